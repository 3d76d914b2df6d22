"""The chunk conversions of the result layout agree with numpy's reference formulas."""

from __future__ import annotations

import numpy as np
import pytest

from workers.engine.result_layout import class_map, weighted_to_stored


@pytest.mark.parametrize("classes", [1, 2, 3, 7])
def test_class_map_is_argmax_with_first_index_on_ties(classes: int) -> None:
    rng = np.random.default_rng(classes)
    scores = rng.random((classes, 67, 45)).astype(np.float32)
    if classes > 1:
        scores[1, :10] = scores[0, :10]  # ties resolve to the lower class, as argmax does
        scores[-1, 20:30] = scores[:, 20:30].max(axis=0)
    assert class_map(scores).dtype == np.uint8
    np.testing.assert_array_equal(class_map(scores), scores.argmax(axis=0))


def test_class_map_numbers_from_first() -> None:
    scores = np.random.default_rng(1).random((4, 9, 7)).astype(np.float32)
    np.testing.assert_array_equal(class_map(scores, first=1), scores.argmax(axis=0) + 1)
    with pytest.raises(ValueError, match="from 2"):
        class_map(scores, first=2)


def test_class_map_refuses_more_classes_than_uint8_holds() -> None:
    with pytest.raises(ValueError, match="got 256"):
        class_map(np.zeros((256, 2, 2), np.float32))


def _numpy_uint8(values: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(values * np.float32(255.0), 0, 255)).astype(np.uint8)


def test_weighted_to_stored_scales_rounds_and_saturates_like_numpy() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(-0.5, 1.5, (3, 40, 33)).astype(np.float32)
    values[0, 0, :4] = [0.5 / 255, 1.5 / 255, 2.5 / 255, 254.5 / 255]  # halves: to even
    got = weighted_to_stored(values, np.ones((40, 33), np.float32), 255.0)
    expected = _numpy_uint8(values)
    assert got.shape == values.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert (got == expected).mean() > 0.999
    assert got[values < 0].max() == 0 and got[values > 1].min() == 255


def test_weighted_to_stored_divides_on_the_way_and_zeroes_uncovered_pixels() -> None:
    rng = np.random.default_rng(1)
    values = rng.uniform(-0.2, 1.2, (3, 32, 40)).astype(np.float32)
    weights = rng.uniform(0.001, 3.0, (32, 40)).astype(np.float32)
    weights[:4] = 0  # no tile covered these rows
    sums = values * weights
    got = weighted_to_stored(sums, weights, 255.0)
    expected = _numpy_uint8(values)
    assert got.dtype == np.uint8 and got.shape == values.shape
    assert np.abs(got[:, 4:].astype(int) - expected[:, 4:]).max() <= 1
    assert (got[:, 4:] == expected[:, 4:]).mean() > 0.999
    assert not got[:, :4].any()
    wide = weighted_to_stored(sums, weights, 65535.0, np.uint16)
    assert wide.dtype == np.uint16
    assert np.abs(wide[:, 4:] / 65535 - np.clip(values[:, 4:], 0, 1)).max() < 1e-4
    exact = weighted_to_stored(sums, weights, 1.0, np.float32)
    np.testing.assert_allclose(exact[:, 4:], values[:, 4:], rtol=1e-5)
    with pytest.raises(ValueError, match="store as one of"):
        weighted_to_stored(sums, weights, 1.0, np.int32)
