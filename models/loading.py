"""Loading a model: build a card's network and read its weights from a local file.

Weights are read from local files only (safetensors, or a plain PyTorch state dict):
nothing is downloaded, ever. Cards themselves are found by :mod:`models.catalogue`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.architectures import build_module
from models.card import ModelCard
from models.catalogue import sha256_file
from models.errors import CheckpointUnreadable

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    card: ModelCard
    module: nn.Module
    weights_path: Path | None
    weights_sha256: str | None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a PyTorch file (tensors only, no pickled code)."""
    if not path.is_file():
        raise CheckpointUnreadable(f"no weights file at {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors/pickle raise assorted types on corrupt files
        raise CheckpointUnreadable(f"cannot read weights {str(path)!r}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state:  # Lightning-style checkpoints
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointUnreadable(f"{str(path)!r} holds no state dict")
    return state


def load_model(
    card: ModelCard, *, weights: Path | None = None, allow_random_init: bool = False
) -> LoadedModel:
    """Build the card's module and load its weights (``weights`` overrides the card's)."""
    module = build_module(card)
    path = Path(weights) if weights is not None else card.weights_path()
    has_parameters = any(True for _ in module.parameters())
    if path is None:
        if has_parameters and not allow_random_init:
            raise CheckpointUnreadable(
                f"model {card.name!r} needs a weights file: pass --weights, or use a card "
                "whose 'weights' names one (slidepipe models init writes a fresh one)"
            )
        if has_parameters:
            log.warning("model %s runs with randomly initialised weights", card.name)
        module.eval()
        return LoadedModel(card, module, None, None)
    state = read_state_dict(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointUnreadable(
            f"weights {str(path)!r} do not fit architecture {card.architecture!r} "
            f"of card {card.name!r}: {str(err)[:500]}"
        ) from err
    module.eval()
    return LoadedModel(card, module, path, sha256_file(path))


def save_weights(module: nn.Module, path: Path) -> str:
    """Write ``module``'s weights as safetensors; returns their sha256."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path))
    return sha256_file(path)
