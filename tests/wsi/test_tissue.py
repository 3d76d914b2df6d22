"""Tissue masks on slides whose tissue is known exactly.

``rect_svs`` (0.5 µm/px) and ``rect_generic_tiff`` (0.25 µm/px) hold the same physical
layout (``RECT_LAYOUT_UM``): flat H&E-pink/purple rectangles on white glass whose edges
all lie on the 8 µm grid, so a perfect mask at the default 4 µm/px (and at 8 µm/px) is
exactly the rectangles. The 80 x 80 µm purple speck is stained tissue: since the
recall rework (``stain``, 200 µm² fragments) it is kept; dust is told apart by its
colour, not its size (``tests/wsi/test_tissue_scene.py``).

Tolerance. The mask pipeline changes a right-angled corner and nothing else: a k x k
median (k = 2r + 1) removes the pixels near a convex corner whose window holds less
than half tissue (``median_corner_px(r)``: 1 px for the default 12 µm = 3 px at
4 µm/px), a closing with a disc of radius R fills about R^2 (1 - pi/4) px of a concave
corner (1.9 px for the default 24 µm = 7 px), and JPEG can flip about one edge pixel.
So an object with ``n`` corners must be within ``n * (median + closing + 1)`` px of its
true area (A: 4 corners, 16 px = 250 µm² of 960 000 µm², 0.03%).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from tests.data import RECT_HOLE_UM, BuiltSlide
from wsi import tissue_stain
from wsi.errors import InvalidParameter, SlideMissingMpp
from wsi.reader import Slide
from wsi.tissue import (
    TissueMask,
    TissueParams,
    _view_geometry,
    clean_mask,
    threshold_tissue,
    tissue_mask,
)
from wsi.tissue_stain import GREY_CODE, LOW_FLOOR, PEN_BIT, pen_regions, stain_code, stain_mask
from wsi.tissue_view import stain_view

BACKENDS = ("openslide", "tiffslide")

# objects a mask should find, in µm: (x, y, w, h); the frame is counted with its hole
A = (400, 400, 1200, 800)
B = (2400, 1600, 800, 600)
FRAME = (400, 1600, 600, 600)
SPECK = (3200, 400, 80, 80)
HOLE_AREA_UM2 = RECT_HOLE_UM[2] * RECT_HOLE_UM[3]  # 152 x 152 = 23 104 µm²


def median_corner_px(r: int) -> int:
    """Pixels a (2r+1)^2 median removes at a convex right-angled corner."""
    k = 2 * r + 1
    majority = (k * k + 1) // 2
    return sum(1 for i in range(k) for j in range(k) if (r + 1 + i) * (r + 1 + j) < majority)


def corner_tolerance_um2(n_corners: int, mask: TissueMask, params: TissueParams) -> float:
    r_med = (max(1, round(params.median_um / mask.mpp)) | 1) // 2
    r_close = (max(1, round(params.closing_um / mask.mpp)) | 1) // 2
    per_corner = median_corner_px(r_med) + r_close**2 * (1 - math.pi / 4) + 1
    return n_corners * per_corner * mask.mpp**2


def components(mask: TissueMask) -> list[tuple[tuple[float, float, float, float], float]]:
    """(bounding box in µm, area in µm²) of every 8-connected object, largest first."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.mask.astype(np.uint8), connectivity=8)
    out = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        out.append(((x * mask.mpp, y * mask.mpp, w * mask.mpp, h * mask.mpp), area * mask.mpp**2))
    return sorted(out, key=lambda c: -c[1])


def assert_objects(
    mask: TissueMask,
    params: TissueParams,
    expected: list[tuple[tuple[int, int, int, int], float, int]],
) -> None:
    """Each expected (box µm, area µm², corners) is found once, in place, within tolerance."""
    found = components(mask)
    assert len(found) == len(expected), f"found {[(b, a) for b, a in found]}"
    for box, area, corners in expected:
        match = [f for f in found if np.allclose(f[0], box, atol=mask.mpp + 1e-6)]
        assert match, f"no object at {box} µm; found {[b for b, _ in found]}"
        tol = corner_tolerance_um2(corners, mask, params)
        assert match[0][1] == pytest.approx(area, abs=tol), (box, match[0][1], area, tol)


