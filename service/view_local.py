"""``slidepipe view``: the service's viewer page for one local result, without a server's
database, keys or links (it listens on the loopback address by default)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from service.errors import install_error_handlers
from service.routes.viewer import ViewerTarget, viewer_pages
from workers.jobs.actions import NotFound

LOCAL_TOKEN = "local"


def local_viewer_app(result: Path, slide: Path) -> FastAPI:
    """An app serving ``/v1/view/local/`` for ``result`` over ``slide``."""
    target = ViewerTarget(Path(result).resolve(), Path(slide).resolve(), Path(slide).name)

    def resolve(token: str) -> ViewerTarget:
        if token != LOCAL_TOKEN:
            raise NotFound(f"no viewer {token!r} here; open /v1/view/{LOCAL_TOKEN}/")
        return target

    app = FastAPI(title="slidepipe viewer", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.include_router(viewer_pages(resolve, lambda: None))
    return app
