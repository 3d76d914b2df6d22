"""The OpenAPI document as the API really answers: every error is ``Error`` JSON.

FastAPI documents a 422 as its own ``HTTPValidationError`` (``detail`` a list) and leaves
out what any ``/v1`` call can answer (401 without a key, 413 for an oversized body, 503
when the database or broker is down, 507 when the disk is full). Clients and contract
tests (schemathesis, in the suite) read this document, so :func:`install_openapi` adds
those answers to every operation and gives every error the one shape the error handlers
send (``service.errors``): ``{"detail": message, "error": type, "errors"?: [...]}``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["detail", "error"],
    "properties": {
        "detail": {"type": "string", "description": "what went wrong, naming the value"},
        "error": {"type": "string", "description": "the error's type"},
        "errors": {"type": "array", "items": {}, "description": "validation: what failed where"},
    },
}
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}

#: What every ``/v1`` operation may answer besides its own results.
V1_ERRORS = {
    "401": "missing or invalid API key",
    "413": "request body above SLIDEPIPE_MAX_BODY_BYTES",
    "422": "invalid parameters, body or path",
    "503": "the database or the broker is unavailable",
    "507": "the server's storage is full",
}
PATH_ERRORS = {"404": "no such resource (or another owner's)"}
BODY_ERRORS = {"400": "malformed request body"}
#: Answers particular to a group of routes that their decorators do not declare yet.
PREFIX_ERRORS = {"/v1/view/": {"403": "a viewer link that is malformed, forged or expired"}}
READY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"status": {"type": "string"}, "checks": {"type": "object"}},
}


def _with_errors(path: str, method: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    wanted: dict[str, str] = {}
    if path.startswith("/v1/"):
        wanted.update(V1_ERRORS)
        if "{" in path:
            wanted.update(PATH_ERRORS)
        if "requestBody" in operation:
            wanted.update(BODY_ERRORS)
        for prefix, errors in PREFIX_ERRORS.items():
            if path.startswith(prefix):
                wanted.update(errors)
    for code, description in wanted.items():
        responses.setdefault(code, {"description": description})
    for code, response in responses.items():
        if code[:1] in ("4", "5"):
            response["content"] = dict(_ERROR_CONTENT)
    if path == "/readyz" and method == "get":
        ready = {"application/json": {"schema": READY_SCHEMA}}
        responses["200"]["content"] = ready
        responses["503"] = {"description": "the database or broker is unreachable", "content": ready}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if isinstance(operation, dict) and "responses" in operation:
                _with_errors(path, method, operation)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's, if now unused
        kept = schemas.pop(unused, None)
        if kept is not None and f'"#/components/schemas/{unused}"' in json.dumps(schema):
            schemas[unused] = kept
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve :func:`build_openapi`'s document at ``/openapi.json`` (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
