"""Publishing a result folder into an object store, atomically.

The engine writes a result into the worker's private scratch folder. On a remote store
the tree is then uploaded under a *fresh* prefix per attempt
(``results/<job>/<attempt>.zarr/...``), in parallel threads, and a marker object
(``results/<job>/<attempt>.published``, listing the files and bytes) is written after
every object is up. Nothing reads an attempt without its marker, and the job row names
the prefix only after the marker exists, so a reader sees a whole result or none; an
attempt that died half-way leaves objects without a marker, which the next attempt of
the job removes (:func:`remove_unpublished`), with the staging of an interrupted split.
Chunks uploaded during the run (:mod:`workers.storage.streaming`) are not uploaded again.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from workers.storage.objects import Store

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".published"
UPLOAD_THREADS = 8
#: A split attempt's staging under ``results/<job>/`` (workers/jobs/split_staging.py)
SPLIT_STAGING_PREFIX = ".split-"


@dataclass(frozen=True)
class Published:
    key: str  # the result's prefix, e.g. results/<job>/<attempt>.zarr
    files: int
    bytes: int
    seconds: float
    #: what this call uploaded: the tree less the chunks that were up already
    uploaded_files: int = 0
    uploaded_bytes: int = 0


def marker_key(result_key: str) -> str:
    """``results/<job>/<attempt>.zarr`` -> ``results/<job>/<attempt>.published``."""
    stem = result_key[: -len(".zarr")] if result_key.endswith(".zarr") else result_key
    return stem + MARKER_SUFFIX


def publish_tree(store: Store, local_dir: Path, result_key: str,
                 threads: int = UPLOAD_THREADS,
                 already_up: dict[str, int] | None = None) -> Published:
    """Upload every file under ``local_dir`` to ``result_key``/..., then the marker.

    ``already_up``: files (relative name -> size) uploaded under ``result_key`` during
    the run; one whose local size still matches is not uploaded again."""
    started = time.monotonic()
    up = already_up or {}
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and not p.is_symlink())
    sizes = {p: p.stat().st_size for p in files}
    todo = [p for p in files if up.get(p.relative_to(local_dir).as_posix()) != sizes[p]]

    def put(path: Path) -> int:
        return store.put_file(path, f"{result_key}/{path.relative_to(local_dir).as_posix()}")

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="publish") as pool:
        uploaded = sum(pool.map(put, todo))  # re-raises the first failed upload
    total = sum(sizes.values())
    store.put_bytes(marker_key(result_key),
                    json.dumps({"files": len(files), "bytes": total}).encode())
    done = Published(result_key, len(files), total, round(time.monotonic() - started, 3),
                     uploaded_files=len(todo), uploaded_bytes=uploaded)
    log.info("published %s: %d files, %d bytes in %.2f s (%d files, %d bytes uploaded now, "
             "the rest during the run)", result_key, done.files, done.bytes, done.seconds,
             done.uploaded_files, done.uploaded_bytes)
    return done


def find_published(store: Store, job_prefix: str) -> str | None:
    """The result key of a published attempt under ``job_prefix`` (``results/<job>``)."""
    for name in store.list_dir(job_prefix):
        if name.endswith(MARKER_SUFFIX):
            return f"{job_prefix}/{name[: -len(MARKER_SUFFIX)]}.zarr"
    return None


def remove_unpublished(store: Store, job_prefix: str) -> int:
    """Delete attempts under ``job_prefix`` that have no marker (died mid-upload)."""
    names = store.list_dir(job_prefix)
    markers = {n[: -len(MARKER_SUFFIX)] for n in names if n.endswith(MARKER_SUFFIX)}
    removed = 0
    for name in names:
        if name.endswith(".zarr") and name[: -len(".zarr")] not in markers:
            log.info("removing %s/%s left by an interrupted upload", job_prefix, name)
            store.delete(f"{job_prefix}/{name}")
            removed += 1
        elif name.startswith(SPLIT_STAGING_PREFIX):  # an earlier split attempt's staging
            log.info("removing %s/%s left by an interrupted split", job_prefix, name)
            store.delete(f"{job_prefix}/{name}")
            removed += 1
    return removed
