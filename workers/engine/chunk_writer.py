"""Storing finished chunks on a small pool of threads, behind a bounded queue.

Why: blending a tile into its chunks and storing a finished chunk (class map, uint8
conversion, compression, file write) each cost about as much per tile as decoding it.
In one thread they form the slowest stage of the pipeline; on a pool beside the blending
thread, the stages overlap on separate cores (numpy, OpenCV, Blosc and file writes
release the GIL; numcodecs' Blosc runs its GIL-free context API off the main thread),
and on a many-core GPU machine storing scales with the cores instead of capping the job
at one. Each chunk is stored whole by one thread, to its own files, so the order in
which chunks finish does not matter. At most ``max_pending`` chunks wait or are being
stored at once, so memory stays bounded when storing falls behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

#: (chunk_y, chunk_x, weighted sums or blended values, weight sums): numpy arrays, or
#: device tensors for the sinks of ``workers.engine.device_blend``.
AnySink = Callable[[int, int, Any, Any], None]


class BackgroundSink:
    """A :data:`~wsi.blending.ChunkSink` that runs ``sink`` on ``workers`` background
    threads (``sink`` must accept different chunks concurrently, as ``DenseSink`` does).

    Errors of ``sink`` come back from the next call or from :meth:`close`. ``busy_s``
    sums the seconds the threads spent storing; ``wait_s`` is the time callers were
    blocked because ``max_pending`` chunks were already queued (the store was behind)."""

    def __init__(self, sink: AnySink, *, workers: int = 1, max_pending: int | None = None,
                 name: str = "chunk-store") -> None:
        self._sink = sink
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(max_pending or 2 * self.workers + 2)
        self._futures: list[Future[None]] = []
        self._lock = threading.Lock()
        self.busy_s = 0.0
        self.cpu_s = 0.0  # CPU seconds of the storing threads, storing
        self.wait_s = 0.0
        self.chunks = 0

    def __call__(self, cy: int, cx: int, blended: Any, weights: Any) -> None:
        self._raise_failures()
        start = time.perf_counter()
        self._slots.acquire()  # blocks while max_pending chunks wait to be stored
        self.wait_s += time.perf_counter() - start
        future = self._pool.submit(self._store, cy, cx, blended, weights)
        future.add_done_callback(lambda _f: self._slots.release())
        self._futures.append(future)

    @property
    def blocked_s(self) -> float:
        """Seconds callers spent blocked in this sink (waiting for a free slot)."""
        return self.wait_s

    def _store(self, cy: int, cx: int, blended: Any, weights: Any) -> None:
        start, cpu_start = time.perf_counter(), time.thread_time()
        try:
            self._sink(cy, cx, blended, weights)
        finally:
            with self._lock:
                self.busy_s += time.perf_counter() - start
                self.cpu_s += time.thread_time() - cpu_start
                self.chunks += 1

    def _raise_failures(self, wait: bool = False) -> None:
        futures, self._futures = self._futures, []
        for index, future in enumerate(futures):
            if wait or future.done():
                try:
                    future.result()  # re-raises the sink's error here, once
                except BaseException:
                    self._futures += [f for f in futures[index + 1:] if not f.done()]
                    raise
            else:
                self._futures.append(future)

    def close(self) -> None:
        """Wait for every chunk to be stored; re-raise the first storing error."""
        try:
            self._raise_failures(wait=True)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


class TimedSink:
    """``sink`` run on the calling thread, timed like :class:`BackgroundSink` (for a
    blending thread that stores its own chunks: one hand-off less per chunk)."""

    def __init__(self, sink: AnySink) -> None:
        self._sink = sink
        self.workers = 0
        self.busy_s = self.cpu_s = self.wait_s = 0.0
        self.chunks = 0

    def __call__(self, cy: int, cx: int, blended: Any, weights: Any) -> None:
        start, cpu_start = time.perf_counter(), time.thread_time()
        try:
            self._sink(cy, cx, blended, weights)
        finally:
            self.busy_s += time.perf_counter() - start
            self.cpu_s += time.thread_time() - cpu_start
            self.chunks += 1

    @property
    def blocked_s(self) -> float:
        """Seconds the caller spent in this sink."""
        return self.busy_s

    def close(self) -> None:
        """Nothing waits: every chunk was stored when its call returned."""
