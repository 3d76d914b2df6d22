"""Adapters over the two slide libraries, reduced to what :class:`wsi.reader.Slide` needs.

Each adapter opens one file and answers the same few questions: level geometry, the raw
property map, the microns-per-pixel and vendor (each library names them differently) and
``read(x, y, level, w, h)`` returning an ``(h, w, 3|4)`` uint8 array for a region given
in *level* pixels that lies inside the level. Both libraries take level-0 coordinates
and convert back with their own rounding, so each adapter does the conversion that its
library inverts exactly. Clamping, padding and alpha compositing live in the facade.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from wsi.errors import RegionUnreadable, SlideUnreadable
from wsi.remote import RemoteFile
from wsi.tiff_integrity import TIFF_MAGICS, check_tiff_extent, check_tiff_extent_of, is_tiff
from wsi.tile_cache import TiledLevel, TiledReader, tiled_level

BACKENDS: tuple[str, ...] = ("openslide", "tiffslide")


class SlideBackend(Protocol):
    name: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: Mapping[str, str]
    mpp: float | None
    vendor: str
    #: whether one handle may serve reads from several threads at once
    concurrent_reads: bool

    def read(
        self, x: int, y: int, level: int, width: int, height: int
    ) -> npt.NDArray[np.uint8]: ...

    def drop_cache(self) -> None:
        """Forget decoded tiles that no later read will want (after a whole-level pass)."""

    def close(self) -> None: ...


#: A resolution coarser than this is a TIFF writer's default (72 dpi = 352.8 µm/px),
#: not a scanner's: such a slide is treated as having no mpp.
MAX_PLAUSIBLE_MPP = 50.0


def _float_or_none(value: str | float | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if 0 < number <= MAX_PLAUSIBLE_MPP else None


class OpenSlideBackend:
    """openslide-python over the ``openslide-bin`` wheel (no system library needed)."""

    name = "openslide"
    #: the C library is thread-safe and openslide-python releases the GIL while it reads
    concurrent_reads = True

    def __init__(self, path: Path) -> None:
        import openslide

        self._path = path
        try:
            self._slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError, ValueError) as err:
            raise SlideUnreadable(f"openslide cannot open {path.name!r}: {err}") from err
        self.level_dimensions = tuple(self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties: Mapping[str, str] = dict(self._slide.properties)
        self.mpp = _float_or_none(self.properties.get("openslide.mpp-x"))
        self.vendor = self.properties.get("openslide.vendor", "generic-tiff")

    def read(self, x: int, y: int, level: int, width: int, height: int) -> npt.NDArray[np.uint8]:
        import openslide

        ds = self.level_downsamples[level]
        x0, y0 = round(x * ds), round(y * ds)  # openslide resamples sub-pixel offsets
        try:
            image = self._slide.read_region((x0, y0), level, (width, height))
        except openslide.OpenSlideError as err:
            # openslide's errors are sticky: the handle fails every later read, so
            # reopen it before reporting, and the next region reads normally again
            self._slide.close()
            self._slide = openslide.OpenSlide(str(self._path))
            raise RegionUnreadable(
                f"openslide failed on region x={x} y={y} level={level} "
                f"size={width}x{height}: {err}"
            ) from err
        return np.asarray(image)

    def drop_cache(self) -> None:
        """openslide's own tile cache has a fixed size: nothing to drop."""

    def close(self) -> None:
        self._slide.close()


