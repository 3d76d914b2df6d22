"""Region tracing (wsi/regions.py): exact pixel-edge polygons, band by band, merged."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import shapely

from wsi.regions import trace_regions


def _trace(labels: np.ndarray, values: list[int], rows: int, band_pixels: int | None,
           monkeypatch: pytest.MonkeyPatch) -> list:
    if band_pixels is not None:
        monkeypatch.setattr("wsi.regions.BAND_PIXELS", band_pixels)
    h, w = labels.shape
    return list(trace_regions(lambda y0, y1: labels[y0:y1], height=h, width=w, values=values,
                              rows=rows, weights=lambda v, y0, y1: (labels[y0:y1] == v) * 2.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("rows", "band_rows"), [(7, None), (40, 5), (500, None)])
def test_regions_are_the_8_connected_components_exactly(
    seed: int, rows: int, band_rows: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Noise (many corner touches) and blobs, traced in blocks of ``rows`` and bands of
    ``band_rows``: one valid polygon per 8-connected component, whose area is its pixel
    count and which holds exactly its pixels' centres."""
    rng = np.random.default_rng(seed)
    h, w = 83, 121
    if seed == 2:
        coarse = rng.integers(0, 3, size=(h // 5 + 1, w // 5 + 1)).astype(np.uint8)
        labels = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_NEAREST)
    else:
        labels = rng.integers(0, 3, size=(h, w)).astype(np.uint8)
    band_pixels = 4 * w * band_rows if band_rows else None
    regions = _trace(labels, [1, 2], rows, band_pixels, monkeypatch)
    yy, xx = np.mgrid[0:h, 0:w]
    for value in (1, 2):
        mine = [r for r in regions if r.value == value]
        mask = (labels == value).astype(np.uint8)
        assert len(mine) == cv2.connectedComponents(mask, connectivity=8)[0] - 1
        geometries = np.array([r.geometry for r in mine])
        assert shapely.is_valid(geometries).all()
        for region in mine:
            assert region.geometry.area == region.pixels
            assert region.weight_sum == 2.0 * region.pixels
        inside = shapely.contains_xy(shapely.union_all(geometries), xx + 0.5, yy + 0.5)
        np.testing.assert_array_equal(inside, mask.astype(bool))


def test_a_ring_keeps_its_hole_across_bands(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame split over four bands comes back as one polygon with one interior ring."""
    labels = np.zeros((40, 50), np.uint8)
    labels[5:35, 10:40] = 1
    labels[12:25, 18:30] = 0
    (region,) = _trace(labels, [1], 10, 4 * 50 * 6, monkeypatch)
    assert region.geometry.geom_type == "Polygon"
    assert len(region.geometry.interiors) == 1
    hole = shapely.Polygon(region.geometry.interiors[0])
    assert hole.area == 13 * 12 and hole.bounds == (18.0, 12.0, 30.0, 25.0)
    assert region.geometry.area == 30 * 30 - 13 * 12


def test_parts_touching_at_a_corner_make_one_multipolygon(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    labels = np.zeros((10, 10), np.uint8)
    labels[2:5, 2:5] = 1
    labels[5:8, 5:8] = 1  # meets the first square at the corner (5, 5), across a band edge
    (region,) = _trace(labels, [1], 5, None, monkeypatch)
    assert region.geometry.geom_type == "MultiPolygon" and region.geometry.is_valid
    assert len(region.geometry.geoms) == 2 and region.geometry.area == 18
