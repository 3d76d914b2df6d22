"""The FastAPI application: routers under ``/v1``, probes, error handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import metadata

from fastapi import FastAPI

from service import metrics
from service.errors import install_error_handlers
from service.limits import BodyLimit
from service.openapi import install_openapi
from service.routes import health, jobs, models, outputs, slide_tissue, slides, viewer
from workers.jobs.settings import Settings, get_settings
from workers.jobs.store import JobStore

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return metadata.version("slidepipe")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def create_app(
    settings: Settings | None = None,
    *,
    store: JobStore | None = None,
    enqueue: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the app; by default from :func:`get_settings` and the Celery queue."""
    settings = settings or get_settings()
    settings.api_key_owners()  # a malformed SLIDEPIPE_API_KEYS fails at start, not per request
    if enqueue is None:
        from workers.jobs.celery_app import enqueue_job

        enqueue = enqueue_job

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        app.state.store = store or JobStore(settings.effective_database_url)
        if not settings.api_key_owners():
            log.warning("no API keys configured (SLIDEPIPE_API_KEYS): every /v1 request gets 401")
        yield
        if store is None:
            app.state.store.dispose()
        if getattr(app.state, "metrics_redis", None) is not None:  # made by GET /metrics
            app.state.metrics_redis.close()

    app = FastAPI(
        title="slidepipe",
        version=_version(),
        description="Whole-slide histopathology pipeline: upload slides, queue batches of "
        "model runs on GPU workers, follow progress, download heatmaps and OME-Zarr results.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.enqueue = enqueue
    install_error_handlers(app)
    install_openapi(app)  # every error documented as the handlers send it
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # 413 for big JSON
    for router in (health.router, metrics.router, slides.router, slide_tissue.router,
                   models.router, jobs.router):
        app.include_router(router)
    for router in (outputs.router, viewer.router):  # what the pathologist takes away
        app.include_router(router)
    app.include_router(viewer.viewer_pages(
        viewer.service_resolver(settings, lambda: app.state.store), lambda: settings))
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory service.app:app_from_env``."""
    return create_app()
