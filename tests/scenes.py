"""Test and benchmark scenes: slides of flat tissue rectangles with hand-countable areas.

Written through the product's writer (:func:`wsi.pyramid_tiff.write_pyramidal_tiff`);
every level is rendered exactly, so a 100k x 100k benchmark slide costs one pass per level.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi.errors import InvalidParameter
from wsi.pyramid_tiff import PyramidInfo, write_pyramidal_tiff

logger = logging.getLogger(__name__)


#: H&E-like colours (RGB): eosin pink, haematoxylin purple, glass background.
PINK: tuple[int, int, int] = (226, 150, 190)
PURPLE: tuple[int, int, int] = (130, 80, 160)
WHITE: tuple[int, int, int] = (255, 255, 255)

@dataclass(frozen=True)
class Rect:
    """An axis-aligned block of flat tissue colour, in level-0 pixels."""

    x: int
    y: int
    width: int
    height: int
    color: tuple[int, int, int] = PINK

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
