"""Training patches for the stain CycleGAN, from slides or folders of tiles.

A *domain* (one centre's stain) is given as any mix of slide files and folders of tile
images. From a slide, *regions* of ``region_scale`` x ``patch_px`` are cut at
``target_mpp`` on a non-overlapping grid and kept where the tissue mask covers at least
``min_tissue_fraction`` of them (de Bel et al. sample inside the tissue mask); from a
tile image, non-overlapping regions with enough stained pixels are kept. Regions are
split into training and validation sets (a seeded shuffle of whole regions, so no pixel
is in both) and capped at ``max_patches`` per domain. Training patches are cropped from
the training regions at random offsets, so a small slide still gives varied patches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.cyclegan_training import PatchSampler
from models.stain_metrics import tissue_pixels
from wsi.errors import InvalidParameter
from wsi.images import image_files, read_rgb_image
from wsi.reader import Slide
from wsi.tiling import TileGeometry, plan_tiles
from wsi.tissue import TissueParams, tissue_mask

log = logging.getLogger(__name__)

@dataclass
class PatchSet:
    """One domain's regions: (n, r, r, 3) uint8 training and validation arrays, from
    which ``patch_px`` patches are cropped (r >= ``patch_px``)."""

    name: str
    train: np.ndarray
    val: np.ndarray
    sources: list[str] = field(default_factory=list)
    patch_px: int = 0  # 0: the regions' own size

    def sampler(self) -> PatchSampler:
        regions = self.train
        size = regions.shape[1]
        p = self.patch_px or size

        def sample(rng: np.random.Generator, n: int) -> np.ndarray:
            picks = rng.integers(0, len(regions), size=n)
            ys, xs = rng.integers(0, size - p + 1, size=(2, n))
            return np.stack([regions[i, y : y + p, x : x + p] for i, y, x in zip(picks, ys, xs)])

        return sample

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "train_regions": len(self.train),
                "val_regions": len(self.val), "region_px": int(self.train.shape[1]),
                "patch_px": self.patch_px or int(self.train.shape[1]), "sources": self.sources}


@dataclass
class Regions:
    """Regions cut from one source, with their (y, x) origins in its pixels."""

    pixels: np.ndarray  # (n, r, r, 3) uint8
    origins: np.ndarray  # (n, 2) int


def _empty(region_px: int) -> Regions:
    return Regions(np.empty((0, region_px, region_px, 3), np.uint8), np.empty((0, 2), np.int64))


def slide_regions(
    path: Path, *, region_px: int, stride_px: int, target_mpp: float,
    min_tissue_fraction: float = 0.75, slide_mpp: float | None = None,
    tissue_method: str = "hsv-otsu",
) -> Regions:
    """Every tissue region of a slide on a grid of ``stride_px`` at ``target_mpp``."""
    with Slide(path, slide_mpp=slide_mpp) as slide:
        mpp = slide.grid_mpp(target_mpp)
        mask = tissue_mask(slide, TissueParams(method=tissue_method))
        width, height = slide.scaled_dimensions(mpp)
        plan = plan_tiles(width=width, height=height, target_mpp=mpp, slide_mpp=slide.mpp,
                          geometry=TileGeometry(tile_px=region_px, overlap_px=region_px - stride_px),
                          mask=mask, min_tissue_fraction=min_tissue_fraction)
        # whole regions only: the grid's last row/column may run off the slide
        tiles = [t for t in plan.tiles if t.x + region_px <= width and t.y + region_px <= height]
        if not tiles:
            return _empty(region_px)
        return Regions(np.stack([slide.read_scaled(mpp, t.x, t.y, region_px, region_px)
                                 for t in tiles]),
                       np.array([(t.y, t.x) for t in tiles], dtype=np.int64))


def image_regions(image: np.ndarray, *, region_px: int, stride_px: int,
                  min_tissue_fraction: float = 0.5) -> Regions:
    """Regions of an RGB image on a grid of ``stride_px`` with enough stained pixels."""
    h, w = image.shape[:2]
    stained = tissue_pixels(image)
    origins = [(y, x) for y in range(0, h - region_px + 1, stride_px)
               for x in range(0, w - region_px + 1, stride_px)
               if stained[y : y + region_px, x : x + region_px].mean() >= min_tissue_fraction]
    if not origins:
        return _empty(region_px)
    return Regions(np.stack([image[y : y + region_px, x : x + region_px] for y, x in origins]),
                   np.array(origins, dtype=np.int64))


def split_regions(parts: Sequence[Regions], region_px: int, val_fraction: float,
                  max_regions: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Validation: whole regions of the non-overlapping sub-grid, chosen at random among
    the more stained half (the metrics look at tissue); training: every region that
    overlaps none of them (so no pixel is in both)."""
    source = np.concatenate([np.full(len(p.pixels), i) for i, p in enumerate(parts)])
    origins = np.concatenate([p.origins for p in parts])
    pixels = np.concatenate([p.pixels for p in parts])
    on_grid = np.flatnonzero(np.all(origins % region_px == 0, axis=1))
    if len(on_grid) > 3:
        stained = np.array([tissue_pixels(pixels[i]).mean() for i in on_grid])
        on_grid = on_grid[stained >= np.median(stained)]
    n_val = 0
    if val_fraction > 0 and len(on_grid) > 1:
        n_val = min(len(on_grid) - 1, max(1, round(len(on_grid) * val_fraction)))
    val = rng.permutation(on_grid)[:n_val]
    train = np.ones(len(pixels), bool)
    for i in val:
        near = np.all(np.abs(origins - origins[i]) < region_px, axis=1) & (source == source[i])
        train &= ~near
    train_idx = rng.permutation(np.flatnonzero(train))[:max_regions]
    return pixels[train_idx], pixels[val[:max_regions]]


