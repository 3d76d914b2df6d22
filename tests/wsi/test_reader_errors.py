"""The reader facade on files that are not (whole) slides: clear errors, never a crash."""


from pathlib import Path

import imagecodecs
import numpy as np
import pytest

from tests.data import CORRUPT_TILE_BOX, BuiltSlide, tile_byte_range
from tests.wsi.test_reader import BACKENDS, assert_same_pixels
from wsi.errors import (
    RegionUnreadable,
    SlideUnreadable,
)
from wsi.reader import Slide

# -- files that are not (whole) slides --------------------------------------------------
NOT_SLIDES = ("text_file", "empty_file", "boxes_png", "truncated_svs")


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("name", NOT_SLIDES)
def test_non_slides_are_unreadable(request: pytest.FixtureRequest, name: str, backend: str) -> None:
    path: Path = request.getfixturevalue(name)
    with pytest.raises(SlideUnreadable) as info:
        Slide(path, backend=backend)
    message = str(info.value)
    assert path.name in message
    if backend == "auto" and "truncated" not in message:
        # the user sees why each library refused it (a truncated TIFF is refused
        # before either library is tried, with the byte counts as the reason)
        assert "openslide" in message and "tiffslide" in message
    assert isinstance(info.value, OSError)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_truncated_pyramid_is_unreadable(truncated_pyramid_svs: Path, backend: str) -> None:
    """A pyramid cut at 70%: IFD 0 survives, the lower levels and the tail do not.

    openslide refuses it; tiffslide (tifffile) opens what is left (level 0 only) and
    only fails once a missing tile is decoded, so an upload would accept the file.
    """
    with pytest.raises(SlideUnreadable, match="truncated_pyramid.svs"):
        Slide(truncated_pyramid_svs, backend=backend)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_unopenable_tiff_is_unreadable(unopenable_tiff: Path, backend: str) -> None:
    """openslide's fixture with compression 52479: nothing can decode its pixels."""
    with pytest.raises(SlideUnreadable, match="unopenable.tiff"):
        Slide(unopenable_tiff, backend=backend)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideUnreadable, match="no slide file"):
        Slide(tmp_path / "nope.svs")
    with pytest.raises(SlideUnreadable, match="no slide in folder"):
        Slide(tmp_path)  # a folder without a DICOM series, MRXS or slide file is none


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_tile_raises_region_unreadable(corrupt_tile_svs: BuiltSlide, backend: str) -> None:
    x, y, w, h = CORRUPT_TILE_BOX
    with Slide(corrupt_tile_svs.path, backend=backend) as slide:
        good = slide.read_level(0, 0, 0, 256, 256)  # another tile decodes fine
        assert_same_pixels(good, stored_level_safe(corrupt_tile_svs), "intact tile")
        with pytest.raises(RegionUnreadable, match=f"x={x - 10} y={y + 10}"):
            slide.read_level(0, x - 10, y + 10, 32, 32)
        with pytest.raises(OSError):  # callers that only know OSError still catch it
            slide.read_level(0, x, y, w, h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_intact_regions_still_read_after_a_corrupt_one(
    corrupt_tile_svs: BuiltSlide, backend: str
) -> None:
    """RegionUnreadable means "this region", not "this slide": the rest stays readable.

    openslide makes a handle unusable after any error (the error is sticky), so
    without a reopen one bad tile would fail every later read of the slide.
    """
    x, y, w, h = CORRUPT_TILE_BOX
    with Slide(corrupt_tile_svs.path, backend=backend) as slide:
        with pytest.raises(RegionUnreadable):
            slide.read_level(0, x, y, w, h)
        good = slide.read_level(0, 0, 0, 256, 256)
        assert_same_pixels(good, stored_level_safe(corrupt_tile_svs), "intact tile after")


def stored_level_safe(built: BuiltSlide) -> np.ndarray:
    """Tile 0 of level 0 of the corrupt slide, decoded straight from its bytes."""
    offset, count = tile_byte_range(built.path, page=0, tile_index=0)
    with built.path.open("rb") as fh:
        fh.seek(offset)
        return imagecodecs.jpeg8_decode(fh.read(count))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreadable_svs_fixture(unreadable_svs: Path, backend: str) -> None:
    """openslide's own corrupt-JPEG fixture: both libraries open it, but its first tile
    does not decode, so the facade refuses it at open time with the decoder's reason."""
    with pytest.raises(SlideUnreadable, match="unreadable.svs.*level 0 does not decode"):
        Slide(unreadable_svs, backend=backend)


def test_slide_is_a_context_manager(cmu_svs: Path) -> None:
    with Slide(cmu_svs, backend="openslide") as slide:
        assert "openslide" in repr(slide) and "2220" in repr(slide)
        assert slide.properties["openslide.vendor"] == "aperio"
    with Slide(cmu_svs) as slide:
        assert "tiffslide" in repr(slide) and slide.vendor == "aperio"
