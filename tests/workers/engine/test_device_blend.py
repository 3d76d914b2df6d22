"""Blending on the model's torch device stores exactly the pixels of the numpy path.

CI has no GPU: the torch path runs here on torch's CPU device (``accumulate="torch"``),
which is the same code that runs on CUDA, tensor for tensor."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from models.architectures import build_module
from models.catalogue import BUILTIN_CARDS
from models.loading import save_weights
from workers.engine.device_blend import DeviceDenseSink, TorchMerger
from workers.engine.result_layout import DenseSink
from workers.engine.run import run_engine
from workers.engine.spec import RunSpec
from wsi.blending import StreamingMerger, weight_window
from wsi.ome_zarr import ChannelSpec, LabelSpec, ResultWriter


def _arrays(path: Path) -> dict[str, np.ndarray]:
    """Every full-resolution array of a result, by path."""
    root = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(node) for name, node in root.members(max_depth=None)
            if isinstance(node, zarr.Array) and name.split("/")[-1] == "0"}


def _run(slide: Path, model: str, out: Path, accumulate: str,
         caplog: pytest.LogCaptureFixture, **options: object) -> dict:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="workers.engine.infer"):
        run_engine(RunSpec(slide_path=slide, model=model, out_path=out, device="cpu",
                           extra={"accumulate": accumulate}, **options))  # type: ignore[arg-type]
    stages = [r.infer_stages for r in caplog.records if hasattr(r, "infer_stages")]
    assert len(stages) == 1
    return stages[0]


def test_identity_torch_and_numpy_paths_store_the_same_pixels(
    engine_slides: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Identity on real tissue, tissue tiles only (chunks at the tissue's edge with
    uncovered pixels): every stored array equal, max diff 0."""
    options = {"tile_px": 128, "overlap_px": 32, "chunk_px": 128}
    slide = engine_slides["svs"]
    on_numpy = _run(slide, "identity", tmp_path / "numpy.zarr", "numpy", caplog, **options)
    on_torch = _run(slide, "identity", tmp_path / "torch.zarr", "torch", caplog, **options)
    assert on_numpy["accumulate"] == "numpy" and on_torch["accumulate"] == "torch:cpu"
    assert on_torch["tiles"] == on_numpy["tiles"] > 10
    numpy_arrays, torch_arrays = _arrays(tmp_path / "numpy.zarr"), _arrays(tmp_path / "torch.zarr")
    assert numpy_arrays.keys() == torch_arrays.keys() >= {"0", "labels/classes/0"}
    for name, expected in numpy_arrays.items():
        diff = np.abs(torch_arrays[name].astype(np.int32) - expected.astype(np.int32))
        assert diff.max() == 0, f"{name}: max diff {diff.max()}"
    labels = numpy_arrays["labels/classes/0"]
    assert 0 < (labels > 0).mean() < 1  # some pixels uncovered: the zero-weight branch ran


