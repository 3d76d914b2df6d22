"""Pyramids made while level 0 is written (wsi/pyramid_stream.py) equal the ones built
from the finished level 0 (ResultWriter.build_pyramids), file for file: chunks written
in any order from two threads, some never written, odd canvas edges, and so few
parents allowed in memory that most are parked in their files and resumed."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from wsi.ome_zarr import ChunkFiles, LabelSpec, ResultWriter, array_at
from wsi.pyramid_stream import LevelReducer, parent_mask, stream_levels

CHUNK = 64
HEIGHT, WIDTH = 601, 455  # odd: the last chunk row and column are partial, odd-sized


def _level0(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An RGB image with smooth gradients and noise, its label map, and which chunks
    hold anything (about a third are left unwritten: background)."""
    rng = np.random.default_rng(seed)
    n_cy, n_cx = -(-HEIGHT // CHUNK), -(-WIDTH // CHUNK)
    written = rng.random((n_cy, n_cx)) > 0.35
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    image = np.stack([(yy * 255 // HEIGHT), (xx * 255 // WIDTH), (yy + xx) % 256])
    image = (image + rng.integers(0, 40, image.shape)).clip(0, 255).astype(np.uint8)
    labels = ((yy // 7 + xx // 5) % 4).astype(np.uint8)
    return image, labels, written


def _writer(path: Path) -> tuple[ResultWriter, ChunkFiles, ChunkFiles]:
    writer = ResultWriter(path, height=HEIGHT, width=WIDTH, mpp=0.5, chunk_px=CHUNK)
    from wsi.ome_zarr import ChannelSpec

    image = writer.create_image("", "rgb", [ChannelSpec(n, "FFFFFF") for n in "rgb"])
    label = writer.create_label(LabelSpec("classes", {i: (f"c{i}", (i, i, i, 255))
                                                      for i in range(1, 4)}))
    return writer, writer.chunk_files(image), writer.chunk_files(label)


def _chunks(written: np.ndarray) -> list[tuple[int, int]]:
    return [(int(cy), int(cx)) for cy, cx in zip(*np.nonzero(written))]


def _block(array: np.ndarray, cy: int, cx: int) -> np.ndarray:
    return array[..., cy * CHUNK : (cy + 1) * CHUNK, cx * CHUNK : (cx + 1) * CHUNK]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".z")}


@pytest.mark.parametrize("max_open", [1, 3, 1000])
def test_streamed_pyramid_equals_the_one_built_from_level_0(tmp_path: Path, max_open: int) -> None:
    image, labels, written = _level0(seed=max_open)
    # built afterwards, the way a split run does
    built, b_image, b_labels = _writer(tmp_path / "built.zarr")
    for cy, cx in _chunks(written):
        b_image.write((0, cy, cx), _block(image, cy, cx))
        b_labels.write((cy, cx), _block(labels, cy, cx))
    built.build_pyramids(workers=2)
    # streamed: any order, two threads, few parents in memory
    streamed, s_image, s_labels = _writer(tmp_path / "streamed.zarr")
    levels = len(streamed.shapes)
    assert levels >= 4, "the canvas spans several levels"
    reducers = []
    for level0, mean in ((s_image, True), (s_labels, False)):
        group = "" if level0 is s_image else "labels/classes"
        files = [level0] + [streamed.chunk_files(array_at(streamed.root, f"{group}/{lv}".lstrip("/")))
                            for lv in range(1, levels)]
        reducers += stream_levels(files, written, mean=mean, max_open=max_open)
    order = _chunks(written)
    random.Random(max_open).shuffle(order)

    def store(key: tuple[int, int]) -> None:
        s_image.write((0, *key), _block(image, *key))
        s_labels.write(key, _block(labels, *key))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(store, order))
    assert all(r.complete for r in reducers)
    if max_open <= 3:
        assert sum(r.parents_parked for r in reducers) > 0, "parking was exercised"
        assert max(r.peak_open for r in reducers) <= max_open + 2  # one per thread in flight
    a, b = _files(tmp_path / "built.zarr"), _files(tmp_path / "streamed.zarr")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert sum(k.startswith(f"{levels - 1}/") for k in a) == 1, "the top level was written"


def test_parent_mask_marks_parents_of_written_children() -> None:
    children = np.zeros((5, 3), bool)
    children[4, 2] = children[0, 0] = True
    assert parent_mask(children, (3, 2)).tolist() == [[True, False], [False, False],
                                                       [False, True]]


def test_reducer_refuses_odd_chunks_and_repeated_children(tmp_path: Path) -> None:
    writer = ResultWriter(tmp_path / "odd.zarr", height=300, width=300, mpp=1.0, chunk_px=75)
    label = writer.create_label(LabelSpec("l", {1: ("x", (1, 1, 1, 255))}))
    files = writer.chunk_files(label)
    level1 = writer.chunk_files(array_at(writer.root, "labels/l/1"))
    with pytest.raises(ValueError, match="even"):
        LevelReducer(files, level1, np.ones((4, 4), bool), mean=False)
    writer = ResultWriter(tmp_path / "even.zarr", height=256, width=256, mpp=1.0, chunk_px=64)
    label = writer.create_label(LabelSpec("l", {1: ("x", (1, 1, 1, 255))}))
    files = writer.chunk_files(label)
    expected = np.zeros((4, 4), bool)
    expected[0, 0] = expected[0, 1] = True
    stream_levels([files, writer.chunk_files(array_at(writer.root, "labels/l/1"))],
                  expected, mean=False)
    files.write((0, 0), np.ones((64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"\(0, 0\).*arrived twice"):
        files.write((0, 0), np.ones((64, 64), np.uint8))
    with pytest.raises(ValueError, match="not announced"):
        files.write((3, 3), np.ones((64, 64), np.uint8))
