"""The tiling plan: which tiles to read, where, and where their outputs go.

All positions are integer pixels of the *target* grid (the slide resampled to the
model's ``target_mpp``); each tile also carries its level-0 origin for provenance and
for readers that need it. A model may drop ``output_crop_px`` input pixels on every
side (a valid-padding U-Net, a kept centre) and emit one output pixel per
``output_stride`` input pixels; the plan places tiles so that the *kept* regions tile
the slide edge to edge. The last tile of a row or column is shifted back so that it ends
at the slide's edge (as MONAI's sliding window does) instead of running off it: a model
then sees real tissue, not padding, at the slide border. Only a slide smaller than one
tile (and a cropping model's margin beyond the border) is padded, with white, by the
reader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from wsi.errors import InvalidParameter
from wsi.tissue import TissueMask

MAX_TILE_PX = 8192


@dataclass(frozen=True)
class TileGeometry:
    """Tile size and overlap at the target mpp, and how the model maps input to output."""

    tile_px: int
    overlap_px: int = 0
    output_crop_px: int = 0
    output_stride: int = 1

    @property
    def stride_px(self) -> int:
        return self.tile_px - self.overlap_px

    @property
    def kept_px(self) -> int:
        """Input pixels per side whose output the model returns."""
        return self.tile_px - 2 * self.output_crop_px

    @property
    def output_tile_px(self) -> int:
        return self.kept_px // self.output_stride

    def validate(self) -> None:
        t, o, c, s = self.tile_px, self.overlap_px, self.output_crop_px, self.output_stride
        if not 16 <= t <= MAX_TILE_PX:
            raise InvalidParameter(f"tile_px must be in [16, {MAX_TILE_PX}], got {t}")
        if not 0 <= o < t:
            raise InvalidParameter(f"overlap_px must be in [0, tile_px={t}), got {o}")
        if c < 0 or self.kept_px < 1:
            raise InvalidParameter(f"output_crop_px={c} leaves nothing of a {t}px tile")
        if o < 2 * c:
            raise InvalidParameter(
                f"overlap_px={o} must be at least 2 * output_crop_px={2 * c}, "
                "or the kept centres would leave gaps"
            )
        if s < 1 or self.kept_px % s or self.stride_px % s:
            raise InvalidParameter(
                f"output_stride={s} must divide both the kept size {self.kept_px} "
                f"and the tile stride {self.stride_px}"
            )


@dataclass(frozen=True, slots=True)
class Tile:
    """One tile: its input origin on the target grid, grid position and tissue share.
    (Slotted: a 100k px slide plans tens of thousands of them.)"""

    index: int
    row: int
    col: int
    x: int
    y: int
    x0: int
    y0: int
    tissue_fraction: float


@dataclass(frozen=True)
class TilePlan:
    """Every tile kept for inference, in row-major order, and the output canvas."""

    target_mpp: float
    width: int
    height: int
    geometry: TileGeometry
    n_rows: int
    n_cols: int
    tiles: list[Tile] = field(repr=False)

    @property
    def output_shape(self) -> tuple[int, int]:
        """(height, width) of the output canvas in output pixels."""
        s = self.geometry.output_stride
        return math.ceil(self.height / s), math.ceil(self.width / s)

    @property
    def output_mpp(self) -> float:
        return self.target_mpp * self.geometry.output_stride

    def output_box(self, tile: Tile) -> tuple[int, int, int, int]:
        """(y, x, height, width) of the tile's output on the output canvas (unclipped)."""
        g = self.geometry
        s = g.output_stride
        return (
            (tile.y + g.output_crop_px) // s,
            (tile.x + g.output_crop_px) // s,
            g.output_tile_px,
            g.output_tile_px,
        )


def grid_count(length_px: int, kept_px: int, stride_px: int) -> int:
    """How many tiles along one axis so that the kept regions cover ``length_px``."""
    if length_px <= kept_px:
        return 1
    return math.ceil((length_px - kept_px) / stride_px) + 1