def area(box: tuple[int, int, int, int]) -> float:
    return float(box[2] * box[3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["rect_svs", "rect_generic_tiff"])
def test_mask_matches_the_rectangles(
    request: pytest.FixtureRequest, name: str, backend: str
) -> None:
    """Default (``stain`` at 4 µm/px): A, B, the frame (hole filled) and the 6 400 µm²
    speck of stain found. Same answer at 0.5 and 0.25 µm/px."""
    built: BuiltSlide = request.getfixturevalue(name)
    params = TissueParams()
    with Slide(built.path, backend=backend) as slide:
        mask = tissue_mask(slide, params)
    assert mask.mpp == pytest.approx(4.0)
    assert mask.mask.shape == (750, 1000) and mask.mask.dtype == bool
    assert_objects(mask, params, [(A, area(A), 4), (B, area(B), 4), (FRAME, area(FRAME), 4),
                                  (SPECK, area(SPECK), 4)])
    total = area(A) + area(B) + area(FRAME) + area(SPECK)
    assert mask.area_um2 == pytest.approx(total, abs=corner_tolerance_um2(16, mask, params))
    assert mask.fragments == 4 and mask.findings["pen_um2"] == 0.0


@pytest.mark.parametrize("method", ["grey-otsu", "hsv-otsu"])
def test_otsu_methods_find_the_same_tissue(rect_svs: BuiltSlide, method: str) -> None:
    params = TissueParams(method=method)
    with Slide(rect_svs.path) as slide:
        mask = tissue_mask(slide, params)
    assert_objects(mask, params, [(A, area(A), 4), (B, area(B), 4), (FRAME, area(FRAME), 4),
                                  (SPECK, area(SPECK), 4)])


def test_the_old_default_drops_the_speck(rect_svs: BuiltSlide) -> None:
    """The parameters before the recall rework (hsv-otsu, 8 µm/px, 20 000 µm² objects)
    still work as they did: the 6 400 µm² speck goes."""
    params = TissueParams(method="hsv-otsu", working_mpp=8.0, median_um=40.0,
                          closing_um=60.0, min_fragment_um2=20_000.0)
    with Slide(rect_svs.path) as slide:
        mask = tissue_mask(slide, params)
    assert mask.mask.shape == (375, 500)
    assert_objects(mask, params, [(A, area(A), 4), (B, area(B), 4), (FRAME, area(FRAME), 4)])


def test_working_resolution_changes_pixels_not_micrometres(rect_svs: BuiltSlide) -> None:
    """At 8 µm/px the mask has a quarter of the pixels and the same areas in µm²."""
    params = TissueParams(working_mpp=8.0)
    with Slide(rect_svs.path) as slide:
        mask = tissue_mask(slide, params)
    assert mask.mpp == pytest.approx(8.0)
    assert mask.mask.shape == (375, 500)
    assert_objects(mask, params, [(A, area(A), 4), (B, area(B), 4), (FRAME, area(FRAME), 4),
                                  (SPECK, area(SPECK), 4)])


@pytest.mark.parametrize(
    ("min_fragment_um2", "kept"),
    [
        (0.0, ["A", "B", "FRAME", "SPECK"]),
        (5_000.0, ["A", "B", "FRAME", "SPECK"]),  # speck 6 400 µm² (6 336 after the median)
        (7_000.0, ["A", "B", "FRAME"]),
        (400_000.0, ["A", "B"]),  # frame 360 000 µm² goes
        (500_000.0, ["A"]),  # B 480 000 µm² goes
    ],
)
def test_small_objects_removed_by_area_in_um2(
    rect_svs: BuiltSlide, min_fragment_um2: float, kept: list[str]
) -> None:
    boxes = {"A": (A, 4), "B": (B, 4), "FRAME": (FRAME, 4), "SPECK": (SPECK, 4)}
    params = TissueParams(min_fragment_um2=min_fragment_um2)
    with Slide(rect_svs.path) as slide:
        mask = tissue_mask(slide, params)
    assert_objects(mask, params, [(boxes[k][0], area(boxes[k][0]), boxes[k][1]) for k in kept])


@pytest.mark.parametrize(
    ("max_hole_um2", "filled"),
    [(50_000.0, True), (24_000.0, True), (20_000.0, False), (0.0, False)],
)
def test_holes_filled_up_to_max_hole(
    rect_svs: BuiltSlide, max_hole_um2: float, filled: bool
) -> None:
    """The frame encloses a 23 104 µm² hole: filled when it is at most ``max_hole_um2``.

    Unfilled, the frame has 8 corners (4 concave around the hole, which the closing
    rounds off a little).
    """
    params = TissueParams(max_hole_um2=max_hole_um2)
    with Slide(rect_svs.path) as slide:
        mask = tissue_mask(slide, params)
    hx, hy, hw, hh = (round(v / mask.mpp) for v in RECT_HOLE_UM)
    centre = mask.mask[hy + hh // 2 - 2 : hy + hh // 2 + 3, hx + hw // 2 - 2 : hx + hw // 2 + 3]
    assert bool(centre.all()) is filled
    frame_area = area(FRAME) if filled else area(FRAME) - HOLE_AREA_UM2
    assert_objects(
        mask, params, [(A, area(A), 4), (B, area(B), 4), (FRAME, frame_area, 4 if filled else 8),
                       (SPECK, area(SPECK), 4)]
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["stain", "hsv-otsu", "grey-otsu"])
def test_blank_slide_gives_an_empty_mask(blank_svs: BuiltSlide, backend: str, method: str) -> None:
    with Slide(blank_svs.path, backend=backend) as slide:
        mask = tissue_mask(slide, TissueParams(method=method))
    assert mask.mask.size > 0
    assert not mask.mask.any()
    assert mask.area_um2 == 0.0
    assert mask.fragments == 0 and mask.describe().startswith("0 mm² of tissue in 0 fragments")


def test_real_tissue_same_mask_from_both_backends(tissue_svs: BuiltSlide) -> None:
    masks = []
    for backend in BACKENDS:
        with Slide(tissue_svs.path, backend=backend) as slide:
            masks.append(tissue_mask(slide))
    np.testing.assert_array_equal(masks[0].mask, masks[1].mask)
    share = masks[0].mask.mean()
    assert 0.1 < share < 0.9, f"real H&E crop should be partly tissue, got {share:.2f}"


def test_mask_needs_mpp(no_mpp_tiff: BuiltSlide) -> None:
    with Slide(no_mpp_tiff.path) as slide, pytest.raises(SlideMissingMpp):
        tissue_mask(slide)
    with Slide(no_mpp_tiff.path, slide_mpp=0.5) as slide:
        mask = tissue_mask(slide)
    assert mask.mpp == pytest.approx(4.0, rel=0.01)


def test_threshold_and_clean_on_arrays() -> None:
    """The two stages on a hand-made image: exact where nothing is ambiguous."""
    rgb = np.full((100, 120, 3), 255, np.uint8)
    rgb[20:60, 30:90] = (226, 150, 190)  # 40 x 60 px of eosin pink
    rgb[80:82, 5:7] = (130, 80, 160)  # 2 x 2 px speck
    for method in ("hsv-otsu", "grey-otsu"):
        raw = threshold_tissue(rgb, method, min_threshold=12)
        assert raw.sum() == 40 * 60 + 4
    params = TissueParams(median_um=0, closing_um=0, min_fragment_um2=10 * 64.0)
    cleaned = clean_mask(threshold_tissue(rgb, "hsv-otsu", 12), 8.0, params)
    assert cleaned.sum() == 40 * 60  # the 4-px (256 µm²) speck is below 640 µm²
    with pytest.raises(InvalidParameter):
        threshold_tissue(rgb, "laplacian", 12)


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "magic"},
        {"working_mpp": 0.05},
        {"working_mpp": 300.0},
        {"median_um": -1.0},
        {"closing_um": math.nan},
        {"min_fragment_um2": math.inf},
        {"max_hole_um2": -5.0},
        {"pen_width_um": -1.0},
        {"min_fragment_um2": math.nan},
        {"min_threshold": -1},
        {"min_threshold": 256},
    ],
)
def test_bad_params_raise(rect_svs: BuiltSlide, bad: dict[str, object]) -> None:
    params = TissueParams(**bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameter):
        params.validate()
    with Slide(rect_svs.path) as slide, pytest.raises(InvalidParameter):
        tissue_mask(slide, params)


