"""Bounds on what one request may send: JSON bodies are refused above a size (413).

Slide uploads have their own, much larger limit (``SLIDEPIPE_MAX_UPLOAD_BYTES``, checked
while they stream to disk in :mod:`service.uploads`), so their route is exempt here.
Every other body is small JSON: one declaring more than ``max_bytes`` is refused before
it is read, and one sent chunked (no ``Content-Length``) is refused as soon as what has
arrived passes the limit, so that a client cannot make the API parse 50 MB of JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: (method, path) pairs whose bodies are streamed uploads with a limit of their own.
UPLOAD_ROUTES: frozenset[tuple[str, str]] = frozenset({("POST", "/v1/slides")})


def is_upload(method: str, path: str) -> bool:
    return (method, path.rstrip("/") or "/") in UPLOAD_ROUTES


class BodyLimit:
    """ASGI middleware: 413 with a JSON reason for a body above ``max_bytes``."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, exempt: Callable[[str, str], bool] = is_upload
    ) -> None:
        self.app, self.max_bytes, self.exempt = app, max_bytes, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.exempt(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            size = int(declared) if declared.isdigit() else None
            if size is not None and size > self.max_bytes:
                await self._refuse(send, f"a request body of {size} bytes")
                return
            await self.app(scope, receive, send)  # the server stops at Content-Length
            return
        # chunked: read it here, at most max_bytes + 1, and hand it on whole
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay(message, receive), send)
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(send, f"a request body of more than {len(body)} bytes")
                return
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": bytes(body), "more_body": False}
        await self.app(scope, _replay(whole, receive), send)

    async def _refuse(self, send: Send, what: str) -> None:
        payload = json.dumps(
            {
                "detail": f"{what} is above the limit of {self.max_bytes} bytes "
                "(SLIDEPIPE_MAX_BODY_BYTES); slides are uploaded to POST /v1/slides",
                "error": "PayloadTooLarge",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _replay(first: Message, receive: Receive) -> Receive:
    """A receive that returns ``first`` once, then whatever the server sends next
    (a disconnect, for a streaming response)."""
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
