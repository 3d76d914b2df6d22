"""The browser viewer: a page that shows the slide as deep-zoom tiles with the result over
it (OpenSeadragon), opened through a short-lived signed link.

``POST /v1/jobs/{id}/viewer-link`` (with the API key) hands out ``/v1/view/<token>/``;
that page and everything it loads (the slide's DZI and tiles, the overlay tiles, the
page's script) live under the token, so the browser needs no key. ``GET
/v1/jobs/{id}/viewer`` serves the same page with a fresh token, and ``/v1/slides/{id}/
slide.dzi`` and ``slide_files/...`` give API clients a slide's deep-zoom tiles with the
key. ``slidepipe view`` mounts the same pages for a local result (``viewer_pages``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response, status
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field

from service.deps import OwnerDep, SettingsDep, StoreDep
from service.viewer_links import LinkRejected, sign, verify
from workers.jobs import actions as jobs
from workers.jobs.objects import result_dir, slide_path
from workers.jobs.rows import SlideRow
from workers.jobs.settings import Settings
from workers.jobs.store import JobStore
from wsi.deepzoom import dzi_levels, dzi_tile, dzi_xml
from wsi.errors import InvalidParameter
from wsi.overlay import (
    encode_rgba_png,
    overlay_info,
    render_overlay_tile,
    rgb_hex,
    viridis_stops,
)

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parents[1] / "viewer_static"
REPO_OSD = Path(__file__).resolve().parents[2] / "node_modules/openseadragon/build/openseadragon"
ASSETS_URL = "/viewer-assets/openseadragon/"
TILE_CACHE = {"Cache-Control": "private, max-age=3600"}


@dataclass(frozen=True)
class ViewerTarget:
    """What one viewer page shows."""

    result: Path
    slide: Path
    title: str


Resolver = Callable[[str], ViewerTarget]


def openseadragon_dir(settings: Settings | None) -> Path:
    """OpenSeadragon's build folder; 503 with the fix when it is not installed."""
    folder = settings.openseadragon_dir if settings and settings.openseadragon_dir else REPO_OSD
    if not (folder / "openseadragon.min.js").is_file():
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"the viewer's OpenSeadragon is not installed at {folder}: run scripts/setup.sh "
            "(npm ci) or set SLIDEPIPE_OPENSEADRAGON_DIR",
        )
    return folder


def page_html(base: str | None = None) -> str:
    html = (STATIC / "viewer.html").read_text(encoding="utf-8").replace("{assets}", ASSETS_URL)
    if base is not None:
        html = html.replace("<head>", f'<head>\n<base href="{base}">', 1)
    return html


def _found(call: Callable[[], Any]) -> Any:
    """Run ``call``; a tile address outside the pyramid is a 404, not a 422."""
    try:
        return call()
    except InvalidParameter as err:
        raise jobs.NotFound(str(err)) from err


def info_json(target: ViewerTarget) -> dict[str, Any]:
    info, pyramid = overlay_info(target.result)
    _, (width0, height0) = dzi_levels(target.slide)
    return {
        "title": f"{target.title} | model {info.model_name} | {info.finished[:10]}",
        "warnings": list(info.warnings),
        "assets": ASSETS_URL,
        "slide": {"width": width0, "height": height0, "mpp": info.slide_mpp},
        "overlay": {
            "width": pyramid.width, "height": pyramid.height, "tile_px": pyramid.tile_px,
            "max_level": pyramid.max_level,
            "viewport_width": pyramid.width * info.scale / max(1, width0),
        },
        "classes": [{"value": c.value, "name": c.name, "color": rgb_hex(c.rgb)}
                    for c in info.classes],
        "viridis": viridis_stops(),
    }


def _class_values(text: str | None) -> set[int] | None:
    if text is None:
        return None
    if text in ("", "none"):
        return set()
    try:
        return {int(v) for v in text.split(",")}
    except ValueError as err:
        raise InvalidParameter(f"classes must be label values like 1,3; got {text!r}") from err


