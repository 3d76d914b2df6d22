"""A split job on an object store: how its parts meet when workers share no folder.

With a ``file://`` store every part writes into the one staged result (zero copy).
With ``s3://`` every worker has only its private scratch folder, so the staged result
travels through the store under a staging key of the attempt,
``results/<job>/.split-<token>/``:

- ``result/...``: the staged zarr tree. ``prepare`` uploads its metadata (the arrays
  are empty then); each part uploads the chunk files it owns (parts own disjoint chunks,
  so their objects never collide, and a retried part rewrites its own with the same
  bytes);
- ``record/...``: the record ``prepare`` wrote (``state.json``, ``tiles.npz``,
  ``tissue.npy``), then each part's ``part-<i>.npz`` (its tile-grid entries) and,
  last, ``part-<i>.json`` (the part is done);
- ``manifest.json``: what ``prepare`` uploaded, so that a part downloads exactly that
  without listing the chunks other parts have stored meanwhile.

A part downloads the manifest's files into its scratch folder, runs there and uploads
what it wrote; the merge downloads the whole staging tree, runs ``finish`` there and
publishes through :class:`workers.jobs.objects.ResultOutput` like a whole run. Every
file goes up and down streamed in chunks (``Store.put_file``/``get_file``), a few at a
time in threads: no tree is ever held in memory. The record's host paths (slide, output,
model folder) are rewritten for the host that reads it
(:func:`workers.engine.staging.relocate`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from workers.engine.staging import record_dir
from workers.jobs.settings import RESULTS_DIR
from workers.storage.objects import Store
from workers.storage.publish import SPLIT_STAGING_PREFIX

log = logging.getLogger(__name__)

#: Prefix of a staging key under ``results/<job>/`` (swept with unpublished attempts).
STAGING_PREFIX = SPLIT_STAGING_PREFIX
TRANSFER_THREADS = 8
_RESULT, _RECORD, _MANIFEST = "result", "record", "manifest.json"

#: (size, mtime_ns) of a file, to tell what a part wrote from what it downloaded
_Stamp = tuple[int, int]


def staging_key(job_id: str, token: str) -> str:
    return f"{RESULTS_DIR}/{job_id}/{STAGING_PREFIX}{token[:16]}"


def _files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _stamp(path: Path) -> _Stamp:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _in_threads(work: Callable[[tuple[Path, str]], int], items: Iterable[tuple[Path, str]]) -> int:
    """Run ``work`` over ``items`` a few at a time; re-raises the first failure."""
    with ThreadPoolExecutor(TRANSFER_THREADS, thread_name_prefix="split-transfer") as pool:
        return sum(pool.map(work, items))


@dataclass(frozen=True)
class RemoteStaging:
    """The staging key of one split attempt in a remote store."""

    store: Store
    key: str

    @classmethod
    def for_job(cls, store: Store, job_id: str, token: str) -> RemoteStaging:
        return cls(store, staging_key(job_id, token))

    def _put(self, item: tuple[Path, str]) -> int:
        path, key = item
        return self.store.put_file(path, f"{self.key}/{key}")

    def _get(self, item: tuple[Path, str]) -> int:
        path, key = item
        return self.store.get_file(f"{self.key}/{key}", path)

    @staticmethod
    def _local(staged: Path, key: str) -> Path:
        """The local file of a staging-relative key, under ``staged`` or its record."""
        area, _, rel = key.partition("/")
        return (staged if area == _RESULT else record_dir(staged)) / rel

    # -- prepare ------------------------------------------------------------------------
    def upload_prepared(self, staged: Path) -> int:
        """Upload what ``prepare`` made (array metadata and the record), the manifest
        last; bytes uploaded."""
        items = [(p, f"{_RESULT}/{p.relative_to(staged).as_posix()}") for p in _files(staged)]
        record = record_dir(staged)
        items += [(p, f"{_RECORD}/{p.relative_to(record).as_posix()}") for p in _files(record)]
        total = _in_threads(self._put, items)
        self.store.put_bytes(f"{self.key}/{_MANIFEST}",
                             json.dumps({"files": [key for _, key in items]}).encode())
        log.info("staged split %s: %d files, %d bytes", self.key, len(items), total)
        return total

    # -- a part ---------------------------------------------------------------------------
    def download_prepared(self, staged: Path) -> list[Path]:
        """Download what ``prepare`` uploaded into ``staged`` (and its record); the
        files downloaded."""
        names = json.loads(self.store.get_bytes(f"{self.key}/{_MANIFEST}"))["files"]
        items = [(self._local(staged, key), key) for key in names]
        _in_threads(self._get, items)
        return [path for path, _ in items]

    def upload_part(self, staged: Path, index: int, downloaded: dict[Path, _Stamp]) -> int:
        """Upload what part ``index`` wrote (new or changed files: its chunks, its
        tile-grid entries), then ``part-<index>.json``, which marks it done.
        ``downloaded``: :func:`stamps` of the local copy before the part ran (after the
        record was pointed at this host, which is never uploaded)."""
        record = record_dir(staged)
        done = record / f"part-{index}.json"
        items = [(p, f"{_RESULT}/{p.relative_to(staged).as_posix()}") for p in _files(staged)
                 if downloaded.get(p) != _stamp(p)]
        items += [(p, f"{_RECORD}/{p.relative_to(record).as_posix()}") for p in _files(record)
                  if p != done and downloaded.get(p) != _stamp(p)]
        total = _in_threads(self._put, items)
        total += self._put((done, f"{_RECORD}/{done.name}"))
        log.info("part %d of %s: uploaded %d files, %d bytes", index, self.key,
                 len(items) + 1, total)
        return total

    # -- the merge ------------------------------------------------------------------------
    def download_all(self, staged: Path) -> int:
        """Download the whole staging tree (level 0 as the parts stored it, the record
        with every part's entries) into ``staged`` and its record; bytes downloaded."""
        items = []
        for key in self.store.list_files(self.key):
            rel = key[len(self.key) + 1:]
            if rel != _MANIFEST:
                items.append((self._local(staged, rel), rel))
        total = _in_threads(self._get, items)
        log.info("merging split %s: downloaded %d files, %d bytes", self.key, len(items), total)
        return total

    def delete(self) -> None:
        self.store.delete(self.key)


def stamps(paths: Iterable[Path]) -> dict[Path, _Stamp]:
    """``(size, mtime_ns)`` of each file: what a part's upload compares against."""
    return {path: _stamp(path) for path in paths}


def scratch_folder(scratch_dir: Path, job_id: str, label: str) -> Path:
    """A fresh private folder for one part's (or merge's) copy of the staged result."""
    folder = scratch_dir / "split" / f"{job_id}-{label}-{os.getpid()}-{os.urandom(4).hex()}"
    folder.mkdir(parents=True)
    return folder


def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
