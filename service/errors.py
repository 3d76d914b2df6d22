"""The one place where library errors become HTTP statuses.

``wsi`` and ``models`` raise their own typed errors and know nothing of HTTP; the jobs
layer raises ``NotFound``/``Conflict``/``QueueUnavailable``; uploads raise
``UploadRejected`` with their status. Every answer is JSON ``{"detail": message,
"error": type}``; nothing a client sends ends as a bare 500.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException

from models.errors import CheckpointUnreadable, ModelCardInvalid, ModelError, UnknownModel
from service.upload_errors import STORAGE_FULL_ERRNOS, UploadRejected
from workers.jobs.actions import Conflict, NotFound, QueueUnavailable
from workers.storage.errors import StorageError
from wsi.errors import (
    InvalidParameter,
    OutputExists,
    RegionUnreadable,
    SlideError,
    SlideMissingMpp,
    SlideUnreadable,
)
from wsi.limits import SlideTooLarge

log = logging.getLogger(__name__)

#: Most specific first: the first class an error is an instance of decides.
STATUS_BY_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (NotFound, 404),
    (Conflict, 409),
    (QueueUnavailable, 503),
    (StorageError, 503),  # the object store is unreachable or refused (docs/storage.md)
    (UnknownModel, 422),
    (ModelCardInvalid, 422),
    (CheckpointUnreadable, 422),
    (ModelError, 422),
    (SlideUnreadable, 422),
    (RegionUnreadable, 422),
    (SlideMissingMpp, 422),
    (InvalidParameter, 422),
    (OutputExists, 409),
    (SlideTooLarge, 413),  # declares more than the server decodes (a decompression bomb)
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


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float spelled as a string: a client may send
    ``NaN``, ``Infinity`` or ``1e400`` (Python's JSON reads all three), and an error that
    echoes its input must still be valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # 'nan', 'inf', '-inf'
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


async def _validation_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = finite_json(jsonable_encoder(error.errors()))
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


async def _http_error(_: Request, error: Exception) -> JSONResponse:
    """Starlette's and FastAPI's own errors (401, 404 route, 405) in the one JSON shape."""
    assert isinstance(error, HTTPException)
    try:
        kind = HTTPStatus(error.status_code).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        kind = "HTTPError"
    return JSONResponse(
        {"detail": str(error.detail), "error": kind},
        status_code=error.status_code,
        headers=error.headers,
    )


async def _os_error(_: Request, error: Exception) -> JSONResponse:
    """Storage errors: a full disk is 507, anything else the server's trouble (503)."""
    assert isinstance(error, OSError)
    if error.errno in STORAGE_FULL_ERRNOS:
        log.error("storage full: %s", error)
        return JSONResponse(
            {
                "detail": f"the server's storage is full ({error.strerror or error}); "
                "try again later",
                "error": "InsufficientStorage",
            },
            status_code=507,
        )
    log.error("storage or service error: %r", error)
    return JSONResponse(
        {"detail": f"storage or service unavailable: {error}", "error": type(error).__name__},
        status_code=503,
    )


async def _database_error(_: Request, error: Exception) -> JSONResponse:
    """The database is full (507) or unreachable (503); never a bare 500."""
    message = str(getattr(error, "orig", None) or error)
    if "full" in message.lower():
        log.error("database full: %s", message)
        return JSONResponse(
            {"detail": f"the server's database is full: {message}", "error": "InsufficientStorage"},
            status_code=507,
        )
    log.error("database unavailable: %s", message)
    return JSONResponse(
        {"detail": f"the database is unavailable: {message}", "error": "DatabaseUnavailable"},
        status_code=503,
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
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(OSError, _os_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(Exception, _unexpected)