def viewer_pages(resolve: Resolver, settings: Callable[[], Settings | None]) -> APIRouter:
    """The page and its resources under ``/v1/view/{token}/``, plus the shared assets."""
    router = APIRouter(tags=["viewer"])

    @router.get("/v1/view/{token}", include_in_schema=False)
    def page_redirect(token: str) -> RedirectResponse:
        return RedirectResponse(f"/v1/view/{token}/", status_code=307)

    @router.get("/v1/view/{token}/", response_class=HTMLResponse)
    def page(token: str) -> HTMLResponse:
        """The viewer page (open it in a browser)."""
        resolve(token)
        openseadragon_dir(settings())
        return HTMLResponse(page_html(), headers={"Cache-Control": "no-store"})

    @router.get("/v1/view/{token}/viewer.js", include_in_schema=False)
    def script(token: str) -> FileResponse:
        return FileResponse(STATIC / "viewer.js", media_type="text/javascript")

    @router.get("/v1/view/{token}/info.json")
    def info(token: str) -> dict[str, Any]:
        return info_json(resolve(token))

    @router.get("/v1/view/{token}/slide.dzi", response_class=Response)
    def slide_dzi(token: str) -> Response:
        return Response(dzi_xml(resolve(token).slide), media_type="application/xml")

    @router.get("/v1/view/{token}/slide_files/{level}/{col}_{row}.jpeg", response_class=Response)
    def slide_tile(token: str, level: int, col: int, row: int) -> Response:
        path = resolve(token).slide
        data = _found(lambda: dzi_tile(path, level, col, row))
        return Response(data, media_type="image/jpeg", headers=TILE_CACHE)

    @router.get("/v1/view/{token}/overlay/{level}/{col}_{row}.png", response_class=Response)
    def overlay_tile(
        token: str, level: int, col: int, row: int,
        mode: Annotated[str, Query(pattern="^(classes|probability)$")] = "classes",
        classes: Annotated[str | None, Query(max_length=1000)] = None,
        class_value: Annotated[int, Query(alias="class", ge=1, le=255)] = 1,
    ) -> Response:
        path = resolve(token).result
        wanted = _class_values(classes)
        rgba = _found(lambda: render_overlay_tile(path, level, col, row, mode=mode,
                                                  classes=wanted, probability_of=class_value))
        return Response(encode_rgba_png(rgba), media_type="image/png", headers=TILE_CACHE)

    @router.get("/viewer-assets/openseadragon/{file_path:path}", include_in_schema=False)
    def assets(file_path: str) -> FileResponse:
        folder = openseadragon_dir(settings()).resolve()
        target = (folder / file_path).resolve()
        if not target.is_relative_to(folder) or not target.is_file():
            raise jobs.NotFound(f"no viewer asset {file_path!r}")
        return FileResponse(target)

    return router


# -- the service: signed links to a job's result ------------------------------------------
def _slide_file(settings: Settings, slide: SlideRow) -> Path:
    """The slide as a local file for deep zoom: the data dir's, or the read-through
    cache's copy (downloaded once; the tile server keeps it open, so an eviction of
    the cached file later does not break the handle)."""
    with slide_path(settings, slide) as path:
        return path


def service_resolver(app_settings: Settings, store_of: Callable[[], JobStore]) -> Resolver:
    def resolve(token: str) -> ViewerTarget:
        try:
            job_id, owner = verify(app_settings, token)
        except LinkRejected as err:
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(err)) from err
        store = store_of()
        job = jobs.get_job(store, owner, job_id)
        result = result_dir(app_settings, job)
        slide = jobs.get_slide(store, owner, job.slide_id)
        return ViewerTarget(result, _slide_file(app_settings, slide), slide.filename)

    return resolve


class ViewerLinkRequest(BaseModel):
    ttl_s: int | None = Field(default=None, ge=60, le=7 * 86400,
                              description="seconds the link is valid (default "
                              "SLIDEPIPE_VIEWER_LINK_TTL_S)")


class ViewerLink(BaseModel):
    url: str
    expires_at: int = Field(description="unix seconds")


router = APIRouter(tags=["viewer"])


@router.post("/v1/jobs/{job_id}/viewer-link", response_model=ViewerLink,
             responses={409: {"description": "job not succeeded"}})
def viewer_link(job_id: str, owner: OwnerDep, store: StoreDep, settings: SettingsDep,
                body: ViewerLinkRequest | None = None) -> ViewerLink:
    """A short-lived signed link to the job's viewer page: open it in a browser."""
    result_dir(settings, jobs.get_job(store, owner, job_id))
    ttl = body.ttl_s if body is not None else None
    token, expires = sign(settings, job_id, owner, ttl)
    return ViewerLink(url=f"/v1/view/{token}/", expires_at=expires)


@router.get("/v1/jobs/{job_id}/viewer", response_class=HTMLResponse,
            responses={409: {"description": "job not succeeded"}})
def viewer(job_id: str, owner: OwnerDep, store: StoreDep, settings: SettingsDep) -> HTMLResponse:
    """The viewer page of the job's result, its resources under a fresh signed link."""
    result_dir(settings, jobs.get_job(store, owner, job_id))
    openseadragon_dir(settings)
    token, _ = sign(settings, job_id, owner)
    return HTMLResponse(page_html(base=f"/v1/view/{token}/"), headers={"Cache-Control": "no-store"})


@router.get("/v1/slides/{slide_id}/slide.dzi", response_class=Response)
def slide_dzi(slide_id: str, owner: OwnerDep, store: StoreDep, settings: SettingsDep) -> Response:
    """The slide's deep-zoom descriptor (254 px JPEG tiles, overlap 1)."""
    slide = jobs.get_slide(store, owner, slide_id)
    return Response(dzi_xml(_slide_file(settings, slide)), media_type="application/xml")


@router.get("/v1/slides/{slide_id}/slide_files/{level}/{col}_{row}.jpeg",
            response_class=Response)
def slide_dzi_tile(slide_id: str, level: int, col: int, row: int, owner: OwnerDep,
                   store: StoreDep, settings: SettingsDep) -> Response:
    """One deep-zoom tile of the slide, as openslide's ``DeepZoomGenerator`` makes it."""
    slide = jobs.get_slide(store, owner, slide_id)
    path = _slide_file(settings, slide)
    return Response(_found(lambda: dzi_tile(path, level, col, row)), media_type="image/jpeg",
                    headers=TILE_CACHE)
