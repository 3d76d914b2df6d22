"""Pyramidal test and benchmark slides written with tifffile, streaming.

Slides are produced tile by tile from a *tile source*, so a 100k x 100k slide never
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

Lower levels are true area averages of level 0: either the writer averages level-0
regions itself, or the source renders each level directly and promises the same result
(:class:`RectangleSource` does this exactly for flat rectangles, so huge benchmark slides
need one pass over level 0, not one per level).
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Protocol, TypeVar

import cv2
import imagecodecs
import numpy as np
import tifffile

from wsi.errors import InvalidParameter

logger = logging.getLogger(__name__)

FLAVORS: tuple[str, ...] = ("svs", "generic")
COMPRESSIONS: tuple[str, ...] = ("jpeg", "deflate", "none")

#: H&E-like colours (RGB): eosin pink, haematoxylin purple, glass background.
PINK: tuple[int, int, int] = (226, 150, 190)
PURPLE: tuple[int, int, int] = (130, 80, 160)
WHITE: tuple[int, int, int] = (255, 255, 255)

#: Level-0 bytes averaged at once when a lower level is computed from level 0.
_AVERAGE_BUDGET_BYTES = 24 * 2**20
#: Above this raw size a file is written as BigTIFF (offsets past 4 GiB).
_BIGTIFF_RAW_BYTES = 2**32 - 2**27


class TileSource(Protocol):
    """Pixels of a slide: ``(level, y, x, h, w) -> (h, w, 3) uint8`` in *level* pixels.

    The writer only asks for regions inside the level. A source that sets
    ``renders_levels = True`` is called for every level and must return the area
    average of level 0 (what the writer would compute); otherwise it is only called
    with ``level=0``.
    """

    def __call__(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray: ...


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
def _block_mean_numpy(region: np.ndarray, factor: int) -> np.ndarray:
    """Block mean with partial last blocks averaged over their real pixels only."""
    vh, vw = region.shape[:2]
    oh, ow = -(-vh // factor), -(-vw // factor)
    padded = np.zeros((oh * factor, ow * factor, region.shape[2]), dtype=np.uint8)
    padded[:vh, :vw] = region
    sums = padded.reshape(oh, factor, ow, factor, -1).sum(axis=(1, 3), dtype=np.uint32)
    ny = np.minimum(factor, vh - np.arange(oh) * factor).astype(np.uint32)
    nx = np.minimum(factor, vw - np.arange(ow) * factor).astype(np.uint32)
    counts = (ny[:, None] * nx[None, :])[..., None]
    return ((sums + counts // 2) // counts).astype(np.uint8)


def block_mean(region: np.ndarray, factor: int, valid_hw: tuple[int, int]) -> np.ndarray:
    """Mean of ``factor`` x ``factor`` blocks of an (H, W, 3) uint8 array (area average).

    Only the top-left ``valid_hw`` pixels are real; the last row/column of blocks may be
    partial and is averaged over its real pixels only, as a scanner's pyramid does at
    the slide border. Full blocks go through OpenCV's integer-factor area resize (20x
    faster than numpy; it may round differently by one grey level).
    """
    vh, vw = valid_hw
    if factor == 1:
        return np.ascontiguousarray(region[:vh, :vw])
    oh, ow = -(-vh // factor), -(-vw // factor)
    fh, fw = vh // factor, vw // factor
    out = np.empty((oh, ow, region.shape[2]), dtype=np.uint8)
    if fh and fw:
        full = np.ascontiguousarray(region[: fh * factor, : fw * factor])
        out[:fh, :fw] = cv2.resize(full, (fw, fh), interpolation=cv2.INTER_AREA).reshape(fh, fw, -1)
    if fw < ow:
        out[:, fw:] = _block_mean_numpy(region[:vh, fw * factor : vw], factor)
    if fh < oh and fw:
        out[fh:, :fw] = _block_mean_numpy(region[fh * factor : vh, : fw * factor], factor)
    return out


class _LevelReader:
    """Regions of any level, rendered by the source or averaged from its level 0."""

    def __init__(
        self,
        source: TileSource,
        width: int,
        height: int,
        downsamples: Sequence[int],
        render_levels: bool,
    ) -> None:
        self.source = source
        self.width, self.height = width, height
        self.downsamples = tuple(int(d) for d in downsamples)
        self.render_levels = render_levels

    def region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        d = self.downsamples[level]
        if level == 0 or self.render_levels:
            out = np.asarray(self.source(level, y, x, h, w))
            if out.shape != (h, w, 3) or out.dtype != np.uint8:
                raise ValueError(
                    f"tile source returned {out.shape} {out.dtype} for level {level} "
                    f"region {h}x{w}; expected ({h}, {w}, 3) uint8"
                )
            return out
        # average level 0, a strip of level rows at a time (bounded memory)
        out = np.empty((h, w, 3), dtype=np.uint8)
        rows_per_strip = max(1, _AVERAGE_BUDGET_BYTES // (d * d * w * 3))
        x0 = x * d
        x1 = min((x + w) * d, self.width)
        for r in range(0, h, rows_per_strip):
            rh = min(rows_per_strip, h - r)
            y0 = (y + r) * d
            y1 = min((y + r + rh) * d, self.height)
            strip = self.region(0, y0, x0, y1 - y0, x1 - x0)
            out[r : r + rh] = block_mean(strip, d, (y1 - y0, x1 - x0))
        return out


# -- encoding ---------------------------------------------------------------------------
class _TileEncoder:
    """Encodes full tiles; identical uniform tiles (glass) are encoded once."""

    def __init__(self, compression: str, quality: int) -> None:
        self.compression = compression
        self.quality = quality
        self._uniform: dict[tuple[int, ...], bytes] = {}

    def encode(self, tile: np.ndarray) -> bytes:
        # uniform iff every row equals the one above and row 0 is one colour; both
        # comparisons are over contiguous memory, 10x faster than broadcasting a pixel
        if np.array_equal(tile[1:], tile[:-1]) and np.array_equal(tile[0, 1:], tile[0, :-1]):
            key = (*tile.shape, *(int(v) for v in tile[0, 0]))
            cached = self._uniform.get(key)
            if cached is None:
                cached = self._encode(tile)
                self._uniform[key] = cached  # dict assignment is atomic under the GIL
            return cached
        return self._encode(tile)

    def _encode(self, tile: np.ndarray) -> bytes:
        if self.compression == "jpeg":
            return bytes(
                imagecodecs.jpeg8_encode(
                    tile,
                    level=self.quality,
                    colorspace="RGB",
                    outcolorspace="YCBCR",
                    subsampling=(2, 2),
                )
            )
        if self.compression == "deflate":
            return bytes(imagecodecs.zlib_encode(tile, level=6))
        return tile.tobytes()

    def tifffile_args(self) -> dict[str, object]:
        if self.compression == "jpeg":
            return {"compression": "jpeg", "subsampling": (2, 2)}
        if self.compression == "deflate":
            return {"compression": "zlib"}
        return {"compression": None}


T = TypeVar("T")
R = TypeVar("R")


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map`` over a thread pool, in order, with at most ``2 * workers`` in flight.

    JPEG encoding and numpy release the GIL, so tiles encode in parallel while the
    bounded queue keeps memory at a handful of tiles.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synthetic") as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _level_tiles(
    reader: _LevelReader,
    encoder: _TileEncoder,
    level: int,
    dims: tuple[int, int],
    tile_px: int,
    workers: int,
) -> Iterator[bytes]:
    """Encoded tiles of one level, row-major; edge tiles padded by edge replication."""
    lw, lh = dims
    positions = [(ty, tx) for ty in range(0, lh, tile_px) for tx in range(0, lw, tile_px)]

    def make(pos: tuple[int, int]) -> bytes:
        ty, tx = pos
        th, tw = min(tile_px, lh - ty), min(tile_px, lw - tx)
        region = reader.region(level, ty, tx, th, tw)
        if (th, tw) != (tile_px, tile_px):
            # replicate the edge rather than pad with a colour, so that JPEG does not
            # ring across an artificial edge into the real pixels
            region = np.pad(region, ((0, tile_px - th), (0, tile_px - tw), (0, 0)), mode="edge")
        return encoder.encode(np.ascontiguousarray(region))

    return _ordered_map(make, positions, workers)


def _thumbnail(reader: _LevelReader, dims: tuple[int, int], max_px: int) -> np.ndarray:
    """Block mean of the coarsest level to at most ``max_px``, computed in strips."""
    lw, lh = dims
    level = len(reader.downsamples) - 1
    f = max(1, -(-max(lw, lh) // max_px))
    rows = max(f, (_AVERAGE_BUDGET_BYTES // (lw * 3)) // f * f)
    parts = []
    for y in range(0, lh, rows):
        h = min(rows, lh - y)
        parts.append(block_mean(reader.region(level, y, 0, h, lw), f, (h, lw)))
    return np.concatenate(parts, axis=0)


def _aperio_header(width: int, height: int, tile_px: int, compression: str, quality: int) -> str:
    codec = {"jpeg": "JPEG/RGB", "deflate": "Deflate/RGB", "none": "Raw/RGB"}[compression]
    return (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
        f"({tile_px}x{tile_px}) {codec} Q={quality}"
    )


def _aperio_fields(mpp: float | None, app_mag: float | None, filename: str) -> str:
    fields = []
    if app_mag is not None:
        fields.append(f"AppMag = {app_mag:g}")
    fields.append("ScanScope ID = SLIDEPIPE-SYNTHETIC")
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
    reader = _LevelReader(tile_source, width, height, ds, render_levels)
    encoder = _TileEncoder(compression, quality)
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
                common: dict[str, object] = {
                    "shape": (lh, lw, 3),
                    "dtype": np.uint8,
                    "photometric": "rgb",
                    "tile": (tile_px, tile_px),
                    "metadata": None,
                    "software": "slidepipe.wsi.synthetic",
                    **codec_args,
                }
                if flavor == "svs":
                    if level == 0:
                        description = _aperio_header(width, height, tile_px, compression, quality)
                    else:
                        description = (
                            f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> {lw}x{lh} - "
                        )
                    description += _aperio_fields(mpp, app_mag, path.stem)
                    extra: dict[str, object] = {"description": description}
                else:
                    extra = {"subfiletype": 1 if level else 0}
                    if mpp is not None:
                        level_mpp = mpp * ((width / lw) + (height / lh)) / 2
                        extra["resolution"] = (1e4 / level_mpp, 1e4 / level_mpp)
                        extra["resolutionunit"] = "CENTIMETER"
                logger.debug("level %d: %dx%d", level, lw, lh)
                tif.write(
                    _level_tiles(reader, encoder, level, (lw, lh), tile_px, workers),
                    **common,
                    **extra,
                )
                if flavor == "svs" and level == 0:
                    thumb = _thumbnail(reader, dims[-1], thumbnail_px)
                    th, tw = thumb.shape[:2]
                    tif.write(
                        thumb,
                        photometric="rgb",
                        metadata=None,
                        description=(
                            f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> "
                            f"{tw}x{th} - " + _aperio_fields(mpp, app_mag, path.stem)
                        ),
                        software="slidepipe.wsi.synthetic",
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


# -- sources ----------------------------------------------------------------------------
def _source_runs(start: int, count: int, size: int, mode: str) -> list[tuple[int, slice]]:
    """Split output indices ``start..start+count`` into runs copied with one slice each.

    Returns (output offset, source slice) pairs; mirrored runs have a negative step.
    """
    runs: list[tuple[int, slice]] = []
    pos, end = start, start + count
    period = size if mode == "tile" else 2 * size
    while pos < end:
        phase = pos % period
        if phase < size:  # forward copy of the image
            n = min(size - phase, end - pos)
            runs.append((pos - start, slice(phase, phase + n)))
        else:  # mirrored copy: phase size..2*size-1 maps to size-1..0
            src = period - 1 - phase
            n = min(src + 1, end - pos)
            stop = src - n
            runs.append((pos - start, slice(src, stop if stop >= 0 else None, -1)))
        pos += n
    return runs


class ArraySource:
    """Level-0 pixels of an in-memory RGB image extended to any size.

    ``mode="mirror"`` reflects the image at its borders (no seams in the tissue),
    ``"tile"`` repeats it. Lower levels are left to the writer's area averaging.
    """

    renders_levels = False

    def __init__(self, rgb: np.ndarray, *, mode: str = "mirror") -> None:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InvalidParameter(
                f"expected an (h, w, 3) uint8 image, got {rgb.shape} {rgb.dtype}"
            )
        if mode not in ("mirror", "tile"):
            raise InvalidParameter(f"mode must be 'mirror' or 'tile', got {mode!r}")
        self.rgb = np.ascontiguousarray(rgb)
        self.mode = mode

    def __call__(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        if level != 0:
            raise ValueError("ArraySource renders level 0 only")
        ih, iw = self.rgb.shape[:2]
        out = np.empty((h, w, 3), dtype=np.uint8)
        col_runs = _source_runs(x, w, iw, self.mode)
        for oy, sy in _source_runs(y, h, ih, self.mode):
            rows = self.rgb[sy]
            for ox, sx in col_runs:
                block = rows[:, sx]
                out[oy : oy + block.shape[0], ox : ox + block.shape[1]] = block
        return out


def write_slide_from_array(
    path: str | Path,
    rgb: np.ndarray,
    *,
    mpp: float | None,
    width: int | None = None,
    height: int | None = None,
    mode: str = "mirror",
    **kwargs: object,
) -> PyramidInfo:
    """A pyramidal slide from an RGB array, mirrored/tiled to ``width`` x ``height``.

    Extra keyword arguments go to :func:`write_pyramidal_tiff`.
    """
    h, w = rgb.shape[:2]
    return write_pyramidal_tiff(
        path,
        width=width or w,
        height=height or h,
        mpp=mpp,
        tile_source=ArraySource(rgb, mode=mode),
        **kwargs,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class Rect:
    """An axis-aligned block of flat tissue colour, in level-0 pixels."""

    x: int
    y: int
    width: int
    height: int
    color: tuple[int, int, int] = PINK

    @property
    def area_px(self) -> int:
        return self.width * self.height

    def intersects(self, other: Rect) -> bool:
        return not (
            self.x + self.width <= other.x
            or other.x + other.width <= self.x
            or self.y + self.height <= other.y
            or other.y + other.height <= self.y
        )


class _PeriodicGrain:
    """A 1-D periodic integer grain with O(1) sums over any index range."""

    def __init__(self, period: int, amplitude: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.period = period
        self.values = rng.integers(-amplitude, amplitude + 1, size=period).astype(np.int64)
        self._cum = np.concatenate([[0], np.cumsum(self.values)])

    def prefix(self, n: np.ndarray) -> np.ndarray:
        """Sum of the grain over indices ``[0, n)`` (``n`` may exceed the period)."""
        q, r = np.divmod(n, self.period)
        return q * self._cum[-1] + self._cum[r]


class RectangleSource:
    """Flat tissue rectangles on a flat background; every level rendered exactly.

    The area average over a level pixel's level-0 footprint of a flat rectangle is its
    coverage (a product of per-axis overlaps) times its colour, and that of the optional
    grain (``texture`` > 0: a separable, periodic +-``2 * texture`` luminance pattern
    inside tissue, for realistic JPEG sizes) is a product of per-axis sums. So every
    level is rendered directly, rounded half up (within one grey level of
    :func:`block_mean`): the pyramid is exact and costs one pass per level, never a
    re-read of level 0. ``tissue_area_px`` gives the hand-countable tissue area.
    """

    renders_levels = True

    def __init__(
        self,
        width: int,
        height: int,
        rects: Sequence[Rect],
        *,
        downsamples: Sequence[int] = (1, 4, 16),
        background: tuple[int, int, int] = WHITE,
        texture: int = 0,
    ) -> None:
        if width < 1 or height < 1:
            raise InvalidParameter(f"slide size must be positive, got {width}x{height}")
        self.width, self.height = width, height
        self.rects = tuple(rects)
        self.downsamples = tuple(int(d) for d in downsamples)
        self.background = np.array(background, dtype=np.float32)
        self._background_u8 = np.array(background, dtype=np.uint8)
        self.texture = int(texture)
        for i, a in enumerate(self.rects):
            if a.width < 1 or a.height < 1:
                raise InvalidParameter(f"empty rectangle {a}")
            if min(a.color) - 2 * self.texture < 0 or max(a.color) + 2 * self.texture > 255:
                raise InvalidParameter(f"texture {self.texture} would clip colour {a.color}")
            for b in self.rects[i + 1 :]:
                if a.intersects(b):
                    raise InvalidParameter(f"rectangles overlap: {a} and {b}")
        # prime periods: the pattern never lines up with tiles or downsamples
        self._grain_y = _PeriodicGrain(251, self.texture, 1) if self.texture else None
        self._grain_x = _PeriodicGrain(241, self.texture, 2) if self.texture else None

    @property
    def tissue_area_px(self) -> int:
        """Level-0 tissue pixels (the part of each rectangle inside the slide)."""
        total = 0
        for r in self.rects:
            w = max(0, min(r.x + r.width, self.width) - max(r.x, 0))
            h = max(0, min(r.y + r.height, self.height) - max(r.y, 0))
            total += w * h
        return total

    @staticmethod
    def _axis(
        start: int,
        count: int,
        d: int,
        limit: int,
        lo: int,
        hi: int,
        grain: _PeriodicGrain | None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Per level pixel: covered share of its footprint, and grain sum / footprint."""
        p0 = np.arange(start, start + count, dtype=np.int64) * d
        p1 = np.minimum(p0 + d, limit)
        c0, c1 = np.maximum(p0, lo), np.minimum(p1, hi)
        covered = np.clip(c1 - c0, 0, None)
        size = np.maximum(p1 - p0, 1)
        if grain is None:
            return (covered / size).astype(np.float32), None
        sums = np.where(covered > 0, grain.prefix(np.maximum(c1, c0)) - grain.prefix(c0), 0)
        return (covered / size).astype(np.float32), (sums / size).astype(np.float32)

    def __call__(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        d = self.downsamples[level]
        # broadcasting a 3-vector is ~100x slower than copying whole rows
        rows = np.empty((h, w * 3), dtype=np.uint8)
        rows[:] = np.tile(self._background_u8, w)
        out = rows.reshape(h, w, 3)
        fy0, fy1 = y * d, min((y + h) * d, self.height)  # level-0 footprint
        fx0, fx1 = x * d, min((x + w) * d, self.width)
        hits = [
            r
            for r in self.rects
            if r.y < fy1 and fy0 < r.y + r.height and r.x < fx1 and fx0 < r.x + r.width
        ]
        if not hits:
            return out
        # the level pixels any hit touches; rectangles closer than d share edge pixels,
        # so accumulate all of them in float over their joint bounding box
        by0 = max(y, min(r.y for r in hits) // d)
        by1 = min(y + h, -(-max(r.y + r.height for r in hits) // d))
        bx0 = max(x, min(r.x for r in hits) // d)
        bx1 = min(x + w, -(-max(r.x + r.width for r in hits) // d))
        value = np.empty((by1 - by0, bx1 - bx0, 3), dtype=np.float32)
        value[:] = self.background
        for r in hits:
            cy, gy = self._axis(by0, by1 - by0, d, self.height, r.y, r.y + r.height, self._grain_y)
            cx, gx = self._axis(bx0, bx1 - bx0, d, self.width, r.x, r.x + r.width, self._grain_x)
            delta = np.array(r.color, dtype=np.float32) - self.background
            value += np.multiply.outer(np.outer(cy, cx), delta)
            if gy is not None and gx is not None:
                grain = np.outer(gy, cx) + np.outer(cy, gx)
                value += grain[..., None]
        out[by0 - y : by1 - y, bx0 - x : bx1 - x] = np.floor(value + 0.5 + 1e-4).astype(np.uint8)
        return out


def tissue_band_rects(
    width: int,
    height: int,
    *,
    tissue_fraction: float = 0.1,
    bands: int = 3,
    colors: Sequence[tuple[int, int, int]] = (PINK, PURPLE),
) -> list[Rect]:
    """Horizontal tissue bands covering about ``tissue_fraction`` of the slide.

    Mostly glass, like a real section: ``bands`` equal bands spread over the height,
    each spanning the middle 80% of the width, alternating ``colors``. Used for memory
    benchmarks where the amount of tissue, not the slide area, should drive the cost.
    """
    if not 0 < tissue_fraction <= 0.8:
        raise InvalidParameter(f"tissue_fraction must be in (0, 0.8], got {tissue_fraction}")
    if bands < 1:
        raise InvalidParameter(f"bands must be positive, got {bands}")
    band_w = max(1, int(width * 0.8))
    band_h = max(1, int(round(tissue_fraction * width * height / (band_w * bands))))
    gap = (height - bands * band_h) / (bands + 1)
    if gap < 0:
        raise InvalidParameter("bands do not fit; lower tissue_fraction or bands")
    x = (width - band_w) // 2
    return [
        Rect(x, int(round(gap + i * (band_h + gap))), band_w, band_h, colors[i % len(colors)])
        for i in range(bands)
    ]


def write_banded_slide(
    path: str | Path,
    *,
    width: int,
    height: int,
    mpp: float = 0.5,
    tissue_fraction: float = 0.1,
    bands: int = 3,
    texture: int = 0,
    **kwargs: object,
) -> PyramidInfo:
    """A mostly-background slide of any size with tissue bands (benchmarks).

    Extra keyword arguments (``downsamples``, ``flavor``, ``compression``...) go to
    :func:`write_pyramidal_tiff`.
    """
    downsamples = tuple(kwargs.pop("downsamples", (1, 4, 16)))  # type: ignore[call-overload]
    source = RectangleSource(
        width,
        height,
        tissue_band_rects(width, height, tissue_fraction=tissue_fraction, bands=bands),
        downsamples=downsamples,
        texture=texture,
    )
    return write_pyramidal_tiff(
        path,
        width=width,
        height=height,
        mpp=mpp,
        tile_source=source,
        downsamples=downsamples,
        **kwargs,  # type: ignore[arg-type]
    )
