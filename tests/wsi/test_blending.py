"""Weight windows and the streaming chunked merger, against a dense numpy reference."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from wsi.blending import WINDOW_FLOOR, WINDOWS, StreamingMerger, weight_window
from wsi.errors import InvalidParameter

Box = tuple[int, int, int, int]


# -- windows ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tent", "gaussian"])
@pytest.mark.parametrize("shape", [(64, 64), (65, 33), (256, 256), (7, 128)])
def test_window_peaks_at_centre_and_falls_to_a_floor(kind: str, shape: tuple[int, int]) -> None:
    w = weight_window(*shape, kind=kind)
    h, wd = shape
    assert w.shape == shape and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0)
    # the maximum sits on the centre pixel(s)
    cy, cx = (h - 1) / 2, (wd - 1) / 2
    ys, xs = np.nonzero(w == w.max())
    assert np.all(np.abs(ys - cy) <= 0.5) and np.all(np.abs(xs - cx) <= 0.5)
    # symmetric about both centre lines
    np.testing.assert_allclose(w, w[::-1, :], rtol=1e-6)
    np.testing.assert_allclose(w, w[:, ::-1], rtol=1e-6)
    if h == wd:
        np.testing.assert_allclose(w, w.T, rtol=1e-6)
    # never increases from the centre towards the border
    row, col = w[int(cy)], w[:, int(cx)]
    assert np.all(np.diff(row[int(cx) :]) <= 1e-7) and np.all(np.diff(col[int(cy) :]) <= 1e-7)
    assert w.min() >= WINDOW_FLOOR > 0
    assert w[0, 0] < w[h // 2, wd // 2]


def test_tent_is_the_product_of_linear_ramps() -> None:
    w = weight_window(8, 8, kind="tent")
    ramp = np.array([0.5, 1.5, 2.5, 3.5, 3.5, 2.5, 1.5, 0.5]) / 4
    expected = np.maximum(np.outer(ramp, ramp) / (3.5 / 4) ** 2, WINDOW_FLOOR)
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    # a large tile's corners hit the floor: 1/256^2 << 1e-3
    assert weight_window(256, 256)[0, 0] == pytest.approx(WINDOW_FLOOR)


def test_constant_window_and_bad_windows() -> None:
    assert set(WINDOWS) >= {"tent", "gaussian", "constant"}
    np.testing.assert_array_equal(weight_window(5, 6, kind="constant"), np.ones((5, 6)))
    with pytest.raises(InvalidParameter):
        weight_window(0, 10)
    with pytest.raises(InvalidParameter, match="window"):
        weight_window(10, 10, kind="hann")


# -- merger helpers ---------------------------------------------------------------------
class Canvas:
    """A sink that assembles the chunks it receives and remembers each one."""

    def __init__(self, channels: int, shape: tuple[int, int], chunk_px: int) -> None:
        self.values = np.full((channels, *shape), np.nan, np.float32)
        self.weights = np.zeros(shape, np.float32)
        self.chunk_px = chunk_px
        self.sunk: Counter[tuple[int, int]] = Counter()

    def __call__(self, cy: int, cx: int, blended: np.ndarray, weights: np.ndarray) -> None:
        c = self.chunk_px
        h, w = weights.shape
        assert blended.shape[1:] == (h, w)
        self.values[:, cy * c : cy * c + h, cx * c : cx * c + w] = blended
        self.weights[cy * c : cy * c + h, cx * c : cx * c + w] = weights
        self.sunk[cy, cx] += 1


def grid_boxes(shape: tuple[int, int], tile: int, stride: int, start: int) -> list[Box]:
    """Row-major tile boxes from ``start`` (may be negative: off the canvas)."""
    h, w = shape
    return [(y, x, tile, tile) for y in range(start, h, stride) for x in range(start, w, stride)]


def dense_reference(
    channels: int,
    shape: tuple[int, int],
    boxes: list[Box],
    tiles: list[np.ndarray],
    window: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The weighted average computed naively over the whole canvas in float64."""
    h, w = shape
    pad = max(b[2] for b in boxes) * 2
    sums = np.zeros((channels, h + 2 * pad, w + 2 * pad))
    weights = np.zeros((h + 2 * pad, w + 2 * pad))
    for (y, x, th, tw), tile in zip(boxes, tiles, strict=True):
        sums[:, pad + y : pad + y + th, pad + x : pad + x + tw] += tile * window
        weights[pad + y : pad + y + th, pad + x : pad + x + tw] += window
    sums, weights = sums[:, pad : pad + h, pad : pad + w], weights[pad : pad + h, pad : pad + w]
    out = np.divide(sums, weights, out=np.zeros_like(sums), where=weights > 0)
    return out, weights


