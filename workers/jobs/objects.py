"""The store as the jobs side and the API see it: slides to read, results to publish and
serve, objects to delete, all by the keys the rows keep (``rel_path``,
``result_rel_path``).

With a ``file://`` store (the default) every function here hands out the data dir's own
paths, exactly as before the store existed. With ``s3://`` a worker reads a TIFF slide
by byte ranges (a slide reference in its scratch folder) or any other slide through the
read-through cache, makes the result in its scratch folder and publishes it under a
fresh key (:mod:`workers.storage.publish`), its level-0 chunks uploaded while the run
makes them (:mod:`workers.storage.streaming`); the API reads slides and results through
its own cache.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from workers.jobs.actions import Conflict, NotFound
from workers.jobs.rows import JobRow, SlideRow
from workers.jobs.settings import RESULTS_DIR, SLIDES_DIR, Settings, result_rel_path
from workers.storage.cache import ReadThroughCache
from workers.storage.objects import Store
from workers.storage.publish import (
    Published,
    find_published,
    publish_tree,
    remove_unpublished,
)
from workers.storage.streaming import ChunkUploader
from wsi.ome_zarr import ChunkStored
from wsi.remote import write_slide_ref

log = logging.getLogger(__name__)

_lock = threading.Lock()
_stores: dict[str, Store] = {}
_caches: dict[tuple[str, Path, int], ReadThroughCache] = {}


def get_object_store(settings: Settings) -> Store:
    """The process's store for ``settings`` (one per URL: its byte counters add up)."""
    url = settings.effective_storage_url
    with _lock:
        if url not in _stores:
            _stores[url] = Store(url)
        return _stores[url]


def get_cache(settings: Settings) -> ReadThroughCache:
    store = get_object_store(settings)
    key = (store.url, settings.effective_object_cache_dir, settings.cache_bytes)
    with _lock:
        if key not in _caches:
            _caches[key] = ReadThroughCache(store, key[1], key[2])
        return _caches[key]


def slide_entry(rel_path: str) -> str:
    """The object a slide is stored as: its file, or its archive's folder
    (``slides/<id>/<inner path>`` -> ``slides/<id>``)."""
    parts = rel_path.split("/")
    return "/".join(parts[:2]) if parts[0] == SLIDES_DIR else rel_path


@contextmanager
def slide_path(settings: Settings, slide: SlideRow, *, ranges: bool = False) -> Iterator[Path]:
    """A path :class:`wsi.reader.Slide` opens for ``slide``, valid while the block runs.

    ``ranges``: a TIFF slide that tiffslide reads (the backend recorded at upload) on a
    remote store is handed as a slide reference, read by byte ranges; otherwise the
    slide comes through the read-through cache (downloaded once, pinned while in use).
    """
    store = get_object_store(settings)
    if store.is_local:
        yield store.local_path(slide.rel_path)
        return
    single_file = slide_entry(slide.rel_path) == slide.rel_path
    if ranges and single_file and slide.backend == "tiffslide" \
            and settings.remote_slide_reads == "range":
        name = slide.rel_path.rsplit("/", 1)[-1]
        yield write_slide_ref(settings.effective_scratch_dir / SLIDES_DIR / name,
                              store.url_of(slide.rel_path), sha256=slide.sha256)
        return
    cache = get_cache(settings)
    with cache.local(slide_entry(slide.rel_path)):
        yield cache.root / slide.rel_path


def result_dir(settings: Settings, job: JobRow) -> Path:
    """The published result of a succeeded job as a local folder; Conflict while there
    is none, NotFound when its objects are gone. On a remote store it is the cache's
    copy (a result never changes once published, so the copy never goes stale)."""
    if job.status != "succeeded" or not job.result_rel_path:
        raise Conflict(f"job {job.id!r} has no result: it is {job.status}")
    store = get_object_store(settings)
    if store.is_local:
        path = store.local_path(job.result_rel_path)
        if not path.is_dir():
            raise NotFound(f"the result of job {job.id!r} is gone from storage")
        return path
    cache = get_cache(settings)
    if not (cache.root / job.result_rel_path).is_dir() and not store.list_files(
        job.result_rel_path
    ):
        raise NotFound(f"the result of job {job.id!r} is gone from storage")
    with cache.local(job.result_rel_path) as path:
        return path