def collect_domain(
    name: str,
    paths: Sequence[Path],
    *,
    patch_px: int,
    target_mpp: float,
    region_scale: int = 2,
    max_patches: int = 1000,
    val_fraction: float = 0.1,
    min_tissue_fraction: float = 0.75,
    slide_mpp: float | None = None,
    tissue_method: str = "hsv-otsu",
    seed: int = 0,
) -> PatchSet:
    """The regions of one domain from slide files and/or folders of tile images.

    Regions of ``region_scale`` x ``patch_px`` lie on a grid of half their size; at most
    ``max_patches`` are kept for training.
    """
    region_px = patch_px * max(1, region_scale)
    stride_px = max(1, region_px // 2)
    if not paths:
        raise InvalidParameter(f"domain {name}: no slides or tile folders given")
    if not 0 <= val_fraction < 1:
        raise InvalidParameter(f"val_fraction must be in [0, 1), got {val_fraction}")
    parts: list[Regions] = []
    sources: list[str] = []
    for path in map(Path, paths):
        if not path.exists():
            raise InvalidParameter(f"domain {name}: {str(path)!r} does not exist")
        if path.is_dir():
            images = image_files(path)
            if not images:
                raise InvalidParameter(f"domain {name}: no tile images in {str(path)!r}")
            for image in images:
                parts.append(image_regions(read_rgb_image(image), region_px=region_px,
                                           stride_px=stride_px,
                                           min_tissue_fraction=min_tissue_fraction * 2 / 3))
            sources.append(f"{path} ({len(images)} tiles)")
        else:
            parts.append(slide_regions(path, region_px=region_px, stride_px=stride_px,
                                       target_mpp=target_mpp,
                                       min_tissue_fraction=min_tissue_fraction,
                                       slide_mpp=slide_mpp, tissue_method=tissue_method))
            sources.append(str(path))
        log.info("domain %s: %d regions of %d px from %s", name, len(parts[-1].pixels),
                 region_px, path)
    n = sum(len(p.pixels) for p in parts)
    if n < 2:
        raise InvalidParameter(
            f"domain {name}: only {n} tissue regions of {region_px} px at {target_mpp} µm/px; "
            "give more tissue, a smaller patch size or a coarser mpp"
        )
    train, val = split_regions(parts, region_px, val_fraction, max_patches,
                               np.random.default_rng(seed))
    if len(train) == 0:
        raise InvalidParameter(f"domain {name}: no training regions left beside the validation ones")
    return PatchSet(name=name, train=train, val=val, sources=sources, patch_px=patch_px)
