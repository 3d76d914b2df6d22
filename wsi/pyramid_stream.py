"""Pyramid levels made while level 0 is written, instead of read back afterwards.

Why: building level 1 from a finished level 0 decodes every level-0 chunk again and
allocates a 2x2-chunk block per level-1 chunk; on a real-tissue identity run that was a
quarter of the whole job, after the inference stage and on nothing else's time. Here
each chunk, as it is written, is halved at once (the same rounded 2x2 mean or nearest
pick as :meth:`wsi.ome_zarr.ResultWriter.build_pyramids`) into its quarter of the
parent chunk; a parent is written when every child that will be written has arrived,
and being a chunk itself, feeds the level above it the same way.

Memory: a parent waits in memory for its children. Tiles run in vertical strips, so
most parents complete within a few chunk rows; a parent whose other children lie in
the next strip would wait a whole strip. At most ``max_open`` parents per level stay in
memory: beyond that the oldest is stored as it is and read back when its next child
arrives (an extra encode and decode for the few parents on strip edges), so memory is
bounded by the strip band, never by the slide's height.

The chunk side must be even, so that no 2x2 block straddles two children; with an odd
one the caller builds the pyramid afterwards as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from wsi.ome_zarr import ChunkFiles, downsample_mean, downsample_nearest

#: Parents kept in memory per level before the oldest is parked in its chunk file.
MAX_OPEN_PARENTS = 24


def parent_mask(children: npt.NDArray[np.bool_], shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """Which chunks of the level above (``shape`` chunks) get at least one child."""
    padded = np.zeros((2 * shape[0], 2 * shape[1]), dtype=bool)
    padded[: children.shape[0], : children.shape[1]] = children
    return np.asarray(padded.reshape(shape[0], 2, shape[1], 2).any(axis=(1, 3)), dtype=bool)


class LevelReducer:
    """Receives the chunks of one level (``add``, from any thread) and writes the level
    above, each parent once it is whole. ``expected`` marks the child chunks that will
    arrive (the others stay at the fill value, as a build from level 0 reads them)."""

    def __init__(self, src: ChunkFiles, dst: ChunkFiles, expected: npt.NDArray[np.bool_], *,
                 mean: bool, max_open: int = MAX_OPEN_PARENTS) -> None:
        c = src.chunks[-1]
        if c % 2 or src.chunks != dst.chunks:
            raise ValueError(f"streamed pyramids need equal, even chunk sides; got {src.chunks} "
                             f"below {dst.chunks}")
        if expected.shape != src.n_chunks()[-2:]:
            raise ValueError(f"expected must be a {src.n_chunks()[-2:]} mask, "
                             f"got {expected.shape}")
        self.src, self.dst, self.mean, self.max_open = src, dst, mean, max(1, max_open)
        n_py, n_px = dst.n_chunks()[-2:]
        self.expected_parents = parent_mask(expected, (n_py, n_px))
        self._waiting = expected.copy()  # children still to come
        pending = np.zeros((2 * n_py, 2 * n_px), dtype=np.int32)
        pending[: expected.shape[0], : expected.shape[1]] = expected
        self._pending = pending.reshape(n_py, 2, n_px, 2).sum(axis=(1, 3))
        self._open: OrderedDict[tuple[int, int], npt.NDArray[np.generic]] = OrderedDict()
        self._parked: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self.parents_parked = 0
        self.peak_open = 0

    @property
    def complete(self) -> bool:
        """Every expected child arrived and every parent is stored."""
        return not self._pending.any() and not self._open

    def add(self, index: tuple[int, ...], data: npt.NDArray[np.generic]) -> None:
        """Child chunk ``index`` (its last two entries: chunk row and column) with its
        pixels, possibly smaller at the level's far edges."""
        cy, cx = index[-2:]
        key = (cy // 2, cx // 2)
        with self._lock:
            if not self._waiting[cy, cx]:
                raise ValueError(f"chunk {tuple(index)} of {self.src.folder} arrived twice "
                                 "or was not announced")
            self._waiting[cy, cx] = False
        # halved outside the lock: the costly part, in parallel across store threads
        half = downsample_mean(data) if self.mean else downsample_nearest(data)
        c2 = self.src.chunks[-1] // 2
        y0, x0 = (cy % 2) * c2, (cx % 2) * c2
        finished = None
        with self._lock:
            parent = self._parent(key)
            parent[..., y0 : y0 + half.shape[-2], x0 : x0 + half.shape[-1]] = half
            self._pending[key] -= 1
            if self._pending[key] == 0:
                finished = self._open.pop(key)
                self._parked.discard(key)
            else:
                self._park_oldest()
        if finished is not None:
            self.dst.write((*self._lead, *key), self._crop(finished, key))

    @property
    def _lead(self) -> tuple[int, ...]:
        return (0,) * (len(self.dst.chunks) - 2)

    def _parent(self, key: tuple[int, int]) -> npt.NDArray[np.generic]:
        parent = self._open.get(key)
        if parent is None:
            if key in self._parked:  # parked earlier: continue from its stored pixels
                parent = self.dst.read((*self._lead, *key)).copy()
            else:
                parent = np.full(self.dst.chunks, self.dst.fill, dtype=self.dst.dtype)
            self._open[key] = parent
            self.peak_open = max(self.peak_open, len(self._open))
        else:
            self._open.move_to_end(key)
        return parent

    def _park_oldest(self) -> None:
        while len(self._open) > self.max_open:
            key, parent = self._open.popitem(last=False)
            # stored without telling the level above: it is not finished
            self.dst.store((*self._lead, *key), self._crop(parent, key))
            self._parked.add(key)
            self.parents_parked += 1

    def _crop(self, parent: npt.NDArray[np.generic], key: tuple[int, int]) -> npt.NDArray[np.generic]:
        c = self.dst.chunks[-1]
        h, w = self.dst.shape[-2:]
        return parent[..., : min(c, h - key[0] * c), : min(c, w - key[1] * c)]


def stream_levels(levels: Sequence[ChunkFiles], expected: npt.NDArray[np.bool_], *,
                  mean: bool, max_open: int = MAX_OPEN_PARENTS) -> list[LevelReducer]:
    """Chain reducers over ``levels`` (level 0 first): each level's chunk files hand
    every chunk written to the reducer that builds the next. ``expected``: the level-0
    chunks that will be written. Returns the reducers, to check ``complete`` after."""
    reducers: list[LevelReducer] = []
    for src, dst in zip(levels, levels[1:]):
        reducer = LevelReducer(src, dst, expected, mean=mean, max_open=max_open)
        src.on_data = reducer.add
        reducers.append(reducer)
        expected = reducer.expected_parents
    return reducers
