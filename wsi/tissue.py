"""Tissue detection on a low-resolution view of the slide.

HSV saturation with Otsu's threshold (default: stain is saturated, glass and pen-free
background are not) or plain grey-level Otsu, then median blur, morphological closing,
hole filling and removal of small objects. Sizes are in micrometres so that one set of
parameters means the same thing at every scanner resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from wsi.errors import InvalidParameter
from wsi.reader import Slide

#: "none" treats the whole slide as tissue (every tile is processed).
TISSUE_METHODS: tuple[str, ...] = ("hsv-otsu", "grey-otsu", "none")


@dataclass(frozen=True)
class TissueParams:
    """How to find tissue. Defaults suit H&E at 20x-40x."""

    method: str = "hsv-otsu"
    working_mpp: float = 8.0
    median_um: float = 40.0
    closing_um: float = 60.0
    min_object_um2: float = 20_000.0
    max_hole_um2: float = 50_000.0
    #: Otsu's threshold never goes below this (0-255), so a blank slide stays empty.
    min_threshold: int = 12

    def validate(self) -> None:
        if self.method not in TISSUE_METHODS:
            raise InvalidParameter(
                f"tissue method must be one of {', '.join(TISSUE_METHODS)}, got {self.method!r}"
            )
        if not (0.1 <= self.working_mpp <= 256):
            raise InvalidParameter(
                f"working_mpp must be within [0.1, 256] µm/px, got {self.working_mpp}"
            )
        for name in ("median_um", "closing_um", "min_object_um2", "max_hole_um2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidParameter(f"{name} must be a non-negative number, got {value}")
        if not 0 <= self.min_threshold <= 255:
            raise InvalidParameter(f"min_threshold must be in [0, 255], got {self.min_threshold}")


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask and the microns per pixel it was computed at."""

    mask: np.ndarray
    mpp: float

    @property
    def area_um2(self) -> float:
        return float(self.mask.sum()) * self.mpp * self.mpp


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 == 1 else k + 1


def threshold_tissue(rgb: np.ndarray, method: str, min_threshold: int) -> np.ndarray:
    """Raw Otsu foreground of an RGB image (before any morphology)."""
    if method == "hsv-otsu":
        channel = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
        polarity = cv2.THRESH_BINARY  # saturated = tissue
    elif method == "grey-otsu":
        channel = 255 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        polarity = cv2.THRESH_BINARY  # dark = tissue, so invert first
    else:
        raise InvalidParameter(f"unknown tissue method {method!r}")
    otsu, _ = cv2.threshold(channel, 0, 255, polarity | cv2.THRESH_OTSU)
    return channel > max(otsu, min_threshold)


def clean_mask(mask: np.ndarray, mpp: float, params: TissueParams) -> np.ndarray:
    """Median blur, closing, hole filling and small-object removal (sizes in µm)."""
    m = mask.astype(np.uint8) * 255
    m = cv2.medianBlur(m, _odd(params.median_um / mpp))
    close_px = _odd(params.closing_um / mpp)
    if close_px > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close_px, close_px))
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, kernel)
    px_area = mpp * mpp
    # holes: background components that do not touch the border and are small enough
    n, labels, stats, _ = cv2.connectedComponentsWithStats((m == 0).astype(np.uint8), 4)
    h, w = m.shape
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    touches_border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = ~touches_border & (stats[:, cv2.CC_STAT_AREA] * px_area <= params.max_hole_um2)
    fill[0] = False  # label 0 is the foreground itself
    m[fill[labels]] = 255
    n, labels, stats, _ = cv2.connectedComponentsWithStats((m > 0).astype(np.uint8), 8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] * px_area >= params.min_object_um2
    return keep[labels]


def working_view(slide: Slide, working_mpp: float) -> tuple[np.ndarray, float]:
    """The slide at about ``working_mpp`` (RGB) and its exact mpp."""
    w0, h0 = slide.dimensions
    factor = max(1.0, working_mpp / slide.mpp)
    width, height = max(1, round(w0 / factor)), max(1, round(h0 / factor))
    level = max(
        (lvl for lvl, ds in enumerate(slide.level_downsamples) if ds <= factor * 1.01),
        key=lambda lvl: slide.level_downsamples[lvl],
    )
    rgb = slide.read_level_resized(level, width, height)
    return rgb, slide.mpp * w0 / width


def tissue_mask(slide: Slide, params: TissueParams | None = None) -> TissueMask:
    """Find tissue on ``slide`` at about ``params.working_mpp``."""
    params = params or TissueParams()
    params.validate()
    if params.method == "none":
        factor = max(1.0, params.working_mpp / slide.mpp)
        w0, h0 = slide.dimensions
        width, height = max(1, round(w0 / factor)), max(1, round(h0 / factor))
        return TissueMask(mask=np.ones((height, width), dtype=bool), mpp=slide.mpp * w0 / width)
    rgb, mpp = working_view(slide, params.working_mpp)
    raw = threshold_tissue(rgb, params.method, params.min_threshold)
    return TissueMask(mask=clean_mask(raw, mpp, params), mpp=mpp)
