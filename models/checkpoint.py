"""Training checkpoints: a model folder that the engine runs, plus the state to resume.

A checkpoint folder holds

``card.json`` + ``weights.safetensors``
    the model as the engine and the service load it (``models.catalogue``);
``checkpoint.pt``
    what resuming needs besides the weights: the step, the optimiser's and scheduler's
    state, and the random generators' state (tensors and plain values only, read back
    with ``weights_only=True``).

Every file is written to a temporary name and renamed into place, so an interrupted
write never leaves a half checkpoint that looks whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.card import ModelCard
from models.errors import CheckpointUnreadable
from models.loading import read_state_dict, save_weights

WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "checkpoint.pt"


def save_checkpoint(folder: Path, card: ModelCard, module: nn.Module, state: dict[str, Any]) -> str:
    """Write the model (card + weights) and the resume ``state``; returns the weights' sha256."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card = card.model_copy(update={"weights": WEIGHTS_FILE})
    tmp_weights = folder / f".{WEIGHTS_FILE}.tmp"
    sha = save_weights(module, tmp_weights)
    tmp_state = folder / f".{STATE_FILE}.tmp"
    torch.save(state, tmp_state)
    os.replace(tmp_weights, folder / WEIGHTS_FILE)
    os.replace(tmp_state, folder / STATE_FILE)
    card.save(folder)
    return sha


def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / STATE_FILE).is_file() and (Path(folder) / WEIGHTS_FILE).is_file()


def load_checkpoint(folder: Path, module: nn.Module) -> dict[str, Any]:
    """Load the weights into ``module`` and return the resume state."""
    folder = Path(folder)
    try:
        state: dict[str, Any] = torch.load(
            folder / STATE_FILE, map_location="cpu", weights_only=True
        )
    except Exception as err:  # pickle/zip errors of assorted types
        raise CheckpointUnreadable(f"cannot read {str(folder / STATE_FILE)!r}: {err}") from err
    try:
        module.load_state_dict(read_state_dict(folder / WEIGHTS_FILE), strict=True)
    except RuntimeError as err:
        raise CheckpointUnreadable(
            f"the checkpoint in {str(folder)!r} does not fit this model: {str(err)[:300]}"
        ) from err
    return state
