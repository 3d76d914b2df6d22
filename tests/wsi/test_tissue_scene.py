"""Tissue recall on real tissue with strands, fragments and artefacts at known places.

The scene (``tests/tissue_scenes.py``) pastes real H&E of ``cmu_small_region.svs`` as a
main piece, five strands 15-50 µm wide and five fragments of 300-2000 µm², and paints
blue, green and black marker strokes, dust specks, a bubble's rim and the slide's edge
on the glass. Tiles are planned as the engine plans them (the identity model's 256 px
at 0.5 µm/px, overlap 32, every tissue pixel covered), and scored at level 0.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.tissue_scenes import TISSUE_KINDS, Scene, build_scene, reference_tissue, write_scene
from wsi.reader import Slide
from wsi.tiling import TileGeometry, TilePlan, plan_tiles
from wsi.tissue import TissueMask, TissueParams, tissue_mask

BEFORE = TissueParams(method="hsv-otsu", working_mpp=8.0, median_um=40.0, closing_um=60.0,
                      min_fragment_um2=20_000.0)
GEOMETRY = TileGeometry(tile_px=256, overlap_px=32)


@pytest.fixture(scope="module")
def scene(cmu_rgb: np.ndarray) -> Scene:
    return build_scene(cmu_rgb)


@pytest.fixture(scope="module")
def scene_svs(scene: Scene, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scene(scene, tmp_path_factory.mktemp("scene") / "scene.svs").path


def plan_and_cover(path: Path, params: TissueParams, cover: bool = True
                   ) -> tuple[TissueMask, TilePlan, np.ndarray]:
    """The mask, the plan, and the level-0 pixels inside a planned tile."""
    with Slide(path) as slide:
        mask = tissue_mask(slide, params)
        width, height = slide.scaled_dimensions(slide.mpp)
        plan = plan_tiles(width=width, height=height, target_mpp=slide.mpp,
                          slide_mpp=slide.mpp, geometry=GEOMETRY, mask=mask,
                          min_tissue_fraction=0.1, cover_all_tissue=cover)
    covered = np.zeros((height, width), bool)
    for t in plan.tiles:
        covered[t.y : t.y + GEOMETRY.tile_px, t.x : t.x + GEOMETRY.tile_px] = True
    return mask, plan, covered


def upsampled(mask: TissueMask, shape: tuple[int, int]) -> np.ndarray:
    return cv2.resize(mask.mask.view(np.uint8), (shape[1], shape[0]),
                      interpolation=cv2.INTER_NEAREST) > 0


def test_every_strand_and_fragment_is_analysed_and_no_artefact(
    scene: Scene, scene_svs: Path
) -> None:
    mask, plan, covered = plan_and_cover(scene_svs, TissueParams())
    tissue = scene.tissue
    assert (covered & tissue).sum() / tissue.sum() >= 0.99
    assert (upsampled(mask, tissue.shape) & tissue).sum() / tissue.sum() >= 0.99
    for i, obj in enumerate(scene.objects):
        share = (covered & scene.object_mask(i)).sum() / scene.object_mask(i).sum()
        if obj.kind in TISSUE_KINDS:
            assert share >= 0.99, (obj.name, share)
        else:  # pens, the bubble's rim and the slide's edge
            assert share == 0.0, (obj.name, share)
    dust = scene.labels == scene.dust_label
    assert not (covered & dust).any()
    assert mask.findings["pen_um2"] > 0.9e6  # the blue and green strokes: 0.95 mm²
    assert mask.findings["grey_um2"] > 1e5  # the black stroke, the edge, the dust


def test_the_old_default_missed_them(scene: Scene, scene_svs: Path) -> None:
    """The same scoring fails the parameters before the rework: small pieces unanalysed,
    ink tiled (what the recall test above guards against)."""
    _, plan, covered = plan_and_cover(scene_svs, BEFORE, cover=False)
    missed = [o.name for i, o in enumerate(scene.objects) if o.kind in ("strand", "fragment")
              and (covered & scene.object_mask(i)).sum() < 0.99 * scene.object_mask(i).sum()]
    assert len(missed) >= 8, missed
    inked = [o.name for i, o in enumerate(scene.objects)
             if o.kind == "pen" and (covered & scene.object_mask(i)).any()]
    assert inked == ["blue pen", "green pen"]


def test_pen_filter_saves_the_tiles_of_the_strokes(scene_svs: Path) -> None:
    """Without the pen filter blue and green ink look stained; with it, their tiles go."""
    _, with_filter, _ = plan_and_cover(scene_svs, TissueParams())
    _, without, _ = plan_and_cover(scene_svs, TissueParams(pen_filter=False))
    assert len(without.tiles) - len(with_filter.tiles) >= 40


def test_dust_is_told_apart_by_colour_not_size(scene: Scene, scene_svs: Path) -> None:
    """Dust specks up to 1 260 µm² are not tissue; a 300 µm² fragment of stain is."""
    mask, _, _ = plan_and_cover(scene_svs, TissueParams())
    up = upsampled(mask, scene.tissue.shape)
    dust = scene.labels == scene.dust_label
    assert not (up & dust).any()
    (small,) = [i for i, o in enumerate(scene.objects) if o.name == "fragment 300 µm²"]
    assert up[scene.object_mask(small)].mean() > 0.9


def test_cmu_slide_strand_and_fragments(cmu_svs: Path, cmu_rgb: np.ndarray) -> None:
    """The real slide against its full-resolution reference: the strand on the left
    (level 0 x 58-870, y 985-1145) and the two detached fragments are analysed."""
    reference = reference_tissue(cmu_rgb)
    mask, plan, covered = plan_and_cover(cmu_svs, TissueParams())
    assert (covered & reference).sum() / reference.sum() >= 0.99
    for x0, y0, x1, y1 in [(58, 985, 870, 1145), (0, 40, 60, 140), (2040, 570, 2140, 660)]:
        ref = reference[y0:y1, x0:x1]
        assert ref.sum() > 500 and covered[y0:y1, x0:x1][ref].all(), (x0, y0)
    assert mask.fragments >= 3
    _, before, before_covered = plan_and_cover(cmu_svs, BEFORE, cover=False)
    assert not before_covered[40:140, 0:60][reference[40:140, 0:60]].any()
    # the tile count grows with the tissue found: no more tiles per mm² of tissue
    assert len(plan.tiles) / mask.area_um2 <= 1.05 * len(before.tiles) / tissue_area(
        cmu_svs, BEFORE)


def tissue_area(path: Path, params: TissueParams) -> float:
    with Slide(path) as slide:
        return tissue_mask(slide, params).area_um2
