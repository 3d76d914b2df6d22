"""Pyramid levels are the rounded 2x2 mean of the level below, edges replicated."""

from __future__ import annotations

import numpy as np
import pytest

from wsi.ome_zarr import downsample_mean


def _reference(block: np.ndarray) -> np.ndarray:
    h, w = block.shape[-2:]
    pad = [(0, 0)] * (block.ndim - 2) + [(0, h % 2), (0, w % 2)]
    b = np.pad(block, pad, mode="edge").astype(np.uint32)
    total = b[..., 0::2, 0::2] + b[..., 1::2, 0::2] + b[..., 0::2, 1::2] + b[..., 1::2, 1::2]
    return ((total + 2) // 4).astype(block.dtype)


@pytest.mark.parametrize("shape", [(3, 64, 48), (2, 33, 17), (1, 1, 1), (5, 7, 2), (4, 6)])
def testdownsample_mean_is_the_rounded_2x2_mean(shape: tuple[int, ...]) -> None:
    block = np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8)
    block.flat[:4] = [0, 1, 1, 0]  # a sum of 2: the mean 0.5 rounds up, as (s + 2) // 4
    got = downsample_mean(block)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, _reference(block))


@pytest.mark.parametrize("shape", [(2, 64, 48), (1, 33, 17)])
def testdownsample_mean_of_uint16_maps_stays_uint16_and_exact(shape: tuple[int, ...]) -> None:
    """uint16 probability maps (``probability_dtype="uint16"``) reduce the same way."""
    block = np.random.default_rng(7).integers(0, 65536, shape, dtype=np.uint16)
    block.flat[:4] = [65535, 65535, 65535, 65534]  # no overflow near the top
    got = downsample_mean(block)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, _reference(block))


def testdownsample_mean_of_float32_maps_is_the_plain_mean() -> None:
    """float32 probability maps (``probability_dtype="float32"``) reduce unrounded."""
    block = np.random.default_rng(8).random((2, 33, 17), dtype=np.float32)
    padded = np.pad(block, [(0, 0), (0, 1), (0, 1)], mode="edge").astype(np.float64)
    expected = (padded[..., 0::2, 0::2] + padded[..., 1::2, 0::2] + padded[..., 0::2, 1::2]
                + padded[..., 1::2, 1::2]) / 4
    got = downsample_mean(block)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)
