"""Macenko stain normalisation (Macenko et al., ISBI 2009), and stain re-composition.

Non-learned: the two stain vectors of an H&E image are the extreme directions (robust
1st/99th percentile angles) of its tissue pixels' optical densities projected onto the
plane of their two main principal axes; each pixel's concentrations are the
least-squares solution on those vectors. Normalising maps a source image's
concentrations, scaled so their 99th percentiles match, onto the reference's stain
vectors. The source's stains are fitted once (per slide, from tiles across its tissue)
and then applied pixel by pixel, so tiles of one slide share one transform and no seams
appear. numpy only; reading the reference tile or slide is the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: Background intensity (glass) and the optical-density floor below which a pixel is glass.
IO = 240.0
BETA = 0.15
ALPHA = 1.0  # percentile of the extreme angles

#: The H&E reference of Macenko's reference implementation (columns: H, E) and its
#: 99th-percentile concentrations: the built-in target when no reference is chosen.
DEFAULT_STAINS: npt.NDArray[np.float64] = np.array(
    [[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]
)
DEFAULT_MAX_CONC: npt.NDArray[np.float64] = np.array([1.9705, 1.0308])


class StainEstimationError(ValueError):
    """Too little tissue, or degenerate colours, to estimate two stain vectors."""


def optical_density(rgb: npt.NDArray[np.uint8], io: float = IO) -> npt.NDArray[np.float64]:
    return -np.log((rgb.astype(np.float64) + 1.0) / io)


def estimate_stains(
    rgb: npt.NDArray[np.uint8], *, beta: float = BETA, alpha: float = ALPHA, io: float = IO,
    max_pixels: int = 2_000_000, seed: int = 0,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(3, 2) unit stain vectors (H, E) and the 99th-percentile concentrations of an
    RGB uint8 image (any shape ending in 3)."""
    od = optical_density(rgb.reshape(-1, 3), io)
    od = od[np.all(od > beta, axis=1)]
    if len(od) > max_pixels:
        od = od[np.random.default_rng(seed).choice(len(od), max_pixels, replace=False)]
    if len(od) < 100:
        raise StainEstimationError(
            f"only {len(od)} tissue pixels (optical density > {beta} in every channel); "
            "choose a reference with more stained tissue"
        )
    _, eigvecs = np.linalg.eigh(np.cov(od.T))
    plane = eigvecs[:, 1:3]  # the two largest
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # haematoxylin absorbs more red than eosin does: it is the vector with larger R OD
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)
    stains = np.stack([h, e], axis=1)
    stains *= np.sign(stains.sum(axis=0, keepdims=True))  # optical densities are positive
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    if abs(np.dot(stains[:, 0], stains[:, 1])) > 0.999:
        raise StainEstimationError("the two stain vectors coincide; is this an H&E image?")
    conc = concentrations(od, stains)
    max_conc = np.percentile(conc, 99, axis=0)
    if np.any(max_conc <= 1e-6):
        raise StainEstimationError(f"a stain is absent (99th-percentile concentrations {max_conc})")
    return stains, max_conc


def concentrations(
    od: npt.NDArray[np.float64], stains: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """(n, 2) least-squares stain concentrations of (n, 3) optical densities."""
    return od @ np.linalg.pinv(stains).T


@dataclass(frozen=True)
class StainReference:
    """A target stain: unit vectors (3, 2; H, E) and 99th-percentile concentrations."""

    stains: npt.NDArray[np.float64]
    max_conc: npt.NDArray[np.float64]

    @classmethod
    def default(cls) -> StainReference:
        return cls(DEFAULT_STAINS / np.linalg.norm(DEFAULT_STAINS, axis=0), DEFAULT_MAX_CONC.copy())

    @classmethod
    def from_image(cls, rgb: npt.NDArray[np.uint8]) -> StainReference:
        return cls(*estimate_stains(rgb))

    def to_dict(self) -> dict[str, list[list[float]] | list[float]]:
        return {"stains_rgb_by_he": np.round(self.stains, 5).tolist(),
                "max_concentrations": np.round(self.max_conc, 5).tolist()}


class MacenkoNormalizer:
    """Maps one source's stains onto a reference's; call it on uint8 (..., 3) arrays."""

    def __init__(self, reference: StainReference | None = None, io: float = IO) -> None:
        self.reference = reference or StainReference.default()
        self.io = io
        self.source: StainReference | None = None

    def fit(self, source_rgb: npt.NDArray[np.uint8]) -> MacenkoNormalizer:
        """Estimate the source's stains (e.g. from tiles across one slide's tissue)."""
        self.source = StainReference(*estimate_stains(source_rgb, io=self.io))
        return self

    def __call__(self, rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        source = self.source
        if source is None:
            source = StainReference(*estimate_stains(rgb, io=self.io))
        shape = rgb.shape
        od = optical_density(rgb.reshape(-1, 3), self.io)
        conc = concentrations(od, source.stains)
        conc *= self.reference.max_conc / source.max_conc
        out = self.io * np.exp(-conc @ self.reference.stains.T) - 1.0
        return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(shape)


def restain(
    rgb: npt.NDArray[np.uint8],
    rgb_from_stains: npt.NDArray[np.float64],
    stains_from_rgb: npt.NDArray[np.float64],
) -> npt.NDArray[np.uint8]:
    """Re-compose an image with other stain vectors (colour deconvolution, Ruifrok &
    Johnston): concentrations = OD @ ``stains_from_rgb``; OD' = concentrations @
    ``rgb_from_stains``. OD is -log10(I / 255) with I clipped to [1, 255]."""
    od = -np.log10(np.clip(rgb.astype(np.float64), 1, 255) / 255.0)
    out = 255.0 * 10 ** (-(od @ stains_from_rgb) @ rgb_from_stains)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
