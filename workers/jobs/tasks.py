"""The one Celery task: run the engine for a stored job and keep the store up to date.

The task is thin; :func:`execute_job` does the work and runs without Celery too. A job
is *claimed* in the store before it runs (a fresh token per attempt), a heartbeat thread
keeps the claim alive, and every later write is conditional on that claim, so that a
message delivered twice (visibility timeout, a worker thought dead) never lets two
runs both report; a second delivery waits at most ``stale_after_s`` for the first
worker's heartbeat to stop, then drops (the reconciler re-queues the job if that worker
dies later), so a long job never parks idle workers. The engine publishes its result
atomically at ``out_path``; the job is marked ``succeeded`` only after that, and a
failed or cancelled run publishes nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from contextlib import ExitStack
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Task
from celery.signals import worker_process_init

from models.errors import ModelError
from workers.engine.spec import Progress, RunCancelled, RunSpec
from workers.jobs import telemetry
from workers.jobs.actions import progress_percent, run_info
from workers.jobs.celery_app import RUN_JOB_TASK, app
from workers.jobs.claims import ClaimOutcome
from workers.jobs.objects import ResultOutput, slide_path
from workers.jobs.rows import JobRow, JobStatus
from workers.jobs.settings import Settings, get_settings
from workers.jobs.split import run_or_split  # also registers the part tasks
from workers.jobs.store import JobStore
from wsi.errors import InvalidParameter, SlideError

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def get_store() -> JobStore:
    """The store of this (pool) process; created lazily, after any fork."""
    return JobStore(get_settings().effective_database_url)


@worker_process_init.connect
def _fresh_store_after_fork(**_: Any) -> None:
    get_store.cache_clear()


def build_spec(
    job: JobRow,
    settings: Settings,
    *,
    slide: Path,
    out_path: Path,
    reference: Path | None = None,
) -> RunSpec:
    """The engine's view of a job: stored parameters plus server-side paths and device.

    ``slide`` and ``reference`` (the slide ``stain_reference_slide`` names, Macenko's
    target stain) are what :func:`workers.jobs.objects.slide_path` hands out: the data
    dir's files, or on a remote store a slide reference or a cached copy.
    """
    params = {k: v for k, v in (job.params or {}).items() if v is not None}
    if params.pop("stain_reference_slide", None) is not None:
        if reference is None:
            raise InvalidParameter("the stain reference slide of this job is gone")
        params["stain_reference"] = str(reference)
    return RunSpec.from_dict(
        {
            **params,
            "slide_path": str(slide),
            "model": job.model,
            "model_dir": str(settings.model_dir) if settings.model_dir else None,
            "out_path": str(out_path),
            "device": settings.worker_device,
            "overwrite": False,
        }
    )


def remove_partials(out_path: Path) -> None:
    """Drop what runs of this job killed mid-way left beside ``out_path``.

    Called only by the run that holds the job's claim, so none of them is still live.
    """
    for partial in out_path.parent.glob(f".{out_path.name}.partial-*"):
        log.info("removing %s left by an interrupted run", partial.name)
        shutil.rmtree(partial, ignore_errors=True)


class _Run:
    """Progress, cancellation and heartbeat of one claimed run."""

    def __init__(self, store: JobStore, job_id: str, token: str, settings: Settings) -> None:
        self.store, self.job_id, self.token, self.settings = store, job_id, token, settings
        self.lost = threading.Event()  # the claim went to another worker
        self.cancel = threading.Event()
        self._stop = threading.Event()
        self._last_stage: str | None = None
        self._last_write = 0.0
        self._last_poll = 0.0
        self._tiles: tuple[int, int] | None = None
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> _Run:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.settings.heartbeat_s + 5)

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                ours, cancel = self.store.heartbeat(self.job_id, self.token)
            except Exception as err:  # a database blip must not kill the run
                log.warning("heartbeat of job %s failed: %s", self.job_id, err)
                continue
            if not ours:
                self.lost.set()
            if cancel:
                self.cancel.set()

    def progress(self, progress: Progress) -> None:
        """Throttled store write; stage changes and the last unit always go through."""
        now = time.monotonic()
        if progress.stage == "infer":
            self._tiles = (progress.done, progress.total)
        changed = progress.stage != self._last_stage
        last_unit = progress.total > 0 and progress.done >= progress.total
        if not (
            changed or last_unit or now - self._last_write >= self.settings.progress_interval_s
        ):
            return
        self._last_stage, self._last_write = progress.stage, now
        tiles_done, tiles_total = self._tiles if self._tiles else (None, None)
        try:
            ours = self.store.update_progress(
                self.job_id,
                self.token,
                stage=progress.stage,
                done=progress.done,
                total=progress.total,
                percent=progress_percent(progress),
                tiles_done=tiles_done,
                tiles_total=tiles_total,
            )
        except Exception as err:
            log.warning("progress write of job %s failed: %s", self.job_id, err)
            return
        if not ours:
            self.lost.set()

    def should_stop(self) -> bool:
        """The engine's cancel check: polled between batches, the store at most 1/s."""
        if self.lost.is_set() or self.cancel.is_set():
            return True
        now = time.monotonic()
        if now - self._last_poll >= min(1.0, self.settings.heartbeat_s):
            self._last_poll = now
            try:
                if self.store.cancel_requested(self.job_id):
                    self.cancel.set()
            except Exception as err:
                log.warning("cancel poll of job %s failed: %s", self.job_id, err)
        return self.cancel.is_set()


