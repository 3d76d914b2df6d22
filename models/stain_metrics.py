"""How well a stain transfer worked, as de Bel et al. report it.

* **SSIM** (Wang et al. 2004; Gaussian window sigma 1.5, K1 0.01, K2 0.03, on the grey
  level) between the source image and its transform: was the structure kept?
* **Colour-histogram Wasserstein distance**: the earth mover's distance between the
  256-bin histograms of each RGB channel, in grey levels, averaged over the channels:
  how far the transform's colours are from the target domain's. Images of different
  tissue can be compared (only the distributions matter); masks restrict either side to
  tissue so that glass does not dominate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)

#: An image or grey level: uint8 as read, or float.
Pixels = npt.NDArray[np.integer[Any] | np.floating[Any]]
#: A tissue mask: boolean, or integer with non-zero for inside.
Mask = npt.NDArray[np.bool_ | np.integer[Any]]


def to_grey(rgb: Pixels) -> npt.NDArray[np.float64]:
    return rgb.astype(np.float64) @ GREY_WEIGHTS


def ssim(a: Pixels, b: Pixels, *, data_range: float = 255.0, sigma: float = 1.5,
         mask: Mask | None = None) -> float:
    """Mean SSIM of two images of one shape (over ``mask`` when given); RGB images are
    compared on their grey level."""
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs images of one shape, got {a.shape} and {b.shape}")
    x = to_grey(a) if a.ndim == 3 else a.astype(np.float64)
    y = to_grey(b) if b.ndim == 3 else b.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    radius = int(3.5 * sigma + 0.5)

    def blur(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(
            cv2.GaussianBlur(v, (2 * radius + 1, 2 * radius + 1), sigma,
                             borderType=cv2.BORDER_REFLECT),
            dtype=np.float64,
        )

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    n = 2 * radius + 1  # sample (not population) covariance, as Wang et al. and skimage
    scale = n * n / (n * n - 1)
    vx, vy, cxy = vx * scale, vy * scale, cxy * scale
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    if mask is not None:
        inside = mask.astype(bool).copy()
        inside[:radius], inside[-radius:], inside[:, :radius], inside[:, -radius:] = (False,) * 4
        if not inside.any():
            raise ValueError("no pixels to compare (empty mask)")
        return float(s[inside].mean())
    crop = radius  # ignore the border, where the window runs off the image
    return float(s[crop:-crop, crop:-crop].mean()) if min(s.shape) > 2 * crop else float(s.mean())


def channel_histograms(
    rgb: npt.NDArray[np.uint8], mask: Mask | None = None
) -> npt.NDArray[np.float64]:
    """(3, 256) normalised histograms of an RGB uint8 image (inside ``mask``)."""
    pixels = rgb.reshape(-1, 3) if mask is None else rgb[mask.astype(bool)]
    if len(pixels) == 0:
        raise ValueError("no pixels to histogram (empty mask)")
    hist = np.stack([np.bincount(pixels[:, c], minlength=256)[:256] for c in range(3)])
    normalised: npt.NDArray[np.float64] = hist / hist.sum(axis=1, keepdims=True)
    return normalised


def histogram_wasserstein(
    a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8], *, mask_a: Mask | None = None,
    mask_b: Mask | None = None,
) -> float:
    """Mean over RGB of the 1-D Wasserstein-1 distance between channel histograms
    (grey levels): the area between the two cumulative histograms."""
    ha, hb = channel_histograms(a, mask_a), channel_histograms(b, mask_b)
    return float(np.abs(np.cumsum(ha, axis=1) - np.cumsum(hb, axis=1)).sum(axis=1).mean())


def tissue_pixels(rgb: npt.NDArray[np.uint8], min_od: float = 0.15) -> npt.NDArray[np.bool_]:
    """Pixels whose summed optical density exceeds ``min_od`` (not glass)."""
    od: npt.NDArray[np.float32] = -np.log10(np.clip(rgb.astype(np.float32), 1, 255) / 255.0)
    tissue: npt.NDArray[np.bool_] = od.sum(axis=-1) > min_od
    return tissue


def seam_energy_ratio(
    rgb: Pixels,
    borders_y: Sequence[int] | npt.NDArray[np.integer[Any]],
    borders_x: Sequence[int] | npt.NDArray[np.integer[Any]],
    mask: Mask | None = None,
) -> float:
    """Gradient energy across tile borders over gradient energy elsewhere.

    ``borders_x`` are the columns where a tile's kept region begins (the step between
    column ``b - 1`` and ``b`` crosses a border), ``borders_y`` the rows. Squared grey
    differences across borders are averaged and divided by the average over every other
    pixel step, both inside ``mask`` (computed tissue). About 1 when tiles meet without
    a seam; well above 1 when each tile's output has its own offset.
    """
    grey = to_grey(rgb) if rgb.ndim == 3 else rgb.astype(np.float64)
    valid = np.ones(grey.shape, bool) if mask is None else mask.astype(bool)
    gx = np.diff(grey, axis=1) ** 2  # step from column x to x + 1
    gy = np.diff(grey, axis=0) ** 2
    vx = valid[:, 1:] & valid[:, :-1]
    vy = valid[1:] & valid[:-1]
    on_x = np.zeros(gx.shape[1], bool)
    on_x[[b - 1 for b in borders_x if 0 < b < grey.shape[1]]] = True
    on_y = np.zeros(gy.shape[0], bool)
    on_y[[b - 1 for b in borders_y if 0 < b < grey.shape[0]]] = True
    border = np.concatenate([gx[vx & on_x[None, :]], gy[vy & on_y[:, None]]])
    inner = np.concatenate([gx[vx & ~on_x[None, :]], gy[vy & ~on_y[:, None]]])
    if border.size == 0 or inner.size == 0:
        raise ValueError("no border or no interior steps inside the mask")
    return float(border.mean() / max(inner.mean(), 1e-12))
