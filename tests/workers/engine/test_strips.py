"""The engine's output grid: strip widths (strip edges on chunk edges where the stride
allows it, so that a chunk two strips share parks only the overhang on disk) and the
tissue label resampled onto it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import zarr

from workers.engine.geometry import STRIP_CHUNKS, strip_px
from workers.engine.run import write_tissue_label
from wsi.ome_zarr import LabelSpec, ResultWriter
from wsi.tiling import TileGeometry, TilePlan
from wsi.tissue import TissueMask


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


@pytest.mark.parametrize("output_mpp", [0.5, 3.0, 8.0, 20.0])
def test_tissue_label_is_the_nearest_resampled_mask(tmp_path: Path, output_mpp: float) -> None:
    """write_tissue_label repeats mask pixels chunk by chunk; the result equals gathering
    the nearest mask pixel (centre rule) for every output pixel, finer or coarser."""
    rng = np.random.default_rng(int(output_mpp * 10))
    mask = TissueMask(mask=rng.random((37, 53)) < 0.4, mpp=8.0)
    height, width = int(37 * 8 / output_mpp), int(53 * 8 / output_mpp)
    plan = TilePlan(target_mpp=output_mpp, width=width, height=height,
                    geometry=TileGeometry(tile_px=16), n_rows=1, n_cols=1, tiles=[])
    writer = ResultWriter(tmp_path / "r.zarr", height=height, width=width, mpp=output_mpp,
                          chunk_px=64)
    label = writer.create_label(LabelSpec("tissue", {1: ("tissue", (0, 200, 0, 110))}))
    write_tissue_label(writer.chunk_files(label), mask, plan)
    rows = np.minimum(((np.arange(height) + 0.5) * output_mpp / 8.0).astype(int), 36)
    cols = np.minimum(((np.arange(width) + 0.5) * output_mpp / 8.0).astype(int), 52)
    expected = mask.mask[np.ix_(rows, cols)].astype(np.uint8)
    got = np.asarray(zarr.open_group(str(tmp_path / "r.zarr"), mode="r")["labels/tissue/0"])
    np.testing.assert_array_equal(got, expected)
