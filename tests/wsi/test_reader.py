"""The slide reader facade over openslide and tiffslide, on real and built slides.

Pixel tolerance between backends: both decode the same JPEG bytes with libjpeg-turbo
(openslide-bin bundles it, imagecodecs links it), so the only legitimate difference is
the decoder's IDCT/upsampling path. We allow ``max |a - b| <= 2`` and ``mean < 0.5``
grey levels; in practice the difference is 0. The one exception is openslide on a level
whose downsample is not an integer: its API takes level-0 coordinates, so a level pixel
can only be addressed to within 0.5 / downsample px and openslide resamples bilinearly
by that sub-pixel shift. There we assert alignment (no whole-pixel shift), not equality.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.data import CMU_MPP, BuiltSlide, stored_level
from tests.scenes import RectangleSource
from wsi.errors import (
    InvalidParameter,
    SlideMissingMpp,
    SlideUnreadable,
)
from wsi.pyramid_levels import block_mean
from wsi.reader import Slide, composite_on_white

BACKENDS = ("openslide", "tiffslide")
MAX_ABS = 2
MEAN_ABS = 0.5


def assert_same_pixels(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shapes {a.shape} != {b.shape}"
    assert a.dtype == np.uint8 and b.dtype == np.uint8
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= MAX_ABS, f"{what}: max abs diff {diff.max()} > {MAX_ABS}"
    assert diff.mean() < MEAN_ABS, f"{what}: mean abs diff {diff.mean():.3f} >= {MEAN_ABS}"


def windows(width: int, height: int, size: int, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` window origins inside a level, including both far corners."""
    rng = np.random.default_rng(seed)
    out = [(0, 0), (width - size, height - size)]
    for _ in range(n - 2):
        out.append((int(rng.integers(0, width - size)), int(rng.integers(0, height - size))))
    return out


# -- backend choice ---------------------------------------------------------------------
def test_auto_prefers_tiffslide_where_every_level_is_tiled(
    cmu_svs: Path, tissue_generic_tiff: BuiltSlide
) -> None:
    """Its tiled path decodes each slide tile once (tests/test_tile_cache.py)."""
    for path in (cmu_svs, tissue_generic_tiff.path):
        with Slide(path) as slide:
            assert slide.backend == "tiffslide" and slide.concurrent_reads


def test_auto_falls_back_to_tiffslide(stripped_tiff: Path) -> None:
    """A plain stripped TIFF: openslide refuses it (not tiled), tiffslide reads it."""
    with pytest.raises(SlideUnreadable):
        Slide(stripped_tiff, backend="openslide")
    with Slide(stripped_tiff) as slide:
        assert slide.backend == "tiffslide"
        assert slide.dimensions == (400, 300)


def test_unknown_backend_is_rejected(cmu_svs: Path) -> None:
    with pytest.raises(ValueError, match="unknown slide backend"):
        Slide(cmu_svs, backend="bioformats")


# -- metadata ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_aperio_metadata(cmu_svs: Path, backend: str) -> None:
    with Slide(cmu_svs, backend=backend) as slide:
        assert slide.backend == backend
        assert slide.dimensions == (2220, 2967)
        assert slide.level_count == 1
        assert slide.level_downsamples == (1.0,)
        assert slide.vendor == "aperio"
        assert slide.has_mpp
        assert slide.mpp == pytest.approx(CMU_MPP)


@pytest.mark.parametrize("backend", BACKENDS)
def test_openslide_fixture_metadata(small_svs: Path, boxes_tiff: Path, backend: str) -> None:
    with Slide(small_svs, backend=backend) as slide:
        assert slide.dimensions == (16, 16)
        assert slide.vendor == "aperio"
        assert slide.mpp == pytest.approx(0.499)
    with Slide(boxes_tiff, backend=backend) as slide:
        assert slide.level_dimensions == ((300, 250), (150, 125), (75, 62), (37, 31))
        assert slide.level_downsamples[1] == pytest.approx(2.0)
        assert slide.vendor == "generic-tiff"
        # 72 dpi (352.8 µm/px) is a TIFF writer's default, not a scanner's: no mpp
        assert not slide.has_mpp
        with pytest.raises(SlideMissingMpp, match="slide_mpp"):
            _ = slide.mpp


