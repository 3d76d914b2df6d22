"""Finding model cards by name or path, and loading a card with its weights.

Names resolve, in order, to a built-in card or to ``<model_dir>/<name>/card.json``;
anything that looks like a path is read as a card. Weights are read from local files
only (safetensors, or a plain PyTorch state dict): nothing is downloaded, ever.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.architectures import build_module
from models.card import CARD_FILE, IMAGENET, ClassSpec, ModelCard, OutputSpec, read_card
from models.cyclegan import cyclegan_card
from models.errors import CheckpointUnreadable, UnknownModel

log = logging.getLogger(__name__)

BUILTIN_CARDS: dict[str, ModelCard] = {
    "identity": ModelCard(
        name="identity",
        architecture="identity",
        description="Returns the tile's RGB as a 3-channel map in [0, 1]; measures the "
        "engine's own cost and exactness with no network in the way.",
        classes=[
            ClassSpec(name="red", color="FF0000"),
            ClassSpec(name="green", color="00FF00"),
            ClassSpec(name="blue", color="0000FF"),
        ],
        activation="none",
        target_mpp=0.5,
        tile_px=256,
        overlap_px=32,
    ),
    "unet": ModelCard(
        name="unet",
        architecture="unet",
        description="segmentation-models-pytorch U-Net (ResNet-18 encoder) for tissue "
        "background vs tissue; needs a weights file (--weights).",
        classes=[
            ClassSpec(name="background", color="000000"),
            ClassSpec(name="tissue", color="FF00FF"),
        ],
        target_mpp=1.0,
        tile_px=512,
        overlap_px=64,
        normalization=IMAGENET,
        params={"encoder_name": "resnet18"},
    ),
    "joint": ModelCard(
        name="joint",
        architecture="joint",
        description="Joint classification-segmentation ResNet-18 (Ciga & Martel, 'Learning "
        "to segment images with classification labels'): 128 px patches at 1.25x (8 µm/px), "
        "BACH classes; a segmentation map and per-tile class scores. Needs a weights file "
        "(slidepipe train joint, or slidepipe models init).",
        classes=[
            ClassSpec(name="normal", color="00A000"),
            ClassSpec(name="benign", color="FFD000"),
            ClassSpec(name="in situ", color="FF8000"),
            ClassSpec(name="invasive", color="E00000"),
        ],
        target_mpp=8.0,
        tile_px=128,
        overlap_px=32,
        normalization=IMAGENET,
        outputs=[OutputSpec(name="probabilities"),
                 OutputSpec(name="tile_scores", kind="per_tile")],
    ),
}
BUILTIN_CARDS["cyclegan"] = cyclegan_card(
    "cyclegan",
    description="Stain-transforming CycleGAN generator (de Bel et al., MIDL 2019), depth 3, "
    "32 filters: 2048 px tiles, the central 1024 kept, stride 512. Needs a weights file "
    "(slidepipe train cyclegan writes one card per direction).",
)


def _looks_like_path(name: str) -> bool:
    return name.endswith(".json") or "/" in name or "\\" in name


def list_model_cards(model_dir: Path | None = None) -> list[ModelCard]:
    """The built-in cards, then every ``<model_dir>/*/card.json`` that reads cleanly."""
    cards = list(BUILTIN_CARDS.values())
    if model_dir is not None and Path(model_dir).is_dir():
        for card_path in sorted(Path(model_dir).glob(f"*/{CARD_FILE}")):
            try:
                cards.append(read_card(card_path))
            except Exception as err:  # one broken card must not hide the others
                log.warning("skipping model card %s: %s", card_path, err)
    return cards


def resolve_card(name_or_path: str, model_dir: Path | None = None) -> ModelCard:
    """The card for a built-in name, a model folder name, or a card path."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        if not path.exists():
            raise UnknownModel(f"no model card at {name_or_path!r}")
        return read_card(path)
    if name_or_path in BUILTIN_CARDS:
        return BUILTIN_CARDS[name_or_path]
    if model_dir is not None:
        candidate = Path(model_dir) / name_or_path / CARD_FILE
        if candidate.is_file():
            return read_card(candidate)
    known = [card.name for card in list_model_cards(model_dir)]
    raise UnknownModel(f"unknown model {name_or_path!r}; known models: {', '.join(known)}")


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


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
