"""``/v1/jobs`` and ``/v1/batches``: submit, follow, cancel, and fetch results."""

from __future__ import annotations

import asyncio
import json
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import FileResponse, StreamingResponse

from service.deps import EnqueueDep, OwnerDep, SettingsDep, StoreDep
from service.schemas import (
    BatchAccepted,
    BatchCreate,
    BatchOut,
    JobAccepted,
    JobCreate,
    JobList,
    JobOut,
)
from service.shutdown import SHUTTING_DOWN
from workers.jobs import actions as jobs
from workers.jobs.objects import result_dir
from workers.jobs.rows import TERMINAL, JobRow, JobStatus, as_utc
from workers.jobs.settings import Settings
from workers.jobs.store import JobStore
from wsi.errors import InvalidParameter
from wsi.heatmap import MAX_HEATMAP_PX, render_heatmap_png

router = APIRouter(tags=["jobs"])

EVENT_KEEPALIVE_S = 15.0
#: The longest ``result.zarr/<path>`` looked up on disk.
MAX_RESULT_PATH = 1024
ZIP_BLOCK_BYTES = 1 << 20


def job_links(job_id: str) -> dict[str, str]:
    base = f"/v1/jobs/{job_id}"
    return {
        "self": base,
        "events": f"{base}/events",
        "cancel": f"{base}/cancel",
        "heatmap": f"{base}/heatmap.png",
        "zip": f"{base}/result.zarr.zip",
        "zarr": f"{base}/result.zarr",
    }


def job_out(job: JobRow) -> JobOut:
    out = JobOut.model_validate(job)
    out.links = job_links(job.id)
    if job.status != JobStatus.succeeded:
        for key in ("heatmap", "zip", "zarr"):
            out.links.pop(key)
    return out


# -- submission -------------------------------------------------------------------------
@router.post(
    "/v1/jobs",
    response_model=JobAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        404: {"description": "no such slide"},
        422: {"description": "bad model or parameters"},
    },
)
def submit_job(
    body: JobCreate,
    response: Response,
    owner: OwnerDep,
    store: StoreDep,
    settings: SettingsDep,
    enqueue: EnqueueDep,
) -> JobAccepted:
    """Queue one slide through one model; everything is validated before it is queued."""
    _, created = jobs.submit(
        store,
        enqueue,
        owner=owner,
        slide_ids=[body.slide_id],
        model=body.model,
        params=body.parameters,
        batch=False,
        model_dir=settings.model_dir,
        max_tiles=settings.max_tiles_per_job,
    )
    job = created[0]
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobAccepted(job_id=job.id, status=JobStatus(job.status), links=job_links(job.id))


@router.post(
    "/v1/batches",
    response_model=BatchAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        404: {"description": "no such slide"},
        422: {"description": "bad model or parameters"},
    },
)
def submit_batch(
    body: BatchCreate,
    response: Response,
    owner: OwnerDep,
    store: StoreDep,
    settings: SettingsDep,
    enqueue: EnqueueDep,
) -> BatchAccepted:
    """Queue many slides through one model with one set of parameters (one job each)."""
    batch, created = jobs.submit(
        store,
        enqueue,
        owner=owner,
        slide_ids=body.slide_ids,
        model=body.model,
        params=body.parameters,
        batch=True,
        model_dir=settings.model_dir,
        max_tiles=settings.max_tiles_per_job,
    )
    assert batch is not None
    response.headers["Location"] = f"/v1/batches/{batch.id}"
    return BatchAccepted(
        batch_id=batch.id,
        job_ids=[j.id for j in created],
        links={"self": f"/v1/batches/{batch.id}", "jobs": f"/v1/jobs?batch_id={batch.id}"},
    )


@router.get("/v1/batches/{batch_id}", response_model=BatchOut)
def get_batch(batch_id: str, owner: OwnerDep, store: StoreDep) -> BatchOut:
    found = store.get_batch(owner, batch_id)
    if found is None:
        raise jobs.NotFound(f"batch {batch_id!r} not found")
    batch, batch_jobs = found
    counts = {s.value: 0 for s in JobStatus}
    for job in batch_jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    percent = sum(j.percent for j in batch_jobs) / len(batch_jobs) if batch_jobs else 0.0
    return BatchOut(
        id=batch.id,
        model=batch.model,
        params=batch.params,
        created_at=as_utc(batch.created_at),  # type: ignore[arg-type]
        job_ids=[j.id for j in batch_jobs],
        counts=counts,
        percent=round(percent, 2),
    )


