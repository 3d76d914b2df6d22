"""Tissue detection on a low-resolution view of the slide.

HSV saturation with Otsu's threshold (default: stain is saturated, glass and pen-free
background are not) or plain grey-level Otsu, then median blur, morphological closing,
hole filling and removal of small objects. Sizes are in micrometres so that one set of
parameters means the same thing at every scanner resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

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

    mask: npt.NDArray[np.bool_]
    mpp: float

    @property
    def area_um2(self) -> float:
        return float(self.mask.sum()) * self.mpp * self.mpp


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 == 1 else k + 1


def threshold_channel(rgb: npt.NDArray[np.uint8], method: str) -> npt.NDArray[np.uint8]:
    """The uint8 channel Otsu thresholds: HSV saturation, or inverted grey (dark = high)."""
    if method == "hsv-otsu":
        hsv = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV), dtype=np.uint8)
        return hsv[..., 1]
    if method == "grey-otsu":
        grey = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), dtype=np.uint8)
        return 255 - grey
    raise InvalidParameter(f"unknown tissue method {method!r}")


def otsu_foreground(channel: npt.NDArray[np.uint8], min_threshold: int) -> npt.NDArray[np.bool_]:
    """Pixels above Otsu's threshold (never below ``min_threshold``)."""
    otsu, _ = cv2.threshold(channel, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return channel > max(otsu, min_threshold)


def threshold_tissue(
    rgb: npt.NDArray[np.uint8], method: str, min_threshold: int
) -> npt.NDArray[np.bool_]:
    """Raw Otsu foreground of an RGB image (before any morphology)."""
    return otsu_foreground(threshold_channel(rgb, method), min_threshold)


def _components(
    binary: npt.NDArray[np.uint8], connectivity: int
) -> tuple[int, npt.NDArray[np.integer[Any]], npt.NDArray[np.int32]]:
    """Connected components with 16-bit labels when they fit (half the memory of a
    full-resolution int32 label image), else 32-bit."""
    try:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=connectivity,
                                                               ltype=cv2.CV_16U)
    except cv2.error:  # more than 65535 components
        n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=connectivity,
                                                               ltype=cv2.CV_32S)
    return n, np.asarray(labels), np.asarray(stats, dtype=np.int32)


def clean_mask(
    mask: npt.NDArray[np.bool_] | npt.NDArray[np.uint8], mpp: float, params: TissueParams
) -> npt.NDArray[np.bool_]:
    """Median blur, closing, hole filling and small-object removal (sizes in µm).

    ``mask`` is boolean or uint8 (non-zero = tissue). Temporaries are freed as soon as
    possible: on a 100k-pixel slide each one is tens of megabytes.
    """
    m = np.asarray(
        cv2.medianBlur(np.where(mask, np.uint8(255), np.uint8(0)), _odd(params.median_um / mpp)),
        dtype=np.uint8,
    )
    close_px = _odd(params.closing_um / mpp)
    if close_px > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close_px, close_px))
        cv2.morphologyEx(m, cv2.MORPH_CLOSE, kernel, dst=m)
    px_area = mpp * mpp
    # holes: background components that do not touch the border and are small enough
    n, labels, stats = _components(np.asarray(cv2.bitwise_not(m), dtype=np.uint8), 4)
    h, w = m.shape
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    touches_border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = ~touches_border & (stats[:, cv2.CC_STAT_AREA] * px_area <= params.max_hole_um2)
    fill[0] = False  # label 0 is the foreground itself
    if fill.any():
        m[fill[labels]] = 255
    del labels
    n, labels, stats = _components(m, 8)
    del m
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] * px_area >= params.min_object_um2
    cleaned: npt.NDArray[np.bool_] = keep[labels]
    return cleaned


def _view_geometry(slide: Slide, working_mpp: float) -> tuple[int, int, int, float]:
    """(level, width, height, mpp) of the slide viewed at about ``working_mpp``."""
    w0, h0 = slide.dimensions
    factor = max(1.0, working_mpp / slide.mpp)
    width, height = max(1, round(w0 / factor)), max(1, round(h0 / factor))
    level = max(
        (lvl for lvl, ds in enumerate(slide.level_downsamples) if ds <= factor * 1.01),
        key=lambda lvl: slide.level_downsamples[lvl],
    )
    return level, width, height, slide.mpp * w0 / width


def working_view(slide: Slide, working_mpp: float) -> tuple[npt.NDArray[np.uint8], float]:
    """The slide at about ``working_mpp`` (RGB) and its exact mpp."""
    level, width, height, mpp = _view_geometry(slide, working_mpp)
    return slide.read_level_resized(level, width, height), mpp


def tissue_mask(slide: Slide, params: TissueParams | None = None) -> TissueMask:
    """Find tissue on ``slide`` at about ``params.working_mpp``.

    Only the thresholded channel of the working view is held, never its RGB, so the
    mask's memory is one byte per working pixel plus the morphology's temporaries.
    """
    params = params or TissueParams()
    params.validate()
    level, width, height, mpp = _view_geometry(slide, params.working_mpp)
    if params.method == "none":
        return TissueMask(mask=np.ones((height, width), dtype=bool), mpp=mpp)
    channel = slide.read_level_resized(
        level, width, height, channel=lambda rgb: threshold_channel(rgb, params.method)
    )
    otsu, _ = cv2.threshold(channel, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    # in place: the channel becomes the 0/255 foreground (no second full-size array)
    cv2.threshold(channel, max(otsu, params.min_threshold), 255, cv2.THRESH_BINARY, dst=channel)
    return TissueMask(mask=clean_mask(channel, mpp, params), mpp=mpp)