def test_stain_code_tells_stain_from_ink_and_dust() -> None:
    """One pixel of each: stain keeps its chroma; black ink and dust are grey; blue and
    green ink carry the pen bit; a dark blue-purple nucleus is stain, not ink."""
    colours = {
        "glass": ((243, 242, 244), 2),
        "eosin": ((226, 150, 190), 76),
        "haematoxylin": ((130, 80, 160), 80),
        "nucleus": ((45, 43, 81), 38),
        "black ink": ((38, 38, 44), GREY_CODE),
        "dust": ((90, 90, 94), GREY_CODE),
        "blue ink": ((55, 85, 175), PEN_BIT | 120),
        "green ink": ((45, 135, 95), PEN_BIT | 90),
    }
    rgb = np.array([[c for c, _ in colours.values()]], np.uint8)
    code = stain_code(rgb)[0]
    assert dict(zip(colours, code.tolist())) == {k: v for k, (_, v) in colours.items()}


def test_pen_regions_need_a_stroke_not_scattered_nuclei() -> None:
    """At 4 µm/px: a 40 µm wide band of pen hue is ink; the same number of pen-hued
    pixels scattered like nuclei is not."""
    pen = np.zeros((200, 200), np.uint8)
    pen[50:60, 20:180] = 255  # 10 px = 40 µm wide, 640 µm long
    regions = pen_regions(pen, 4.0, 30.0)
    assert regions is not None and regions[50:60, 20:180].all() and not regions[:40].any()
    scattered = np.zeros((200, 200), np.uint8)
    scattered[::3, ::3] = 255
    assert pen_regions(scattered, 4.0, 30.0) is None


