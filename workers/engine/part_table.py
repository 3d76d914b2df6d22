"""Where to cut a run into parts whose results are bit-identical to one whole run.

A part is a contiguous range of the whole run's *batches* (same batch size, same order),
so a model sees exactly the batches it would see in one run (convolutions may depend on
what else is in the batch). A part *owns* the output chunks whose last touching tile
lies in its own batches, and runs from the earliest batch any of those chunks needs: the
blending merger then adds every tile of an owned chunk in plan order, the same float
operations as one run, and writes only owned chunks (the others it sees partially).

The cost of a cut is the tiles two parts both run. The plan goes in vertical strips
(:func:`workers.engine.geometry.strip_px`), and a chunk on a strip's left edge is touched
by the previous strip's overhang, so a cut costs about one strip of tiles when tiles
overlap and nothing when they do not. :func:`plan_parts` places the cuts so that the
largest part (own batches plus the batches it re-runs) is as small as possible; when no
cut pays off it returns fewer parts than asked, down to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from wsi.tiling import TilePlan


@dataclass(frozen=True)
class PartRange:
    """One part: the batches whose tiles and chunks it owns, and those it runs."""

    index: int
    own_batches: tuple[int, int]  # [first, end): tile-grid entries and chunks it stores
    run_batches: tuple[int, int]  # [first, end): batches it reads and runs (ends with own)

    def own_tiles(self, batch_size: int, n_tiles: int) -> tuple[int, int]:
        """Plan positions [start, end) of the tiles this part owns."""
        return (min(self.own_batches[0] * batch_size, n_tiles),
                min(self.own_batches[1] * batch_size, n_tiles))

    def run_tiles(self, batch_size: int, n_tiles: int) -> tuple[int, int]:
        """Plan positions [start, end) of the tiles this part runs."""
        return (min(self.run_batches[0] * batch_size, n_tiles),
                min(self.run_batches[1] * batch_size, n_tiles))

    def to_dict(self) -> dict[str, list[int]]:
        return {"own": list(self.own_batches), "run": list(self.run_batches)}

    @classmethod
    def from_dict(cls, index: int, data: dict[str, list[int]]) -> PartRange:
        own, run = data["own"], data["run"]
        return cls(index, (int(own[0]), int(own[1])), (int(run[0]), int(run[1])))


def chunk_touches(plan: TilePlan, chunk_px: int) -> tuple[npt.NDArray[np.int64],
                                                           npt.NDArray[np.int64]]:
    """Plan positions of the first and the last tile touching each output chunk
    ((n_cy, n_cx) arrays; -1 where no tile touches), clipped to the canvas as the
    merger clips (:class:`wsi.blending.StreamingMerger`)."""
    height, width = plan.output_shape
    n_cy, n_cx = -(-height // chunk_px), -(-width // chunk_px)
    first = np.full((n_cy, n_cx), -1, np.int64)
    last = np.full((n_cy, n_cx), -1, np.int64)
    for position, tile in enumerate(plan.tiles):
        y, x, h, w = plan.output_box(tile)
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, height), min(x + w, width)
        if y1 <= y0 or x1 <= x0:
            continue
        rows = slice(y0 // chunk_px, (y1 - 1) // chunk_px + 1)
        cols = slice(x0 // chunk_px, (x1 - 1) // chunk_px + 1)
        block = first[rows, cols]
        block[block < 0] = position
        last[rows, cols] = position
    return first, last


def _greedy(needs: npt.NDArray[np.int64], max_work: int,
            limit: int) -> list[tuple[int, int, int]] | None:
    """Cut batches left to right, each part as long as its work (own batches plus the
    earlier ones its chunks need) stays within ``max_work``; None if more than
    ``limit`` parts (or a single batch) would be needed. Returns (start, end, run_from)."""
    parts: list[tuple[int, int, int]] = []
    start, n_batches = 0, len(needs)
    while start < n_batches:
        if len(parts) == limit:
            return None
        run_from, end = start, start
        while end < n_batches:
            candidate = min(run_from, int(needs[end]))
            if end + 1 - candidate > max_work:
                break
            run_from, end = candidate, end + 1
        if end == start:
            return None
        parts.append((start, end, run_from))
        start = end
    return parts


def plan_parts(plan: TilePlan, chunk_px: int, batch_size: int, n_parts: int) -> list[PartRange]:
    """At most ``n_parts`` parts covering every batch once as owner, with the smallest
    largest part (see the module docstring)."""
    n_tiles = len(plan.tiles)
    n_batches = -(-n_tiles // batch_size)
    if n_batches == 0 or n_parts <= 1:
        return [PartRange(0, (0, n_batches), (0, n_batches))]
    first, last = chunk_touches(plan, chunk_px)
    touched = last >= 0
    # needs[b]: the earliest batch that a chunk finished in batch b needs
    needs = np.arange(n_batches, dtype=np.int64)
    np.minimum.at(needs, last[touched] // batch_size, first[touched] // batch_size)
    limit = min(n_parts, n_batches)
    lo, hi = -(-n_batches // limit), n_batches  # hi is always feasible (one part)
    while lo < hi:
        mid = (lo + hi) // 2
        if _greedy(needs, mid, limit) is None:
            lo = mid + 1
        else:
            hi = mid
    cuts = _greedy(needs, lo, limit)
    assert cuts is not None
    return [PartRange(i, (start, end), (run_from, end))
            for i, (start, end, run_from) in enumerate(cuts)]


def owned_chunks(last: npt.NDArray[np.int64], own_tiles: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """Which chunks a part stores: those whose last touching tile it owns."""
    return (last >= own_tiles[0]) & (last < own_tiles[1])
