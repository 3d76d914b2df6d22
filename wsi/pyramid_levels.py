"""Pyramid levels for the TIFF writer: area averaging, tile encoding, ordered threads.

A lower level is the area average of level 0, computed in bounded strips (or rendered
by a source that promises the same); tiles are encoded in a small thread pool and handed
to tifffile in order.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, TypedDict, TypeVar

import cv2
import imagecodecs
import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)


#: Level-0 bytes averaged at once when a lower level is computed from level 0.
_AVERAGE_BUDGET_BYTES = 24 * 2**20


class TileSource(Protocol):
    """Pixels of a slide: ``(level, y, x, h, w) -> (h, w, 3) uint8`` in *level* pixels.

    The writer only asks for regions inside the level. A source that sets
    ``renders_levels = True`` is called for every level and must return the area
    average of level 0 (what the writer would compute); otherwise it is only called
    with ``level=0``.
    """

    def __call__(self, level: int, y: int, x: int, h: int, w: int) -> npt.NDArray[np.uint8]: ...


# -- area averaging ---------------------------------------------------------------------
def _block_mean_numpy(region: npt.NDArray[np.uint8], factor: int) -> npt.NDArray[np.uint8]:
    """Block mean with partial last blocks averaged over their real pixels only."""
    vh, vw = region.shape[:2]
    oh, ow = -(-vh // factor), -(-vw // factor)
    padded = np.zeros((oh * factor, ow * factor, region.shape[2]), dtype=np.uint8)
    padded[:vh, :vw] = region
    sums = padded.reshape(oh, factor, ow, factor, -1).sum(axis=(1, 3), dtype=np.uint32)
    ny = np.minimum(factor, vh - np.arange(oh) * factor).astype(np.uint32)
    nx = np.minimum(factor, vw - np.arange(ow) * factor).astype(np.uint32)
    counts = (ny[:, None] * nx[None, :])[..., None]
    mean: npt.NDArray[np.uint8] = ((sums + counts // 2) // counts).astype(np.uint8)
    return mean


def block_mean(
    region: npt.NDArray[np.uint8], factor: int, valid_hw: tuple[int, int]
) -> npt.NDArray[np.uint8]:
    """Mean of ``factor`` x ``factor`` blocks of an (H, W, 3) uint8 array (area average).

    Only the top-left ``valid_hw`` pixels are real; the last row/column of blocks may be
    partial and is averaged over its real pixels only, as a scanner's pyramid does at
    the slide border. Full blocks go through OpenCV's integer-factor area resize (20x
    faster than numpy; it may round differently by one grey level).
    """
    vh, vw = valid_hw
    if factor == 1:
        return np.ascontiguousarray(region[:vh, :vw])
    oh, ow = -(-vh // factor), -(-vw // factor)
    fh, fw = vh // factor, vw // factor
    out = np.empty((oh, ow, region.shape[2]), dtype=np.uint8)
    if fh and fw:
        full = np.ascontiguousarray(region[: fh * factor, : fw * factor])
        out[:fh, :fw] = cv2.resize(full, (fw, fh), interpolation=cv2.INTER_AREA).reshape(fh, fw, -1)
    if fw < ow:
        out[:, fw:] = _block_mean_numpy(region[:vh, fw * factor : vw], factor)
    if fh < oh and fw:
        out[fh:, :fw] = _block_mean_numpy(region[fh * factor : vh, : fw * factor], factor)
    return out


class LevelReader:
    """Regions of any level, rendered by the source or averaged from its level 0."""

    def __init__(
        self,
        source: TileSource,
        width: int,
        height: int,
        downsamples: Sequence[int],
        render_levels: bool,
    ) -> None:
        self.source = source
        self.width, self.height = width, height
        self.downsamples = tuple(int(d) for d in downsamples)
        self.render_levels = render_levels

    def region(self, level: int, y: int, x: int, h: int, w: int) -> npt.NDArray[np.uint8]:
        d = self.downsamples[level]
        if level == 0 or self.render_levels:
            out = np.asarray(self.source(level, y, x, h, w))
            if out.shape != (h, w, 3) or out.dtype != np.uint8:
                raise ValueError(
                    f"tile source returned {out.shape} {out.dtype} for level {level} "
                    f"region {h}x{w}; expected ({h}, {w}, 3) uint8"
                )
            return out
        # average level 0, a strip of level rows at a time (bounded memory)
        out = np.empty((h, w, 3), dtype=np.uint8)
        rows_per_strip = max(1, _AVERAGE_BUDGET_BYTES // (d * d * w * 3))
        x0 = x * d
        x1 = min((x + w) * d, self.width)
        for r in range(0, h, rows_per_strip):
            rh = min(rows_per_strip, h - r)
            y0 = (y + r) * d
            y1 = min((y + r + rh) * d, self.height)
            strip = self.region(0, y0, x0, y1 - y0, x1 - x0)
            out[r : r + rh] = block_mean(strip, d, (y1 - y0, x1 - x0))
        return out


# -- encoding ---------------------------------------------------------------------------
class CodecArgs(TypedDict, total=False):
    """The keywords of ``tifffile.TiffWriter.write`` that name a tile codec."""

    compression: str | None
    subsampling: tuple[int, int]


class TileEncoder:
    """Encodes full tiles; identical uniform tiles (glass) are encoded once."""

    def __init__(self, compression: str, quality: int) -> None:
        self.compression = compression
        self.quality = quality
        self._uniform: dict[tuple[int, ...], bytes] = {}

    def encode(self, tile: npt.NDArray[np.uint8]) -> bytes:
        # uniform iff every row equals the one above and row 0 is one colour; both
        # comparisons are over contiguous memory, 10x faster than broadcasting a pixel
        if np.array_equal(tile[1:], tile[:-1]) and np.array_equal(tile[0, 1:], tile[0, :-1]):
            key = (*tile.shape, *(int(v) for v in tile[0, 0]))
            cached = self._uniform.get(key)
            if cached is None:
                cached = self._encode(tile)
                self._uniform[key] = cached  # dict assignment is atomic under the GIL
            return cached
        return self._encode(tile)

    def _encode(self, tile: npt.NDArray[np.uint8]) -> bytes:
        if self.compression == "jpeg":
            return bytes(
                imagecodecs.jpeg8_encode(
                    tile,
                    level=self.quality,
                    colorspace="RGB",
                    outcolorspace="YCBCR",
                    subsampling=(2, 2),
                )
            )
        if self.compression == "deflate":
            # imagecodecs' stub says bytes, but zlib_encode takes any buffer (an array)
            return bytes(imagecodecs.zlib_encode(tile, level=6))  # type: ignore[arg-type]
        return tile.tobytes()

    def tifffile_args(self) -> CodecArgs:
        if self.compression == "jpeg":
            return {"compression": "jpeg", "subsampling": (2, 2)}
        if self.compression == "deflate":
            return {"compression": "zlib"}
        return {"compression": None}


T = TypeVar("T")
R = TypeVar("R")


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map`` over a thread pool, in order, with at most ``2 * workers`` in flight.

    JPEG encoding and numpy release the GIL, so tiles encode in parallel while the
    bounded queue keeps memory at a handful of tiles.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synthetic") as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def level_tiles(
    reader: LevelReader,
    encoder: TileEncoder,
    level: int,
    dims: tuple[int, int],
    tile_px: int,
    workers: int,
) -> Iterator[bytes]:
    """Encoded tiles of one level, row-major; edge tiles padded by edge replication."""
    lw, lh = dims
    positions = [(ty, tx) for ty in range(0, lh, tile_px) for tx in range(0, lw, tile_px)]

    def make(pos: tuple[int, int]) -> bytes:
        ty, tx = pos
        th, tw = min(tile_px, lh - ty), min(tile_px, lw - tx)
        region = reader.region(level, ty, tx, th, tw)
        if (th, tw) != (tile_px, tile_px):
            # replicate the edge rather than pad with a colour, so that JPEG does not
            # ring across an artificial edge into the real pixels
            region = np.pad(region, ((0, tile_px - th), (0, tile_px - tw), (0, 0)), mode="edge")
        return encoder.encode(np.ascontiguousarray(region))

    return _ordered_map(make, positions, workers)


def thumbnail(reader: LevelReader, dims: tuple[int, int], max_px: int) -> npt.NDArray[np.uint8]:
    """Block mean of the coarsest level to at most ``max_px``, computed in strips."""
    lw, lh = dims
    level = len(reader.downsamples) - 1
    f = max(1, -(-max(lw, lh) // max_px))
    rows = max(f, (_AVERAGE_BUDGET_BYTES // (lw * 3)) // f * f)
    parts = []
    for y in range(0, lh, rows):
        h = min(rows, lh - y)
        parts.append(block_mean(reader.region(level, y, 0, h, lw), f, (h, lw)))
    return np.concatenate(parts, axis=0)

