"""One error hierarchy for everything that reads or writes slides.

Each class also inherits the builtin it refines, so that callers who only know
``OSError`` or ``ValueError`` still catch it; ``service/`` maps them to HTTP statuses.
"""

from __future__ import annotations


class SlideError(Exception):
    """Base of every error raised by ``wsi``."""


class SlideUnreadable(SlideError, OSError):
    """The file is not a slide any backend can open, or it is truncated or corrupt."""


class RegionUnreadable(SlideError, OSError):
    """A region of an otherwise valid slide could not be decoded (a corrupt tile)."""


class SlideMissingMpp(SlideError, ValueError):
    """The slide declares no microns-per-pixel and none was given to override it."""


class InvalidParameter(SlideError, ValueError):
    """A processing parameter is out of its valid range."""


class OutputExists(SlideError, FileExistsError):
    """The output path already holds something we refuse to overwrite."""
