"""Blending quality against a whole-image pass, the OME-Zarr contract (read back with
ome-zarr-py, an independent reader), atomic publication and cancellation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from models.architectures import build_module
from models.card import ModelCard
from models.catalogue import BUILTIN_CARDS
from models.loading import load_model, save_weights
from models.predictor import Predictor
from workers.engine.run import run_engine
from workers.engine.spec import Progress, RunCancelled, RunSpec
from wsi.errors import OutputExists, SlideUnreadable
from wsi.ome_zarr import full_scale
from wsi.reader import Slide

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def unet_card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, randomly initialised 2-class U-Net saved as a real card + weights."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("unet")
    card = BUILTIN_CARDS["unet"].model_copy(
        update={"name": "unet-test", "weights": "weights.safetensors", "target_mpp": 1.0,
                "tile_px": 256, "overlap_px": 64,
                "params": {"encoder_name": "resnet18", "encoder_depth": 4,
                           "decoder_channels": [64, 32, 16, 8]}}
    )
    module = build_module(card)
    save_weights(module, folder / "weights.safetensors")
    return card.save(folder)


def _mae_vs_whole(slide: Path, card_path: Path, window: str, tmp_path: Path,
                  probability_dtype: str = "uint8") -> float:
    out = tmp_path / f"{window}-{probability_dtype}.zarr"
    run_engine(RunSpec(slide_path=slide, model=str(card_path), out_path=out, window=window,
                       tissue_method="none", device="cpu", chunk_px=256,
                       probability_dtype=probability_dtype))
    stored = np.asarray(zarr.open_group(str(out), mode="r")["0"])
    assert stored.dtype == np.dtype(probability_dtype)
    tiled = stored.astype(np.float32) / full_scale(stored.dtype)
    from models.card import read_card

    card = read_card(card_path)
    predictor = Predictor(load_model(card), device="cpu")
    with Slide(slide) as s:
        mpp = s.grid_mpp(card.target_mpp)
        width, height = s.scaled_dimensions(mpp)
        # one pass over the whole region, padded to the U-Net's multiple of 32 with white
        padded_h, padded_w = -(-height // 32) * 32, -(-width // 32) * 32
        image = s.read_scaled(mpp, 0, 0, padded_w, padded_h)
    whole = predictor(image[None])["probabilities"][0][:, :height, :width]
    return float(np.abs(tiled - whole).mean())


def test_blended_unet_close_to_whole_image_pass(
    engine_slides: dict[str, Path], unet_card: Path, tmp_path: Path
) -> None:
    """The tent-blended result differs from one whole-image pass by a small mean
    absolute probability error, smaller than plain averaging of the same tiles."""
    slide = engine_slides["svs"]  # 750 x 650 px at 1 µm/px: fits one pass in memory
    tent = _mae_vs_whole(slide, unet_card, "tent", tmp_path)
    gaussian = _mae_vs_whole(slide, unet_card, "gaussian", tmp_path)
    constant = _mae_vs_whole(slide, unet_card, "constant", tmp_path)
    log.info("seam MAE vs whole pass: tent %.4f gaussian %.4f constant %.4f",
             tent, gaussian, constant)
    assert tent < 0.03, tent
    assert gaussian < 0.03, gaussian
    assert tent < constant, (tent, constant)


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_finer_probability_types_store_the_blend_at_finer_steps(
    engine_slides: dict[str, Path], unet_card: Path, tmp_path: Path, dtype: str
) -> None:
    """``probability_dtype`` uint16 / float32: the probability pyramid has that type
    (display window up to its full scale) and ome-zarr-py reads it, the class map is the
    uint8 run's, the values are the uint8 ones without the 1/255 rounding, the seam error
    against a whole-image pass drops with the quantisation, and heatmaps render."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from wsi.heatmap import render_heatmap

    slide = engine_slides["small"]
    coarse = _mae_vs_whole(slide, unet_card, "gaussian", tmp_path)
    fine = _mae_vs_whole(slide, unet_card, "gaussian", tmp_path, dtype)
    log.info("seam MAE vs whole pass, gaussian: uint8 %.6f %s %.6f", coarse, dtype, fine)
    assert fine < coarse

    r8, fine_root = (zarr.open_group(str(tmp_path / f"gaussian-{d}.zarr"), mode="r")
                     for d in ("uint8", dtype))
    np.testing.assert_array_equal(np.asarray(fine_root["labels/classes/0"]),
                                  np.asarray(r8["labels/classes/0"]))
    top = full_scale(dtype)
    p8 = np.asarray(r8["0"]).astype(np.float64) / 255
    p_fine = np.asarray(fine_root["0"]).astype(np.float64) / top
    assert np.abs(p_fine - p8).max() <= 0.5 / 255 + 0.5 / 65535 + 1e-6
    assert fine_root.attrs["omero"]["channels"][0]["window"]["end"] == top
    image = next(iter(Reader(parse_url(str(tmp_path / f"gaussian-{dtype}.zarr")))()))
    assert [str(level.dtype) for level in image.data] == [dtype] * len(image.data)
    assert [tuple(level.shape[1:]) for level in image.data[:2]] == [(260, 350), (130, 175)]
    heat8 = render_heatmap(tmp_path / "gaussian-uint8.zarr", max_px=256).astype(int)
    heat_fine = render_heatmap(tmp_path / f"gaussian-{dtype}.zarr", max_px=256).astype(int)
    assert heat_fine.shape == heat8.shape and np.abs(heat_fine - heat8).mean() < 1.0


