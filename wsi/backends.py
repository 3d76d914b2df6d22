"""Adapters over the two slide libraries, reduced to what :class:`wsi.reader.Slide` needs.

Each adapter opens one file and answers the same few questions: level geometry, the raw
property map, the microns-per-pixel and vendor (each library names them differently) and
``read(x0, y0, level, w, h)`` returning an ``(h, w, 3|4)`` uint8 array for a region that
lies inside the level. Clamping, padding and alpha compositing live in the facade.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from wsi.errors import RegionUnreadable, SlideUnreadable

BACKENDS: tuple[str, ...] = ("openslide", "tiffslide")


class SlideBackend(Protocol):
    name: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: Mapping[str, str]
    mpp: float | None
    vendor: str

    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray: ...

    def close(self) -> None: ...


def _float_or_none(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


class OpenSlideBackend:
    """openslide-python over the ``openslide-bin`` wheel (no system library needed)."""

    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError, ValueError) as err:
            raise SlideUnreadable(f"openslide cannot open {path.name!r}: {err}") from err
        self.level_dimensions = tuple(self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = dict(self._slide.properties)
        self.mpp = _float_or_none(self.properties.get("openslide.mpp-x"))
        self.vendor = self.properties.get("openslide.vendor", "generic-tiff")

    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        import openslide

        try:
            image = self._slide.read_region((x0, y0), level, (width, height))
        except openslide.OpenSlideError as err:
            raise RegionUnreadable(
                f"openslide failed on region x0={x0} y0={y0} level={level} "
                f"size={width}x{height}: {err}"
            ) from err
        return np.asarray(image)

    def close(self) -> None:
        self._slide.close()


class TiffSlideBackend:
    """tiffslide (tifffile + imagecodecs): pure Python, fsspec-capable."""

    name = "tiffslide"

    def __init__(self, path: Path) -> None:
        import tiffslide

        try:
            self._slide = tiffslide.TiffSlide(str(path))
            self.level_dimensions = tuple(self._slide.level_dimensions)
        except Exception as err:  # tifffile raises many unrelated types on garbage input
            raise SlideUnreadable(f"tiffslide cannot open {path.name!r}: {err}") from err
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = {k: str(v) for k, v in self._slide.properties.items() if v is not None}
        self.mpp = _float_or_none(self._slide.properties.get("tiffslide.mpp-x"))
        self.vendor = str(self._slide.properties.get("tiffslide.vendor") or "generic-tiff")

    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        try:
            return np.asarray(
                self._slide.read_region((x0, y0), level, (width, height), as_array=True)
            )
        except Exception as err:  # imagecodecs/tifffile errors have no common base
            raise RegionUnreadable(
                f"tiffslide failed on region x0={x0} y0={y0} level={level} "
                f"size={width}x{height}: {err}"
            ) from err

    def close(self) -> None:
        self._slide.close()


def open_backend(path: Path, backend: str) -> SlideBackend:
    """Open ``path`` with the named backend; ``auto`` tries openslide, then tiffslide."""
    if backend == "openslide":
        return OpenSlideBackend(path)
    if backend == "tiffslide":
        return TiffSlideBackend(path)
    if backend != "auto":
        raise ValueError(f"unknown slide backend {backend!r}; expected auto, {', '.join(BACKENDS)}")
    reasons: list[str] = []
    for candidate in (OpenSlideBackend, TiffSlideBackend):
        try:
            return candidate(path)
        except SlideUnreadable as err:
            reasons.append(str(err))
    raise SlideUnreadable("; ".join(reasons))
