"""Reading and decoding tiles in background threads, handed out in ordered batches.

Each worker thread opens its own :class:`~wsi.reader.Slide` (neither openslide handles
nor tifffile file handles are shared across threads), and at most ``prefetch_batches``
batches are read ahead, so memory stays a few batches while decoding overlaps with
whatever the consumer does (inference, blending).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi.reader import Slide
from wsi.tiling import Tile


@dataclass(frozen=True)
class TileBatch:
    tiles: list[Tile]
    pixels: np.ndarray  # (n, tile_px, tile_px, 3) uint8


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
            slide = Slide(self.slide_path, backend=self.backend, slide_mpp=self.slide_mpp)
            self._local.slide = slide
            with self._lock:
                self._opened.append(slide)
        return slide

    def read_tile(self, tile: Tile) -> np.ndarray:
        p = self.tile_px
        return self._slide().read_scaled(self.target_mpp, tile.x, tile.y, p, p)

    def __iter__(self) -> Iterator[TileBatch]:
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="tile-read")
        window = self.batch_size * (self.prefetch_batches + 1)
        pending: deque[tuple[Tile, Future[np.ndarray]]] = deque()
        upcoming = iter(self.tiles)
        try:
            def refill() -> None:
                while len(pending) < window:
                    tile = next(upcoming, None)
                    if tile is None:
                        return
                    pending.append((tile, pool.submit(self.read_tile, tile)))

            refill()
            while pending:
                n = min(self.batch_size, len(pending))
                batch = [pending.popleft() for _ in range(n)]
                refill()
                pixels = np.stack([future.result() for _, future in batch])
                yield TileBatch(tiles=[tile for tile, _ in batch], pixels=pixels)
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            self.close()

    def close(self) -> None:
        with self._lock:
            for slide in self._opened:
                slide.close()
            self._opened.clear()
        self._local = threading.local()