def _claim(
    store: JobStore, job_id: str, token: str, worker: str, settings: Settings
) -> ClaimOutcome:
    """Claim the job; while another worker's claim is alive, wait a little, then drop.

    A second delivery of a job (the broker's visibility timeout ran out while the job
    was still running, a pool process died, the reconciler re-queued it) finds the job
    ``running``. It waits at most ``stale_after_s`` (plus one heartbeat): long enough to
    take over from a pool process that just died, whose heartbeat stops. An owner whose
    heartbeat stays alive keeps the job, and this delivery is acknowledged and dropped
    (``busy``): standing by until the end would park this worker for the whole job, and
    nothing is lost, since the reconciler re-queues the job if its owner dies later.
    """
    announced = False
    deadline = time.monotonic() + settings.stale_after_s + settings.heartbeat_s
    while True:
        result = store.claim(job_id, token, worker, settings.stale_after_s)
        if result.outcome != ClaimOutcome.busy:
            return result.outcome
        owner = result.job.worker if result.job is not None else "?"
        if time.monotonic() >= deadline:
            log.info(
                "job %s runs on %s, whose heartbeat is alive: this copy is dropped (the "
                "reconciler re-queues the job if %s dies)", job_id, owner, owner
            )
            return ClaimOutcome.busy
        if not announced:
            log.info(
                "job %s is running on %s; waiting to see whether it goes silent", job_id, owner
            )
            announced = True
        time.sleep(min(settings.heartbeat_s, 1.0))


def execute_job(
    job_id: str, *, store: JobStore, settings: Settings, worker: str | None = None
) -> dict[str, Any]:
    """Run one stored job to a terminal state (or leave it to the worker that owns it)."""
    worker = worker or f"{socket.gethostname()}:{os.getpid()}"
    token = uuid.uuid4().hex
    outcome = _claim(store, job_id, token, worker, settings)
    if outcome != ClaimOutcome.claimed:
        log.info("job %s not run by %s: %s", job_id, worker, outcome)
        return {"job_id": job_id, "outcome": str(outcome)}
    job = store.get_job(None, job_id)
    slide = store.get_slide_any_owner(job.slide_id) if job is not None else None
    if job is None or slide is None:
        return {"job_id": job_id, "outcome": str(ClaimOutcome.missing)}
    log.info("job %s (slide %s, model %s) claimed by %s", job_id, slide.id, job.model, worker)
    # local store: the engine publishes in place; remote: it writes into this worker's
    # scratch folder and the tree is uploaded under a fresh key (workers/jobs/objects.py)
    output = ResultOutput.for_job(settings, job_id, token)
    out_path = output.out_path
    with _Run(store, job_id, token, settings) as run:
        try:
            published = output.already_published()
            if published is not None:
                # a previous attempt published and died before recording it: the
                # publish is atomic, so what is there is complete
                rel = published
                log.info("job %s: reusing the result already published at %s", job_id, rel)
                info: dict[str, Any] = {"reused": True}
            elif out_path.is_dir():  # made here by an attempt that died before uploading
                rel = output.publish()
                info = {"reused": True}
            else:
                # the engine pulls in torch: imported on first use (run_or_split), after the claim and
                # under its heartbeat, so that seconds of importing never look like a
                # message nobody took (to the reconciler) or a dead run (to other workers)
                remove_partials(out_path)
                ref_id = (job.params or {}).get("stain_reference_slide")
                reference = store.get_slide_any_owner(ref_id) if ref_id else None
                with ExitStack() as opened:  # slides pinned in the cache while in use
                    spec = build_spec(
                        job,
                        settings,
                        slide=opened.enter_context(slide_path(settings, slide, ranges=True)),
                        out_path=out_path,
                        reference=opened.enter_context(slide_path(settings, reference))
                        if reference is not None
                        else None,
                    )
                    # each inferred tile counted once for /metrics (tiles/s)
                    progress = telemetry.counting_tiles(run.progress, model=job.model)
                    # a large slide goes to its parts' tasks (workers/jobs/split.py): None
                    result = run_or_split(spec, job_id=job_id, token=token, progress=progress,
                                          cancel=run.should_stop,
                                          shared_store=output.store.is_local,
                                          chunk_stored=output.chunk_stored())
                    if result is None:
                        return {"job_id": job_id, "outcome": "split"}
                rel = output.publish()
                info = run_info(result)
        except RunCancelled:
            if run.lost.is_set():
                log.warning("job %s: claim taken over by another worker; stopping", job_id)
                return {"job_id": job_id, "outcome": "superseded"}
            store.finish(job_id, token, JobStatus.cancelled, error="cancelled on request")
            return {"job_id": job_id, "outcome": "cancelled"}
        except (SlideError, ModelError) as err:
            message = f"{type(err).__name__}: {err}"
            log.warning("job %s failed: %s", job_id, message)
            store.finish(job_id, token, JobStatus.failed, error=message)
            return {"job_id": job_id, "outcome": "failed", "error": message}
        except Exception as err:
            message = f"internal error: {type(err).__name__}: {err}"
            log.exception("job %s failed unexpectedly", job_id)
            store.finish(job_id, token, JobStatus.failed, error=message)
            return {"job_id": job_id, "outcome": "failed", "error": message}
        finally:  # chunks a failed run uploaded (nothing once published)
            output.abandon()
    if not store.finish(job_id, token, JobStatus.succeeded, result_rel_path=rel, result_info=info):
        log.warning("job %s succeeded but its claim had moved on; result kept at %s", job_id, rel)
    log.info("job %s succeeded", job_id)
    return {"job_id": job_id, "outcome": "succeeded"}


@app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self: Task, job_id: str) -> dict[str, Any]:
    """Celery entry point: parse the message (a job id) and run it."""
    outcome = execute_job(
        job_id,
        store=get_store(),
        settings=get_settings(),
        worker=f"{self.request.hostname}:{os.getpid()}",
    )
    telemetry.job_finished(get_store(), job_id, str(outcome.get("outcome")))  # /metrics
    return outcome
