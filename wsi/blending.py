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
    than a masked divide of every channel plus a boolean-mask store."""
    inverse = np.zeros_like(weights)
    np.divide(np.float32(scale), weights, out=inverse, where=weights > 0)
    return inverse


class StreamingMerger:
    """Weighted-average merger over a ``(channels, height, width)`` canvas.

    ``boxes`` are the (y, x, h, w) canvas boxes of every tile that will be aggregated
    (clipped to the canvas here); ``sink`` receives each finished chunk exactly once.
    Chunks that no tile touches are never allocated nor sunk.

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
        self.spill_dir, self.horizon = spill_dir, horizon
        # for spilling: which tiles (by arrival index) touch each chunk, in order
        self._touches: dict[tuple[int, int], deque[int]] = {}
        for index, box in enumerate(boxes):
            span = self._chunk_span(box)
            if span is not None:
                cy0, cy1, cx0, cx1 = span
                self._pending[cy0:cy1, cx0:cx1] += 1
                if spill_dir is not None:
                    for cy in range(cy0, cy1):
                        for cx in range(cx0, cx1):
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
        if tile.shape[1:] != self.window.shape:
            raise InvalidParameter(
                f"tile size {tile.shape[1:]} does not match the window {self.window.shape}"
            )
        if tile.dtype != np.float32:
            tile = tile.astype(np.float32)
        y, x = where
        h, w = self.window.shape
        span = self._chunk_span((y, x, h, w))
        if span is None:
            return
        cy0, cy1, cx0, cx1 = span
        c = self.chunk_px
        for cy in range(cy0, cy1):
            for cx in range(cx0, cx1):
                if self._pending[cy, cx] <= 0:
                    raise InvalidParameter(
                        f"tile at {where} touches chunk ({cy}, {cx}) after it was finished; "
                        "aggregate only the boxes given at construction"
                    )
                key = (cy, cx)
                ch, cw = self._chunk_shape(cy, cx)
                if key in self._spilled:
                    self._unspill(key)
                if key not in self._sums:
                    self._sums[key] = np.zeros((self.channels, ch, cw), dtype=np.float32)
                    self._weights[key] = np.zeros((ch, cw), dtype=np.float32)
                    self._extent[key] = [ch, 0, cw, 0]
                    self.peak_open_chunks = max(self.peak_open_chunks, len(self._sums))
                # overlap of tile and chunk, in canvas coordinates
                oy0, oy1 = max(y, cy * c), min(y + h, cy * c + ch)
                ox0, ox1 = max(x, cx * c), min(x + w, cx * c + cw)
                win = self.window[oy0 - y : oy1 - y, ox0 - x : ox1 - x]
                src = tile[:, oy0 - y : oy1 - y, ox0 - x : ox1 - x]
                dst = (slice(oy0 - cy * c, oy1 - cy * c), slice(ox0 - cx * c, ox1 - cx * c))
                sums = self._sums[key]
                for channel in range(self.channels):  # OpenCV: acc += src * win, one pass
                    cv2.accumulateProduct(src[channel], win, sums[channel][dst])
                cv2.accumulate(win, self._weights[key][dst])
                extent = self._extent[key]
                extent[0], extent[1] = min(extent[0], dst[0].start), max(extent[1], dst[0].stop)
                extent[2], extent[3] = min(extent[2], dst[1].start), max(extent[3], dst[1].stop)
                self._pending[cy, cx] -= 1
                if self._pending[cy, cx] == 0:
                    self._flush(key)
                elif self.spill_dir is not None:
                    self._maybe_spill(key)
        self._arrived += 1

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
                np.save(stem.with_suffix(suffix), part)
                self.bytes_spilled += part.nbytes
            self._spilled.add(key)
            self.chunks_spilled += 1

    def _unspill(self, key: tuple[int, int]) -> None:
        assert self.spill_dir is not None
        stem = self.spill_dir / f"{key[0]}_{key[1]}"
        ch, cw = self._chunk_shape(*key)
        y0, y1, x0, x1 = self._extent[key]
        self._sums[key] = np.zeros((self.channels, ch, cw), dtype=np.float32)
        self._weights[key] = np.zeros((ch, cw), dtype=np.float32)
        for suffix, target in ((".sum.npy", self._sums[key][..., y0:y1, x0:x1]),
                               (".weight.npy", self._weights[key][y0:y1, x0:x1])):
            path = stem.with_suffix(suffix)
            target[...] = np.load(path)
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
