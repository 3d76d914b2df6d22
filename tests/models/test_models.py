"""Model cards, checkpoint loading and the torchvision-beside-CPU-torch shim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.architectures import build_module
from models.card import ModelCard, read_card
from models.catalogue import BUILTIN_CARDS, list_model_cards, resolve_card
from models.errors import CheckpointUnreadable, ModelCardInvalid, UnknownModel
from models.loading import LoadedModel, load_model, save_weights
from models.predictor import Predictor, resolve_device


def _small_unet_card(**update: object) -> ModelCard:
    return BUILTIN_CARDS["unet"].model_copy(update={
        "name": "small-unet", "weights": "weights.safetensors",
        "params": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]},
        **update,
    })


def test_torchvision_shim_only_when_needed() -> None:
    """In a fresh interpreter: does plain torchvision import? The shim must engage
    exactly when it does not, and smp must import and build a U-Net either way."""
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    plain_works = probe.returncode == 0
    if not plain_works:
        assert "torchvision::nms" in probe.stderr
    code = (
        "import models._torchvision_compat as c, torch;"
        "smp = c.import_smp();"
        "m = smp.Unet('resnet18', encoder_weights=None, classes=2);"
        "print(c.SHIM_ACTIVE, tuple(m(torch.zeros(1, 3, 64, 64)).shape))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    active, shape = done.stdout.strip().split(" ", 1)
    assert active == str(not plain_works)
    assert shape == "(1, 2, 64, 64)"


def test_builtin_and_folder_cards(tmp_path: Path) -> None:
    card = _small_unet_card()
    card.save(tmp_path / "small-unet")
    names = [c.name for c in list_model_cards(tmp_path)]
    assert names[:2] == ["identity", "unet"] and "small-unet" in names
    assert resolve_card("small-unet", tmp_path).source == (tmp_path / "small-unet" / "card.json").resolve()
    assert resolve_card(str(tmp_path / "small-unet" / "card.json")).name == "small-unet"
    with pytest.raises(UnknownModel, match="unknown model 'nope'; known models: identity, unet"):
        resolve_card("nope", tmp_path)
    with pytest.raises(UnknownModel):
        resolve_card("../../etc/card.json")


@pytest.mark.parametrize("field,value", [
    ("tile_px", -3), ("tile_px", 1_000_000), ("target_mpp", 0), ("name", "../x"),
    ("classes", []), ("architecture", "transformer"), ("unexpected", 1),
])
def test_invalid_cards_are_rejected(tmp_path: Path, field: str, value: object) -> None:
    data = BUILTIN_CARDS["identity"].model_dump(mode="json")
    data[field] = value
    (tmp_path / "card.json").write_text(json.dumps(data))
    with pytest.raises(ModelCardInvalid, match="invalid model card"):
        read_card(tmp_path)


def test_weights_roundtrip_and_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(1)
    card = _small_unet_card()
    module = build_module(card)
    sha = save_weights(module, tmp_path / "weights.safetensors")
    card_path = card.save(tmp_path)
    loaded = load_model(read_card(card_path))
    assert loaded.weights_sha256 == sha
    batch = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    expected = torch.softmax(module.eval()(torch.from_numpy(
        ((batch.transpose(0, 3, 1, 2) / 255.0 - np.array(card.normalization.mean)[:, None, None])
         / np.array(card.normalization.std)[:, None, None]).astype(np.float32))), 1).detach().numpy()
    got = Predictor(loaded, device="cpu")(batch)["probabilities"]
    assert np.allclose(got, expected, atol=1e-5)
    # a plain PyTorch state dict (as smp users save them) loads too
    torch.save(module.state_dict(), tmp_path / "weights.pt")
    assert load_model(read_card(card_path), weights=tmp_path / "weights.pt").weights_sha256
    # weights of another architecture do not fit
    other = _small_unet_card(params={"encoder_name": "resnet18", "encoder_depth": 4,
                                     "decoder_channels": [32, 16, 8, 8]})
    with pytest.raises(CheckpointUnreadable, match="do not fit"):
        load_model(other, weights=tmp_path / "weights.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointUnreadable, match="cannot read weights"):
        load_model(card, weights=tmp_path / "corrupt.safetensors")
    with pytest.raises(CheckpointUnreadable, match="no weights file"):
        load_model(card, weights=tmp_path / "missing.safetensors")


def test_predictor_folds_batchnorm_and_runs_channels_last() -> None:
    """The U-Net runs with BatchNorm folded into its convolutions and in channels-last
    memory (its CPU speed-up), matches the unfused module, and hands back C-contiguous
    NCHW arrays; the caller's module keeps its BatchNorm layers."""
    torch.manual_seed(2)
    card = _small_unet_card()
    module = build_module(card).eval()
    loaded = LoadedModel(card, module, None, None)
    fused = Predictor(loaded, device="cpu")
    plain = Predictor(loaded, device="cpu", fuse=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.module.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    assert fused.channels_last
    batch = np.random.default_rng(1).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    got, want = fused(batch)["probabilities"], plain(batch)["probabilities"]
    assert got.flags.c_contiguous and got.shape == (3, len(card.classes), 64, 64)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_unet_needs_weights_unless_random_init_is_asked_for() -> None:
    with pytest.raises(CheckpointUnreadable, match="needs a weights file"):
        load_model(BUILTIN_CARDS["unet"])
    assert load_model(BUILTIN_CARDS["unet"], allow_random_init=True).weights_sha256 is None


def test_identity_returns_its_input() -> None:
    batch = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    out = Predictor(load_model(BUILTIN_CARDS["identity"]), device="cpu")(batch)["probabilities"]
    assert np.array_equal(np.rint(out * 255).astype(np.uint8), batch.transpose(0, 3, 1, 2))


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelCardInvalid):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelCardInvalid, match="CUDA is not available"):
            resolve_device("cuda")
