"""The one place where library errors become HTTP statuses.

``wsi`` and ``models`` raise their own typed errors and know nothing of HTTP; the jobs
layer raises ``NotFound``/``Conflict``/``QueueUnavailable``; uploads raise
``UploadRejected`` with their status. Every answer is JSON ``{"detail": message,
"error": type}``; nothing a client sends ends as a bare 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from models.errors import CheckpointUnreadable, ModelCardInvalid, ModelError, UnknownModel
from service.uploads import UploadRejected
from workers.jobs.actions import Conflict, NotFound, QueueUnavailable
from wsi.errors import (
    InvalidParameter,
    OutputExists,
    RegionUnreadable,
    SlideError,
    SlideMissingMpp,
    SlideUnreadable,
)

log = logging.getLogger(__name__)

#: Most specific first: the first class an error is an instance of decides.
STATUS_BY_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (NotFound, 404),
    (Conflict, 409),
    (QueueUnavailable, 503),
    (UnknownModel, 422),
    (ModelCardInvalid, 422),
    (CheckpointUnreadable, 422),
    (ModelError, 422),
    (SlideUnreadable, 422),
    (RegionUnreadable, 422),
    (SlideMissingMpp, 422),
    (InvalidParameter, 422),
    (OutputExists, 409),
    (SlideError, 422),
)


def status_for(error: BaseException) -> int:
    if isinstance(error, UploadRejected):
        return error.status_code
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return code
    return 500


def _body(error: BaseException, message: str | None = None) -> dict[str, object]:
    return {"detail": message if message is not None else str(error), "error": type(error).__name__}


async def _known_error(_: Request, error: Exception) -> JSONResponse:
    code = status_for(error)
    if code >= 500:
        log.warning("%s: %s", type(error).__name__, error)
    return JSONResponse(_body(error), status_code=code)


async def _validation_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = jsonable_encoder(error.errors())
    parts = []
    for item in errors:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return JSONResponse(
        {
            "detail": "; ".join(parts) or "invalid request",
            "error": "ValidationError",
            "errors": errors,
        },
        status_code=422,
    )


async def _unexpected(_: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=error)
    return JSONResponse(
        {"detail": "internal server error", "error": type(error).__name__}, status_code=500
    )


def install_error_handlers(app: FastAPI) -> None:
    for error_type in (
        UploadRejected,
        NotFound,
        Conflict,
        QueueUnavailable,
        ModelError,
        SlideError,
    ):
        app.add_exception_handler(error_type, _known_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
