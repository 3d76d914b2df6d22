"""Handing memory a stage has freed back to the operating system (glibc only).

Why: glibc serves a large allocation with its own mapping only above a threshold that
rises, each time such a block is freed, to that block's size. After the tissue stage
frees its multi-megabyte bands, later arrays of that size come from the heap, and the
heap keeps its free pages: on a 100k px slide the peak RSS ended 25% above a 10k px
slide's (bench/memory). ``malloc_trim`` returns them. (Pinning the threshold instead
kept every chunk array in a fresh mapping, and the page faults cost a third of the
identity engine's tile rate.) Elsewhere (musl, macOS) this does nothing.

During a run the opposite holds: the same few sizes (batches, chunk accumulators) are
freed and allocated again thousands of times, and on these machines a page fault on
fresh memory costs microseconds, so :func:`reuse_freed_blocks` keeps such blocks in the
heap for the run, and :func:`trim_heap` hands the heap back once the run is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from functools import cache

#: mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
#: glibc's largest mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2)
MAX_MMAP_THRESHOLD = 32 << 20


@cache
def _libc_function(name: str) -> Callable[..., int] | None:
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path) if path else None
    except OSError:
        return None
    return getattr(libc, name, None)


#: Heaps that threads started from here on share. glibc gives threads up to 8 per core,
#: each keeping its own freed blocks: the pyramid's reader threads then held ~70 MB more
#: on a 100k px slide than on a 10k one (bench/memory); two measured no slower.
ARENA_MAX = 2


def reuse_freed_blocks() -> None:
    """Serve blocks up to 32 MiB from the heap and keep up to 64 MiB of freed heap at its
    top, rather than mapping and unmapping (and faulting in) each batch and chunk; let
    the run's threads share :data:`ARENA_MAX` heaps. Process-wide; memory stays bounded
    by the run's own working set."""
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)
        mallopt(M_TRIM_THRESHOLD, 2 * MAX_MMAP_THRESHOLD)
        mallopt(M_ARENA_MAX, ARENA_MAX)


def trim_heap() -> None:
    """Return the heap's free pages to the operating system (glibc's malloc_trim)."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)
