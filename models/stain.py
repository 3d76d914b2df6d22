"""Colour deconvolution (Ruifrok & Johnston) and stain-based pseudo-labels.

Used to make honest training targets from real H&E tissue when no annotations exist:
haematoxylin marks nuclei, eosin marks stroma and cytoplasm, low optical density is
glass. A model trained on these labels is a learned, smoothed colour-deconvolution
segmenter, and says so in its card.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

#: Rows: optical-density RGB vectors of haematoxylin, eosin and DAB (Ruifrok & Johnston).
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

PSEUDO_CLASSES = ("background", "stroma", "nuclei")
PSEUDO_COLORS = ("000000", "F2A0C8", "3030C0")


def optical_density(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Per-channel optical density, -log10(I / 255), with I clipped to [1, 255]."""
    od: npt.NDArray[np.float32] = -np.log10(np.clip(rgb.astype(np.float32), 1, 255) / 255.0)
    return od


def rgb_to_hed(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """(..., 3) RGB uint8 -> (..., 3) stain concentrations (H, E, DAB)."""
    return (optical_density(rgb) @ HED_FROM_RGB).astype(np.float32)


def stain_pseudo_labels(
    rgb: npt.NDArray[np.uint8], *, min_od: float = 0.12, nuclei_threshold: float | None = None
) -> tuple[npt.NDArray[np.uint8], float]:
    """0 background / 1 stroma / 2 nuclei for an RGB image, and the H threshold used.

    Background is total optical density below ``min_od``; within tissue, nuclei are
    pixels whose haematoxylin exceeds Otsu's threshold on the tissue's H values (or the
    given ``nuclei_threshold``, so that training and validation share one rule).
    """
    od = optical_density(rgb).sum(axis=-1)
    hed = rgb_to_hed(rgb)
    tissue = cv2.medianBlur((od > min_od).astype(np.uint8), 5).astype(bool)
    h = hed[..., 0]
    if nuclei_threshold is None:
        values = h[tissue]
        if values.size == 0:
            return np.zeros(rgb.shape[:2], dtype=np.uint8), float("inf")
        lo, hi = np.percentile(values, [1, 99])
        scaled = np.clip((values - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
        t, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        nuclei_threshold = float(lo + t / 255 * (hi - lo))
    labels = np.zeros(rgb.shape[:2], dtype=np.uint8)
    labels[tissue] = 1
    nuclei = tissue & (h > nuclei_threshold)
    opened = cv2.morphologyEx(nuclei.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    labels[np.asarray(opened).astype(bool)] = 2
    return labels, nuclei_threshold
