"""``/v1/slides``: upload, list, metadata, thumbnail, delete."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request, Response, status

from service.deps import OwnerDep, SettingsDep, StoreDep
from service.schemas import SlideList, SlideOut
from service.uploads import receive_slide
from workers.jobs import actions as jobs
from workers.jobs.objects import delete_result_objects, delete_slide_objects, slide_path
from workers.jobs.rows import SlideRow
from workers.jobs.settings import Settings
from wsi.heatmap import encode_png
from wsi.reader import Slide

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/slides", tags=["slides"])

UPLOAD_DOC = """Upload one slide, streamed.

Send either the raw file as the body (`Content-Type: application/octet-stream`, name in
`?filename=`) or a multipart form whose first file part is the slide
(`curl -F file=@slide.svs`). Uploading the same content again answers 200 with the
slide already stored; a new slide answers 201.

A slide of several files (a DICOM WSI folder, an MRXS with its data folder) is sent as
one zip or tar archive (`.tar.gz` too) of its files; members with absolute paths, `..`,
links or devices are refused (422), and so are archives of too many members or that
unpack to more than `SLIDEPIPE_MAX_UPLOAD_BYTES` (413).
"""


@router.post(
    "",
    response_model=SlideOut,
    status_code=status.HTTP_201_CREATED,
    description=UPLOAD_DOC,
    responses={
        200: {"description": "the same content was already uploaded", "model": SlideOut},
        400: {"description": "empty or malformed body"},
        413: {"description": "larger than SLIDEPIPE_MAX_UPLOAD_BYTES"},
        415: {"description": "not a slide format"},
        422: {
            "description": "a slide format, but unreadable (truncated, corrupt), or a bad filename"
        },
    },
    openapi_extra={
        "requestBody": {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
            },
            "required": True,
        }
    },
)
async def upload_slide(
    request: Request,
    response: Response,
    owner: OwnerDep,
    settings: SettingsDep,
    store: StoreDep,
    filename: Annotated[
        str | None, Query(max_length=255, description="label for a raw upload")
    ] = None,
) -> SlideRow:
    slide, created = await receive_slide(
        request, owner=owner, settings=settings, store=store, filename=filename
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/v1/slides/{slide.id}"
    return slide


@router.get("", response_model=SlideList)
def list_slides(
    owner: OwnerDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> SlideList:
    rows, total = store.list_slides(owner, limit=limit, offset=offset)
    return SlideList(
        items=[SlideOut.model_validate(r) for r in rows], total=total, limit=limit, offset=offset
    )


@router.get("/{slide_id}", response_model=SlideOut)
def get_slide(slide_id: str, owner: OwnerDep, store: StoreDep) -> SlideRow:
    return jobs.get_slide(store, owner, slide_id)


def _thumbnail_png(settings: Settings, slide: SlideRow, max_size: int) -> bytes:
    """Render once per size and keep it in the cache dir (written atomically)."""
    cache = settings.cache_dir / "thumbnails" / f"{slide.id}-{max_size}.png"
    if cache.is_file():
        return cache.read_bytes()
    with slide_path(settings, slide) as path, Slide(path) as reader:
        png = encode_png(reader.thumbnail(max_size))
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(png)
        os.replace(tmp, cache)
    except OSError as err:  # a full disk costs the cache, not the answer
        log.warning("thumbnail cache %s not written: %s", cache.name, err)
        tmp.unlink(missing_ok=True)
    return png


@router.get(
    "/{slide_id}/thumbnail.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
async def get_thumbnail(
    slide_id: str,
    owner: OwnerDep,
    store: StoreDep,
    settings: SettingsDep,
    max_size: Annotated[int, Query(ge=16, le=2048, description="longer side in pixels")] = 512,
) -> Response:
    slide = await anyio.to_thread.run_sync(jobs.get_slide, store, owner, slide_id)
    png = await anyio.to_thread.run_sync(_thumbnail_png, settings, slide, max_size)
    return Response(png, media_type="image/png")


@router.delete(
    "/{slide_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={409: {"description": "a job of this slide is queued or running"}},
)
def delete_slide(slide_id: str, owner: OwnerDep, store: StoreDep, settings: SettingsDep) -> None:
    """Delete a slide with its jobs and their results; refused while a job still runs."""
    slide = jobs.get_slide(store, owner, slide_id)
    if store.count_active_jobs_for_slide(slide_id):
        raise jobs.Conflict(f"slide {slide_id!r} has queued or running jobs; cancel them first")
    deleted_jobs = store.delete_slide(owner, slide_id)
    if deleted_jobs is None:
        raise jobs.NotFound(f"slide {slide_id!r} not found")
    delete_slide_objects(settings, slide)  # a file, or an archive's folder
    for thumb in (settings.cache_dir / "thumbnails").glob(f"{slide.id}-*.png"):
        thumb.unlink(missing_ok=True)
    for job in deleted_jobs:
        delete_result_objects(settings, job)
