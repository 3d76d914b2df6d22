"""Storing finished chunks in a thread of their own, behind a bounded queue.

Why: blending a tile into its chunks and storing a finished chunk (class map, uint8
conversion, compression, file write) each cost about as much per tile as decoding it.
In one thread they form the slowest stage of the pipeline; in two, the stages overlap on
separate cores (numpy, OpenCV, Blosc and file writes release the GIL). The queue holds
at most ``max_pending`` chunks, so memory stays bounded when storing falls behind.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from wsi.blending import ChunkSink


class BackgroundSink:
    """A :data:`~wsi.blending.ChunkSink` that runs ``sink`` in one background thread.

    Errors of ``sink`` come back from the next call or from :meth:`close`."""

    def __init__(self, sink: ChunkSink, *, max_pending: int = 4, name: str = "chunk-store") -> None:
        self._sink = sink
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(max_pending)
        self._futures: list[Future[None]] = []

    def __call__(self, cy: int, cx: int, blended: np.ndarray, weights: np.ndarray) -> None:
        self._raise_failures()
        self._slots.acquire()  # blocks while max_pending chunks wait to be stored
        future = self._pool.submit(self._sink, cy, cx, blended, weights)
        future.add_done_callback(lambda _f: self._slots.release())
        self._futures.append(future)

    def _raise_failures(self, wait: bool = False) -> None:
        pending = []
        for future in self._futures:
            if wait or future.done():
                future.result()  # re-raises the sink's error here
            else:
                pending.append(future)
        self._futures = pending

    def close(self) -> None:
        """Wait for every chunk to be stored; re-raise the first storing error."""
        try:
            self._raise_failures(wait=True)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
