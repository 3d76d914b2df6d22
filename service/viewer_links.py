"""Short-lived signed links to the viewer: the browser cannot send our ``Authorization``
header with image requests, and an API key must never appear in a URL.

A link's token is ``<job id>.<owner, base64url>.<expiry, unix s>.<signature>``: an
HMAC-SHA256 over the first three parts with ``SLIDEPIPE_VIEWER_LINK_KEY`` (default:
derived from ``SLIDEPIPE_API_KEYS``, so rotating the keys revokes every link).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time

from workers.jobs.settings import Settings

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\.[A-Za-z0-9_-]{1,200}\.[0-9]{1,12}\.[A-Za-z0-9_-]{43}$")


class LinkRejected(Exception):
    """A viewer token that is malformed, forged or expired (the answer is 403)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def link_key(settings: Settings) -> bytes:
    if settings.viewer_link_key:
        return settings.viewer_link_key.encode()
    return hashlib.sha256(b"slidepipe viewer links\0" + settings.api_keys.encode()).digest()


def sign(settings: Settings, job_id: str, owner: str, ttl_s: int | None = None,
         now: float | None = None) -> tuple[str, int]:
    """A token for ``owner``'s job and its expiry (unix seconds)."""
    expires = int((now if now is not None else time.time()) + (ttl_s or settings.viewer_link_ttl_s))
    payload = f"{job_id}.{_b64(owner.encode())}.{expires}"
    signature = hmac.new(link_key(settings), payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(signature)}", expires


def verify(settings: Settings, token: str, now: float | None = None) -> tuple[str, str]:
    """(job id, owner) of a valid, unexpired token; LinkRejected otherwise."""
    if not TOKEN_RE.match(token):
        raise LinkRejected("not a viewer link")
    payload, _, signature = token.rpartition(".")
    expected = hmac.new(link_key(settings), payload.encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, _unb64(signature)):
        raise LinkRejected("this viewer link is not valid")
    job_id, owner_b64, expires = payload.split(".")
    if int(expires) < (now if now is not None else time.time()):
        raise LinkRejected("this viewer link has expired; ask for a new one "
                           "(POST /v1/jobs/<id>/viewer-link)")
    return job_id, _unb64(owner_b64).decode()