def axis_starts(length_px: int, count: int, g: TileGeometry) -> npt.NDArray[np.int64]:
    """Kept-region starts along one axis: a regular stride, the last one shifted back to
    end at the edge (rounded up to the output stride, so outputs stay on their grid)."""
    starts = np.arange(count, dtype=np.int64) * g.stride_px
    if count > 1:
        s = g.output_stride
        starts[-1] = min(starts[-1], -(-(length_px - g.kept_px) // s) * s)
    return starts


def tissue_fractions(
    mask: TissueMask, boxes: npt.NDArray[np.int64], target_mpp: float, width: int, height: int
) -> npt.NDArray[np.float64]:
    """Tissue share of each (x, y, w, h) target-grid box, clipped to the slide.

    Boxes are grouped by their band of mask rows (a grid row of tiles shares one), and
    each band is summed to one row of column counts: memory stays one mask row of
    integers, where a whole-mask integral image would take 8 bytes per mask pixel
    (240 MB of temporaries for a 100k-pixel slide at 8 µm/px).
    """
    scale = target_mpp / mask.mpp  # mask pixels per target pixel
    mh, mw = mask.mask.shape
    x_lo = np.clip(boxes[:, 0], 0, width)
    y_lo = np.clip(boxes[:, 1], 0, height)
    x_hi = np.clip(boxes[:, 0] + boxes[:, 2], 0, width)
    y_hi = np.clip(boxes[:, 1] + boxes[:, 3], 0, height)
    mx0 = np.clip(np.floor(x_lo * scale).astype(np.int64), 0, mw - 1)
    my0 = np.clip(np.floor(y_lo * scale).astype(np.int64), 0, mh - 1)
    mx1 = np.clip(np.ceil(x_hi * scale).astype(np.int64), mx0 + 1, mw)
    my1 = np.clip(np.ceil(y_hi * scale).astype(np.int64), my0 + 1, mh)
    inside = np.zeros(len(boxes), dtype=np.int64)
    bands, band_of = np.unique(np.stack([my0, my1], axis=1), axis=0, return_inverse=True)
    band_of = band_of.reshape(-1)
    order = np.argsort(band_of, kind="stable")
    starts = np.searchsorted(band_of[order], np.arange(len(bands) + 1))
    for k, (y0, y1) in enumerate(bands):
        members = order[starts[k] : starts[k + 1]]
        counts = np.zeros(mw + 1, dtype=np.int64)
        np.cumsum(np.count_nonzero(mask.mask[y0:y1], axis=0), out=counts[1:])
        inside[members] = counts[mx1[members]] - counts[mx0[members]]
    fractions: npt.NDArray[np.float64] = inside / ((mx1 - mx0) * (my1 - my0))
    return fractions


def uncovered_tissue_tiles(
    mask: TissueMask, boxes: npt.NDArray[np.int64], kept: npt.NDArray[np.bool_],
    candidates: npt.NDArray[np.bool_], target_mpp: float,
) -> npt.NDArray[np.bool_]:
    """Which ``candidates`` to keep as well so that every tissue pixel of the mask lies in
    a kept box: each, in order, when it holds tissue that no kept box covers yet.

    Boxes are (x, y, w, h) on the target grid. A mask pixel counts as covered when a kept
    box touches it (a box edge inside a mask pixel covers it): at 4 µm/px a sliver under
    4 µm wide may go uncovered where tiles do not overlap. Memory: one byte per mask pixel.
    """
    scale = target_mpp / mask.mpp
    mh, mw = mask.mask.shape
    mx0 = np.clip(np.floor(boxes[:, 0] * scale).astype(np.int64), 0, mw)
    my0 = np.clip(np.floor(boxes[:, 1] * scale).astype(np.int64), 0, mh)
    mx1 = np.clip(np.ceil((boxes[:, 0] + boxes[:, 2]) * scale).astype(np.int64), 0, mw)
    my1 = np.clip(np.ceil((boxes[:, 1] + boxes[:, 3]) * scale).astype(np.int64), 0, mh)
    uncovered = mask.mask.copy()
    for i in np.flatnonzero(kept):
        uncovered[my0[i] : my1[i], mx0[i] : mx1[i]] = False
    added = np.zeros(len(boxes), dtype=bool)
    todo = np.flatnonzero(candidates & ~kept)
    # most uncovered tissue first: fewer tiles than row order for the same cover
    first = [np.count_nonzero(uncovered[my0[i] : my1[i], mx0[i] : mx1[i]]) for i in todo]
    for i in todo[np.argsort(first, kind="stable")[::-1]]:
        window = uncovered[my0[i] : my1[i], mx0[i] : mx1[i]]
        if window.any():
            added[i] = True
            window[:] = False
    return added


def plan_tiles(
    *,
    width: int,
    height: int,
    target_mpp: float,
    slide_mpp: float,
    geometry: TileGeometry,
    mask: TissueMask | None,
    min_tissue_fraction: float = 0.1,
    strip_px: int | None = None,
    cover_all_tissue: bool = False,
) -> TilePlan:
    """Lay a grid over a ``width`` x ``height`` target-grid slide and keep tissue tiles.

    With ``mask=None`` every tile is kept (tissue fraction reported as 1). Tiles come in
    row-major order, or, with ``strip_px``, in vertical strips about that wide, each
    strip top to bottom: what a streaming merger needs to keep open then depends on
    the strip's width, not the slide's. With ``cover_all_tissue`` a tile below
    ``min_tissue_fraction`` is kept too when it holds tissue that no other kept tile
    covers (a small fragment, the edge of a piece): every tissue pixel is analysed,
    and the threshold only skips tiles whose tissue their neighbours already hold.
    """
    geometry.validate()
    if width < 1 or height < 1:
        raise InvalidParameter(f"slide size must be positive, got {width}x{height}")
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise InvalidParameter(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction}")
    g = geometry
    n_cols = grid_count(width, g.kept_px, g.stride_px)
    n_rows = grid_count(height, g.kept_px, g.stride_px)
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    if strip_px is not None:
        if strip_px < g.stride_px:
            raise InvalidParameter(f"strip_px must be at least the stride {g.stride_px}, got {strip_px}")
        strip_cols = max(1, strip_px // g.stride_px)
        order = np.lexsort((cols, rows, cols // strip_cols))
        rows, cols = rows[order], cols[order]
    kept_x = axis_starts(width, n_cols, g)[cols]
    kept_y = axis_starts(height, n_rows, g)[rows]
    if mask is None:
        fractions = np.ones(len(rows))
        keep = np.ones(len(rows), dtype=bool)
    else:
        boxes = np.stack([kept_x, kept_y, np.full_like(kept_x, g.kept_px),
                          np.full_like(kept_x, g.kept_px)], axis=1)
        fractions = tissue_fractions(mask, boxes, target_mpp, width, height)
        keep = (fractions >= min_tissue_fraction) & (fractions > 0)
        if cover_all_tissue:
            keep |= uncovered_tissue_tiles(mask, boxes, keep, fractions > 0, target_mpp)
    level0_per_target = target_mpp / slide_mpp
    tiles: list[Tile] = []
    for r, c, kx, ky, frac in zip(rows[keep], cols[keep], kept_x[keep], kept_y[keep],
                                  fractions[keep]):
        x, y = int(kx) - g.output_crop_px, int(ky) - g.output_crop_px
        tiles.append(
            Tile(
                index=len(tiles),
                row=int(r),
                col=int(c),
                x=x,
                y=y,
                x0=round(x * level0_per_target),
                y0=round(y * level0_per_target),
                tissue_fraction=float(frac),
            )
        )
    return TilePlan(
        target_mpp=target_mpp,
        width=width,
        height=height,
        geometry=g,
        n_rows=n_rows,
        n_cols=n_cols,
        tiles=tiles,
    )
