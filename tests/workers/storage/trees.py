"""Comparing result trees across stores: every chunk byte for byte, metadata as JSON
without the provenance block (its timestamps, timings, hosts and paths differ per run)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

PROVENANCE_KEY = "slidepipe"


def comparable(name: str, data: bytes) -> Any:
    """A file's content as compared: JSON metadata without provenance, else the bytes."""
    base = name.rsplit("/", 1)[-1]
    if base in (".zattrs", ".zgroup", ".zarray", "zarr.json") or base.endswith(".json"):
        value = json.loads(data)
        if isinstance(value, dict):
            value.pop(PROVENANCE_KEY, None)
        return value
    return data


def tree(names: Iterable[str], read: Callable[[str], bytes]) -> dict[str, Any]:
    """``{relative name: comparable content}`` of a result tree."""
    return {name: comparable(name, read(name)) for name in sorted(names)}


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two trees (empty: identical)."""
    found = [f"only in first: {n}" for n in sorted(set(a) - set(b))]
    found += [f"only in second: {n}" for n in sorted(set(b) - set(a))]
    found += [f"differs: {n}" for n in sorted(set(a) & set(b)) if a[n] != b[n]]
    return found