# -- following --------------------------------------------------------------------------
@router.get("/v1/jobs", response_model=JobList)
def list_jobs(
    owner: OwnerDep,
    store: StoreDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    slide_id: Annotated[str | None, Query(max_length=64)] = None,
    batch_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobList:
    rows, total = store.list_jobs(
        owner,
        status=status_.value if status_ else None,
        slide_id=slide_id,
        batch_id=batch_id,
        limit=limit,
        offset=offset,
    )
    return JobList(items=[job_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/v1/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, owner: OwnerDep, store: StoreDep) -> JobOut:
    return job_out(jobs.get_job(store, owner, job_id))


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, owner: OwnerDep, store: StoreDep) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its next batch."""
    return job_out(jobs.cancel(store, owner, job_id))


def _sse(event: str, data: dict[str, object]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str, request: Request, owner: OwnerDep, store: StoreDep, settings: SettingsDep
) -> StreamingResponse:
    """Server-sent events: ``progress`` on every change, then one ``end`` and close."""
    job = await anyio.to_thread.run_sync(jobs.get_job, store, owner, job_id)

    async def stream(first: JobRow) -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        poll_s = settings.events_poll_s
        last: dict[str, object] | None = None
        quiet = 0.0
        current: JobRow | None = first
        while current is not None:
            summary = jobs.job_summary(current)
            if summary != last:
                last, quiet = summary, 0.0
                if current.status in TERMINAL:
                    yield _sse("end", summary)
                    return
                yield _sse("progress", summary)
            elif quiet >= EVENT_KEEPALIVE_S:
                quiet = 0.0
                yield b": keepalive\n\n"
            await asyncio.sleep(poll_s)
            quiet += poll_s
            if SHUTTING_DOWN.is_set():  # the server is stopping: the client reconnects
                yield b": server shutting down\n\n"
                return
            if await request.is_disconnected():
                return
            current = await anyio.to_thread.run_sync(store.get_job, owner, job_id)
        yield _sse("end", {"id": job_id, "status": "deleted"})

    return StreamingResponse(
        stream(job),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# -- results ----------------------------------------------------------------------------
def _result_dir(store: JobStore, settings: Settings, owner: str, job_id: str) -> Path:
    return result_dir(settings, jobs.get_job(store, owner, job_id))


def _render(path: Path, class_name: str | None, max_size: int, overlay: bool) -> bytes:
    try:
        return render_heatmap_png(path, class_name=class_name, max_px=max_size, overlay=overlay)
    except KeyError as err:  # an unknown class: the client's mistake, with the choices
        raise InvalidParameter(str(err.args[0]) if err.args else "unknown class") from err


@router.get(
    "/v1/jobs/{job_id}/heatmap.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 409: {"description": "job not succeeded"}},
)
async def heatmap(
    job_id: str,
    owner: OwnerDep,
    store: StoreDep,
    settings: SettingsDep,
    class_name: Annotated[
        str | None, Query(alias="class", max_length=64, description="default: the last class")
    ] = None,
    max_size: Annotated[int, Query(ge=64, le=MAX_HEATMAP_PX, description="longer side, px")] = 1024,
    overlay: bool = True,
) -> Response:
    """One class's probability as a PNG, over the slide thumbnail when ``overlay``."""
    path = await anyio.to_thread.run_sync(_result_dir, store, settings, owner, job_id)
    png = await anyio.to_thread.run_sync(_render, path, class_name, max_size, overlay)
    return Response(png, media_type="image/png")


class _ZipSink:
    """A write-only, unseekable file for ``zipfile`` whose bytes are taken as they come."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Nothing to release (zipfile never closes a file it was handed; its stub asks
        for the method all the same)."""

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def iter_zip(root: Path) -> Iterator[bytes]:
    """Stream ``root``'s files as a ZIP (stored, zip64) whose top level is the zarr root."""
    sink = _ZipSink()
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            info = zipfile.ZipInfo.from_file(path, arcname=path.relative_to(root).as_posix())
            info.compress_type = zipfile.ZIP_STORED
            with open(path, "rb") as src, zf.open(info, mode="w", force_zip64=True) as dst:
                while block := src.read(ZIP_BLOCK_BYTES):
                    dst.write(block)
                    if chunk := sink.take():
                        yield chunk
            if chunk := sink.take():
                yield chunk
    yield sink.take()


@router.get(
    "/v1/jobs/{job_id}/result.zarr.zip",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/zip": {}}},
        409: {"description": "job not succeeded"},
    },
)
def result_zip(
    job_id: str, owner: OwnerDep, store: StoreDep, settings: SettingsDep
) -> StreamingResponse:
    """The whole result zarr as one ZIP, streamed (its root is the zarr root)."""
    root = _result_dir(store, settings, owner, job_id)
    return StreamingResponse(
        iter_zip(root),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{job_id}.zarr.zip"'},
    )


def safe_result_file(root: Path, rel: str) -> Path:
    """``root/rel`` when it names a regular file inside ``root``; NotFound otherwise."""
    missing = jobs.NotFound(f"no file {rel[:200]!r} in this result")
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        raise missing
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise missing
    # no result file has a longer name: refused before the file system says ENAMETOOLONG
    if len(rel) > MAX_RESULT_PATH or any(len(part.encode()) > 255 for part in parts):
        raise missing
    try:
        root = root.resolve()
        candidate = root.joinpath(*parts).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            raise missing
    except OSError as err:  # any other name the file system refuses is no file of ours
        raise missing from err
    return candidate


@router.head("/v1/jobs/{job_id}/result.zarr/{file_path:path}", include_in_schema=False)
@router.get(
    "/v1/jobs/{job_id}/result.zarr/{file_path:path}",
    response_class=FileResponse,
    responses={
        404: {"description": "no such file in the result"},
        409: {"description": "job not succeeded"},
    },
)
def result_file(
    job_id: str, file_path: str, owner: OwnerDep, store: StoreDep, settings: SettingsDep
) -> FileResponse:
    """One file of the result zarr (metadata or chunk), for zarr/ome-zarr clients over HTTP."""
    root = _result_dir(store, settings, owner, job_id)
    path = safe_result_file(root, file_path)
    media = (
        "application/json"
        if path.name.startswith(".z") or path.suffix == ".json"
        else "application/octet-stream"
    )
    return FileResponse(path, media_type=media)
