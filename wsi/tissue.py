"""Tissue detection on a low-resolution view of the slide.

``stain`` (default, :mod:`wsi.tissue_stain`): chroma with two thresholds, pen ink, dust
and bubble rims kept out, tuned for recall (thin strands and small fragments are
tissue). ``hsv-otsu`` (HSV saturation with Otsu's threshold, the default until
2026-12) and ``grey-otsu`` (plain grey-level Otsu) threshold one channel. Then, for all
of them, median blur, morphological closing, hole filling and removal of fragments
smaller than ``min_fragment_um2``. Sizes are in micrometres so that one set of
parameters means the same thing at every scanner resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from wsi.errors import InvalidParameter
from wsi.reader import Slide
from wsi.tissue_morphology import close, components, count_under, fill_holes, odd, select
from wsi.tissue_stain import stain_mask
from wsi.tissue_view import stain_view

#: "none" treats the whole slide as tissue (every tile is processed).
TISSUE_METHODS: tuple[str, ...] = ("stain", "hsv-otsu", "grey-otsu", "none")


@dataclass(frozen=True)
class TissueParams:
    """How to find tissue. Defaults suit H&E at 20x-40x and favour recall: a 15 µm wide
    strand and a 200 µm² fragment of stained tissue are kept at 4 µm/px."""

    method: str = "stain"
    working_mpp: float = 4.0
    median_um: float = 12.0
    closing_um: float = 24.0
    min_fragment_um2: float = 200.0
    max_hole_um2: float = 50_000.0
    #: Otsu's threshold never goes below this (0-255), so a blank slide stays empty
    #: (``hsv-otsu`` and ``grey-otsu``; ``stain`` has its own floors).
    min_threshold: int = 12
    #: ``stain``: keep pen ink, dust and bubble rims out of the mask.
    pen_filter: bool = True
    #: ``stain``: a pen-coloured region at least this wide is ink, not stained tissue.
    pen_width_um: float = 30.0

    def validate(self) -> None:
        if self.method not in TISSUE_METHODS:
            raise InvalidParameter(
                f"tissue method must be one of {', '.join(TISSUE_METHODS)}, got {self.method!r}"
            )
        if not (0.1 <= self.working_mpp <= 256):
            raise InvalidParameter(
                f"working_mpp must be within [0.1, 256] µm/px, got {self.working_mpp}"
            )
        for name in ("median_um", "closing_um", "min_fragment_um2", "max_hole_um2",
                     "pen_width_um"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidParameter(f"{name} must be a non-negative number, got {value}")
        if not 0 <= self.min_threshold <= 255:
            raise InvalidParameter(f"min_threshold must be in [0, 255], got {self.min_threshold}")


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask, the microns per pixel it was computed at, and what the
    method found on the way (thresholds, fragments, pen and grey areas in µm²)."""

    mask: npt.NDArray[np.bool_]
    mpp: float
    findings: dict[str, Any] = field(default_factory=dict)

    @property
    def area_um2(self) -> float:
        return float(self.mask.sum()) * self.mpp * self.mpp

    @property
    def fragments(self) -> int:
        """Connected pieces of tissue (8-connected)."""
        if "fragments" in self.findings:
            return int(self.findings["fragments"])
        n, _ = cv2.connectedComponents(self.mask.view(np.uint8), connectivity=8)
        return int(n) - 1

    def describe(self) -> str:
        """One line for a person: ``1.23 mm² of tissue in 4 fragments``, and what was
        kept out."""
        text = (f"{self.area_um2 / 1e6:.3g} mm² of tissue in {self.fragments} fragment"
                f"{'' if self.fragments == 1 else 's'}")
        pen = float(self.findings.get("pen_um2", 0.0))
        grey = float(self.findings.get("grey_um2", 0.0))
        if pen or grey:
            text += (f"; kept out: {pen / 1e6:.3g} mm² of pen ink, {grey / 1e6:.3g} mm² of "
                     "dark grey (marker, dust, bubbles)")
        return text


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


def clean_mask(
    mask: npt.NDArray[np.bool_] | npt.NDArray[np.uint8], mpp: float, params: TissueParams
) -> npt.NDArray[np.bool_]:
    """Median blur, closing, hole filling and small-fragment removal (sizes in µm).

    ``mask`` is boolean or uint8 (non-zero = tissue). Temporaries are freed as soon as
    possible: on a 100k-pixel slide each one is tens of megabytes.
    """
    m = np.asarray(
        cv2.medianBlur(np.where(mask, np.uint8(255), np.uint8(0)), odd(params.median_um / mpp)),
        dtype=np.uint8,
    )
    close(m, mpp, params.closing_um)
    fill_holes(m, mpp, params.max_hole_um2)
    n, labels = components(m, 8)
    del m
    keep = count_under(labels, n) * (mpp * mpp) >= params.min_fragment_um2
    cleaned: npt.NDArray[np.bool_] = select(labels, keep) > 0
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

    Only one byte per pixel of the working view is held (the thresholded channel, or
    the ``stain`` code), never its RGB, so the mask's memory is one byte per working
    pixel plus the morphology's temporaries.
    """
    params = params or TissueParams()
    params.validate()
    level, width, height, mpp = _view_geometry(slide, params.working_mpp)
    if params.method == "none":
        return TissueMask(mask=np.ones((height, width), dtype=bool), mpp=mpp,
                          findings={"fragments": 1})
    if params.method == "stain":
        code, decoded = stain_view(slide, level, width, height, mpp)
        tissue, found, fragments = stain_mask(code, mpp, params)
        del code
        cleaned = tissue > 0
        findings = {**found.as_dict(), "fragments": fragments, "decoded_share": decoded}
    else:
        channel = slide.read_level_resized(
            level, width, height, channel=lambda rgb: threshold_channel(rgb, params.method)
        )
        otsu, _ = cv2.threshold(channel, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        # in place: the channel becomes the 0/255 foreground (no second full-size array)
        threshold = max(otsu, params.min_threshold)
        cv2.threshold(channel, threshold, 255, cv2.THRESH_BINARY, dst=channel)
        cleaned = clean_mask(channel, mpp, params)
        n, _ = cv2.connectedComponents(cleaned.view(np.uint8), connectivity=8)
        findings = {"threshold": float(threshold), "fragments": int(n) - 1}
    return TissueMask(mask=cleaned, mpp=mpp, findings=findings)
