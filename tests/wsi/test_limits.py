"""Checks of untrusted slides cost what the file costs, not what it declares."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.data import BuiltSlide
from tests.hostile import bomb_tiff, giant_tile_tiff
from wsi.array_slide import write_slide_from_array
from wsi.errors import SlideUnreadable
from wsi.limits import (
    FULL_DECODE_PIXELS,
    SlideLimits,
    SlideTooLarge,
    check_declared,
    check_decodes,
    check_tiff_header,
)
from wsi.reader import Slide


@pytest.mark.parametrize(
    ("side", "tile_px", "expect"),
    [(150_000, 4096, "pixels per byte"), (1_000_000, 4096, "SLIDEPIPE_MAX_SLIDE_PIXELS"),
     (100_000, None, "100000 x 100000 px")],
)
def test_bombs_are_refused_from_their_directories(
    tmp_path: Path, side: int, tile_px: int | None, expect: str
) -> None:
    path = tmp_path / "bomb.tif"
    if tile_px is None:
        giant_tile_tiff(path, side)
    else:
        bomb_tiff(path, side, side, tile_px=tile_px)
    started = time.monotonic()
    with pytest.raises(SlideTooLarge, match=expect):
        check_tiff_header(path, SlideLimits())
    assert time.monotonic() - started < 0.5


def test_a_bomb_that_passes_the_ratio_is_sampled_not_decoded_whole(tmp_path: Path) -> None:
    """20k x 20k declared (400 Mpx, 1.2 GB decoded) with the ratio limit off: the check
    decodes ten 256 px regions, not the level."""
    path = bomb_tiff(tmp_path / "b.tif", 20_000, 20_000)
    limits = SlideLimits(max_pixels_per_byte=1e12)
    check_tiff_header(path, limits)
    with Slide(path) as slide:
        assert slide.dimensions[0] * slide.dimensions[1] > FULL_DECODE_PIXELS
        started = time.monotonic()
        assert check_decodes(slide, limits) == "sample"
        assert time.monotonic() - started < 5
        with pytest.raises(SlideTooLarge, match="SLIDEPIPE_UPLOAD_CHECK_S"):
            check_decodes(slide, SlideLimits(check_s=0.0))


def test_real_slides_pass(cmu_svs: Path, lossless_tissue_svs: BuiltSlide) -> None:
    for path in (cmu_svs, lossless_tissue_svs.path):
        check_tiff_header(path, SlideLimits())
        with Slide(path) as slide:
            check_declared(slide, SlideLimits())
            assert check_decodes(slide, SlideLimits()) == "thumbnail"


def test_an_all_white_deflate_pyramid_is_no_bomb(tmp_path: Path) -> None:
    """The most compressible honest slide: 8k x 6k of glass, deflate (about 150 px/byte)."""
    path = tmp_path / "glass.tif"
    write_slide_from_array(path, np.full((256, 256, 3), 255, np.uint8), mpp=0.5,
                           width=8_000, height=6_000, compression="deflate")
    check_tiff_header(path, SlideLimits())
    with Slide(path) as slide:
        check_declared(slide, SlideLimits())
    with pytest.raises(SlideTooLarge, match="SLIDEPIPE_MAX_SLIDE_LEVELS"), Slide(path) as slide:
        check_declared(slide, SlideLimits(max_levels=2))


def test_not_a_tiff_is_left_to_the_readers(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    check_tiff_header(path, SlideLimits())  # nothing to read here; readers refuse it later
    for n, garbage in enumerate((b"\xff" * 12, b"\x01")):  # past the end; a cut header
        broken = tmp_path / f"broken{n}.tif"
        broken.write_bytes(b"II*\x00" + garbage)
        with pytest.raises(SlideUnreadable):
            check_tiff_header(broken, SlideLimits())
