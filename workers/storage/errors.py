"""Errors of the object store: the store is unreachable, refuses a write, or a key is bad.

The API answers them 503 (service/errors.py): the request was fine, the storage was not.
"""

from __future__ import annotations


class StorageError(OSError):
    """A store operation failed (network, credentials, a missing bucket, a bad key)."""