def chunks_touched(boxes: list[Box], shape: tuple[int, int], c: int) -> set[tuple[int, int]]:
    h, w = shape
    out = set()
    for y, x, th, tw in boxes:
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + th, h), min(x + tw, w)
        if y1 > y0 and x1 > x0:
            out |= {
                (cy, cx)
                for cy in range(y0 // c, (y1 - 1) // c + 1)
                for cx in range(x0 // c, (x1 - 1) // c + 1)
            }
    return out


def merge(
    channels: int,
    shape: tuple[int, int],
    chunk: int,
    boxes: list[Box],
    tiles: list[np.ndarray],
    window: np.ndarray,
    order: list[int] | None = None,
) -> tuple[StreamingMerger, Canvas]:
    canvas = Canvas(channels, shape, chunk)
    merger = StreamingMerger(
        channels=channels, shape=shape, chunk_px=chunk, boxes=boxes, window=window, sink=canvas
    )
    for i in order if order is not None else range(len(boxes)):
        merger.aggregate(tiles[i], boxes[i][:2])
    merger.finalize()
    return merger, canvas


# -- merger -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tent", "gaussian", "constant"])
@pytest.mark.parametrize("shuffled", [False, True])
def test_merger_equals_dense_reference(kind: str, shuffled: bool) -> None:
    """Random tiles on a 300 x 500 canvas: 64 px tiles every 48 px from -16 (so the
    first row/column and the last hang off the canvas), 100 px chunks (not a divisor of
    anything), a hole with no tiles at all. Any arrival order gives the same result."""
    rng = np.random.default_rng(7)
    shape, channels, chunk = (300, 500), 3, 100
    # leave a gap: no tile touches chunk (2, 3), i.e. y 200-299, x 300-399
    boxes = [
        b for b in grid_boxes(shape, 64, 48, -16) if not (b[0] + 64 > 200 and 300 - 64 < b[1] < 400)
    ]
    tiles = [rng.random((channels, 64, 64), dtype=np.float32) for _ in boxes]
    window = weight_window(64, 64, kind=kind)
    order = list(rng.permutation(len(boxes))) if shuffled else None
    merger, canvas = merge(channels, shape, chunk, boxes, tiles, window, order)
    expected, expected_w = dense_reference(channels, shape, boxes, tiles, window)

    touched = chunks_touched(boxes, shape, chunk)
    assert set(canvas.sunk) == touched
    assert all(n == 1 for n in canvas.sunk.values()), "a chunk was sunk twice"
    assert (2, 3) not in touched  # the gap's chunk was never allocated nor sunk
    assert merger.chunks_written == len(touched) == 14
    sunk_px = ~np.isnan(canvas.values[0])
    np.testing.assert_allclose(canvas.weights[sunk_px], expected_w[sunk_px], rtol=1e-5)
    np.testing.assert_allclose(
        canvas.values[:, sunk_px], expected[:, sunk_px], rtol=1e-5, atol=1e-6
    )
    assert (expected_w[~sunk_px] == 0).all(), "an unsunk pixel had tile weight"
    uncovered = sunk_px & (canvas.weights == 0)
    assert uncovered.any() and (canvas.values[:, uncovered] == 0).all()


def test_identical_tiles_with_constant_window_reproduce_the_input_exactly() -> None:
    """Overlapping crops of one image, averaged with equal weights, give the image back
    bit for bit (integer-valued float32: sums of up to 4 copies are exact). Off-canvas
    parts of edge tiles hold junk, which must be ignored."""
    rng = np.random.default_rng(3)
    shape, channels, tile = (333, 517), 2, 80
    image = rng.integers(0, 256, (channels, *shape)).astype(np.float32)
    boxes = grid_boxes(shape, tile, 60, -20)
    tiles = []
    for y, x, th, tw in boxes:
        t = rng.integers(1000, 2000, (channels, th, tw)).astype(np.float32)  # junk
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + th, shape[0]), min(x + tw, shape[1])
        t[:, y0 - y : y1 - y, x0 - x : x1 - x] = image[:, y0:y1, x0:x1]
        tiles.append(t)
    _, canvas = merge(
        channels, shape, 128, boxes, tiles, weight_window(tile, tile, kind="constant")
    )
    np.testing.assert_array_equal(canvas.values, image)
    # any other window gives the same image up to float rounding
    _, canvas = merge(channels, shape, 128, boxes, tiles, weight_window(tile, tile))
    np.testing.assert_allclose(canvas.values, image, rtol=1e-5)


def peak_for(height: int) -> tuple[int, int]:
    shape, chunk, tile, stride = (height, 4096), 128, 96, 64
    boxes = grid_boxes(shape, tile, stride, 0)
    window = weight_window(tile, tile)
    canvas_chunks = -(-shape[1] // chunk)
    merger = StreamingMerger(
        channels=1, shape=shape, chunk_px=chunk, boxes=boxes, window=window, sink=lambda *a: None
    )
    ones = np.ones((1, tile, tile), np.float32)
    for y, x, _, _ in boxes:
        merger.aggregate(ones, (y, x))
    merger.finalize()
    return merger.peak_open_chunks, canvas_chunks


def test_open_chunks_bounded_by_two_chunk_rows() -> None:
    """Row-major tiles over a wide canvas (32 chunks across): a chunk row stays open
    only until the last tile row touching it, so at most ~2 chunk rows are in memory,
    however tall the slide."""
    peak_short, across = peak_for(1024)
    peak_tall, _ = peak_for(4096)
    assert across == 32
    assert peak_tall == peak_short, "memory grew with the slide's height"
    assert peak_tall <= 2 * across + 2, f"{peak_tall} open chunks > two rows of {across}"


def test_finalize_raises_when_tiles_are_missing() -> None:
    shape, tile = (200, 200), 64
    boxes = grid_boxes(shape, tile, 48, 0)
    canvas = Canvas(1, shape, 64)
    merger = StreamingMerger(
        channels=1,
        shape=shape,
        chunk_px=64,
        boxes=boxes,
        window=weight_window(tile, tile),
        sink=canvas,
    )
    for y, x, _, _ in boxes[:-1]:
        merger.aggregate(np.ones((1, tile, tile), np.float32), (y, x))
    with pytest.raises(InvalidParameter, match="never arrived"):
        merger.finalize()
    # the chunks the last tile touches were held back, the others were written
    assert (3, 3) not in canvas.sunk and (0, 0) in canvas.sunk


def test_tiles_after_their_chunks_finished_are_rejected() -> None:
    shape, tile = (128, 128), 64
    boxes = [(0, 0, tile, tile), (64, 64, tile, tile)]
    merger = StreamingMerger(
        channels=1,
        shape=shape,
        chunk_px=64,
        boxes=boxes,
        window=weight_window(tile, tile),
        sink=lambda *a: None,
    )
    ones = np.ones((1, tile, tile), np.float32)
    merger.aggregate(ones, (0, 0))
    with pytest.raises(InvalidParameter, match="after it was finished"):
        merger.aggregate(ones, (0, 0))  # not announced twice
    merger.aggregate(ones, (64, 64))
    merger.finalize()
    assert merger.chunks_written == 2


def test_tiles_entirely_off_the_canvas_are_ignored() -> None:
    canvas = Canvas(1, (100, 100), 50)
    merger = StreamingMerger(
        channels=1,
        shape=(100, 100),
        chunk_px=50,
        boxes=[(-64, -64, 32, 32), (0, 0, 32, 32)],
        window=weight_window(32, 32),
        sink=canvas,
    )
    merger.aggregate(np.ones((1, 32, 32), np.float32), (-64, -64))
    merger.aggregate(np.full((1, 32, 32), 5, np.float32), (0, 0))
    merger.finalize()
    assert set(canvas.sunk) == {(0, 0)}
    np.testing.assert_allclose(canvas.values[0, :32, :32], 5, rtol=1e-6)


def test_bad_merger_input() -> None:
    window = weight_window(32, 32)
    with pytest.raises(InvalidParameter):
        StreamingMerger(
            channels=0, shape=(10, 10), chunk_px=8, boxes=[], window=window, sink=lambda *a: None
        )
    with pytest.raises(InvalidParameter):
        StreamingMerger(
            channels=1, shape=(10, 10), chunk_px=0, boxes=[], window=window, sink=lambda *a: None
        )
    merger = StreamingMerger(
        channels=2,
        shape=(64, 64),
        chunk_px=32,
        boxes=[(0, 0, 32, 32)],
        window=window,
        sink=lambda *a: None,
    )
    with pytest.raises(InvalidParameter, match="tile must be"):
        merger.aggregate(np.ones((3, 32, 32), np.float32), (0, 0))
    with pytest.raises(InvalidParameter, match="does not match the window"):
        merger.aggregate(np.ones((2, 16, 16), np.float32), (0, 0))


def test_strips_with_spill_keep_memory_independent_of_width(tmp_path: Path) -> None:
    """Tiles in vertical strips with chunks parked on disk: the result equals the dense
    reference, every chunk is sunk once, nothing is left in the spill folder, and the
    open chunks stay the same when the canvas gets four times wider."""
    chunk, tile, stride, strip_cols = 64, 48, 32, 6

    def run(width: int) -> tuple[int, int]:
        shape = (512, width)
        boxes = grid_boxes(shape, tile, stride, 0)
        strip = [b[1] // stride // strip_cols for b in boxes]
        order = sorted(range(len(boxes)), key=lambda i: (strip[i], boxes[i][0], boxes[i][1]))
        boxes = [boxes[i] for i in order]
        rng = np.random.default_rng(width)
        tiles = [rng.random((2, tile, tile), dtype=np.float32) for _ in boxes]
        window = weight_window(tile, tile)
        canvas = Canvas(2, shape, chunk)
        spill = tmp_path / f"spill-{width}"
        spill.mkdir()
        merger = StreamingMerger(channels=2, shape=shape, chunk_px=chunk, boxes=boxes,
                                 window=window, sink=canvas, spill_dir=spill,
                                 horizon=2 * strip_cols + 2)
        for t, (y, x, _, _) in zip(tiles, boxes):
            merger.aggregate(t, (y, x))
        merger.finalize()
        expected, _ = dense_reference(2, shape, boxes, tiles, window)
        np.testing.assert_allclose(canvas.values, expected, rtol=1e-5, atol=1e-6)
        assert set(canvas.sunk.values()) == {1}
        assert list(spill.iterdir()) == []
        assert merger.chunks_spilled > 0
        # strips end on chunk edges here (6 strides = 3 chunks): a parked chunk holds
        # only the previous strip's overhang, and only that slab goes to disk
        overhang_slab = (2 + 1) * chunk * (tile - stride) * 4  # sums + weights, float32
        assert merger.bytes_spilled <= merger.chunks_spilled * overhang_slab
        return merger.peak_open_chunks, merger.chunks_spilled

    narrow, _ = run(1024)
    wide, spilled = run(4096)
    assert wide == narrow, f"open chunks grew with the width: {narrow} -> {wide}"
    assert wide < 4096 // chunk, "fewer chunks open than one row of the wide canvas"


def test_unnormalised_merger_hands_the_sink_weighted_sums(tmp_path: Path) -> None:
    """``normalize=False``: the sink gets the weighted sums and weight sums undivided,
    and dividing them gives the normalised merger's result, chunk for chunk."""
    shape, chunk, tile = (150, 170), 64, 48
    boxes = grid_boxes(shape, tile, 32, 0)
    rng = np.random.default_rng(3)
    tiles = [rng.random((2, tile, tile), dtype=np.float32) for _ in boxes]
    window = weight_window(tile, tile, kind="gaussian")
    got: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def keep(cy: int, cx: int, sums: np.ndarray, weights: np.ndarray) -> None:
        got[(cy, cx)] = (sums.copy(), weights.copy())

    merger = StreamingMerger(channels=2, shape=shape, chunk_px=chunk, boxes=boxes,
                             window=window, sink=keep, normalize=False)
    for t, (y, x, _, _) in zip(tiles, boxes):
        merger.aggregate(t, (y, x))
    merger.finalize()
    _, canvas = merge(2, shape, chunk, boxes, tiles, window)
    assert got.keys() == canvas.sunk.keys()
    for (cy, cx), (sums, weights) in got.items():
        assert weights.min() > 0
        expected = canvas.values[:, cy * chunk : (cy + 1) * chunk, cx * chunk : (cx + 1) * chunk]
        np.testing.assert_allclose(sums / weights, expected, rtol=1e-6, atol=1e-7)
