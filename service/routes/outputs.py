"""What a pathologist takes away from a job: QuPath GeoJSON, the slide report (JSON), and
one CSV row per slide of a batch."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Response
from fastapi.responses import StreamingResponse

from service.deps import OwnerDep, SettingsDep, StoreDep
from workers.jobs import actions as jobs
from workers.jobs.objects import result_dir
from workers.jobs.rows import JobRow, JobStatus
from workers.jobs.settings import Settings
from workers.jobs.store import JobStore
from wsi.geojson_export import iter_geojson
from wsi.summary import reports_csv, summarize

router = APIRouter(tags=["outputs"])


def _result(store: JobStore, settings: Settings, owner: str, job_id: str) -> Path:
    return result_dir(settings, jobs.get_job(store, owner, job_id))


@router.get(
    "/v1/jobs/{job_id}/result.geojson",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/geo+json": {}}},
               409: {"description": "job not succeeded"}},
)
def result_geojson(
    job_id: str, owner: OwnerDep, store: StoreDep, settings: SettingsDep,
    simplify_um: Annotated[float | None, Query(ge=0, le=1000, description=(
        "outline tolerance in µm (default: half a result pixel; 0: every pixel corner)"))] = None,
    min_area_um2: Annotated[float, Query(ge=0)] = 0.0,
    tissue: bool = True,
) -> StreamingResponse:
    """The result as QuPath GeoJSON (import it in QuPath: File > Import objects), streamed
    as regions are traced: one annotation per connected region per class, the tissue
    outline, and a joint model's tile scores as tiles."""
    path = _result(store, settings, owner, job_id)
    texts = iter_geojson(path, simplify_um=simplify_um, min_area_um2=min_area_um2, tissue=tissue)
    first = next(texts)  # errors in the result's metadata surface before the 200 is sent

    def body() -> Iterator[bytes]:
        yield first.encode()
        for text in texts:
            yield text.encode()

    return StreamingResponse(
        body(), media_type="application/geo+json",
        headers={"Content-Disposition": f'attachment; filename="{job_id}.geojson"'},
    )


def cached_summary(settings: Settings, job: JobRow) -> dict[str, Any]:
    """The report of a succeeded job, computed once and kept in the cache dir."""
    path = result_dir(settings, job)
    cache = settings.cache_dir / "summaries" / f"{job.id}.json"
    if cache.is_file() and cache.stat().st_mtime >= path.stat().st_mtime:
        report: dict[str, Any] = json.loads(cache.read_text())
        return report
    report = summarize(path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, cache)
    return report


def _job_report(settings: Settings, job: JobRow, slide_name: str | None) -> dict[str, Any]:
    base = {"job_id": job.id, "slide_id": job.slide_id, "status": job.status,
            "model": job.model, "slide": slide_name}
    if job.status != JobStatus.succeeded:
        return {**base, "error": job.error}
    return {**cached_summary(settings, job), **base}


@router.get("/v1/jobs/{job_id}/summary", responses={409: {"description": "job not succeeded"}})
async def job_summary(job_id: str, owner: OwnerDep, store: StoreDep,
                      settings: SettingsDep) -> dict[str, Any]:
    """The slide report: tissue and analysed area (mm²); per class its area, share of the
    tissue and mean probability over the analysed area; a joint model's slide-level
    scores with the aggregation named."""
    job = await anyio.to_thread.run_sync(jobs.get_job, store, owner, job_id)
    report = await anyio.to_thread.run_sync(cached_summary, settings, job)
    return {"job_id": job.id, "slide_id": job.slide_id, **report}


def _batch_csv(store: JobStore, settings: Settings, owner: str, batch_id: str) -> str:
    found = store.get_batch(owner, batch_id)
    if found is None:
        raise jobs.NotFound(f"batch {batch_id!r} not found")
    _, batch_jobs = found
    reports = []
    for job in batch_jobs:
        slide = store.get_slide(owner, job.slide_id)
        reports.append(_job_report(settings, job, slide.filename if slide else None))
    return reports_csv(reports)


@router.get("/v1/batches/{batch_id}/summary.csv", response_class=Response,
            responses={200: {"content": {"text/csv": {}}}})
async def batch_summary_csv(batch_id: str, owner: OwnerDep, store: StoreDep,
                            settings: SettingsDep) -> Response:
    """One row per slide of the batch: the report's figures per class (jobs that have not
    succeeded get their status and error, figures left empty)."""
    text = await anyio.to_thread.run_sync(_batch_csv, store, settings, owner, batch_id)
    return Response(text, media_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="batch-{batch_id}-summary.csv"'})
