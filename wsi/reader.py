"""``Slide``: one reader facade over openslide and tiffslide.

The backend is chosen by argument (``auto`` tries openslide, then tiffslide), never by a
module global. Metadata is read once and cached. Every read returns RGB uint8 with any
alpha composited on white, and regions that run off the level are padded with white,
so that both backends give the same pixels for the same request.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from wsi.backends import SlideBackend, open_backend, open_remote_backend
from wsi.errors import InvalidParameter, SlideMissingMpp, SlideUnreadable
from wsi.remote import RemoteFile, is_slide_ref, is_url, read_slide_ref
from wsi.slide_files import resolve_slide_path

#: Two mpp values closer than this (relative) are the same resolution: no resampling.
MPP_TOLERANCE = 0.01

WHITE = 255


def composite_on_white(region: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """RGBA -> RGB over a white background; RGB passes through unchanged."""
    if region.ndim != 3 or region.shape[2] not in (3, 4):
        raise ValueError(f"expected an (h, w, 3|4) image, got shape {region.shape}")
    if region.shape[2] == 3:
        return np.ascontiguousarray(region)
    if int(region[..., 3].min()) == 255:  # opaque (tissue scans almost always are)
        # OpenCV drops the alpha plane ~100x faster than numpy's strided copy
        rgb8 = cv2.cvtColor(np.ascontiguousarray(region), cv2.COLOR_RGBA2RGB)
        return np.asarray(rgb8, dtype=np.uint8)  # cv2's stubs type it as any-dtype MatLike
    rgb = region[..., :3].astype(np.uint16)
    alpha = region[..., 3:4].astype(np.uint16)
    out = (rgb * alpha + WHITE * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


class Slide:
    """A whole-slide image opened read-only.

    ``slide_mpp`` overrides (or supplies) the level-0 microns per pixel for slides whose
    metadata lacks it. Use as a context manager, or call :meth:`close`.

    ``path`` may also be a URL (``s3://bucket/key``, any fsspec URL; ``storage_options``
    go to fsspec) or a slide reference file naming one (:mod:`wsi.remote`): the slide
    is then read by byte ranges through tiffslide, never downloaded whole.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        backend: str = "auto",
        slide_mpp: float | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if slide_mpp is not None and not (0 < slide_mpp < 1000):
            raise InvalidParameter(f"slide_mpp must be in (0, 1000) µm/px, got {slide_mpp}")
        url = str(path) if is_url(path) else None
        #: the file opened: ``path`` itself, the slide's file in a folder (DICOM, MRXS),
        #: a slide reference (:func:`wsi.remote.recorded_sha256` gives its file's hash)
        #: or, for a bare URL, its last part
        self.path = Path(url.rsplit("/", 1)[-1]) if url is not None else Path(path)
        if url is None and is_slide_ref(Path(path)):
            url = read_slide_ref(Path(path))
        if url is not None:
            if backend == "openslide":
                raise SlideUnreadable("openslide needs a local file; a remote slide is read "
                                      "by tiffslide (or through the local cache)")
            self._backend: SlideBackend = open_remote_backend(RemoteFile(url, storage_options))
        else:
            self.path = resolve_slide_path(Path(path))
            self._backend = open_backend(self.path, backend)
        self._mpp_override = slide_mpp
        if not self._backend.level_dimensions or min(self._backend.level_dimensions[0]) < 1:
            raise SlideUnreadable(f"{self.path.name!r} has no image levels")

    # -- metadata -----------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def concurrent_reads(self) -> bool:
        """Whether several threads may read through this one handle at once (they then
        share its decoded-tile cache, rather than each decoding the tiles again)."""
        return self._backend.concurrent_reads

    @cached_property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        w, h = self._backend.level_dimensions[0]
        return int(w), int(h)

    @cached_property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(w), int(h)) for w, h in self._backend.level_dimensions)

    @cached_property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._backend.level_downsamples

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def vendor(self) -> str:
        return self._backend.vendor

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._backend.properties)

    @property
    def has_mpp(self) -> bool:
        return self._mpp_override is not None or self._backend.mpp is not None

    @cached_property
    def mpp(self) -> float:
        """Level-0 microns per pixel (the override wins over the file's metadata)."""
        if self._mpp_override is not None:
            return float(self._mpp_override)
        if self._backend.mpp is None:
            raise SlideMissingMpp(
                f"{self.path.name!r} declares no microns-per-pixel; pass slide_mpp "
                "(CLI: --slide-mpp) with the scanner's resolution"
            )
        return float(self._backend.mpp)

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The level to read ``target_mpp`` from.

        A level within 1% of the target is read as is; otherwise the nearest finer level
        (largest mpp below the target), which is then resampled down. A target finer
        than level 0 reads level 0.
        """
        if not (target_mpp > 0 and math.isfinite(target_mpp)):
            raise InvalidParameter(f"target_mpp must be a positive number, got {target_mpp}")
        mpps = [self.level_mpp(level) for level in range(self.level_count)]
        for level, mpp in enumerate(mpps):
            if abs(mpp - target_mpp) <= MPP_TOLERANCE * target_mpp:
                return level
        finer = [level for level, mpp in enumerate(mpps) if mpp < target_mpp]
        return max(finer, key=lambda level: mpps[level]) if finer else 0

    def grid_mpp(self, target_mpp: float) -> float:
        """The true mpp of the grid ``target_mpp`` is read on: a level's own mpp when
        it is within tolerance (so physical scales stay exact), else ``target_mpp``."""
        level = self.best_level_for_mpp(target_mpp)
        return self.level_mpp(level) if self._scale(level, target_mpp) == 1.0 else target_mpp

    def scaled_dimensions(self, target_mpp: float) -> tuple[int, int]:
        """(width, height) of the whole slide at ``target_mpp``."""
        level = self.best_level_for_mpp(target_mpp)
        scale = self._scale(level, target_mpp)
        w, h = self.level_dimensions[level]
        if scale == 1.0:
            return w, h
        return max(1, round(w / scale)), max(1, round(h / scale))

    def _scale(self, level: int, target_mpp: float) -> float:
        """Level pixels per target pixel (1.0 when the level is within tolerance)."""
        ratio = target_mpp / self.level_mpp(level)
        return 1.0 if abs(ratio - 1.0) <= MPP_TOLERANCE else ratio

    # -- pixels -------------------------------------------------------------------------
    def read_level(
        self, level: int, x: int, y: int, width: int, height: int
    ) -> npt.NDArray[np.uint8]:
        """Read a region in *level* pixel coordinates as (h, w, 3) RGB uint8.

        The part of the region outside the level is white.
        """
        if not 0 <= level < self.level_count:
            raise InvalidParameter(f"level must be in [0, {self.level_count}), got {level}")
        if width < 1 or height < 1:
            raise InvalidParameter(f"region size must be positive, got {width}x{height}")
        lw, lh = self.level_dimensions[level]
        x_lo, y_lo = max(x, 0), max(y, 0)
        x_hi, y_hi = min(x + width, lw), min(y + height, lh)
        if (x_lo, y_lo, x_hi, y_hi) == (x, y, x + width, y + height):  # inside: no canvas
            return composite_on_white(self._backend.read(x, y, level, width, height))
        out = np.full((height, width, 3), WHITE, dtype=np.uint8)
        if x_hi <= x_lo or y_hi <= y_lo:
            return out
        region = self._backend.read(x_lo, y_lo, level, x_hi - x_lo, y_hi - y_lo)
        out[y_lo - y : y_hi - y, x_lo - x : x_hi - x] = composite_on_white(region)
        return out

    def read_scaled(
        self, target_mpp: float, x: int, y: int, width: int, height: int
    ) -> npt.NDArray[np.uint8]:
        """Read a region given in pixels of the ``target_mpp`` grid.

        Reads the level :meth:`best_level_for_mpp` picks and, when its resolution differs
        by more than 1%, resamples with area interpolation.
        """
        level = self.best_level_for_mpp(target_mpp)
        scale = self._scale(level, target_mpp)
        if scale == 1.0:
            return self.read_level(level, x, y, width, height)
        lx0, ly0 = math.floor(x * scale), math.floor(y * scale)
        lx1, ly1 = math.ceil((x + width) * scale), math.ceil((y + height) * scale)
        region = self.read_level(level, lx0, ly0, lx1 - lx0, ly1 - ly0)
        interpolation = cv2.INTER_AREA if scale > 1 else cv2.INTER_LINEAR
        resized = cv2.resize(region, (width, height), interpolation=interpolation)
        return np.asarray(resized, dtype=np.uint8)

    def thumbnail(self, max_px: int) -> npt.NDArray[np.uint8]:
        """The whole slide fitted into ``max_px`` x ``max_px`` (RGB uint8)."""
        if max_px < 1:
            raise InvalidParameter(f"thumbnail size must be positive, got {max_px}")
        w0, h0 = self.dimensions
        factor = max(w0, h0) / max_px
        tw, th = max(1, round(w0 / factor)), max(1, round(h0 / factor))
        level = max(
            (lvl for lvl, ds in enumerate(self.level_downsamples) if ds <= max(factor, 1.0)),
            key=lambda lvl: self.level_downsamples[lvl],
        )
        return self.read_level_resized(level, tw, th)

    def read_level_resized(
        self,
        level: int,
        width: int,
        height: int,
        *,
        band_pixels: int = 1 << 20,
        channel: Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.uint8]] | None = None,
        workers: int = 2,
    ) -> npt.NDArray[np.uint8]:
        """A whole level resized to (width, height), read in horizontal bands.

        Memory is one band of about ``band_pixels`` level pixels plus the small output,
        so a single-level 100k-pixel slide can still be reduced to a mask or thumbnail. ``channel`` maps
        each resized RGB band to one uint8 channel (e.g. saturation) so that only that
        channel of the whole view is ever held. Where the backend allows concurrent reads
        (openslide), ``workers`` bands are decoded at once: decoding is most of the time
        of a tissue mask, and a whole-level view of a 100k-pixel slide is ~40 Mpx.
        """
        lw, lh = self.level_dimensions[level]
        shape = (height, width) if channel is not None else (height, width, 3)
        out = np.empty(shape, dtype=np.uint8)
        rows_per_band = max(math.ceil(lh / height), band_pixels // lw, 1)
        interpolation = cv2.INTER_AREA if lw >= width else cv2.INTER_LINEAR

        def do_band(y: int) -> None:
            y_end = min(y + rows_per_band, lh)
            oy0, oy1 = round(y * height / lh), round(y_end * height / lh)
            if oy1 > oy0:
                band = self.read_level(level, 0, y, lw, y_end - y)
                resized = np.asarray(
                    cv2.resize(band, (width, oy1 - oy0), interpolation=interpolation),
                    dtype=np.uint8,
                )
                out[oy0:oy1] = resized if channel is None else channel(resized)

        starts = range(0, lh, rows_per_band)
        if workers > 1 and len(starts) > 1 and self._backend.concurrent_reads:
            with ThreadPoolExecutor(workers, thread_name_prefix="level-band") as pool:
                for _ in pool.map(do_band, starts):  # in order; re-raises a band's error
                    pass
        else:
            for y in starts:
                do_band(y)
        # the pass left the cache full of this level's tiles, which tile reads (at the
        # model's resolution) will not ask for: memory that would grow with the slide
        self._backend.drop_cache()
        return out

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, backend={self.backend!r}, dimensions={self.dimensions})"
