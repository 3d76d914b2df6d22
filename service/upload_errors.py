"""The errors an upload is refused with; each carries its HTTP status.

Kept apart from the upload code so that the error handlers, the archive unpacker and the
body stream all raise and map the same classes.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: errno values that mean "the server's storage is full" (507), not a client error
STORAGE_FULL_ERRNOS = frozenset({28, 122, 27})  # ENOSPC, EDQUOT, EFBIG


class UploadRejected(Exception):
    """An upload refused with an HTTP status (the error handler uses ``status_code``)."""

    status_code = 400

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code


class PayloadTooLarge(UploadRejected):
    status_code = 413


class NotASlide(UploadRejected):
    status_code = 415


class BrokenSlide(UploadRejected):
    status_code = 422


class BadFilename(UploadRejected):
    status_code = 422


class DeclaresTooMuch(UploadRejected):
    """A slide declaring more pixels, levels or tiles than the server decodes (a bomb)."""

    status_code = 413


class InsufficientStorage(UploadRejected):
    """The data disk is full (or the file is above what it can hold)."""

    status_code = 507


def raise_if_full(err: OSError, what: str) -> None:
    """Raise a 507 for ``err`` when it means the disk is full; return otherwise."""
    if err.errno in STORAGE_FULL_ERRNOS:
        log.error("storage full while %s: %s", what, err)
        raise InsufficientStorage(
            f"the server's storage is full while {what} ({err.strerror or err}); "
            "try again later"
        ) from err