def test_seeded_unet_torch_and_numpy_paths_store_the_same_pixels(
    engine_slides: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    card = BUILTIN_CARDS["unet"].model_copy(
        update={"name": "unet-device", "weights": "weights.safetensors", "target_mpp": 2.0,
                "tile_px": 128, "overlap_px": 32,
                "params": {"encoder_name": "resnet18", "encoder_depth": 3,
                           "decoder_channels": [32, 16, 8]}})
    save_weights(build_module(card), tmp_path / "card" / "weights.safetensors")
    card_path = str(card.save(tmp_path / "card"))
    slide = engine_slides["svs"]
    options = {"tissue_method": "none", "chunk_px": 64}
    _run(slide, card_path, tmp_path / "numpy.zarr", "numpy", caplog, **options)
    stages = _run(slide, card_path, tmp_path / "torch.zarr", "torch", caplog, **options)
    assert stages["accumulate"] == "torch:cpu"
    numpy_arrays, torch_arrays = _arrays(tmp_path / "numpy.zarr"), _arrays(tmp_path / "torch.zarr")
    assert numpy_arrays.keys() == torch_arrays.keys() >= {"0", "labels/classes/0"}
    for name, expected in numpy_arrays.items():
        np.testing.assert_array_equal(torch_arrays[name], expected, err_msg=name)
    probabilities = numpy_arrays["0"]
    assert probabilities.dtype == np.uint8 and len(np.unique(probabilities)) > 20


def test_torch_merger_sums_equal_numpy_merger_bit_for_bit(tmp_path: Path) -> None:
    shape, chunk, tile = (150, 170), 64, 48
    boxes = [(y, x, tile, tile) for y in range(-16, 150, 32) for x in range(-16, 170, 32)]
    tiles = np.random.default_rng(5).random((len(boxes), 2, tile, tile), dtype=np.float32)
    window = weight_window(tile, tile, kind="tent")
    got: dict[str, dict] = {"numpy": {}, "torch": {}}

    def keeper(into: dict) -> Callable[[int, int, object, object], None]:
        def keep(cy: int, cx: int, sums: object, weights: object) -> None:
            into[(cy, cx)] = (np.array(sums), np.array(weights))
        return keep

    common = {"channels": 2, "shape": shape, "chunk_px": chunk, "boxes": boxes,
              "window": window, "horizon": 2}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mergers = [
        StreamingMerger(sink=keeper(got["numpy"]), normalize=False, spill_dir=tmp_path / "a",
                        **common),  # type: ignore[arg-type]
        TorchMerger(device=torch.device("cpu"), sink=keeper(got["torch"]),
                    spill_dir=tmp_path / "b", **common),  # type: ignore[arg-type]
    ]
    for start in range(0, len(boxes), 5):
        wheres = [b[:2] for b in boxes[start : start + 5]]
        mergers[0].aggregate_batch(tiles[start : start + 5], wheres)
        mergers[1].aggregate_batch(torch.from_numpy(tiles[start : start + 5]), wheres)
    for merger in mergers:
        merger.finalize()
    assert mergers[1].chunks_spilled == mergers[0].chunks_spilled > 0
    assert got["numpy"].keys() == got["torch"].keys()
    for key, (sums, weights) in got["numpy"].items():
        np.testing.assert_array_equal(got["torch"][key][0], sums)
        np.testing.assert_array_equal(got["torch"][key][1], weights)


def test_device_sink_rounds_saturates_and_breaks_ties_like_the_numpy_sink(tmp_path: Path) -> None:
    """Crafted chunks: values exactly half-way between grey levels, above full scale,
    uncovered pixels, and tied classes; the two sinks write identical chunk files."""
    rng = np.random.default_rng(7)
    c, size = 3, 64
    weights = rng.uniform(0.001, 3, (size, size)).astype(np.float32)
    weights[:5] = 0
    sums = (rng.integers(0, 256, (c, size, size)) + 0.5).astype(np.float32) / 255
    sums *= weights
    sums[:, 10:12] = 2.0 * weights[10:12]  # above 1: saturates at 255
    sums[1, 20:30] = sums[0, 20:30]  # ties: the lower class wins
    written = {}
    for name in ("numpy", "torch"):
        writer = ResultWriter(tmp_path / f"{name}.zarr", height=size, width=size, mpp=1.0,
                              chunk_px=size)
        image = writer.create_image("", "p", [ChannelSpec(str(i), "FF0000") for i in range(c)])
        label = writer.create_label(LabelSpec("classes", {i + 1: (str(i), (255, 0, 0, 255))
                                                          for i in range(c)}))
        dense = DenseSink(writer.chunk_files(image), 1.0, writer.chunk_files(label))
        if name == "numpy":
            dense(0, 0, sums.copy(), weights.copy())
        else:
            DeviceDenseSink(dense)(0, 0, torch.from_numpy(sums.copy()),
                                   torch.from_numpy(weights.copy()))
        written[name] = (dense.image.read((0, 0, 0)), dense.classes.read((0, 0)))  # type: ignore[union-attr]
    for expected, got in zip(written["numpy"], written["torch"]):
        np.testing.assert_array_equal(got, expected)
    stored, labels = written["numpy"]
    assert (stored[:, 10:12] == 255).all() and not labels[:5].any()


def test_device_sink_stores_only_the_chunks_its_sink_owns(tmp_path: Path) -> None:
    """A part of a split run stores only its own chunks: the device sink asks the same
    ``owns``; a sink that overrides ``__call__`` instead gets host arrays."""

    class Owned(DenseSink):
        def owns(self, cy: int, cx: int) -> bool:
            return cx == 0

    class Filtering(DenseSink):
        def __call__(self, cy: int, cx: int, sums: np.ndarray, weights: np.ndarray) -> None:
            assert isinstance(sums, np.ndarray) and isinstance(weights, np.ndarray)
            if cx == 1:
                super().__call__(cy, cx, sums, weights)

    size = 32
    sums, weights = torch.full((2, size, size), 0.5), torch.ones(size, size)
    for kind, stored in ((Owned, {(0, 0)}), (Filtering, {(0, 1)})):
        writer = ResultWriter(tmp_path / f"{kind.__name__}.zarr", height=size, width=2 * size,
                              mpp=1.0, chunk_px=size)
        image = writer.create_image("", "p", [ChannelSpec("a", "FF0000"),
                                              ChannelSpec("b", "00FF00")])
        files = writer.chunk_files(image)
        sink = DeviceDenseSink(kind(files, 1.0, None))
        for cx in (0, 1):
            sink(0, cx, sums.clone(), weights.clone())
        written = {(0, cx) for cx in (0, 1) if files.read((0, 0, cx)).any()}
        assert written == stored
        assert (files.read((0, 0, min(stored)[1])) == 128).all()
