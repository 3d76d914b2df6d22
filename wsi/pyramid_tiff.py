"""Pyramidal TIFF slides written with tifffile, streaming: the product's slide writer.

``wsi.tiff_export`` writes results with it, the tests and benches build their slides with
it. Slides are produced tile by tile from a *tile source*, so a 100k x 100k slide never
exists in memory: at most a few tiles (and, while a lower level is averaged, a bounded
strip of level-0 pixels) are alive at once. Two on-disk flavours:

``svs``
    Aperio layout: level 0, a stripped thumbnail page, then one tiled page per lower
    level; ImageDescription starts with ``Aperio Image Library`` and carries ``AppMag``
    and ``MPP``. openslide reports vendor ``aperio``; tiffslide reads the same levels.
``generic``
    A plain tiled TIFF with one page per level (lower levels flagged reduced-resolution)
    and X/YResolution in pixels per centimetre, from which openslide and tiffslide both
    derive the mpp. tifffile (hence tiffslide) only recognises such a pyramid when every
    level is the previous one reduced by the same factor 2, 3 or 4, so other downsamples
    are refused. (openslide 4 ignores SubIFDs, hence one page per level.)

Lower levels are true area averages of level 0 (:mod:`wsi.pyramid_levels`): either the
writer averages level-0 regions itself, or the source renders each level directly and
promises the same result (the tests' ``RectangleSource`` does this exactly for flat
rectangles, so huge benchmark slides need one pass over level 0, not one per level).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import tifffile

from wsi.errors import InvalidParameter
from wsi.pyramid_levels import (
    CodecArgs,
    LevelReader,
    TileEncoder,
    TileSource,
    level_tiles,
    thumbnail,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

FLAVORS: tuple[str, ...] = ("svs", "generic")
COMPRESSIONS: tuple[str, ...] = ("jpeg", "deflate", "none")
#: What the slides built for tests and benchmarks say they were scanned by; a result's
#: export (wsi.tiff_export) names no scanner.
SYNTHETIC_ID = "SLIDEPIPE-SYNTHETIC"
#: Above this raw size a file is written as BigTIFF (offsets past 4 GiB).
_BIGTIFF_RAW_BYTES = 2**32 - 2**27


@dataclass(frozen=True)
class PyramidInfo:
    """What :func:`write_pyramidal_tiff` wrote (dimensions are (width, height))."""

    path: Path
    flavor: str
    mpp: float | None
    downsamples: tuple[int, ...]
    level_dimensions: tuple[tuple[int, int], ...]
    tile_px: int
    compression: str

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_page_indices(self) -> tuple[int, ...]:
        """TIFF page index of each level (SVS puts the thumbnail at page 1)."""
        if self.flavor == "svs":
            return (0, *range(2, len(self.downsamples) + 1))
        return tuple(range(len(self.downsamples)))


class WriterOptions(TypedDict, total=False):
    """The optional keywords of :func:`write_pyramidal_tiff`."""

    downsamples: Sequence[int]
    tile_px: int
    compression: str
    quality: int
    flavor: str
    render_levels: bool | None
    app_mag: float | None
    thumbnail_px: int
    bigtiff: bool | None
    workers: int | None
    scanscope_id: str | None


class _LevelPage(CodecArgs, total=False):
    """``TiffWriter.write`` keywords of one level's page (what every level shares)."""

    shape: tuple[int, int, int]
    dtype: type[np.uint8]
    photometric: str
    tile: tuple[int, int]
    metadata: None
    software: str


class _LevelTags(TypedDict, total=False):
    """``TiffWriter.write`` keywords that differ between levels and flavours."""

    description: str
    subfiletype: int
    resolution: tuple[float, float]
    resolutionunit: str


