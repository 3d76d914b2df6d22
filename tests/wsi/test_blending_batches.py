"""The batched merger: whole batches at once give the same bits as one tile at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi.blending import StreamingMerger, weight_window
from wsi.errors import InvalidParameter

Box = tuple[int, int, int, int]
Chunks = dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]


def strip_boxes(shape: tuple[int, int], tile: int, stride: int, strip_cols: int) -> list[Box]:
    """Tile boxes in vertical strips (as the engine plans them), some off the canvas."""
    h, w = shape
    boxes = [(y, x, tile, tile) for y in range(-stride, h, stride)
             for x in range(-stride, w, stride)]
    return sorted(boxes, key=lambda b: ((b[1] + stride) // stride // strip_cols, b[0], b[1]))


def run(boxes: list[Box], tiles: np.ndarray, shape: tuple[int, int], chunk: int,
        batch: int, spill: Path | None) -> tuple[Chunks, StreamingMerger]:
    got: Chunks = {}

    def keep(cy: int, cx: int, sums: np.ndarray, weights: np.ndarray) -> None:
        assert (cy, cx) not in got, "each chunk is sunk once"
        got[(cy, cx)] = (sums.copy(), weights.copy())

    window = weight_window(tiles.shape[-2], tiles.shape[-1], kind="gaussian")
    merger = StreamingMerger(channels=tiles.shape[1], shape=shape, chunk_px=chunk, boxes=boxes,
                             window=window, sink=keep, normalize=False, spill_dir=spill,
                             horizon=4)
    for start in range(0, len(boxes), batch):
        if batch == 1:
            merger.aggregate(tiles[start], boxes[start][:2])
        else:
            merger.aggregate_batch(tiles[start : start + batch],
                                   [b[:2] for b in boxes[start : start + batch]])
    merger.finalize()
    return got, merger


def dense_float32(boxes: list[Box], tiles: np.ndarray, shape: tuple[int, int]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sums over the whole canvas in float32, tile after tile in plan order,
    each step a fused multiply-add (the exact product and sum in float64, rounded once
    to float32): per pixel, the operations the merger makes, in its order."""
    h, w = shape
    pad = tiles.shape[-1]
    sums = np.zeros((tiles.shape[1], h + 2 * pad, w + 2 * pad), np.float32)
    weights = np.zeros((h + 2 * pad, w + 2 * pad), np.float32)
    window = weight_window(tiles.shape[-2], tiles.shape[-1], kind="gaussian")
    for (y, x, th, tw), tile in zip(boxes, tiles, strict=True):
        region = (slice(pad + y, pad + y + th), slice(pad + x, pad + x + tw))
        exact = sums[(slice(None), *region)].astype(np.float64) + tile.astype(np.float64) * window
        sums[(slice(None), *region)] = exact.astype(np.float32)
        weights[region] += window
    return sums[:, pad : pad + h, pad : pad + w], weights[pad : pad + h, pad : pad + w]


@pytest.mark.parametrize("batch", [3, 8, 1000])
def test_batches_equal_one_tile_at_a_time_bit_for_bit(tmp_path: Path, batch: int) -> None:
    """Batches of any size (a batch spanning strips, chunks parked on disk and brought
    back mid-batch, tiles off the canvas) give exactly the per-tile chunks, and both
    equal a dense float32 accumulation in plan order, bit for bit."""
    shape, chunk, tile, stride = (200, 330), 64, 48, 32
    boxes = strip_boxes(shape, tile, stride, strip_cols=3)
    tiles = np.random.default_rng(batch).random((len(boxes), 3, tile, tile), dtype=np.float32)
    (tmp_path / "one").mkdir()
    (tmp_path / "batch").mkdir()
    one, one_merger = run(boxes, tiles, shape, chunk, 1, tmp_path / "one")
    batched, merger = run(boxes, tiles, shape, chunk, batch, tmp_path / "batch")
    assert merger.chunks_spilled == one_merger.chunks_spilled > 0
    assert batched.keys() == one.keys()
    sums, weights = dense_float32(boxes, tiles, shape)
    for (cy, cx), (s, w) in batched.items():
        np.testing.assert_array_equal(s, one[(cy, cx)][0])
        np.testing.assert_array_equal(w, one[(cy, cx)][1])
        region = (slice(cy * chunk, cy * chunk + w.shape[0]),
                  slice(cx * chunk, cx * chunk + w.shape[1]))
        np.testing.assert_array_equal(s, sums[(slice(None), *region)])
        np.testing.assert_array_equal(w, weights[region])
    assert list((tmp_path / "batch").iterdir()) == []


def test_float64_tiles_are_weighted_in_float32() -> None:
    """A model that returns float64 gives the float32 merger the same bits as float32."""
    shape, tile = (64, 64), 32
    boxes = [(0, 0, tile, tile), (16, 16, tile, tile), (32, 32, tile, tile)]
    tiles = np.random.default_rng(1).random((3, 2, tile, tile), dtype=np.float32)
    as32, _ = run(boxes, tiles, shape, 32, 3, None)
    as64, _ = run(boxes, tiles.astype(np.float64), shape, 32, 3, None)
    for key, (s, _) in as32.items():
        np.testing.assert_array_equal(s, as64[key][0])
        assert as64[key][0].dtype == np.float32


def test_bad_batches_are_refused() -> None:
    window = weight_window(32, 32)
    merger = StreamingMerger(channels=2, shape=(64, 64), chunk_px=32, boxes=[(0, 0, 32, 32)],
                             window=window, sink=lambda *a: None)
    with pytest.raises(InvalidParameter, match="2 tiles but 1 positions"):
        merger.aggregate_batch(np.ones((2, 2, 32, 32), np.float32), [(0, 0)])
    with pytest.raises(InvalidParameter, match="tiles must be"):
        merger.aggregate_batch(np.ones((1, 3, 32, 32), np.float32), [(0, 0)])
    with pytest.raises(InvalidParameter, match="does not match the window"):
        merger.aggregate_batch(np.ones((1, 2, 16, 16), np.float32), [(0, 0)])
