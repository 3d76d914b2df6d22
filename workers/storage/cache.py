"""A local read-through cache of store objects, bounded in bytes, for readers that need a
path (openslide, DICOM folders, the API's result readers).

An *entry* is one file key (``slides/<id>.svs``) or one folder prefix (an archive's
``slides/<id>``, a result's ``results/<job>/<attempt>.zarr``); it is downloaded once into
``<root>/<key>`` (to a temp name, renamed when complete) and kept until the cache holds
more than ``max_bytes``, when the least recently used entries are removed whole.

Entries are pinned while in use with ``flock`` on a lock file per entry: a shared lock
for each user (any thread, any process on this host), an exclusive one to download or to
evict, taken without waiting, so an entry in use is never evicted. An entry bigger than
the bound is still served (the job needs it) and goes at the next eviction after use.
Store objects never change once written (keys are fresh per slide and per result
attempt), so a cached entry never goes stale.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from workers.storage.objects import Store, check_key

log = logging.getLogger(__name__)

LOCKS_DIR = ".locks"
DOWNLOAD_THREADS = 8


def _lock_name(key: str) -> str:
    return key.replace("%", "%25").replace("/", "%2F") + ".lock"


def _key_of(lock_name: str) -> str:
    return lock_name[: -len(".lock")].replace("%2F", "/").replace("%25", "%")


def entry_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                pass
    return total


class ReadThroughCache:
    """Store objects as local files, downloaded once, LRU-evicted past ``max_bytes``."""

    def __init__(self, store: Store, root: Path, max_bytes: int) -> None:
        self.store = store
        self.root = root
        self.max_bytes = max_bytes
        self.downloads = 0  # entries this instance fetched (tests assert "once")
        (root / LOCKS_DIR).mkdir(parents=True, exist_ok=True)

    def _lock_path(self, key: str) -> Path:
        return self.root / LOCKS_DIR / _lock_name(key)

    @contextmanager
    def local(self, key: str) -> Iterator[Path]:
        """The local copy of the file or folder ``key``, pinned while the block runs.

        On a ``file://`` store the object already is a local file: its path, no copy.
        """
        if self.store.is_local:
            yield self.store.local_path(key)
            return
        target = self.root / check_key(key)
        fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT, 0o644)
        fetched = False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            # converting a flock is not atomic (an evictor may slip in between): the
            # entry is looked at again under the shared lock until it is there
            while not target.exists():
                fcntl.flock(fd, fcntl.LOCK_EX)  # one downloader; the others wait here
                if not target.exists():
                    self._download(key, target)
                    fetched = True
                fcntl.flock(fd, fcntl.LOCK_SH)
            os.utime(self._lock_path(key))  # most recently used
            if fetched:  # only new bytes can push the cache past its bound
                self.evict()
            yield target
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if fetched:  # an entry that was in use when it pushed the cache over may go now
            self.evict()

    def _download(self, key: str, target: Path) -> None:
        started = time.monotonic()
        tmp = target.with_name(f".{target.name}.fetch-{uuid.uuid4().hex[:8]}")
        try:
            files = self.store.list_files(key)
            if files:  # a folder (a result, an archive's slide): its objects in parallel
                with ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="fetch") as pool:
                    for _ in pool.map(
                        lambda k: self.store.get_file(k, tmp / k[len(key) + 1:]), files
                    ):
                        pass  # re-raises the first failed download
            else:
                self.store.get_file(key, tmp)
            tmp.rename(target)
        except BaseException:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            raise
        self.downloads += 1
        log.info("cached %s (%d bytes) in %.2f s", key, entry_bytes(target),
                 time.monotonic() - started)

    def discard(self, key: str) -> bool:
        """Drop the local copy of ``key`` (its object was deleted), unless it is in use;
        whether it is gone."""
        path = self.root / check_key(key)
        if not path.exists() or self.store.is_local:
            return True
        fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # in use: eviction takes it later
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

    def entries(self) -> list[tuple[str, Path, float]]:
        """``(key, local path, last use)`` of every entry present, oldest first."""
        found = []
        for lock in (self.root / LOCKS_DIR).iterdir():
            key = _key_of(lock.name)
            path = self.root / key
            if path.exists():
                found.append((key, path, lock.stat().st_mtime))
        return sorted(found, key=lambda e: e[2])

    def size_bytes(self) -> int:
        return sum(entry_bytes(path) for _, path, _ in self.entries())

    def evict(self) -> int:
        """Remove least recently used entries not in use until the bound holds; the
        bytes freed."""
        entries = [(key, path, entry_bytes(path)) for key, path, _ in self.entries()]
        total = sum(size for *_, size in entries)
        freed = 0
        for key, path, size in entries:
            if total <= self.max_bytes:
                break
            fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use: never evicted
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                total -= size
                freed += size
                log.info("evicted %s (%d bytes) from the cache", key, size)
            finally:
                os.close(fd)  # releases the lock
        return freed
