"""Reading and decoding tiles in background threads, handed out in ordered batches.

The worker threads share one :class:`~wsi.reader.Slide` where its backend reads
concurrently (then they share its decoded-tile cache too, so a slide tile that two
overlapping tiles need is decoded once); otherwise each thread opens its own. At most
``prefetch_batches`` batches are read ahead, so memory stays a few batches while
decoding overlaps with whatever the consumer does (inference, blending).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import numpy.typing as npt

from wsi.reader import Slide
from wsi.tiling import Tile


@dataclass(frozen=True)
class TileBatch:
    tiles: list[Tile]
    pixels: npt.NDArray[np.uint8]  # (n, tile_px, tile_px, 3) uint8


class TileBatchLoader:
    """Iterate over ``tiles`` in order, as batches of decoded RGB pixels."""

    def __init__(
        self,
        slide_path: Path,
        tiles: Sequence[Tile],
        *,
        tile_px: int,
        target_mpp: float,
        batch_size: int,
        backend: str = "auto",
        slide_mpp: float | None = None,
        workers: int = 2,
        prefetch_batches: int = 2,
    ) -> None:
        self.slide_path = Path(slide_path)
        self.tiles = list(tiles)
        self.tile_px = tile_px
        self.target_mpp = target_mpp
        self.batch_size = max(1, batch_size)
        self.backend = backend
        self.slide_mpp = slide_mpp
        self.workers = max(1, workers)
        self.prefetch_batches = max(1, prefetch_batches)
        self._local = threading.local()
        self._opened: list[Slide] = []
        self._lock = threading.Lock()

    def _slide(self) -> Slide:
        slide = getattr(self._local, "slide", None)
        if slide is None:
            with self._lock:
                shared = self._opened[0] if self._opened else None
                if shared is not None and shared.concurrent_reads:
                    slide = shared
                else:
                    slide = Slide(self.slide_path, backend=self.backend,
                                  slide_mpp=self.slide_mpp)
                    self._opened.append(slide)
            self._local.slide = slide
        return slide

    def read_tile(self, tile: Tile) -> npt.NDArray[np.uint8]:
        p = self.tile_px
        return self._slide().read_scaled(self.target_mpp, tile.x, tile.y, p, p)

    def _read_into(self, pixels: npt.NDArray[np.uint8], tiles: Sequence[Tile]) -> None:
        for i, tile in enumerate(tiles):
            pixels[i] = self.read_tile(tile)

    def __iter__(self) -> Generator[TileBatch, None, None]:
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="tile-read")
        # each batch is read as one task per worker, straight into its array: a task per
        # tile costs a future, a lock and a thread wake-up for every tile
        part = -(-self.batch_size // self.workers)
        pending: deque[tuple[list[Tile], npt.NDArray[np.uint8], list[Future[None]]]] = deque()
        upcoming = iter(self.tiles)
        p = self.tile_px
        try:
            def refill() -> None:
                while len(pending) <= self.prefetch_batches:
                    tiles = list(islice(upcoming, self.batch_size))
                    if not tiles:
                        return
                    pixels = np.empty((len(tiles), p, p, 3), np.uint8)
                    parts = [pool.submit(self._read_into, pixels[i : i + part], tiles[i : i + part])
                             for i in range(0, len(tiles), part)]
                    pending.append((tiles, pixels, parts))

            refill()
            while pending:
                tiles, pixels, parts = pending.popleft()
                refill()
                for future in parts:
                    future.result()  # re-raises a read error
                yield TileBatch(tiles=tiles, pixels=pixels)
        finally:
            for _, _, parts in pending:
                for future in parts:
                    future.cancel()
            pool.shutdown(wait=True)
            self.close()

    def close(self) -> None:
        with self._lock:
            for slide in self._opened:
                slide.close()
            self._opened.clear()
        self._local = threading.local()