class TiffSlideBackend:
    """tiffslide (tifffile + imagecodecs): pure Python, fsspec-capable.

    Levels stored as uint8 RGB tiles (SVS, generic pyramidal TIFF) are read through
    :class:`wsi.tile_cache.TiledReader`: each slide tile decoded once into a cache shared
    by every thread, with the same codec tiffslide uses, so the pixels are tiffslide's.
    Other layouts go through tiffslide's own ``read_region``.
    """

    name = "tiffslide"

    def __init__(self, path: Path, remote: RemoteFile | None = None) -> None:
        import tiffslide

        self._remote = remote
        try:
            # a remote slide: tiffslide parses through a buffered handle, tiles by range
            source: Any = remote.open() if remote is not None else str(path)
            self._slide = tiffslide.TiffSlide(source)
            self.level_dimensions = tuple(self._slide.level_dimensions)
        except SlideUnreadable:
            raise
        except Exception as err:  # tifffile raises many unrelated types on garbage input
            raise SlideUnreadable(f"tiffslide cannot open {path.name!r}: {err}") from err
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties: Mapping[str, str] = {
            k: str(v) for k, v in self._slide.properties.items() if v is not None
        }
        self.mpp = _float_or_none(self._slide.properties.get("tiffslide.mpp-x"))
        self.vendor = str(self._slide.properties.get("tiffslide.vendor") or "generic-tiff")
        self._tiled = TiledReader(remote if remote is not None else path, self._tiled_levels())
        #: pread-based tiled reads share no file position; tiffslide's own path does
        self.concurrent_reads = all(
            self._tiled.covers(level) for level in range(len(self.level_dimensions))
        )

    def _tiled_levels(self) -> list[TiledLevel]:
        if self.properties.get("tiffslide.series-axes") != "YXS":
            return []
        try:
            series = self._slide.ts_tifffile.series[int(self.properties["tiffslide.series-index"])]
            pages = [series.levels[level].pages for level in range(len(self.level_dimensions))]
        except (KeyError, IndexError, ValueError, AttributeError):
            return []
        found = []
        for level, level_pages in enumerate(pages):
            tiled = tiled_level(level, level_pages[0]) if len(level_pages) == 1 else None
            if tiled is not None and (tiled.width, tiled.height) == self.level_dimensions[level]:
                found.append(tiled)
        return found

    def read(self, x: int, y: int, level: int, width: int, height: int) -> npt.NDArray[np.uint8]:
        try:
            if self._tiled.covers(level):
                return self._tiled.read(level, x, y, width, height)
            ds = self.level_downsamples[level]
            # tiffslide maps back with int(x0 / ds): the smallest x0 with x0 / ds >= x hits x
            x0, y0 = math.ceil(x * ds - 1e-9), math.ceil(y * ds - 1e-9)
            return np.asarray(
                self._slide.read_region((x0, y0), level, (width, height), as_array=True)
            )
        except Exception as err:  # imagecodecs/tifffile errors have no common base
            raise RegionUnreadable(
                f"tiffslide failed on region x={x} y={y} level={level} "
                f"size={width}x{height}: {err}"
            ) from err

    def drop_cache(self) -> None:
        self._tiled.cache.clear()

    def close(self) -> None:
        self._tiled.close()
        self._slide.close()
        if self._remote is not None:
            self._remote.close()


def _tiled_tiffslide(path: Path) -> SlideBackend:
    """tiffslide, kept only where every level is stored as RGB tiles (its fast path)."""
    opened = TiffSlideBackend(path)
    if not opened.concurrent_reads:
        opened.close()
        raise SlideUnreadable(f"{path.name!r} has levels that are not RGB tiles")
    return opened


def open_backend(path: Path, backend: str) -> SlideBackend:
    """Open ``path`` with the named backend.

    ``auto`` takes tiffslide for a TIFF whose every level is stored as RGB tiles (SVS,
    pyramidal TIFF): its tiled path decodes each slide tile once, several times faster
    than openslide's ``read_region`` (bench/read). Anything else (MRXS, NDPI, stripped
    or planar TIFFs) goes to openslide, then to tiffslide. A TIFF whose directories or
    tile data run past the end of the file is refused before either library sees it
    (both would serve what is left of it).
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"unknown slide backend {backend!r}; expected auto, {', '.join(BACKENDS)}")
    tiff = is_tiff(path)
    if tiff:
        check_tiff_extent(path)
    candidates: list[Callable[[Path], SlideBackend]] = [OpenSlideBackend, TiffSlideBackend]
    if backend == "openslide":
        candidates = [OpenSlideBackend]
    elif backend == "tiffslide":
        candidates = [TiffSlideBackend]
    elif tiff:
        candidates.insert(0, _tiled_tiffslide)
    reasons: list[str] = []
    for candidate in candidates:
        try:
            opened = candidate(path)
        except SlideUnreadable as err:
            if candidate is not _tiled_tiffslide:  # only a preference, not a failure
                reasons.append(str(err))
            continue
        try:
            probe_levels(opened, path)
        except SlideUnreadable as err:
            opened.close()
            reasons.append(str(err))
            continue
        return opened
    raise SlideUnreadable("; ".join(reasons))


def open_remote_backend(remote: RemoteFile) -> SlideBackend:
    """Open a slide in an object store by byte ranges (tiffslide: a TIFF-based slide).

    The same checks as a local TIFF: its structure must lie inside the file, and one
    pixel of every level must decode. openslide needs a local path: a slide it alone
    reads goes through the worker's read-through cache instead.
    """
    name = Path(remote.name)
    if remote.read_at(4, 0) not in TIFF_MAGICS:
        raise SlideUnreadable(
            f"{remote.name!r} is not a TIFF: only TIFF-based slides are read by range "
            "(others are read through the local cache)"
        )
    try:
        check_tiff_extent_of(remote.open(), remote.size, remote.name)
        opened = TiffSlideBackend(name, remote)
    except SlideUnreadable:
        remote.close()
        raise
    try:
        probe_levels(opened, name)
    except SlideUnreadable:
        opened.close()
        raise
    return opened


def probe_levels(backend: SlideBackend, path: Path) -> None:
    """Decode one pixel of every level, so that a file whose pixels no codec decodes
    (an unknown compression, a corrupt first tile) is refused when it is opened."""
    for level in range(len(backend.level_dimensions)):
        try:
            backend.read(0, 0, level, 1, 1)
        except RegionUnreadable as err:
            raise SlideUnreadable(
                f"{backend.name} opened {path.name!r} but level {level} does not decode: {err}"
            ) from err
