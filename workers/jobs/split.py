"""One slide across many workers: a large job's parts as Celery subtasks, then a merge.

The job task (:func:`workers.jobs.tasks.execute_job`) claims the job as always and calls
:func:`run_or_split`. Above ``SLIDEPIPE_SPLIT_MIN_TILES`` tiles it runs the engine's
``prepare`` (:mod:`workers.engine.parts`) and hands the job to a chord: one
:data:`RUN_PART_TASK` per part, taken by whichever workers are free, then one
:data:`FINISH_SPLIT_TASK` that builds the pyramids and publishes. The result is
bit-identical to a one-worker run (docs/engine.md, "Splitting a slide").

Claims: every part and the finish task carry the job's claim token and write only
under it (``WHERE claim = token``), exactly as the job task does; they beat the job's
heartbeat while they run. When the claim moves on (the reconciler resumed the job
elsewhere, a cancel), a part stops and nothing of this attempt is published. Progress
is summed across parts: each part keeps its count of inferred tiles in a Redis hash
(one field per part, so a retried part restarts its own count instead of adding to
it) and writes the sum. A failing part is retried alone (Celery's retry of that one
subtask; the chunks of the others stay); after ``SLIDEPIPE_PART_RETRIES`` it fails the
job.

With a shared ``file://`` store every part writes its chunks into the one staged
result. With a remote store (``s3://``) workers share no folder: the staged result
travels through the store under a staging key of the attempt, each part and the merge
working on a copy in their own scratch folder (:mod:`workers.jobs.split_staging`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from celery import Task, chord, group
from celery.signals import worker_process_init
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.errors import ModelError
from workers.engine.spec import CancelCheck, Progress, ProgressCallback, RunCancelled, RunSpec
from workers.jobs import telemetry
from workers.jobs.actions import progress_percent, run_info
from workers.jobs.celery_app import app
from workers.jobs.rows import JobStatus
from workers.jobs.settings import get_settings
from wsi.errors import SlideError

if TYPE_CHECKING:
    from workers.engine.spec import RunResult
    from workers.jobs.split_staging import RemoteStaging
    from workers.jobs.store import JobStore
    from wsi.ome_zarr import ChunkStored

log = logging.getLogger(__name__)

RUN_PART_TASK = "slidepipe.run_part"
FINISH_SPLIT_TASK = "slidepipe.finish_split"
#: Test hook: the first attempt of this part index raises half-way (tests/workers/jobs).
TEST_FAIL_PART_ENV = "SLIDEPIPE_TEST_FAIL_PART_ONCE"
_PROGRESS_KEY = "slidepipe:split-progress:{job_id}:{token}"


class SplitSettings(BaseSettings):
    """When a job is split and how its parts are retried (``SLIDEPIPE_*`` variables)."""

    model_config = SettingsConfigDict(env_prefix="SLIDEPIPE_", env_file=".env",
                                      env_file_encoding="utf-8", extra="ignore")

    #: Split a job whose plan has at least this many tiles; 0 never splits.
    split_min_tiles: int = Field(default=0, ge=0)
    #: The most parts a split job is cut into (about the number of model workers).
    split_parts: int = Field(default=2, ge=1, le=1024)
    #: Retries of one failing part before the job fails.
    part_retries: int = Field(default=2, ge=0, le=20)
    part_retry_delay_s: float = Field(default=1.0, ge=0)


@lru_cache(maxsize=1)
def split_settings() -> SplitSettings:
    return SplitSettings()


@lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().effective_result_backend_url,
                                socket_connect_timeout=3, socket_timeout=10)


@worker_process_init.connect
def _fresh_after_fork(**_: Any) -> None:
    _redis.cache_clear()


def run_or_split(spec: RunSpec, *, job_id: str, token: str, progress: ProgressCallback,
                 cancel: CancelCheck, shared_store: bool,
                 chunk_stored: ChunkStored | None = None) -> RunResult | None:
    """Run ``spec`` here, or prepare it and hand its parts to the workers (None).

    ``shared_store``: every worker sees the staged folder (``file://``); otherwise the
    prepared files go to a staging key in the store (:mod:`workers.jobs.split_staging`).
    ``chunk_stored``: told of each level-0 chunk of a run made here (uploads it during
    the run, :meth:`workers.jobs.objects.ResultOutput.chunk_stored`); split parts don't."""
    from workers.engine.parts import prepare
    from workers.engine.run import run_engine, run_prepared
    from workers.engine.staging import discard

    wanted = split_settings()
    if wanted.split_min_tiles <= 0 or wanted.split_parts < 2:
        return run_engine(spec, progress=progress, cancel=cancel, chunk_stored=chunk_stored)
    prepared = prepare(spec, parts=wanted.split_parts, min_tiles=wanted.split_min_tiles,
                       progress=progress, keep_model=True)
    if len(prepared.parts) == 1:
        return run_prepared(prepared, progress=progress, cancel=cancel, chunk_stored=chunk_stored)
    total = sum(prepared.tiles_run(i) for i in range(len(prepared.parts)))
    staged = str(prepared.staged)
    remote = None if shared_store else _remote_staging(job_id, token)
    key = None if remote is None else remote.key
    try:
        if remote is not None:  # the parts run elsewhere, from the store's copy
            remote.upload_prepared(prepared.staged)
            discard(prepared.staged)
        parts = group(run_part_task.s(job_id, token, staged, i, total, spec.model,
                                      staging_key=key)
                      for i in range(len(prepared.parts)))
        chord(parts)(finish_split_task.s(job_id, token, staged, staging_key=key))
    except BaseException:  # nothing was queued (the broker is down): this attempt fails
        discard(prepared.staged)
        if remote is not None:
            with suppress(Exception):
                remote.delete()
        raise
    log.info("job %s: %d tiles split into %d parts (%d tiles run in all)", job_id,
             prepared.tiles_total, len(prepared.parts), total)
    return None


def _remote_staging(job_id: str, token: str) -> RemoteStaging:
    from workers.jobs.objects import get_object_store
    from workers.jobs.split_staging import RemoteStaging

    return RemoteStaging.for_job(get_object_store(get_settings()), job_id, token)


@contextmanager
def _local_copy(run: Any, job_id: str, token: str, staged: str, staging_key: str | None,
                label: str, out_path: Path | None = None) -> Iterator[tuple[Path, Any]]:
    """The staged result a part or the merge works on, and its remote staging (None).

    Shared store: the staged folder itself. Remote store: a copy in this worker's
    scratch folder (the prepared files; the whole tree for the merge, beside
    ``out_path``), with the record pointed at this host's slide, output and model
    folder; removed afterwards. The slide stays pinned (cache) while the block runs."""
    if staging_key is None:
        yield Path(staged), None
        return
    from workers.engine.staging import discard, relocate
    from workers.jobs.objects import get_object_store, slide_path
    from workers.jobs.split_staging import (
        RemoteStaging,
        remove_folder,
        scratch_folder,
        stamps,
    )

    settings = run.settings
    remote = RemoteStaging(get_object_store(settings), staging_key)
    job = run.store.get_job(None, job_id)
    slide = run.store.get_slide_any_owner(job.slide_id) if job is not None else None
    if job is None or slide is None:
        raise SlideError(f"the slide of job {job_id} is gone")
    if out_path is None:  # a part: everything (spill files too) in a private folder
        folder = scratch_folder(settings.effective_scratch_dir, job_id, label)
        local, target = folder / Path(staged).name, folder / f"{job_id}.zarr"
    else:  # the merge: beside the output it publishes into
        folder, local, target = None, out_path.parent / Path(staged).name, out_path
        discard(local)  # an earlier try of this merge
        out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with slide_path(settings, slide, ranges=True) as slide_file:
            if out_path is None:
                downloaded = remote.download_prepared(local)
            else:
                remote.download_all(local)
                downloaded = []
            relocate(local, slide_path=slide_file, out_path=target,
                     model_dir=settings.model_dir)
            yield local, (remote, stamps(downloaded))
    finally:
        discard(local)
        if folder is not None:
            remove_folder(folder)


def _summed_progress(run: Any, index: int, total: int) -> ProgressCallback:
    """The part's progress callback: its tile count into the job's hash, the sum into
    the job row (under the claim), throttled like a whole run's."""
    key = _PROGRESS_KEY.format(job_id=run.job_id, token=run.token)
    last_write = 0.0

    def report(p: Progress) -> None:
        nonlocal last_write
        if p.stage != "infer":
            return
        now = time.monotonic()
        if now - last_write < run.settings.progress_interval_s and p.done < p.total:
            return
        last_write = now
        try:
            pipe = _redis().pipeline()
            pipe.hset(key, str(index), p.done)
            pipe.expire(key, 24 * 3600)
            pipe.hvals(key)
            done = sum(int(v) for v in pipe.execute()[-1])
            ours = run.store.update_progress(
                run.job_id, run.token, stage="infer", done=done, total=total,
                percent=progress_percent(Progress("infer", done, total)),
                tiles_done=done, tiles_total=total)
        except Exception as err:  # a blip must not kill the part
            log.warning("progress of job %s part %d not written: %s", run.job_id, index, err)
            return
        if not ours:
            run.lost.set()

    return report


def _test_hook(index: int, attempt: int, progress: ProgressCallback) -> ProgressCallback:
    """Tests only: with ``SLIDEPIPE_TEST_FAIL_PART_ONCE=<index>``, the first attempt of
    that part raises half-way through its tiles (after storing some chunks)."""
    if os.environ.get(TEST_FAIL_PART_ENV) != str(index) or attempt > 0:
        return progress

    def report(p: Progress) -> None:
        progress(p)
        if p.stage == "infer" and p.total and 2 * p.done >= p.total:
            raise RuntimeError(f"{TEST_FAIL_PART_ENV}: part {index} fails once")

    return report


def _drop_staging(settings: Any, staging_key: str | None) -> None:
    """Delete a remote split attempt's staging key (nothing for a shared store)."""
    if staging_key is None:
        return
    from workers.jobs.objects import get_object_store
    from workers.jobs.split_staging import RemoteStaging

    try:
        RemoteStaging(get_object_store(settings), staging_key).delete()
    except Exception as err:  # left for the next attempt's sweep or the job's deletion
        log.warning("staging %s not deleted: %s", staging_key, err)


def _finish_job(store: JobStore, job_id: str, token: str, status: JobStatus,
                error: str) -> dict[str, Any]:
    store.finish(job_id, token, status, error=error)
    return {"job_id": job_id, "outcome": str(status), "error": error}


@app.task(name=RUN_PART_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_part_task(self: Task, job_id: str, token: str, staged: str, index: int,
                  tiles_total: int, model: str,
                  staging_key: str | None = None) -> dict[str, Any]:
    """One part of a split job; retried alone when it fails. ``staging_key``: the
    attempt's staging in a remote store (the staged result is downloaded, and the part's
    chunks uploaded, there)."""
    from workers.engine.parts import run_part
    from workers.jobs.tasks import _Run, get_store

    store, settings = get_store(), get_settings()
    attempt = int(self.request.retries)
    log.info("part %d of job %s: attempt %d on %s", index, job_id, attempt,
             self.request.hostname)
    ours, _ = store.heartbeat(job_id, token)
    if not ours:  # the job ended or another run took it over: nothing of ours to do
        log.info("part %d of job %s: the claim has moved on; dropped", index, job_id)
        return {"job_id": job_id, "part": index, "outcome": "superseded"}
    with _Run(store, job_id, token, settings) as run:
        progress = _test_hook(index, attempt, telemetry.counting_tiles(
            _summed_progress(run, index, tiles_total), model=model))
        try:
            with _local_copy(run, job_id, token, staged, staging_key, f"part{index}") as (
                    local, remote):
                done = run_part(local, index, progress=progress, cancel=run.should_stop)
                if remote is not None:
                    remote[0].upload_part(local, index, remote[1])
        except RunCancelled:
            if run.lost.is_set():
                return {"job_id": job_id, "part": index, "outcome": "superseded"}
            return _finish_job(store, job_id, token, JobStatus.cancelled, "cancelled on request")
        except (SlideError, ModelError) as err:  # the same every time: no retry
            return _finish_job(store, job_id, token, JobStatus.failed,
                               f"{type(err).__name__}: {err}")
        except Exception as err:
            if attempt < split_settings().part_retries:
                log.warning("part %d of job %s failed (%s: %s); retrying it alone", index,
                            job_id, type(err).__name__, err)
                raise self.retry(exc=err, countdown=split_settings().part_retry_delay_s,
                                 max_retries=split_settings().part_retries) from err
            log.exception("part %d of job %s failed for good", index, job_id)
            return _finish_job(store, job_id, token, JobStatus.failed,
                               f"internal error in part {index}: {type(err).__name__}: {err}")
        finally:
            telemetry.flush()
    return {"job_id": job_id, "part": index, "outcome": "succeeded",
            "tiles_run": done.tiles_run, "infer_s": done.infer_s, "worker": self.request.hostname}


@app.task(name=FINISH_SPLIT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def finish_split_task(self: Task, outcomes: list[dict[str, Any]], job_id: str, token: str,
                      staged: str, staging_key: str | None = None) -> dict[str, Any]:
    """After every part: pyramids, provenance, publish; the job succeeds. With a remote
    store the merge runs on a copy of the staging tree in this worker's scratch folder,
    and the staging key is deleted once the result is published (or abandoned)."""
    from workers.engine.parts import finish
    from workers.engine.staging import discard
    from workers.jobs.objects import ResultOutput
    from workers.jobs.tasks import _Run, get_store

    store, settings = get_store(), get_settings()
    ours, _ = store.heartbeat(job_id, token)
    if not ours or any(o.get("outcome") != "succeeded" for o in outcomes):
        discard(Path(staged))  # a part ended the job, or the claim moved on
        _drop_staging(settings, staging_key)
        log.info("job %s: split attempt abandoned (%s)", job_id,
                 [o.get("outcome") for o in outcomes])
        return {"job_id": job_id, "outcome": "abandoned"}
    with _Run(store, job_id, token, settings) as run:
        output = ResultOutput.for_job(settings, job_id, token)
        try:
            with _local_copy(run, job_id, token, staged, staging_key, "merge",
                             out_path=output.out_path) as (local, _):
                result = finish(local, progress=run.progress)
            rel = output.publish()
        except Exception as err:
            log.exception("job %s: merging its parts failed", job_id)
            discard(Path(staged))
            _drop_staging(settings, staging_key)
            return _finish_job(store, job_id, token, JobStatus.failed,
                               f"internal error: {type(err).__name__}: {err}")
    info = run_info(
        result,
        parts=[{k: o[k] for k in ("tiles_run", "infer_s", "worker")} for o in outcomes],
    )
    if not store.finish(job_id, token, JobStatus.succeeded, result_rel_path=rel,
                        result_info=info):
        log.warning("job %s succeeded but its claim had moved on; result kept at %s", job_id, rel)
    # only now: a merge redelivered after a crash before the row was written redoes it
    _drop_staging(settings, staging_key)
    with suppress(Exception):  # the hash expires on its own anyway
        _redis().delete(_PROGRESS_KEY.format(job_id=job_id, token=token))
    telemetry.job_finished(store, job_id, "succeeded")
    log.info("job %s succeeded (%d parts)", job_id, len(outcomes))
    return {"job_id": job_id, "outcome": "succeeded"}
