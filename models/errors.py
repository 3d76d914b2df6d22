"""Errors raised by ``models``; each also inherits the builtin it refines."""

from __future__ import annotations


class ModelError(Exception):
    """Base of every error raised by ``models``."""


class UnknownModel(ModelError, KeyError):
    """No built-in model and no model card by that name or path."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else "unknown model"


class ModelCardInvalid(ModelError, ValueError):
    """A model card (or a parameter overriding it) is malformed or inconsistent."""


class CheckpointUnreadable(ModelError, OSError):
    """A weights file is missing, corrupt, or does not fit the card's architecture."""