def pyramid_dimensions(
    width: int, height: int, downsamples: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """(width, height) of every level: ceil division, so no level-0 pixel is dropped."""
    return tuple((-(-width // d), -(-height // d)) for d in downsamples)


def _validate(
    width: int,
    height: int,
    mpp: float | None,
    downsamples: Sequence[int],
    tile_px: int,
    compression: str,
    quality: int,
    flavor: str,
) -> None:
    if width < 1 or height < 1:
        raise InvalidParameter(f"slide size must be positive, got {width}x{height}")
    if mpp is not None and not (0 < mpp < 1000 and math.isfinite(mpp)):
        raise InvalidParameter(f"mpp must be in (0, 1000) or None, got {mpp}")
    ds = list(downsamples)
    if not ds or ds[0] != 1 or any(int(d) != d or d < 1 for d in ds):
        raise InvalidParameter(f"downsamples must be integers starting with 1, got {ds}")
    if any(b <= a for a, b in pairwise(ds)):
        raise InvalidParameter(f"downsamples must increase strictly, got {ds}")
    if tile_px < 16 or tile_px % 16:
        raise InvalidParameter(f"tile_px must be a positive multiple of 16, got {tile_px}")
    if compression not in COMPRESSIONS:
        raise InvalidParameter(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if not 1 <= quality <= 100:
        raise InvalidParameter(f"JPEG quality must be in [1, 100], got {quality}")
    if flavor not in FLAVORS:
        raise InvalidParameter(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    if flavor == "generic" and len(ds) > 1:
        ratios = {b / a for a, b in pairwise(ds)}
        if len(ratios) != 1 or ratios.pop() not in (2, 3, 4):
            # tifffile would silently show one level: refuse rather than write a file
            # on which the two backends disagree
            raise InvalidParameter(
                f"generic TIFF downsamples must be powers of one factor 2, 3 or 4 (tifffile "
                f"cannot see other pyramids in a generic TIFF), got {ds}; use flavor='svs'"
            )


# -- area averaging ---------------------------------------------------------------------


def _aperio_header(width: int, height: int, tile_px: int, compression: str, quality: int,
                  level_size: tuple[int, int] | None = None) -> str:
    codec = {"jpeg": "JPEG/RGB", "deflate": "Deflate/RGB", "none": "Raw/RGB"}[compression]
    reduced = f" -> {level_size[0]}x{level_size[1]}" if level_size else ""
    return (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
        f"({tile_px}x{tile_px}){reduced} {codec} Q={quality}"
    )


def _aperio_fields(mpp: float | None, app_mag: float | None, filename: str,
                   scanscope_id: str | None = SYNTHETIC_ID) -> str:
    fields = []
    if app_mag is not None:
        fields.append(f"AppMag = {app_mag:g}")
    if scanscope_id:
        fields.append(f"ScanScope ID = {scanscope_id}")
    fields.append(f"Filename = {filename}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:.6g}")
    return "|" + "|".join(fields)


def write_pyramidal_tiff(
    path: str | Path,
    *,
    width: int,
    height: int,
    mpp: float | None,
    tile_source: TileSource,
    downsamples: Sequence[int] = (1, 4, 16),
    tile_px: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    flavor: str = "svs",
    render_levels: bool | None = None,
    app_mag: float | None = None,
    thumbnail_px: int = 768,
    bigtiff: bool | None = None,
    workers: int | None = None,
    scanscope_id: str | None = SYNTHETIC_ID,
) -> PyramidInfo:
    """Write a tiled pyramidal TIFF (``svs`` or ``generic``) from ``tile_source``.

    Level ``k`` is level 0 area-averaged by ``downsamples[k]`` (an integer), with size
    ``ceil(width / d) x ceil(height / d)``. ``mpp=None`` writes a slide without any
    resolution metadata. ``render_levels`` defaults to the source's ``renders_levels``
    attribute. ``app_mag`` defaults to ``10 / mpp`` rounded (20 for 0.5 µm/px).
    ``workers`` threads (default: up to 4) call the source and encode tiles, so the
    source must be thread-safe (the ones here are pure functions). The file appears
    atomically: it is written next to ``path`` and renamed at the end. JPEG tiles are
    YCbCr 4:2:0 like a scanner's; ``compression="deflate"`` keeps pixels exact.
    ``scanscope_id`` is the SVS's scanner field (None: no such field).

    Bio-Formats (QuPath) reads an SVS's pyramid as the resolutions of series 0 only when
    every page states NewSubfileType 0 (a page without the tag counts as a label or macro
    image) and the stripped thumbnail is smaller than the coarsest level (it is dropped as
    the smallest "resolution"); both flavours carry the mpp in X/YResolution (per cm) too.
    """
    path = Path(path)
    _validate(width, height, mpp, downsamples, tile_px, compression, quality, flavor)
    ds = tuple(int(d) for d in downsamples)
    dims = pyramid_dimensions(width, height, ds)
    if render_levels is None:
        render_levels = bool(getattr(tile_source, "renders_levels", False))
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if bigtiff is None:
        raw = sum(w * h * 3 for w, h in dims)
        bigtiff = raw > _BIGTIFF_RAW_BYTES
    if app_mag is None and mpp is not None:
        app_mag = float(max(1, round(10.0 / mpp)))
    source_ds = getattr(tile_source, "downsamples", None)
    if render_levels and source_ds is not None and tuple(source_ds) != ds:
        raise InvalidParameter(
            f"the tile source renders downsamples {tuple(source_ds)}, not the requested {ds}"
        )
    reader = LevelReader(tile_source, width, height, ds, render_levels)
    encoder = TileEncoder(compression, quality)
    codec_args = encoder.tifffile_args()
    tmp = path.with_name(f".{path.name}.partial")
    logger.info(
        "writing %s slide %s: %dx%d, downsamples %s, %s",
        flavor,
        path,
        width,
        height,
        ds,
        compression,
    )
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            for level, (lw, lh) in enumerate(dims):
                common: _LevelPage = {
                    "shape": (lh, lw, 3),
                    "dtype": np.uint8,
                    "photometric": "rgb",
                    "tile": (tile_px, tile_px),
                    "metadata": None,
                    "software": "slidepipe.wsi.pyramid_tiff",
                    **codec_args,
                }
                if flavor == "svs":
                    if level == 0:
                        description = _aperio_header(width, height, tile_px, compression, quality)
                    else:
                        # a reduced level, as Aperio writes it (tile size and codec, then the
                        # level's size): what Bio-Formats reads as a resolution of series 0
                        description = _aperio_header(width, height, tile_px, compression,
                                                     quality, level_size=(lw, lh))
                    description += _aperio_fields(mpp, app_mag, path.stem, scanscope_id)
                    extra: _LevelTags = {"description": description, "subfiletype": 0}
                else:
                    extra = {"subfiletype": 1 if level else 0}
                if mpp is not None:
                    level_mpp = mpp * ((width / lw) + (height / lh)) / 2
                    extra["resolution"] = (1e4 / level_mpp, 1e4 / level_mpp)
                    extra["resolutionunit"] = "CENTIMETER"
                logger.debug("level %d: %dx%d", level, lw, lh)
                tif.write(
                    level_tiles(reader, encoder, level, (lw, lh), tile_px, workers),
                    **common,
                    **extra,
                )
                if flavor == "svs" and level == 0:
                    # strictly smaller than the coarsest level (see above)
                    thumb_px = max(1, min(thumbnail_px, max(dims[-1]) - 1))
                    thumb = thumbnail(reader, dims[-1], thumb_px)
                    th, tw = thumb.shape[:2]
                    tif.write(
                        thumb,
                        photometric="rgb",
                        metadata=None,
                        subfiletype=0,
                        description=(
                            f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> "
                            f"{tw}x{th} - "
                            + _aperio_fields(mpp, app_mag, path.stem, scanscope_id)
                        ),
                        software="slidepipe.wsi.pyramid_tiff",
                    )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return PyramidInfo(
        path=path,
        flavor=flavor,
        mpp=mpp,
        downsamples=ds,
        level_dimensions=dims,
        tile_px=tile_px,
        compression=compression,
    )
