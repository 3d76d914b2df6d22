"""Regions of tiled TIFF levels assembled from a shared cache of decoded tiles.

Why: a 256 px read through tiffslide's ``read_region`` goes through zarr and decodes
every slide tile the region touches, again for each overlapping request, so a tiled
pass over a slide with overlap decodes each JPEG tile up to four times; openslide caches
decoded tiles but spends most of a read in cairo compositing and ARGB conversion. Here
each slide tile's bytes are read with ``os.pread`` (no shared file position, so any
number of threads may read at once), decoded once with the page's own codec (tifffile's
``page.decode``: JPEG tables, YCbCr and every compression tifffile knows), kept in a
byte-bounded LRU cache shared by all threads, and copied into the requested region.
Two threads asking for the same tile wait for one decode. A slide in an object store
(:mod:`wsi.remote`) gives the bytes by one ranged request per tile instead of ``pread``.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from wsi.errors import RegionUnreadable

#: Decoded bytes kept per slide handle, as openslide's own default cache: a few rows of
#: slide tiles across a processing strip.
DEFAULT_CACHE_BYTES = 32 << 20

TileKey = tuple[int, int]  # (level, tile index)


class DecodedTileCache:
    """LRU of decoded tiles by key, bounded in bytes, safe to share between threads."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.decodes = 0
        self._tiles: OrderedDict[TileKey, npt.NDArray[np.uint8]] = OrderedDict()
        self._loading: dict[TileKey, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, key: TileKey, decode: Callable[[], npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
        """The tile for ``key``, calling ``decode`` only if no thread has it or is making it."""
        while True:
            with self._lock:
                tile = self._tiles.get(key)
                if tile is not None:
                    self._tiles.move_to_end(key)
                    return tile
                waiting = self._loading.get(key)
                if waiting is None:
                    done = self._loading[key] = threading.Event()
                    break
            waiting.wait()  # another thread decodes it; then look again (it may have failed)
        try:
            tile = decode()
            tile.setflags(write=False)  # shared: callers copy out of it
            with self._lock:
                self._tiles[key] = tile
                self.bytes += tile.nbytes
                self.decodes += 1
                while self.bytes > self.max_bytes and len(self._tiles) > 1:
                    _, old = self._tiles.popitem(last=False)
                    self.bytes -= old.nbytes
            return tile
        finally:
            with self._lock:
                del self._loading[key]
            done.set()

    def clear(self) -> None:
        with self._lock:
            self._tiles.clear()
            self.bytes = 0


@dataclass(frozen=True)
class TiledLevel:
    """Where one level's tiles lie in the file and how to decode one."""

    index: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    samples: int
    offsets: Sequence[int]
    byte_counts: Sequence[int]
    decode_segment: Callable[..., Any]  # tifffile's page.decode
    jpegtables: bytes | None

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)


def tiled_level(index: int, page: Any) -> TiledLevel | None:
    """A :class:`TiledLevel` for a tifffile page that holds a whole level as contiguous
    uint8 RGB tiles, or ``None`` (strips, planar or other layouts stay with tiffslide)."""
    try:
        fits = (
            page.is_tiled and page.imagedepth == 1 and page.samplesperpixel == 3
            and page.planarconfig == 1 and np.dtype(page.dtype) == np.uint8
            and not getattr(page, "is_ndpi", False)
            and len(page.dataoffsets) == -(-page.imagelength // page.tilelength)
            * -(-page.imagewidth // page.tilewidth)
        )
        if not fits:
            return None
        return TiledLevel(
            index=index, width=int(page.imagewidth), height=int(page.imagelength),
            tile_w=int(page.tilewidth), tile_h=int(page.tilelength), samples=3,
            offsets=page.dataoffsets, byte_counts=page.databytecounts,
            decode_segment=page.decode, jpegtables=page.jpegtables,
        )
    except (AttributeError, TypeError, ValueError):
        return None


class RangeSource(Protocol):
    """Bytes at an offset, safe to call from any thread (a remote slide's ranged reads)."""

    def read_at(self, count: int, offset: int) -> bytes: ...


class TiledReader:
    """Reads regions of tiled levels of one file, through one :class:`DecodedTileCache`."""

    def __init__(self, source: Path | RangeSource, levels: Sequence[TiledLevel],
                 cache: DecodedTileCache | None = None) -> None:
        self.levels = {level.index: level for level in levels}
        self.cache = cache or DecodedTileCache()
        self._remote = None if isinstance(source, Path) else source
        self._fd = os.open(source, os.O_RDONLY) if isinstance(source, Path) else -1

    def covers(self, level: int) -> bool:
        return level in self.levels

    def _decode(self, level: TiledLevel, index: int) -> npt.NDArray[np.uint8]:
        shape = (level.tile_h, level.tile_w, level.samples)
        count = int(level.byte_counts[index])
        if count == 0:  # a sparse TIFF's missing tile: the fill value, as tifffile reads it
            return np.zeros(shape, np.uint8)
        offset = int(level.offsets[index])
        if self._remote is not None:
            data = self._remote.read_at(count, offset)
        else:
            data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise RegionUnreadable(
                f"tile {index} of level {level.index} is truncated: {len(data)} of {count} bytes"
            )
        try:
            segment, _, _ = level.decode_segment(data, index, jpegtables=level.jpegtables)
        except Exception as err:  # imagecodecs raises its own per-codec error types
            raise RegionUnreadable(
                f"tile {index} of level {level.index} does not decode: {err}"
            ) from err
        if segment is None or segment.size != np.prod(shape):
            raise RegionUnreadable(
                f"tile {index} of level {level.index} decoded to "
                f"{None if segment is None else segment.shape}, expected {shape}"
            )
        tile: npt.NDArray[np.uint8] = segment.reshape(shape)  # tifffile's decode is untyped
        return tile

    def read(self, level: int, x: int, y: int, width: int, height: int) -> npt.NDArray[np.uint8]:
        """The (height, width, 3) region at (x, y) of ``level``; it must lie inside it."""
        lv = self.levels[level]
        if x < 0 or y < 0 or x + width > lv.width or y + height > lv.height:
            raise RegionUnreadable(
                f"region x={x} y={y} {width}x{height} is outside level {level} "
                f"({lv.width}x{lv.height})"
            )
        out = np.empty((height, width, lv.samples), np.uint8)
        for ty in range(y // lv.tile_h, (y + height - 1) // lv.tile_h + 1):
            top = ty * lv.tile_h
            y0, y1 = max(y, top), min(y + height, top + lv.tile_h)
            for tx in range(x // lv.tile_w, (x + width - 1) // lv.tile_w + 1):
                left = tx * lv.tile_w
                x0, x1 = max(x, left), min(x + width, left + lv.tile_w)
                index = ty * lv.tiles_across + tx
                tile = self.cache.get((level, index), partial(self._decode, lv, index))
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[y0 - top : y1 - top,
                                                            x0 - left : x1 - left]
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.cache.clear()
