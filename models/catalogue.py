"""The model catalogue: finding model cards by name or path, without torch.

Names resolve, in order, to a built-in card or to ``<model_dir>/<name>/card.json``;
anything that looks like a path is read as a card. This module imports no torch, so the
API process lists models and checks jobs in a few megabytes; building a card's network
and loading its weights is :mod:`models.loading`'s job, in the worker.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from models.card import (
    CARD_FILE,
    IMAGENET,
    ClassSpec,
    ModelCard,
    Normalization,
    OutputSpec,
    read_card,
)
from models.errors import ModelCardInvalid, UnknownModel

log = logging.getLogger(__name__)

#: Inputs are scaled to [-1, 1] (tanh range) by the card's normalisation.
TANH_NORMALIZATION = Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
RGB_CLASSES = [
    ClassSpec(name="red", color="FF0000"),
    ClassSpec(name="green", color="00FF00"),
    ClassSpec(name="blue", color="0000FF"),
]



def cyclegan_card(
    name: str,
    *,
    target_mpp: float = 0.5,
    depth: int = 3,
    base_filters: int = 32,
    residual_blocks: int = 1,
    tile_px: int = 2048,
    kept_px: int = 1024,
    stride_px: int = 512,
    description: str = "",
    weights: str | None = None,
    extra_params: dict[str, Any] | None = None,
) -> ModelCard:
    """A card for one direction of a trained CycleGAN, with the paper's slide geometry
    by default: 2048 px tiles, the central 1024 kept, stride 512."""
    crop = (tile_px - kept_px) // 2
    if tile_px - 2 * crop != kept_px or kept_px <= 0:
        raise ModelCardInvalid(f"kept_px={kept_px} must leave an even margin of tile_px={tile_px}")
    return ModelCard(
        name=name,
        architecture="cyclegan",
        description=description or (
            "Stain-transforming CycleGAN generator (de Bel et al., MIDL 2019): RGB tile in, "
            "the same tissue in the target centre's stain out."
        ),
        classes=list(RGB_CLASSES),
        activation="none",
        target_mpp=target_mpp,
        tile_px=tile_px,
        overlap_px=tile_px - stride_px,
        output_crop_px=crop,
        normalization=TANH_NORMALIZATION,
        outputs=[OutputSpec(name="rgb", channels="rgb")],
        params={"depth": depth, "base_filters": base_filters,
                "residual_blocks": residual_blocks, **(extra_params or {})},
        weights=weights,
    )


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


