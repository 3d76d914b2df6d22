"""Uploading a result's level-0 chunks while the run still makes them.

On a remote store a result used to reach the store only after the run: every chunk
written into scratch was read back and uploaded by :func:`workers.storage.publish.publish_tree`,
so a large slide's minutes of level 0 were uploaded after its minutes of inference.
:class:`ChunkUploader` takes each chunk's encoded bytes as the engine writes the file
(``wsi.ome_zarr.ChunkStored``) and puts them under the attempt's key on a few background
threads; publishing then uploads only the rest (pyramid levels, labels, metadata) and
writes the marker last, as before. The attempt's key is fresh and nothing reads it
before its marker, so chunks that are up early are never seen as a result.

The pool is small and bounded: a caller blocks (backpressure, not unbounded memory) when
``max_pending`` chunks wait; a failed upload does not stop the run, it is raised by
:meth:`ChunkUploader.finish` at the end, which fails the job (no marker is written).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from workers.storage.errors import StorageError
from workers.storage.objects import Store

log = logging.getLogger(__name__)

UPLOAD_THREADS = 4
#: Chunks waiting or uploading at once, at most (a few MB of encoded chunks).
MAX_PENDING = 16


class ChunkUploader:
    """Puts chunks under ``result_key``/<name> on background threads (thread-safe)."""

    def __init__(self, store: Store, result_key: str, *, threads: int = UPLOAD_THREADS,
                 max_pending: int = MAX_PENDING) -> None:
        self.store, self.result_key = store, result_key
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="chunk-upload")
        self._slots = threading.BoundedSemaphore(max(1, max_pending))
        self._lock = threading.Lock()
        self._futures: list[Future[None]] = []
        self._error: BaseException | None = None
        #: name below the result -> size in bytes, of every chunk that is up
        self.uploaded: dict[str, int] = {}
        self.wait_s = 0.0  # how long callers were blocked waiting for a free slot

    def __call__(self, name: str, data: bytes) -> None:
        """Queue ``data`` for ``result_key/name``; blocks while ``max_pending`` wait."""
        if self._error is not None:  # the run fails at the end anyway: save the traffic
            return
        started = time.perf_counter()
        self._slots.acquire()
        with self._lock:
            self.wait_s += time.perf_counter() - started
            self._futures.append(self._pool.submit(self._put, name, data))

    def _put(self, name: str, data: bytes) -> None:
        try:
            self.store.put_bytes(f"{self.result_key}/{name}", data)
            with self._lock:
                self.uploaded[name] = len(data)
        except BaseException as err:
            with self._lock:
                if self._error is None:
                    self._error = err
                    log.warning("uploading chunk %s of %s failed: %s", name, self.result_key, err)
        finally:
            self._slots.release()

    def finish(self) -> dict[str, int]:
        """Wait for every queued chunk; what is up (name -> size), or the first error."""
        self._pool.shutdown(wait=True)
        if self._error is not None:
            if isinstance(self._error, StorageError):
                raise self._error
            raise StorageError(f"uploading chunks of {self.result_key} failed: "
                               f"{self._error}") from self._error
        log.info("%d chunks (%d bytes) of %s uploaded during the run (callers waited %.2f s)",
                 len(self.uploaded), sum(self.uploaded.values()), self.result_key, self.wait_s)
        return dict(self.uploaded)

    def abandon(self) -> None:
        """The run failed: drop what waits, and remove the chunks already up (best effort;
        the job's next attempt removes unpublished attempts anyway)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            names = list(self.uploaded)
            self.uploaded.clear()
        if names:
            log.info("removing %d chunks of the failed attempt %s", len(names), self.result_key)
            try:
                self.store.delete(self.result_key)
            except Exception as err:  # noqa: BLE001 - cleanup never hides the run's error
                log.warning("could not remove %s: %s", self.result_key, err)