def delete_slide_objects(settings: Settings, slide: SlideRow) -> None:
    """Delete a slide's file (or its archive's folder) from the store, and this host's
    cached copy."""
    store = get_object_store(settings)
    store.delete(slide_entry(slide.rel_path))
    if not store.is_local:
        get_cache(settings).discard(slide_entry(slide.rel_path))


def delete_result_objects(settings: Settings, job: JobRow) -> None:
    """Delete every object of a job's results (every attempt) from the store, and this
    host's cached copy."""
    store = get_object_store(settings)
    if store.is_local:
        if job.result_rel_path:
            store.delete(job.result_rel_path)
        return
    store.delete(f"{RESULTS_DIR}/{job.id}")
    if job.result_rel_path:
        get_cache(settings).discard(job.result_rel_path)


@dataclass
class ResultOutput:
    """Where the engine writes one attempt of a job, and how it is then published."""

    settings: Settings
    store: Store
    job_id: str
    token: str
    _chunks: ChunkUploader | None = field(default=None, init=False, repr=False)
    #: what the last :meth:`publish` did on a remote store (files, bytes, uploaded now)
    published: Published | None = field(default=None, init=False)

    @classmethod
    def for_job(cls, settings: Settings, job_id: str, token: str) -> ResultOutput:
        return cls(settings, get_object_store(settings), job_id, token)

    @property
    def out_path(self) -> Path:
        """Local store: the published path itself (the engine renames into place).
        Remote: the worker's private scratch folder."""
        rel = result_rel_path(self.job_id)
        if self.store.is_local:
            return self.store.local_path(rel)
        return self.settings.effective_scratch_dir / rel

    def already_published(self) -> str | None:
        """The key of a result a previous attempt published (and died before recording)."""
        if self.store.is_local:
            rel = result_rel_path(self.job_id)
            return rel if self.out_path.is_dir() else None
        found = find_published(self.store, f"{RESULTS_DIR}/{self.job_id}")
        if found is None:  # leftovers of attempts that died mid-upload
            remove_unpublished(self.store, f"{RESULTS_DIR}/{self.job_id}")
        return found

    @property
    def attempt_key(self) -> str:
        """The fresh key a remote store's attempt is published under."""
        return f"{RESULTS_DIR}/{self.job_id}/{self.token[:16]}.zarr"

    def chunk_stored(self) -> ChunkStored | None:
        """For the engine (``run_engine(chunk_stored=...)``): on a remote store, a callback
        that uploads each level-0 chunk under :attr:`attempt_key` while the run goes on,
        so that :meth:`publish` has only the rest left. None on a local store, where the
        result is renamed into place and nothing is copied."""
        if self.store.is_local:
            return None
        if self._chunks is None:
            self._chunks = ChunkUploader(self.store, self.attempt_key)
        return self._chunks

    def abandon(self) -> None:
        """The attempt ends without publishing: stop the chunk uploads and remove the
        chunks already up (no-op after :meth:`publish`, or when nothing was streamed)."""
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            chunks.abandon()

    def publish(self) -> str:
        """Make the engine's finished output the job's result; its key for the row.
        Chunk upload errors of the run are raised here (StorageError): no marker then."""
        if self.store.is_local:
            return result_rel_path(self.job_id)
        key = self.attempt_key
        already_up: dict[str, int] = {}
        if self._chunks is not None:
            try:
                already_up = self._chunks.finish()
            except BaseException:
                self.abandon()
                raise
            self._chunks = None
        self.published = publish_tree(self.store, self.out_path, key, already_up=already_up)
        shutil.rmtree(self.out_path, ignore_errors=True)
        return key