BUILT = (
    "tissue_svs",
    "tissue_generic_tiff",
    "lossless_tissue_svs",
    "rect_svs",
    "rect_generic_tiff",
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", BUILT)
def test_built_slide_metadata(request: pytest.FixtureRequest, name: str, backend: str) -> None:
    built: BuiltSlide = request.getfixturevalue(name)
    with Slide(built.path, backend=backend) as slide:
        assert slide.level_dimensions == built.info.level_dimensions
        for got, nominal in zip(slide.level_downsamples, built.info.downsamples, strict=True):
            assert got == pytest.approx(nominal, rel=0.01)
        assert slide.mpp == pytest.approx(built.mpp, rel=1e-6)
        assert slide.level_mpp(1) == pytest.approx(built.mpp * slide.level_downsamples[1])
        expected_vendor = "aperio" if built.info.flavor == "svs" else "generic-tiff"
        assert slide.vendor == expected_vendor


@pytest.mark.parametrize("name", BUILT)
def test_backends_report_identical_geometry(request: pytest.FixtureRequest, name: str) -> None:
    built: BuiltSlide = request.getfixturevalue(name)
    with Slide(built.path, backend="openslide") as a, Slide(built.path, backend="tiffslide") as b:
        assert a.level_dimensions == b.level_dimensions
        assert a.level_downsamples == pytest.approx(b.level_downsamples)
        assert a.mpp == pytest.approx(b.mpp)


# -- pixels -----------------------------------------------------------------------------
def test_backends_same_pixels_real_slide(cmu_svs: Path) -> None:
    with Slide(cmu_svs, backend="openslide") as a, Slide(cmu_svs, backend="tiffslide") as b:
        w, h = a.dimensions
        assert_same_pixels(a.read_level(0, 0, 0, w, h), b.read_level(0, 0, 0, w, h), "cmu")
        for x, y in windows(w, h, 300, 6, seed=1):
            assert_same_pixels(
                a.read_level(0, x, y, 300, 300),
                b.read_level(0, x, y, 300, 300),
                f"cmu window {x},{y}",
            )


def test_backends_same_pixels_whole_levels(
    boxes_tiff: Path,
    tissue_svs: BuiltSlide,
    tissue_generic_tiff: BuiltSlide,
    rect_svs: BuiltSlide,
) -> None:
    """Whole levels (origin 0, so no sub-pixel addressing even at fractional downsamples);
    rect_svs's 48 Mpx level 0 is left out for speed (its windows are checked elsewhere)."""
    for path in (boxes_tiff, tissue_svs.path, tissue_generic_tiff.path, rect_svs.path):
        with Slide(path, backend="openslide") as a, Slide(path, backend="tiffslide") as b:
            for level, (w, h) in enumerate(a.level_dimensions):
                if w * h > 20_000_000:
                    continue
                assert_same_pixels(
                    a.read_level(level, 0, 0, w, h),
                    b.read_level(level, 0, 0, w, h),
                    f"{path.name} level {level}",
                )


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_level_matches_stored_pixels(tissue_svs: BuiltSlide, backend: str) -> None:
    """Windows anywhere in every level (integer downsamples 1/4/16) are the stored pixels."""
    with Slide(tissue_svs.path, backend=backend) as slide:
        for level, (w, h) in enumerate(slide.level_dimensions):
            stored = stored_level(tissue_svs, level)
            for x, y in windows(w, h, 100, 12, seed=level):
                assert_same_pixels(
                    slide.read_level(level, x, y, 100, 100),
                    stored[y : y + 100, x : x + 100],
                    f"level {level} window {x},{y}",
                )


def best_shift(region: np.ndarray, stored: np.ndarray, x: int, y: int) -> tuple[int, int]:
    """The whole-pixel shift (dx, dy) in -1..1 under which ``region`` best matches."""
    h, w = region.shape[:2]
    scores = {}
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            ref = stored[y + dy : y + dy + h, x + dx : x + dx + w].astype(np.int16)
            scores[dx, dy] = float(np.abs(region.astype(np.int16) - ref).mean())
    return min(scores, key=scores.__getitem__)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_level_is_pixel_aligned_at_fractional_downsamples(
    lossless_tissue_svs: BuiltSlide, backend: str
) -> None:
    """Levels 1/2 have downsamples ~2.996 and ~8.966 (sizes are not multiples).

    A window read at level pixel (x, y) must be the stored window at (x, y), not one
    pixel off. tiffslide gives exactly the stored (lossless) pixels; openslide can only
    be addressed to within 0.5/downsample px and resamples, so for it we check alignment.
    """
    with Slide(lossless_tissue_svs.path, backend=backend) as slide:
        for level in (1, 2):
            w, h = slide.level_dimensions[level]
            stored = stored_level(lossless_tissue_svs, level)
            misaligned = []
            for x, y in windows(w - 2, h - 2, 40, 40, seed=level):
                x, y = x + 1, y + 1  # keep the +-1 shifted references inside the level
                region = slide.read_level(level, x, y, 40, 40)
                shift = best_shift(region, stored, x, y)
                if shift != (0, 0):
                    misaligned.append((x, y, shift))
                elif backend == "tiffslide":
                    np.testing.assert_array_equal(region, stored[y : y + 40, x : x + 40])
            assert not misaligned, (
                f"level {level} (downsample {slide.level_downsamples[level]:.4f}): "
                f"{len(misaligned)} of 40 windows are shifted by a whole pixel, e.g. "
                f"{misaligned[:3]} as (x, y, (dx, dy))"
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_levels_are_area_averages_of_level0(lossless_tissue_svs: BuiltSlide, backend: str) -> None:
    """The synthetic pyramid is a true area average (checked losslessly, both backends)."""
    with Slide(lossless_tissue_svs.path, backend=backend) as slide:
        w0, h0 = slide.dimensions
        level0 = slide.read_level(0, 0, 0, w0, h0)
        for level, d in enumerate(lossless_tissue_svs.info.downsamples):
            w, h = slide.level_dimensions[level]
            expected = block_mean(level0, d, (h0, w0))
            diff = np.abs(slide.read_level(level, 0, 0, w, h).astype(np.int16) - expected)
            assert diff.max() <= 1, f"level {level}: max diff {diff.max()} (rounding only)"


def test_rect_slide_levels_match_the_rendered_truth(rect_svs: BuiltSlide) -> None:
    """Every level is the exact area average rendered by the source, up to JPEG.

    Flat colours survive JPEG Q90 almost exactly. With 4:2:0 subsampling JPEG codes
    16 x 16 pixel blocks (MCUs, aligned with the 256 px tiles), and a block that holds a
    colour edge may be off anywhere inside it; the decoder's chroma upsampling also
    interpolates into the blocks next to it. Every other block must be within
    ``MAX_ABS``, and the mean over the level within ``MEAN_ABS``. Level 0 is checked on
    a 2048 px window around rectangle A's corner (tile-aligned), the others whole.
    """
    w0, h0 = rect_svs.info.dimensions
    source = RectangleSource(w0, h0, rect_svs.rects, downsamples=rect_svs.info.downsamples)
    regions = [(0, 512, 512, 2048, 2048)]
    regions += [(lvl, 0, 0, *rect_svs.info.level_dimensions[lvl]) for lvl in (1, 2)]
    with Slide(rect_svs.path) as slide:
        for level, x, y, w, h in regions:
            truth = source(level, y, x, h, w).astype(np.int16)
            diff = np.abs(slide.read_level(level, x, y, w, h).astype(np.int16) - truth)
            assert diff.mean() < MEAN_ABS, f"level {level}: mean diff {diff.mean():.3f}"
            # pixels whose 3x3 neighbourhood is not one colour, the 16 px blocks holding
            # any of them, and the blocks around those
            grey = truth @ np.array([1, 256, 65536], np.int64)
            kernel = np.ones((3, 3), np.uint8)
            edge = cv2.dilate(grey.astype(np.float64), kernel) != cv2.erode(
                grey.astype(np.float64), kernel
            )
            bh, bw = -(-h // 16), -(-w // 16)
            padded = np.pad(edge, ((0, bh * 16 - h), (0, bw * 16 - w)))
            edge_blocks = padded.reshape(bh, 16, bw, 16).any(axis=(1, 3)).astype(np.uint8)
            near = cv2.dilate(edge_blocks, kernel).astype(bool)
            flat_px = np.repeat(np.repeat(~near, 16, axis=0), 16, axis=1)[:h, :w]
            assert flat_px.mean() > 0.5  # most of the level is still checked tightly
            assert diff[flat_px].max() <= MAX_ABS, f"level {level}: error in a flat block"


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_level_pads_with_white_off_the_slide(tissue_svs: BuiltSlide, backend: str) -> None:
    with Slide(tissue_svs.path, backend=backend) as slide:
        level = 1
        w, h = slide.level_dimensions[level]
        stored = stored_level(tissue_svs, level)
        region = slide.read_level(level, -10, -5, 40, 30)
        assert region.shape == (30, 40, 3)
        assert (region[:5] == 255).all() and (region[:, :10] == 255).all()
        assert_same_pixels(region[5:, 10:], stored[0:25, 0:30], "top-left inside part")
        region = slide.read_level(level, w - 16, h - 8, 40, 30)
        assert (region[8:] == 255).all() and (region[:, 16:] == 255).all()
        assert_same_pixels(region[:8, :16], stored[h - 8 :, w - 16 :], "bottom-right part")
        assert (slide.read_level(level, w + 5, 0, 20, 20) == 255).all()
        assert (slide.read_level(level, 0, -100, 20, 20) == 255).all()


def test_read_level_rejects_bad_requests(tissue_svs: BuiltSlide) -> None:
    with Slide(tissue_svs.path) as slide:
        for level in (-1, slide.level_count):
            with pytest.raises(InvalidParameter, match="level"):
                slide.read_level(level, 0, 0, 10, 10)
        with pytest.raises(InvalidParameter, match="size"):
            slide.read_level(0, 0, 0, 0, 10)
        with pytest.raises(InvalidParameter):
            slide.thumbnail(0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_thumbnail_fits_and_keeps_aspect(cmu_svs: Path, backend: str) -> None:
    with Slide(cmu_svs, backend=backend) as slide:
        thumb = slide.thumbnail(256)
        assert thumb.dtype == np.uint8 and thumb.shape[2] == 3
        assert max(thumb.shape[:2]) == 256
        assert thumb.shape[1] == pytest.approx(256 * 2220 / 2967, abs=1)


# -- mpp --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["no_mpp_tiff", "no_mpp_svs"])
def test_missing_mpp_is_a_clear_error(
    request: pytest.FixtureRequest, name: str, backend: str
) -> None:
    built: BuiltSlide = request.getfixturevalue(name)
    with Slide(built.path, backend=backend) as slide:
        assert not slide.has_mpp
        assert slide.level_count == 2  # the slide itself is fine
        with pytest.raises(SlideMissingMpp, match="slide_mpp") as info:
            _ = slide.mpp
        assert built.path.name in str(info.value)
        assert isinstance(info.value, ValueError)
        with pytest.raises(SlideMissingMpp):
            slide.best_level_for_mpp(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mpp_override_supplies_and_wins(
    no_mpp_tiff: BuiltSlide, tissue_svs: BuiltSlide, backend: str
) -> None:
    with Slide(no_mpp_tiff.path, backend=backend, slide_mpp=0.5) as slide:
        assert slide.has_mpp and slide.mpp == 0.5
        assert slide.level_mpp(1) == pytest.approx(0.5 * slide.level_downsamples[1])
        assert slide.best_level_for_mpp(2.0) == 1
    with Slide(tissue_svs.path, backend=backend, slide_mpp=0.3) as slide:
        assert slide.mpp == 0.3


@pytest.mark.parametrize("bad", [0.0, -0.5, 1000.0, 5000.0, math.nan])
def test_mpp_override_out_of_range(no_mpp_tiff: BuiltSlide, bad: float) -> None:
    with pytest.raises(InvalidParameter, match="slide_mpp"):
        Slide(no_mpp_tiff.path, slide_mpp=bad)


# tissue_svs level mpps: 0.499, 1.996, 7.984
@pytest.mark.parametrize(
    ("target", "level", "why"),
    [
        (0.499, 0, "exact"),
        (0.5, 0, "0.2% off level 0: read as is"),
        (0.25, 0, "finer than level 0: level 0"),
        (1.0, 0, "between 0 and 1: nearest finer"),
        (1.97, 0, "1.3% finer than level 1: not within 1%, so the finer level 0"),
        (1.99, 1, "0.3% finer than level 1: within 1%"),
        (2.0, 1, "0.2% coarser than level 1"),
        (2.03, 1, "1.7% coarser than level 1: nearest finer is level 1"),
        (7.9, 1, "1.06% finer than level 2: not within, so level 1"),
        (7.93, 2, "0.7% finer than level 2: within 1%"),
        (8.0, 2, "0.2% off level 2"),
        (100.0, 2, "far coarser: the coarsest level"),
    ],
)
def test_best_level_for_mpp(tissue_svs: BuiltSlide, target: float, level: int, why: str) -> None:
    with Slide(tissue_svs.path) as slide:
        assert slide.best_level_for_mpp(target) == level, why


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_best_level_rejects_bad_targets(tissue_svs: BuiltSlide, bad: float) -> None:
    with Slide(tissue_svs.path) as slide, pytest.raises(InvalidParameter, match="target_mpp"):
        slide.best_level_for_mpp(bad)


def test_read_scaled_resamples_only_when_needed(tissue_svs: BuiltSlide) -> None:
    with Slide(tissue_svs.path) as slide:
        # within 1% of level 1: no resampling, the level's own pixels
        assert slide.scaled_dimensions(2.0) == slide.level_dimensions[1]
        np.testing.assert_array_equal(
            slide.read_scaled(2.0, 30, 40, 64, 48), slide.read_level(1, 30, 40, 64, 48)
        )
        # exactly twice level 0's mpp: level 0 read and area-averaged 2x
        target = 2 * CMU_MPP
        assert slide.scaled_dimensions(target) == (2000, 1504)
        got = slide.read_scaled(target, 10, 20, 64, 48)
        assert got.shape == (48, 64, 3)
        stored = stored_level(tissue_svs, 0)[40:136, 20:148]
        expected = cv2.resize(stored, (64, 48), interpolation=cv2.INTER_AREA)
        assert_same_pixels(got, expected, "2x area resample")


def test_composite_on_white_drops_opaque_alpha_and_blends_the_rest() -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (33, 47, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    np.testing.assert_array_equal(composite_on_white(rgba), rgba[..., :3])
    rgba[0, 0] = (100, 0, 200, 0)  # transparent -> white
    rgba[0, 1] = (100, 0, 200, 128)  # half -> halfway to white
    out = composite_on_white(rgba)
    assert out.shape == (33, 47, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (177, 127, 227)
    np.testing.assert_array_equal(out[1:], rgba[1:, :, :3])


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_level_view_in_parallel_bands_equals_one_pass(cmu_svs: Path, backend: str) -> None:
    """Bands decoded two at a time (openslide) or one after the other (tiffslide) give
    the same view, in RGB and through a channel function."""
    with Slide(cmu_svs, backend=backend) as slide:
        w, h = slide.level_dimensions[0]
        size = (w // 7, h // 7)
        serial = slide.read_level_resized(0, *size, band_pixels=w * 49, workers=1)
        banded = slide.read_level_resized(0, *size, band_pixels=w * 49, workers=2)
        np.testing.assert_array_equal(banded, serial)
        grey = slide.read_level_resized(0, *size, band_pixels=w * 49, workers=2,
                                        channel=lambda rgb: rgb[..., 1].copy())
        np.testing.assert_array_equal(grey, banded[..., 1])
