"""The tiling plan: counts, coverage and placement, worked out by hand.

Notation: W x H is the slide on the target grid, t the tile, o the overlap, c the crop
per side, k = t - 2c the kept size and s = t - o the stride. Along one axis the plan
needs n = 1 tile when W <= k, else n = ceil((W - k) / s) + 1, the fewest tiles whose
kept regions, placed every s pixels from 0, reach W.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.data import BuiltSlide
from wsi.errors import InvalidParameter
from wsi.reader import Slide
from wsi.tiling import TileGeometry, TilePlan, grid_count, plan_tiles, tissue_fractions
from wsi.tissue import TissueMask, TissueParams, tissue_mask


def full_plan(width: int, height: int, geometry: TileGeometry, **kw: float) -> TilePlan:
    return plan_tiles(
        width=width,
        height=height,
        target_mpp=kw.get("target_mpp", 1.0),
        slide_mpp=kw.get("slide_mpp", 1.0),
        geometry=geometry,
        mask=None,
    )


@pytest.mark.parametrize(
    ("width", "height", "tile", "overlap", "cols", "rows"),
    [
        (1000, 700, 256, 0, 4, 3),  # ceil(744/256)+1 = 4, ceil(444/256)+1 = 3
        (1000, 700, 256, 64, 5, 4),  # s=192: ceil(744/192)+1 = 5, ceil(444/192)+1 = 4
        (1024, 768, 256, 0, 4, 3),  # exact fit: no extra tile
        (1025, 769, 256, 0, 5, 4),  # one pixel more: one more tile each way
        (256, 256, 256, 128, 1, 1),
        (100, 50, 256, 0, 1, 1),  # smaller than one tile
        (2000, 300, 512, 256, 7, 1),  # s=256: ceil(1488/256)+1 = 7
    ],
)
def test_tile_counts(
    width: int, height: int, tile: int, overlap: int, cols: int, rows: int
) -> None:
    plan = full_plan(width, height, TileGeometry(tile_px=tile, overlap_px=overlap))
    assert (plan.n_cols, plan.n_rows) == (cols, rows)
    assert len(plan.tiles) == cols * rows
    assert [t.index for t in plan.tiles] == list(range(cols * rows))
    assert [(t.row, t.col) for t in plan.tiles] == [
        (r, c) for r in range(rows) for c in range(cols)
    ]
    assert all(t.tissue_fraction == 1.0 for t in plan.tiles)


def test_grid_count_formula() -> None:
    assert grid_count(1, 200, 100) == 1
    assert grid_count(200, 200, 100) == 1
    assert grid_count(201, 200, 100) == 2
    assert grid_count(300, 200, 100) == 2
    assert grid_count(301, 200, 100) == 3


def covered(plan: TilePlan) -> np.ndarray:
    """How many kept regions cover each target pixel (clipped to the slide)."""
    g = plan.geometry
    count = np.zeros((plan.height, plan.width), np.int32)
    for t in plan.tiles:
        ky, kx = t.y + g.output_crop_px, t.x + g.output_crop_px
        count[max(ky, 0) : ky + g.kept_px, max(kx, 0) : kx + g.kept_px] += 1
    return count


@pytest.mark.parametrize(
    "geometry",
    [
        TileGeometry(tile_px=256),
        TileGeometry(tile_px=256, overlap_px=64),
        TileGeometry(tile_px=256, overlap_px=64, output_crop_px=32),  # kept 192 = stride
        TileGeometry(
            tile_px=2048, overlap_px=1536, output_crop_px=512
        ),  # CycleGAN: 1024 kept, s 512
    ],
)
def test_kept_regions_cover_every_pixel(geometry: TileGeometry) -> None:
    plan = full_plan(3001, 2222, geometry)
    count = covered(plan)
    assert count.min() >= 1, "a slide pixel has no tile output"
    g = geometry
    # the last tile is needed: without it the far edge would be uncovered
    assert (
        (plan.n_cols - 1) * g.stride_px + g.kept_px
        >= 3001
        > (plan.n_cols - 2) * g.stride_px + g.kept_px
    )
    assert (
        (plan.n_rows - 1) * g.stride_px + g.kept_px
        >= 2222
        > (plan.n_rows - 2) * g.stride_px + g.kept_px
    )
    # the last column/row is shifted back to end exactly at the slide's edge
    last = plan.tiles[-1]
    assert last.x + g.output_crop_px + g.kept_px == 3001
    assert last.y + g.output_crop_px + g.kept_px == 2222
    if g.overlap_px == 2 * g.output_crop_px:
        # kept regions abut, except where the shifted last column/row overlaps its
        # neighbour: every pixel once, and no more than twice per axis
        assert count[: plan.tiles[-1].y + g.output_crop_px, : last.x + g.output_crop_px].max() == 1
        assert count.max() <= 4


def test_crop_places_tiles_before_their_kept_region() -> None:
    """With a 32 px crop each input tile starts 32 px before its kept region (so the
    first row/column of tiles starts at -32 and is padded by the reader)."""
    g = TileGeometry(tile_px=256, overlap_px=64, output_crop_px=32)
    plan = full_plan(1000, 500, g)
    first, second = plan.tiles[0], plan.tiles[1]
    assert (first.x, first.y) == (-32, -32)
    assert second.x - first.x == g.stride_px == 192
    assert g.kept_px == 192 and g.output_tile_px == 192
    # level-0 origin: target_mpp / slide_mpp = 1 here
    assert (first.x0, first.y0) == (-32, -32)


def test_output_stride_shrinks_the_output_grid() -> None:
    """A model emitting one pixel per 4 input pixels: 256-px tile, crop 32 -> 48 px out."""
    g = TileGeometry(tile_px=256, overlap_px=64, output_crop_px=32, output_stride=4)
    plan = full_plan(1001, 499, g, target_mpp=0.5)
    assert g.output_tile_px == 48
    assert plan.output_shape == (math.ceil(499 / 4), math.ceil(1001 / 4)) == (125, 251)
    assert plan.output_mpp == pytest.approx(2.0)
    out = np.zeros(plan.output_shape, np.int32)
    for t in plan.tiles:
        y, x, h, w = plan.output_box(t)
        assert (y * 4, x * 4) == (t.y + 32, t.x + 32)
        assert (h, w) == (48, 48)
        out[y : y + h, x : x + w] += 1
    # output boxes cover the canvas; only the last (shifted-back) column/row overlaps
    assert out.min() == 1 and out.max() <= 4
    last = plan.tiles[-1]
    assert (last.x + 32) % 4 == 0 and (last.y + 32) % 4 == 0  # on the output grid


def test_level0_origin_follows_the_mpp_ratio() -> None:
    """Target 2 µm/px on a 0.5 µm/px slide: every target pixel is 4 level-0 pixels."""
    plan = plan_tiles(
        width=700,
        height=300,
        target_mpp=2.0,
        slide_mpp=0.5,
        geometry=TileGeometry(tile_px=256, overlap_px=56),
        mask=None,
    )
    for t in plan.tiles:
        assert (t.x0, t.y0) == (4 * t.x, 4 * t.y)
    # s = 200: ceil((700 - 256) / 200) + 1 = 4 columns (400 + 256 = 656 < 700); the
    # last is shifted back from 600 to end at the edge: 700 - 256 = 444
    assert [t.x for t in plan.tiles[: plan.n_cols]] == [0, 200, 400, 444]


def mask_of(array: np.ndarray, mpp: float) -> TissueMask:
    return TissueMask(mask=array.astype(bool), mpp=mpp)


def test_tissue_fraction_selects_tiles() -> None:
    """Mask at 4 µm/px, target 1 µm/px: one mask pixel is 4 x 4 target pixels.

    The slide is 400 x 400 target px (100 x 100 mask px); 100-px tiles -> a 4 x 4 grid,
    each tile 25 x 25 mask px. Tissue: mask columns 0-61, i.e. tile columns 0 and 1
    fully, column 2 for 12 of its 25 mask columns (fraction 0.48), column 3 not at all.
    """
    m = np.zeros((100, 100), bool)
    m[:, :62] = True
    mask = mask_of(m, 4.0)
    g = TileGeometry(tile_px=100)
    common = {
        "width": 400,
        "height": 400,
        "target_mpp": 1.0,
        "slide_mpp": 0.25,
        "geometry": g,
        "mask": mask,
    }
    plan = plan_tiles(**common, min_tissue_fraction=0.5)
    assert {t.col for t in plan.tiles} == {0, 1} and len(plan.tiles) == 8
    plan = plan_tiles(**common, min_tissue_fraction=0.4)
    assert len(plan.tiles) == 12
    assert [t.tissue_fraction for t in plan.tiles if t.col == 2] == [pytest.approx(12 / 25)] * 4
    assert [t.index for t in plan.tiles] == list(range(12))  # re-indexed, row-major
    plan = plan_tiles(**common, min_tissue_fraction=0.0)
    assert len(plan.tiles) == 12, "a tile with no tissue at all is never kept"
    assert plan.n_cols == plan.n_rows == 4


def test_cover_all_tissue_keeps_only_what_no_other_tile_holds() -> None:
    """The grid of ``test_tissue_fraction_selects_tiles`` (4 x 4 tiles of 25 x 25 mask px).
    With ``cover_all_tissue``, column 2 (48% tissue, below 0.5) and a lone 16 µm² speck
    in tile (3, 3) are kept too: no other tile holds that tissue."""
    m = np.zeros((100, 100), bool)
    m[:, :62] = True
    m[90, 90] = True
    common = {"width": 400, "height": 400, "target_mpp": 1.0, "slide_mpp": 0.25,
              "geometry": TileGeometry(tile_px=100), "mask": mask_of(m, 4.0),
              "min_tissue_fraction": 0.5}
    plan = plan_tiles(**common)
    assert len(plan.tiles) == 8
    plan = plan_tiles(**common, cover_all_tissue=True)
    assert len(plan.tiles) == 13
    assert {(t.row, t.col) for t in plan.tiles if t.col >= 2} == {
        (0, 2), (1, 2), (2, 2), (3, 2), (3, 3)}
    assert [t.index for t in plan.tiles] == list(range(13))


def test_cover_all_tissue_skips_tissue_a_neighbour_holds() -> None:
    """Overlapping tiles (100 px, overlap 20): tissue in mask columns 0-21 (target
    0-88) lies wholly in column 0's tile; column 1's tile (from 80) holds 8% of it,
    below 0.2, and none that column 0 does not: it stays out. Add mask column 30
    (target 120-124, column 1's alone): column 1 comes in at 12%."""
    m = np.zeros((100, 100), bool)
    m[:, :22] = True
    plan = plan_tiles(width=400, height=400, target_mpp=1.0, slide_mpp=0.25,
                      geometry=TileGeometry(tile_px=100, overlap_px=20), mask=mask_of(m, 4.0),
                      min_tissue_fraction=0.2, cover_all_tissue=True)
    assert {t.col for t in plan.tiles} == {0}
    assert len(plan.tiles) == plan.n_rows
    m[:, 30] = True
    plan = plan_tiles(width=400, height=400, target_mpp=1.0, slide_mpp=0.25,
                      geometry=TileGeometry(tile_px=100, overlap_px=20), mask=mask_of(m, 4.0),
                      min_tissue_fraction=0.2, cover_all_tissue=True)
    assert {t.col for t in plan.tiles} == {0, 1}
    assert [t.tissue_fraction for t in plan.tiles if t.col == 1][0] == pytest.approx(0.12)


def test_plan_on_a_real_mask_matches_the_geometry(rect_svs: BuiltSlide) -> None:
    """Tiles of 256 px at 2 µm/px (512 µm) over rect_svs: each tile's tissue fraction
    from the mask is within one mask pixel row/column (4 µm of 512 µm per side, so
    4 x 4/512 = 3.1%; the bound checked is that of the old 8 µm/px, 6.25%) of the
    fraction computed from the rectangles themselves."""
    with Slide(rect_svs.path) as slide:
        mask = tissue_mask(slide, TissueParams(min_fragment_um2=0))
        width, height = slide.scaled_dimensions(2.0)
    assert (width, height) == (2000, 1500)
    g = TileGeometry(tile_px=256)
    plan = plan_tiles(
        width=width,
        height=height,
        target_mpp=2.0,
        slide_mpp=0.5,
        geometry=g,
        mask=mask,
        min_tissue_fraction=0.0,
    )
    kept = {(t.row, t.col): t.tissue_fraction for t in plan.tiles}
    truth = np.zeros((height, width), bool)  # rectangles on the 2 µm grid (all aligned)
    for r in (*rect_svs.rects, *rect_svs.hole_rects):  # the hole is filled by the mask
        truth[r.y // 4 : (r.y + r.height) // 4, r.x // 4 : (r.x + r.width) // 4] = True
    for row in range(plan.n_rows):
        for col in range(plan.n_cols):
            y, x = row * 256, col * 256
            frac = truth[y : y + 256, x : x + 256].mean()
            if frac > 0.07:
                assert (row, col) in kept, (row, col, frac)
            if (row, col) in kept:
                assert kept[row, col] == pytest.approx(frac, abs=0.0625), (row, col)
            elif frac > 0:
                assert frac < 0.0625


@pytest.mark.parametrize(
    ("geometry", "match"),
    [
        (TileGeometry(tile_px=8), "tile_px"),
        (TileGeometry(tile_px=9000), "tile_px"),
        (TileGeometry(tile_px=256, overlap_px=256), "overlap_px"),
        (TileGeometry(tile_px=256, overlap_px=-1), "overlap_px"),
        (TileGeometry(tile_px=256, overlap_px=200, output_crop_px=128), "leaves nothing"),
        (TileGeometry(tile_px=256, overlap_px=32, output_crop_px=32), "at least 2"),
        (TileGeometry(tile_px=256, output_stride=3), "output_stride"),
        (TileGeometry(tile_px=256, overlap_px=60, output_stride=8), "output_stride"),
        (TileGeometry(tile_px=256, output_stride=0), "output_stride"),
    ],
)
def test_bad_geometry(geometry: TileGeometry, match: str) -> None:
    with pytest.raises(InvalidParameter, match=match):
        geometry.validate()
    with pytest.raises(InvalidParameter, match=match):
        full_plan(1000, 1000, geometry)


def test_bad_plan_arguments() -> None:
    g = TileGeometry(tile_px=256)
    with pytest.raises(InvalidParameter, match="slide size"):
        full_plan(0, 100, g)
    mask = mask_of(np.ones((10, 10)), 8.0)
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidParameter, match="min_tissue_fraction"):
            plan_tiles(
                width=100,
                height=100,
                target_mpp=1.0,
                slide_mpp=1.0,
                geometry=g,
                mask=mask,
                min_tissue_fraction=bad,
            )


def test_tissue_fractions_match_a_direct_count() -> None:
    """Banded counting agrees with summing each box's mask pixels, for boxes of several
    sizes, partly outside the slide, on a mask coarser than the target grid."""
    rng = np.random.default_rng(3)
    mask = TissueMask(mask=rng.random((57, 83)) < 0.4, mpp=4.0)  # 83x57 px at 4 µm/px
    width, height = 83 * 8, 57 * 8  # the target grid at 0.5 µm/px
    boxes = np.stack([rng.integers(-40, width, 300), rng.integers(-40, height, 300),
                      rng.integers(8, 120, 300), rng.integers(8, 120, 300)], axis=1)
    got = tissue_fractions(mask, boxes, 0.5, width, height)
    for (x, y, w, h), fraction in zip(boxes, got):
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, width), min(y + h, height)
        if x1 <= x0 or y1 <= y0:
            continue
        mx0, my0 = min(x0 // 8, 82), min(y0 // 8, 56)
        mx1, my1 = max(math.ceil(x1 / 8), mx0 + 1), max(math.ceil(y1 / 8), my0 + 1)
        assert fraction == pytest.approx(mask.mask[my0:my1, mx0:mx1].mean())
