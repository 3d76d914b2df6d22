"""Pyramid levels are the rounded 2x2 mean of the level below, edges replicated."""

from __future__ import annotations

import numpy as np
import pytest

from wsi.ome_zarr import _downsample_mean


def _reference(block: np.ndarray) -> np.ndarray:
    h, w = block.shape[-2:]
    pad = [(0, 0)] * (block.ndim - 2) + [(0, h % 2), (0, w % 2)]
    b = np.pad(block, pad, mode="edge").astype(np.uint16)
    total = b[..., 0::2, 0::2] + b[..., 1::2, 0::2] + b[..., 0::2, 1::2] + b[..., 1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


@pytest.mark.parametrize("shape", [(3, 64, 48), (2, 33, 17), (1, 1, 1), (5, 7, 2), (4, 6)])
def test_downsample_mean_is_the_rounded_2x2_mean(shape: tuple[int, ...]) -> None:
    block = np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8)
    block.flat[:4] = [0, 1, 1, 0]  # a sum of 2: the mean 0.5 rounds up, as (s + 2) // 4
    got = _downsample_mean(block)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, _reference(block))
