"""The tissue mask on the result's output grid: a label image written chunk by chunk."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

from workers.engine.streamed_pyramid import StreamedPyramids
from wsi.ome_zarr import ChunkFiles
from wsi.tiling import TilePlan
from wsi.tissue import TissueMask


def _runs(index: np.ndarray) -> tuple[int, int, np.ndarray]:
    """For a non-decreasing index array: its source span [first, last + 1) and how many
    times each source element repeats (0 for one it skips)."""
    first = int(index[0])
    counts = np.bincount(index - first)
    return first, first + len(counts), counts


def write_tissue_label(tissue: ChunkFiles, mask: TissueMask, plan: TilePlan,
                       *, pyramid_from: Path | None = None) -> bool:
    """The tissue mask, nearest-resampled onto the output grid, one chunk at a time
    (a full-width band of a 100k-pixel output would be tens of megabytes).

    Each chunk repeats the few mask pixels it covers (np.repeat along both axes, as
    the sampled indices are non-decreasing) rather than gathering every output pixel,
    which cost ~1 s of a 16k slide's pyramid stage. With ``pyramid_from`` (the staged
    result's root) the label's coarser levels are made as its chunks are written
    (:mod:`wsi.pyramid_stream`); returns whether they were."""
    pyramids = None
    if pyramid_from is not None:  # a first, cheap pass: which chunks will be written
        expected = np.zeros(tissue.n_chunks(), dtype=bool)
        for cy, cx, _ in _tissue_chunks(tissue, mask, plan):
            expected[cy, cx] = True
        pyramids = StreamedPyramids(pyramid_from, expected, tissue.chunks[-1])
        pyramids.attach(tissue, mean=False)
    for cy, cx, block in _tissue_chunks(tissue, mask, plan):
        tissue.write((cy, cx), block())
    return pyramids is not None and bool(pyramids.completed())


def _tissue_chunks(tissue: ChunkFiles, mask: TissueMask, plan: TilePlan,
                   ) -> Iterator[tuple[int, int, Callable[[], np.ndarray]]]:
    """(chunk row, chunk column, its pixels when called) of every chunk with tissue:
    which chunks is known, cheaply, before any is made."""
    height, width = plan.output_shape
    ch, cw = tissue.chunks
    ratio = plan.output_mpp / mask.mpp
    mh, mw = mask.mask.shape
    cols = np.minimum(((np.arange(width) + 0.5) * ratio).astype(np.int64), mw - 1)
    for cy in range(-(-height // ch)):
        rows = np.arange(cy * ch, min((cy + 1) * ch, height))
        r0, r1, row_counts = _runs(np.minimum(((rows + 0.5) * ratio).astype(np.int64), mh - 1))
        if not mask.mask[r0:r1].any():
            continue
        for cx in range(-(-width // cw)):
            c0, c1, col_counts = _runs(cols[cx * cw : (cx + 1) * cw])
            covered = mask.mask[r0:r1, c0:c1]
            if covered.any():
                yield cy, cx, partial(_repeat, covered, row_counts, col_counts)


def _repeat(covered: np.ndarray, row_counts: np.ndarray, col_counts: np.ndarray) -> np.ndarray:
    block = np.repeat(np.repeat(covered, row_counts, axis=0), col_counts, axis=1)
    return block.view(np.uint8)
