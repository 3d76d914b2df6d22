"""A small thread-safe cache of opened files (slides, results), least recently used first out.

Tile servers open the same slide or result for every tile request; opening is the
expensive part (headers, metadata), so the last few stay open. The opener runs outside
the lock: two threads may open the same file at once, and one of the two copies is kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

V = TypeVar("V")


class OpenCache(Generic[V]):
    """Up to ``size`` values by resolved path, each made once by ``opener``."""

    def __init__(self, opener: Callable[[Path], V], size: int) -> None:
        self._opener = opener
        self._size = size
        self._lock = threading.Lock()
        self._open: OrderedDict[Path, V] = OrderedDict()

    def get(self, path: Path) -> V:
        path = Path(path).resolve()
        with self._lock:
            found = self._open.get(path)
            if found is not None:
                self._open.move_to_end(path)
                return found
        value = self._opener(path)
        with self._lock:
            self._open[path] = value
            while len(self._open) > self._size:
                self._open.popitem(last=False)
        return value
