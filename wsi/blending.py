"""Blending overlapping tile outputs into one seamless canvas, chunk by chunk.

Every tile output is multiplied by a weight window that peaks at the tile centre and
falls towards its border, accumulated as a weighted sum and a weight sum, and divided.
Accumulation is per output chunk and streaming: the merger knows every tile box in
advance, counts how many tiles still touch each chunk, and hands a chunk to ``sink`` as
soon as that count reaches zero. With tiles in row-major order, memory is bounded by
about two rows of chunks, never by the slide's area. With tiles in vertical strips (see
``wsi.tiling.plan_tiles(strip_px=...)``) and a ``spill_dir``, a chunk that no tile will
touch for more than ``horizon`` tiles (the strip's right edge, waiting for the next
strip) is parked on disk, so memory is a few rows of one strip, whatever the width.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from wsi.errors import InvalidParameter

WINDOWS: tuple[str, ...] = ("tent", "gaussian", "constant")

#: Smallest weight any pixel of a tile gets. Non-zero so that a slide-border pixel that
#: only one tile's edge covers is still normalised to that tile's value, never lost.
WINDOW_FLOOR = 1e-3

#: Called with (chunk_y, chunk_x, blended (C, h, w) float32, weight sum (h, w) float32);
#: from a merger made with ``normalize=False``, the weighted sums instead of ``blended``.
ChunkSink = Callable[[int, int, npt.NDArray[np.float32], npt.NDArray[np.float32]], None]


def weight_window(
    height: int, width: int, *, kind: str = "tent", sigma_scale: float = 0.125
) -> npt.NDArray[np.float32]:
    """A (height, width) float32 window, 1 at the centre, ``WINDOW_FLOOR`` at worst.

    ``tent``: product of the per-axis distances to the tile border (linear ramps).
    ``gaussian``: as MONAI's, sigma = ``sigma_scale`` x tile size. ``constant``: plain
    averaging, kept for comparison.
    """
    if height < 1 or width < 1:
        raise InvalidParameter(f"window size must be positive, got {height}x{width}")
    if kind not in WINDOWS:
        raise InvalidParameter(f"window must be one of {', '.join(WINDOWS)}, got {kind!r}")
    if kind == "constant":
        return np.ones((height, width), dtype=np.float32)

    def axis(n: int) -> npt.NDArray[np.float64]:
        i = np.arange(n, dtype=np.float64) + 0.5
        if kind == "tent":
            return np.minimum(i, n - i) / (n / 2)
        sigma = max(sigma_scale * n, 1e-6)
        return np.exp(-((i - n / 2) ** 2) / (2 * sigma**2))

    window = np.outer(axis(height), axis(width))
    window /= window.max()
    return np.maximum(window, WINDOW_FLOOR).astype(np.float32)


def inverse_weights(
    weights: npt.NDArray[np.float32], scale: float = 1.0
) -> npt.NDArray[np.float32]:
    """``scale / weights`` where a tile covered the pixel, 0 where none did.

    One reciprocal per pixel, then a broadcast multiply over the channels, is ~5x faster
    than a masked divide of every channel plus a boolean-mask store. The reciprocal is
    OpenCV's (the same correctly rounded float32 division as numpy's, 0.04 ms against
    0.44 ms for numpy's masked divide on a 512 px chunk); only chunks at the tissue's
    edge have uncovered pixels to zero."""
    inverse = np.asarray(cv2.divide(float(np.float32(scale)), weights), dtype=np.float32)
    if weights.size and weights.min() <= 0:
        inverse[weights <= 0] = 0
    return inverse


class StreamingMerger:
    """Weighted-average merger over a ``(channels, height, width)`` canvas.

    ``boxes`` are the (y, x, h, w) canvas boxes of every tile that will be aggregated
    (clipped to the canvas here); ``sink`` receives each finished chunk exactly once.
    Chunks that no tile touches are never allocated nor sunk; with ``chunks`` (a boolean
    mask over the chunk grid) only those chunks are accumulated and sunk, so that mergers
    over disjoint masks can blend the same tiles on several threads.

    ``normalize=False`` hands the sink the weighted sums and weights undivided, for a
    sink that folds the division into a pass it makes anyway (the engine's uint8 store
    multiplies by ``scale / weight`` on the way to uint8): one float pass less per chunk
    on the merging thread, which is the engine's serial stage.
    """

    def __init__(
        self,
        *,
        channels: int,
        shape: tuple[int, int],
        chunk_px: int,
        boxes: Sequence[tuple[int, int, int, int]],
        window: npt.NDArray[np.floating[Any]],
        sink: ChunkSink,
        spill_dir: Path | None = None,
        horizon: int = 0,
        normalize: bool = True,
        chunks: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        if channels < 1 or chunk_px < 1 or min(shape) < 1:
            raise InvalidParameter(
                f"bad merger geometry: channels={channels} shape={shape} chunk_px={chunk_px}"
            )
        self.channels = channels
        self.height, self.width = shape
        self.chunk_px = chunk_px
        self.window = window.astype(np.float32, copy=False)
        self.sink = sink
        self.normalize = normalize
        n_cy = -(-self.height // chunk_px)
        n_cx = -(-self.width // chunk_px)
        self._pending = np.zeros((n_cy, n_cx), dtype=np.int32)
        # the chunks this merger handles (all by default); several mergers over disjoint
        # sets blend one canvas on several threads, each chunk in tile order on one
        self._mine = np.ones((n_cy, n_cx), dtype=bool) if chunks is None else chunks
        if self._mine.shape != (n_cy, n_cx):
            raise InvalidParameter(
                f"chunks must be a ({n_cy}, {n_cx}) mask, got shape {self._mine.shape}")
        self.spill_dir, self.horizon = spill_dir, horizon
        # for spilling: which tiles (by arrival index) touch each chunk, in order
        self._touches: dict[tuple[int, int], deque[int]] = {}
        for index, box in enumerate(boxes):
            span = self._chunk_span(box)
            if span is not None:
                cy0, cy1, cx0, cx1 = span
                self._pending[cy0:cy1, cx0:cx1] += self._mine[cy0:cy1, cx0:cx1]
                if spill_dir is not None:
                    for cy in range(cy0, cy1):
                        for cx in range(cx0, cx1):
                            if self._mine[cy, cx]:
                                self._touches.setdefault((cy, cx), deque()).append(index)
        self._arrived = 0
        # chunk-local (y0, y1, x0, x1) that tiles have touched, per open or parked chunk
        self._extent: dict[tuple[int, int], list[int]] = {}
        self._spilled: set[tuple[int, int]] = set()
        self.chunks_spilled = 0
        self.bytes_spilled = 0  # array bytes parked on disk over the run
        self._sums: dict[tuple[int, int], npt.NDArray[np.float32]] = {}
        self._weights: dict[tuple[int, int], npt.NDArray[np.float32]] = {}
        self.chunks_written = 0
        self.peak_open_chunks = 0

    def _clip(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
        y, x, h, w = box
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + h, self.height), min(x + w, self.width)
        return None if y1 <= y0 or x1 <= x0 else (y0, x0, y1, x1)

    def _chunk_span(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
        clipped = self._clip(box)
        if clipped is None:
            return None
        y0, x0, y1, x1 = clipped
        c = self.chunk_px
        return y0 // c, (y1 - 1) // c + 1, x0 // c, (x1 - 1) // c + 1

    def _chunk_shape(self, cy: int, cx: int) -> tuple[int, int]:
        c = self.chunk_px
        return min(c, self.height - cy * c), min(c, self.width - cx * c)

    def aggregate(self, tile: npt.NDArray[np.floating[Any]], where: tuple[int, int]) -> None:
        """Add one (C, h, w) tile output whose top-left canvas pixel is ``where``."""
        if tile.ndim != 3 or tile.shape[0] != self.channels:
            raise InvalidParameter(
                f"tile must be ({self.channels}, h, w), got shape {tile.shape}"
            )
        self.aggregate_batch(tile[None], [where])

    def aggregate_batch(self, tiles: Any, wheres: Sequence[tuple[int, int]]) -> None:
        """Add ``n`` (C, h, w) tile outputs, given as one (n, C, h, w) array, whose
        top-left canvas pixels are ``wheres``, in that order.

        Why batches: one call, one type check and one float32 conversion per batch,
        and the bookkeeping per tile-chunk overlap, not per channel. The sums are the
        same float operations in the same tile order as one tile at a time, so a chunk
        is bit-identical whichever way the tiles are grouped into batches or threads
        (``chunks``), and in a part of a plan for the chunks only the part's tiles touch."""
        shape = tuple(tiles.shape)
        if len(shape) != 4 or shape[1] != self.channels:
            raise InvalidParameter(
                f"tiles must be (n, {self.channels}, h, w), got shape {shape}"
            )
        if shape[2:] != self.window.shape:
            raise InvalidParameter(
                f"tile size {shape[2:]} does not match the window {self.window.shape}"
            )
        if len(wheres) != shape[0]:
            raise InvalidParameter(f"{shape[0]} tiles but {len(wheres)} positions")
        batch = self._as_float32(tiles)
        window = self._window
        h, w = self.window.shape
        c = self.chunk_px
        for i, where in enumerate(wheres):
            y, x = where
            span = self._chunk_span((y, x, h, w))
            if span is None:
                self._arrived += 1
                continue
            cy0, cy1, cx0, cx1 = span
            tile = batch[i]
            mine = self._mine
            for cy in range(cy0, cy1):
                for cx in range(cx0, cx1):
                    if not mine[cy, cx]:
                        continue
                    if self._pending[cy, cx] <= 0:
                        raise InvalidParameter(
                            f"tile at {where} touches chunk ({cy}, {cx}) after it was "
                            "finished; aggregate only the boxes given at construction"
                        )
                    key = (cy, cx)
                    if key in self._spilled:
                        self._unspill(key)
                    if key not in self._sums:
                        ch, cw = self._chunk_shape(cy, cx)
                        self._sums[key] = self._zeros((self.channels, ch, cw))
                        self._weights[key] = self._zeros((ch, cw))
                        self._extent[key] = [ch, 0, cw, 0]
                        self.peak_open_chunks = max(self.peak_open_chunks, len(self._sums))
                    # overlap of tile and chunk, in chunk and in tile coordinates
                    ch, cw = self._chunk_shape(cy, cx)
                    ty0, ty1 = max(y, cy * c) - y, min(y + h, cy * c + ch) - y
                    tx0, tx1 = max(x, cx * c) - x, min(x + w, cx * c + cw) - x
                    dy0, dx0 = y + ty0 - cy * c, x + tx0 - cx * c
                    dy1, dx1 = dy0 + ty1 - ty0, dx0 + tx1 - tx0
                    self._accumulate(self._sums[key][:, dy0:dy1, dx0:dx1],
                                     self._weights[key][dy0:dy1, dx0:dx1],
                                     tile[:, ty0:ty1, tx0:tx1], window[ty0:ty1, tx0:tx1])
                    extent = self._extent[key]
                    extent[0], extent[1] = min(extent[0], dy0), max(extent[1], dy1)
                    extent[2], extent[3] = min(extent[2], dx0), max(extent[3], dx1)
                    self._pending[cy, cx] -= 1
                    if self._pending[cy, cx] == 0:
                        self._flush(key)
                    elif self.spill_dir is not None:
                        self._maybe_spill(key)
            self._arrived += 1

    # -- array hooks: numpy here; a subclass keeps its buffers elsewhere (a GPU) -----------
    @property
    def _window(self) -> Any:
        """The weight window in the buffers' array type."""
        return self.window

    def _as_float32(self, tiles: Any) -> Any:
        return tiles if tiles.dtype == np.float32 else tiles.astype(np.float32)

    def _accumulate(self, sums: Any, weights: Any, tile: Any, window: Any) -> None:
        """``sums += tile * window`` (one fused multiply-add per value, a single
        rounding: OpenCV's, in one pass, ~3x faster than numpy's multiply then add) and
        ``weights += window``, over the overlap of one tile and one chunk.

        One OpenCV call per channel: a few microseconds each against tens of thousands
        of pixels, and the same fused rounding as torch's ``addcmul_`` on the device
        path, so both store the same pixels."""
        for channel in range(len(tile)):
            cv2.accumulateProduct(tile[channel], window, sums[channel])
        cv2.accumulate(window, weights)

    def _zeros(self, shape: tuple[int, ...]) -> Any:
        return np.zeros(shape, dtype=np.float32)

    def _to_host(self, part: Any) -> npt.NDArray[np.float32]:
        return np.asarray(part)

    def _load_into(self, target: Any, data: npt.NDArray[np.float32]) -> None:
        target[...] = data

    def _maybe_spill(self, key: tuple[int, int]) -> None:
        """Park a chunk on disk when its next tile is more than ``horizon`` tiles away.
        Only the part that tiles have touched is written (at a strip edge, often just
        the previous strip's overhang); the rest is zero."""
        touches = self._touches[key]
        while touches and touches[0] <= self._arrived:
            touches.popleft()
        if touches and touches[0] - self._arrived > self.horizon:
            assert self.spill_dir is not None
            y0, y1, x0, x1 = self._extent[key]
            stem = self.spill_dir / f"{key[0]}_{key[1]}"
            for suffix, part in ((".sum.npy", self._sums.pop(key)[:, y0:y1, x0:x1]),
                                 (".weight.npy", self._weights.pop(key)[y0:y1, x0:x1])):
                part = self._to_host(part)
                np.save(stem.with_suffix(suffix), part)
                self.bytes_spilled += part.nbytes
            self._spilled.add(key)
            self.chunks_spilled += 1

    def _unspill(self, key: tuple[int, int]) -> None:
        assert self.spill_dir is not None
        stem = self.spill_dir / f"{key[0]}_{key[1]}"
        ch, cw = self._chunk_shape(*key)
        y0, y1, x0, x1 = self._extent[key]
        self._sums[key] = self._zeros((self.channels, ch, cw))
        self._weights[key] = self._zeros((ch, cw))
        for suffix, target in ((".sum.npy", self._sums[key][..., y0:y1, x0:x1]),
                               (".weight.npy", self._weights[key][y0:y1, x0:x1])):
            path = stem.with_suffix(suffix)
            self._load_into(target, np.load(path))
            path.unlink()
        self._spilled.discard(key)

    def _flush(self, key: tuple[int, int]) -> None:
        sums = self._sums.pop(key)
        weights = self._weights.pop(key)
        del self._extent[key]
        if self.normalize:
            sums *= inverse_weights(weights)
        self.sink(key[0], key[1], sums, weights)
        self.chunks_written += 1

    def finalize(self) -> None:
        """Check that every announced tile arrived (so every touched chunk was sunk)."""
        missing = int(self._pending.sum())
        if missing:
            raise InvalidParameter(
                f"{missing} tile-chunk contributions never arrived; the merger was "
                "finalised before all announced tiles were aggregated"
            )
