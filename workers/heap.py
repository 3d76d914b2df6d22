"""Handing memory a stage has freed back to the operating system (glibc only).

Why: glibc serves a large allocation with its own mapping only above a threshold that
rises, each time such a block is freed, to that block's size. After the tissue stage
frees its multi-megabyte bands, later arrays of that size come from the heap, and the
heap keeps its free pages: on a 100k px slide the peak RSS ended 25% above a 10k px
slide's (bench/memory). ``malloc_trim`` returns them. (Pinning the threshold instead
kept every chunk array in a fresh mapping, and the page faults cost a third of the
identity engine's tile rate.) Elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def trim_heap() -> None:
    """Return the heap's free pages to the operating system (glibc's malloc_trim)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