def test_result_opens_in_ome_zarr_py(engine_slides: dict[str, Path], unet_card: Path, tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    out = tmp_path / "r.zarr"
    run_engine(RunSpec(slide_path=engine_slides["svs"], model=str(unet_card), out_path=out,
                       device="cpu", chunk_px=128))
    nodes = list(Reader(parse_url(str(out)))())
    image = nodes[0]
    assert image.specs and any(isinstance(s, Multiscales) for s in image.specs)
    axes = image.metadata["axes"]
    assert [a["name"] for a in axes] == ["c", "y", "x"]
    assert [a.get("unit") for a in axes[1:]] == ["micrometer", "micrometer"]
    scales = [t[0]["scale"] for t in image.metadata["coordinateTransformations"]]
    assert scales[0] == [1.0, 1.0, 1.0]
    for level, scale in enumerate(scales):
        assert scale[1:] == [2.0**level, 2.0**level]
    pyramid = image.data
    assert pyramid[0].shape == (2, 650, 750)
    assert [tuple(a.shape[1:]) for a in pyramid[:3]] == [(650, 750), (325, 375), (163, 188)]
    assert image.metadata["channel_names"] == ["background", "tissue"]

    labels = {n.metadata.get("name"): n for n in nodes if any(isinstance(s, Label) for s in n.specs)}
    assert set(labels) == {"classes", "tissue"}
    colours = labels["classes"].metadata["color"]
    assert colours[1] == [0.0, 0.0, 0.0, 1.0]  # background, black
    assert colours[2] == [1.0, 0.0, 1.0, 1.0]  # tissue, FF00FF
    assert len(labels["classes"].data) == len(pyramid)
    class_map = np.asarray(labels["classes"].data[0])
    assert set(np.unique(class_map)) <= {0, 1, 2}
    tissue = np.asarray(labels["tissue"].data[0])
    assert 0.05 < tissue.mean() < 0.95

    provenance = json.loads((out / ".zattrs").read_text())["slidepipe"]
    assert provenance["model_card"]["name"] == "unet-test"
    assert len(provenance["weights_sha256"]) == 64
    assert len(provenance["slide"]["sha256"]) == 64
    assert provenance["versions"]["torch"].startswith("2.")
    assert set(provenance["timings_s"]) >= {"tissue", "infer", "pyramid"}


def test_failed_run_leaves_nothing(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-slide.svs"
    bogus.write_bytes(b"hello" * 1000)
    out = tmp_path / "r.zarr"
    with pytest.raises(SlideUnreadable, match="not-a-slide.svs"):
        run_engine(RunSpec(slide_path=bogus, model="identity", out_path=out))
    assert list(tmp_path.iterdir()) == [bogus]


def test_cancel_between_batches_publishes_nothing(engine_slides: dict[str, Path], tmp_path: Path) -> None:
    seen: list[Progress] = []
    out = tmp_path / "r.zarr"
    with pytest.raises(RunCancelled):
        run_engine(
            RunSpec(slide_path=engine_slides["svs"], model="identity", out_path=out,
                    tissue_method="none", tile_px=128, overlap_px=0, batch_size=4),
            progress=seen.append,
            cancel=lambda: any(p.stage == "infer" and p.done >= 8 for p in seen),
        )
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    infer = [p for p in seen if p.stage == "infer"]
    assert infer[-1].done < infer[-1].total


def test_progress_and_overwrite(engine_slides: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.zarr"
    seen: list[Progress] = []
    spec = RunSpec(slide_path=engine_slides["small"], model="identity", out_path=out,
                   tile_px=128, overlap_px=32)
    run_engine(spec, progress=seen.append)
    stages = [p.stage for p in seen]
    assert stages[0] == "open" and stages[-1] == "done"
    assert stages.index("tissue") < stages.index("infer") < stages.index("pyramid")
    done = [p.done for p in seen if p.stage == "infer"]
    assert done == sorted(done) and done[-1] == seen[[p.stage for p in seen].index("infer")].total
    with pytest.raises(OutputExists):
        run_engine(spec)
    run_engine(RunSpec(**{**spec.__dict__, "overwrite": True}))
    assert (out / ".zattrs").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["r.zarr"]


def test_bad_parameters_are_rejected_before_work(engine_slides: dict[str, Path], tmp_path: Path) -> None:
    from wsi.errors import InvalidParameter

    out = tmp_path / "r.zarr"
    for bad in ({"tile_px": -5}, {"tile_px": 100_000}, {"overlap_px": 256},
                {"target_mpp": -1.0}, {"batch_size": 0}, {"tissue_method": "magic"}):
        with pytest.raises(InvalidParameter):
            run_engine(RunSpec(slide_path=engine_slides["small"], model="identity",
                               out_path=out, **bad))
        assert not out.exists()


def test_card_geometry_mismatch_is_reported(engine_slides: dict[str, Path], tmp_path: Path) -> None:
    from models.errors import ModelCardInvalid

    card = ModelCard.model_validate(
        {**BUILTIN_CARDS["identity"].model_dump(), "name": "liar", "output_stride": 2}
    )
    card_path = card.save(tmp_path / "liar")
    # the identity model honours the stride, so break the promise through the classes
    data = json.loads(card_path.read_text())
    data["classes"] = data["classes"][:2]
    card_path.write_text(json.dumps(data))
    with pytest.raises(ModelCardInvalid, match="has 3 channels but its card implies 2"):
        run_engine(RunSpec(slide_path=engine_slides["small"], model=str(card_path),
                           out_path=tmp_path / "r.zarr"))
