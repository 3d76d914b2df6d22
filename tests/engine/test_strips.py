"""Strip widths of the engine's tile order: strip edges on chunk edges where the stride
allows it, so that a chunk two strips share parks only the overhang on disk."""

from __future__ import annotations

import math

import pytest

from workers.engine import STRIP_CHUNKS, strip_px
from wsi.tiling import TileGeometry


@pytest.mark.parametrize(("tile_px", "overlap_px", "chunk_px", "output_stride"),
                         [(256, 32, 512, 1), (512, 64, 512, 1), (256, 64, 256, 1),
                          (256, 0, 512, 1), (512, 128, 512, 4)])
def test_strips_end_on_chunk_edges_near_the_nominal_width(
    tile_px: int, overlap_px: int, chunk_px: int, output_stride: int
) -> None:
    g = TileGeometry(tile_px=tile_px, overlap_px=overlap_px, output_stride=output_stride)
    width = strip_px(chunk_px, g)
    chunk_target = chunk_px * output_stride
    assert width % g.stride_px == 0, "a whole number of tile columns"
    assert width % chunk_target == 0, "the next strip's first tile starts on a chunk edge"
    nominal = STRIP_CHUNKS * chunk_target
    assert nominal / 2 <= width <= 2 * nominal


def test_incommensurate_strides_keep_the_nominal_width() -> None:
    """A stride sharing no useful factor with the chunk (lcm far beyond the nominal
    width) keeps STRIP_CHUNKS chunks rather than a huge strip."""
    g = TileGeometry(tile_px=251, overlap_px=0)
    assert math.lcm(251, 512) > 2 * STRIP_CHUNKS * 512
    assert strip_px(512, g) == STRIP_CHUNKS * 512