def test_the_view_is_decoded_only_where_a_coarse_level_shows_something(
    rect_svs: BuiltSlide,
) -> None:
    """rect_svs (levels at 0.5, 2 and 8 µm/px): the 8 µm/px level is read first and the
    4 µm/px view decoded only in the blocks near colour. What is skipped is glass, and
    the mask is the one a whole read gives."""
    params = TissueParams()
    with Slide(rect_svs.path) as slide:
        level, width, height, mpp = _view_geometry(slide, params.working_mpp)
        whole = slide.read_level_resized(level, width, height, channel=stain_code)
        part, share = stain_view(slide, level, width, height, mpp)
        mask = tissue_mask(slide, params)
    assert 0.2 < share < 0.8 and mask.findings["decoded_share"] == share
    # nothing a threshold would keep is lost where blocks were skipped (here: white glass)
    assert int((whole[part == 0] & (PEN_BIT - 1)).max()) < LOW_FLOOR
    np.testing.assert_array_equal(stain_mask(whole, mpp, params)[0],
                                  stain_mask(part, mpp, params)[0])


def test_islands_give_the_mask_of_one_whole_box(
    rect_svs: BuiltSlide, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces are looked for island by island (the glass between is never labelled); the
    mask is the one a single box over the whole view gives."""
    with Slide(rect_svs.path) as slide:
        level, width, height, mpp = _view_geometry(slide, 4.0)
        m = np.zeros((height, width), np.uint8)
        m[100:300, 100:400] = m[100:300, 900:990] = 255  # 3 blocks of 128 px apart
        assert len(tissue_stain.islands(m, mpp, TissueParams())) == 2
        by_island = tissue_mask(slide)
        monkeypatch.setattr(tissue_stain, "islands", lambda m, mpp, params: [
            ((slice(0, m.shape[0]), slice(0, m.shape[1])), None)])
        whole = tissue_mask(slide)
    np.testing.assert_array_equal(by_island.mask, whole.mask)
    assert by_island.fragments == whole.fragments == 4
