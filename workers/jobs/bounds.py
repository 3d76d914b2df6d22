"""Bounds on the work one job asks for, checked before anything is stored or queued.

A ``target_mpp`` of 256 µm/px on a 0.5 µm/px slide without a pyramid makes every tile a
read of 131,072 px a side (48 GiB); 0.001 µm/px plans 32.7 million tiles. Both are
refused here with the reason and the range this slide allows:

- ``target_mpp`` from level 0's mpp / 4 (upsampling beyond that invents nothing) to the
  coarsest level's mpp x 4, or further while one tile read from the coarsest level stays
  within :data:`MAX_TILE_READ_PX` a side (a 64 px tile at 4 µm/px from a 0.5 µm/px slide
  reads 512 px: cheap);
- the tiles the grid lays over the slide, before tissue selection, at most
  ``SLIDEPIPE_MAX_TILES_PER_JOB``;
- the tissue mask (made at ``tissue_working_mpp``, never finer than level 0) at most
  :data:`MAX_TISSUE_MASK_PIXELS`.
"""

from __future__ import annotations

import math

from models.card import ModelCard
from workers.engine.geometry import run_geometry
from workers.jobs.rows import SlideRow
from wsi.errors import InvalidParameter
from wsi.tiling import grid_count

#: How much finer than level 0 a job may run (upsampling).
MAX_UPSAMPLE = 4.0
#: How much coarser than the coarsest level a job may always run.
MAX_DOWNSAMPLE = 4.0
#: The largest side, in level pixels, one tile may read from the coarsest level.
MAX_TILE_READ_PX = 4096
MAX_TISSUE_MASK_PIXELS = 2.5e8
DEFAULT_MAX_TILES = 1_000_000


def mpp_range(slide_mpp: float, slide: SlideRow, tile_px: int) -> tuple[float, float]:
    """The ``target_mpp`` interval this slide serves for tiles of ``tile_px``."""
    downsamples = [float(d) for d in (slide.level_downsamples or [1.0])]
    coarsest = slide_mpp * max(downsamples)
    return slide_mpp / MAX_UPSAMPLE, coarsest * max(MAX_DOWNSAMPLE, MAX_TILE_READ_PX / tile_px)


def check_work(
    slide: SlideRow,
    card: ModelCard,
    *,
    target_mpp: float | None,
    slide_mpp: float | None,
    tile_px: int | None,
    overlap_px: int | None,
    tissue_working_mpp: float,
    max_tiles: int = DEFAULT_MAX_TILES,
) -> int:
    """Raise :class:`InvalidParameter` when the job asks for more than the slide can serve
    or the server allows; returns the number of tiles it plans (before tissue)."""
    mpp0 = slide_mpp if slide_mpp is not None else slide.mpp
    if mpp0 is None or not mpp0 > 0:
        return 0  # check_slides already refused a slide without mpp
    target = target_mpp if target_mpp is not None else card.target_mpp
    geometry = run_geometry(card, tile_px, overlap_px)
    name = f"slide {slide.id!r} ({slide.filename})"
    lo, hi = mpp_range(mpp0, slide, geometry.tile_px)
    if not lo <= target <= hi:
        raise InvalidParameter(
            f"target_mpp {target:g} µm/px is outside what {name} can serve with "
            f"{geometry.tile_px} px tiles: [{lo:.4g}, {hi:.4g}] µm/px (level 0 is "
            f"{mpp0:.4g} µm/px, {slide.level_count} level(s))"
        )
    width = max(1, math.ceil(slide.width * mpp0 / target))
    height = max(1, math.ceil(slide.height * mpp0 / target))
    tiles = grid_count(width, geometry.kept_px, geometry.stride_px) * grid_count(
        height, geometry.kept_px, geometry.stride_px
    )
    if tiles > max_tiles:
        raise InvalidParameter(
            f"{name} at target_mpp {target:g} µm/px with tile_px {geometry.tile_px} and "
            f"overlap_px {geometry.overlap_px} plans {tiles} tiles; at most {max_tiles} per "
            "job (SLIDEPIPE_MAX_TILES_PER_JOB): choose a coarser target_mpp or larger tiles"
        )
    factor = max(1.0, tissue_working_mpp / mpp0)
    mask_pixels = (slide.width / factor) * (slide.height / factor)
    if mask_pixels > MAX_TISSUE_MASK_PIXELS:
        raise InvalidParameter(
            f"tissue_working_mpp {tissue_working_mpp:g} µm/px makes a tissue mask of "
            f"{mask_pixels:.3g} pixels for {name}; at most {MAX_TISSUE_MASK_PIXELS:.3g}: "
            "choose a coarser tissue_working_mpp"
        )
    return tiles
