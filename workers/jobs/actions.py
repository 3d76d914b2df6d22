"""The jobs layer: validate a submission, store it, queue it; the API's routes stay thin.

Everything a request can get wrong (an unknown model, a tile size out of range, a slide
of another owner, a slide without mpp) is found here, before a single job is stored or
queued, and raised as a typed error that ``service`` maps to an HTTP status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from models.card import ModelCard
from models.catalogue import resolve_card
from models.errors import UnknownModel
from workers.engine.geometry import run_geometry
from workers.engine.spec import Progress, RunResult
from workers.engine.stain_choice import MACENKO, check_stain, stain_kind
from workers.jobs.bounds import DEFAULT_MAX_TILES, check_work
from workers.jobs.params import JobParams
from workers.jobs.rows import BatchRow, JobRow, SlideRow
from workers.jobs.store import JobStore
from wsi.errors import InvalidParameter, SlideMissingMpp

log = logging.getLogger(__name__)

MAX_JOBS_PER_BATCH = 1000


class JobsError(Exception):
    """Base of the errors of the jobs layer."""


class NotFound(JobsError, LookupError):
    """No such slide, job or batch for this owner (another owner's ids look the same)."""


class Conflict(JobsError):
    """The request contradicts the resource's state (e.g. a heatmap of a running job)."""


class QueueUnavailable(JobsError, ConnectionError):
    """The broker did not take the job; the job is marked failed, not left queued."""


# -- progress as one number -------------------------------------------------------------
#: The share of the whole run each stage takes (inference dominates).
STAGE_SPANS: dict[str, tuple[float, float]] = {
    "open": (0.0, 2.0),
    "tissue": (2.0, 6.0),
    "plan": (6.0, 10.0),
    "infer": (10.0, 95.0),
    "pyramid": (95.0, 99.0),
    "done": (99.0, 100.0),
}


def progress_percent(progress: Progress) -> float:
    lo, hi = STAGE_SPANS.get(progress.stage, (0.0, 0.0))
    fraction = min(max(progress.fraction, 0.0), 1.0)
    return round(lo + (hi - lo) * fraction, 2)


# -- submission -------------------------------------------------------------------------
def check_model(model: str, model_dir: Path | None) -> None:
    """A model must be a card *name* here: clients do not get to point at server files."""
    if "/" in model or "\\" in model or model.endswith(".json") or not model.strip():
        raise UnknownModel(f"model must be the name of a model card, got {model!r}")
    resolve_card(model, model_dir)


def check_params(model: str, params: JobParams, model_dir: Path | None) -> None:
    """Validate the tile geometry the run will use (job values over the card's)."""
    run_geometry(resolve_card(model, model_dir), params.tile_px, params.overlap_px)
    check_stain_params(params, model_dir)


def check_stain_params(params: JobParams, model_dir: Path | None) -> None:
    """A stain step must be Macenko or a cyclegan model *name* (no server paths)."""
    if params.stain is None:
        if params.stain_output or params.stain_reference_slide:
            raise InvalidParameter("stain_output and stain_reference_slide need a stain step")
        return
    if stain_kind(params.stain) == MACENKO:
        return
    if params.stain_reference_slide:
        raise InvalidParameter("stain_reference_slide applies to the Macenko stain step only")
    check_model(params.stain, model_dir)
    check_stain(params.stain, model_dir)


def check_slides(
    store: JobStore,
    owner: str,
    slide_ids: Sequence[str],
    params: JobParams,
    card: ModelCard | None = None,
    max_tiles: int = DEFAULT_MAX_TILES,
) -> None:
    """Each slide exists, is the owner's and has an mpp; with ``card``, the work the job
    asks of it is within bounds (:mod:`workers.jobs.bounds`)."""
    if not slide_ids:
        raise InvalidParameter("at least one slide id is needed")
    if len(slide_ids) > MAX_JOBS_PER_BATCH:
        raise InvalidParameter(f"at most {MAX_JOBS_PER_BATCH} slides per batch")
    if len(set(slide_ids)) != len(slide_ids):
        raise InvalidParameter("a slide id appears twice in the batch")
    for slide_id in slide_ids:
        slide = store.get_slide(owner, slide_id)
        if slide is None:
            raise NotFound(f"slide {slide_id!r} not found")
        if slide.mpp is None and params.slide_mpp is None:
            raise SlideMissingMpp(
                f"slide {slide_id!r} ({slide.filename}) declares no microns-per-pixel; "
                "pass parameters.slide_mpp with the scanner's resolution"
            )
        if card is not None:
            check_work(
                slide,
                card,
                target_mpp=params.target_mpp,
                slide_mpp=params.slide_mpp,
                tile_px=params.tile_px,
                overlap_px=params.overlap_px,
                tissue_working_mpp=params.tissue_working_mpp,
                max_tiles=max_tiles,
            )


def submit(
    store: JobStore,
    enqueue: Callable[[str], None],
    *,
    owner: str,
    slide_ids: Sequence[str],
    model: str,
    params: JobParams,
    batch: bool,
    model_dir: Path | None,
    max_tiles: int = DEFAULT_MAX_TILES,
) -> tuple[BatchRow | None, list[JobRow]]:
    """Validate everything, store the jobs, then queue each one.

    When the broker refuses, the stored jobs are failed with the reason (never left
    ``queued`` with nothing in the queue) and :class:`QueueUnavailable` is raised.
    """
    check_model(model, model_dir)
    check_params(model, params, model_dir)
    check_slides(store, owner, slide_ids, params, resolve_card(model, model_dir), max_tiles)
    if params.stain_reference_slide is not None:
        get_slide(store, owner, params.stain_reference_slide)  # NotFound for another owner's
    stored_params = params.model_dump(exclude_defaults=False)
    batch_row, jobs = store.create_jobs(owner, slide_ids, model, stored_params, batch=batch)
    for index, job in enumerate(jobs):
        try:
            enqueue(job.id)
        except Exception as err:  # kombu/redis raise assorted connection errors
            log.error("could not queue job %s: %s", job.id, err)
            unqueued = [j.id for j in jobs[index:]]
            store.fail_unqueued(unqueued, f"could not be queued: broker unreachable ({err})")
            raise QueueUnavailable(
                f"the job queue (broker) is unreachable: {err}; {len(unqueued)} job(s) "
                "were not queued and are marked failed"
            ) from err
    return batch_row, jobs


def cancel(store: JobStore, owner: str, job_id: str) -> JobRow:
    job = store.request_cancel(owner, job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    return job


def get_job(store: JobStore, owner: str, job_id: str) -> JobRow:
    job = store.get_job(owner, job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    return job


def get_slide(store: JobStore, owner: str, slide_id: str) -> SlideRow:
    slide = store.get_slide(owner, slide_id)
    if slide is None:
        raise NotFound(f"slide {slide_id!r} not found")
    return slide


def run_info(result: RunResult, **extra: Any) -> dict[str, Any]:
    """What a succeeded job keeps of its run (``result_info``), a split run's parts in
    ``extra``; the warnings say, e.g., that no tissue was found (never silent)."""
    return {
        "tiles_total": result.tiles_total,
        "tiles_inferred": result.tiles_inferred,
        "timings_s": result.timings_s,
        "classes": result.classes,
        "warnings": result.warnings,
        **extra,
    }


def job_summary(job: JobRow) -> dict[str, Any]:
    """The fields an event stream sends on each change."""
    return {
        "id": job.id,
        "status": job.status,
        "stage": job.stage,
        "stage_done": job.stage_done,
        "stage_total": job.stage_total,
        "tiles_done": job.tiles_done,
        "tiles_total": job.tiles_total,
        "percent": job.percent,
        "error": job.error,
    }
