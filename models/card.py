"""Model cards: everything the engine needs to know about a model besides its weights.

A card is a JSON file (``card.json``) beside its weights file. It fixes the architecture
and its parameters, the classes and their colours, the resolution the model was trained
at (``target_mpp``), the tile geometry, how the model maps input to output pixels, and the
input normalisation. Jobs may override tile size and overlap, never the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.errors import ModelCardInvalid

CARD_FILE = "card.json"


class ClassSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    color: str = Field(pattern=r"^#?[0-9A-Fa-f]{6}$")


class Normalization(BaseModel):
    """x -> (x / 255 - mean) / std, per RGB channel."""

    model_config = ConfigDict(extra="forbid")

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError(f"std must be positive, got {v}")
        return v


class OutputSpec(BaseModel):
    """One output of a model, as the engine stores it.

    ``dense`` outputs are (C, h, w) maps that are blended into a multiscale image
    (the first dense output is the result's root image); ``per_tile`` outputs are one
    vector per tile, stored on the tile grid. ``channels``: one per class, or RGB.
    Values in [0, ``max_value``] are stored as uint8.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    kind: Literal["dense", "per_tile"] = "dense"
    channels: Literal["classes", "rgb"] = "classes"
    max_value: float = Field(default=1.0, gt=0)


#: Outputs whose raw values are logits: the card's ``activation`` turns them into
#: probabilities. Every other output is used as the model returns it.
ACTIVATED_OUTPUTS = ("probabilities", "tile_scores")

IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


class AnnotatorQuality(BaseModel):
    """How one annotator of a model's training labels did, per class one-vs-all:
    sensitivity (alpha), specificity (beta) and spammer score ``(alpha + beta - 1)^2`` (0:
    its answers ignore the truth), at one ``level`` (pixels of masks, or tile labels),
    over the ``labelled`` items it labelled (``models.crowd``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    level: Literal["pixel", "tile"]
    labelled: int = Field(ge=0)
    sensitivity: dict[str, float]
    specificity: dict[str, float]
    spammer_score: dict[str, float]


class CrowdRecord(BaseModel):
    """The annotators a model was trained from and how their labels were aggregated:
    ``aggnet`` (their alpha and beta are AggNet's EM estimates) or ``majority`` (alpha and
    beta of each against the majority vote)."""

    model_config = ConfigDict(extra="forbid")

    aggregate: Literal["majority", "aggnet"]
    annotators: list[AnnotatorQuality]


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    architecture: Literal["identity", "unet", "joint", "cyclegan"]
    description: str = ""
    classes: list[ClassSpec] = Field(min_length=1, max_length=255)
    #: What the network's raw output is turned into: class probabilities or pass-through.
    activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    target_mpp: float = Field(gt=0, le=256)
    tile_px: int = Field(ge=16, le=8192)
    overlap_px: int = Field(ge=0, le=8191)
    output_stride: int = Field(default=1, ge=1, le=64)
    output_crop_px: int = Field(default=0, ge=0, le=4096)
    normalization: Normalization = Normalization()
    outputs: list[OutputSpec] = Field(
        default_factory=lambda: [OutputSpec(name="probabilities")], min_length=1
    )
    params: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None  # file name relative to the card's folder
    #: trained from several annotators: who they were and how reliable (None: one set)
    crowd: CrowdRecord | None = None
    source: Path | None = Field(default=None, exclude=True)  # where the card was read from

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @field_validator("outputs")
    @classmethod
    def _outputs_valid(cls, v: list[OutputSpec]) -> list[OutputSpec]:
        names = [o.name for o in v]
        if len(set(names)) != len(names):
            raise ValueError(f"output names must be unique, got {names}")
        if v[0].kind != "dense":
            raise ValueError(f"the first output must be dense (the root image), got {v[0].kind}")
        return v

    def weights_path(self) -> Path | None:
        if self.weights is None:
            return None
        base = self.source.parent if self.source is not None else Path.cwd()
        return base / self.weights

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CARD_FILE
        data = self.model_dump(mode="json")
        if data.get("crowd") is None:  # cards of one annotator stay as they were
            data.pop("crowd", None)
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path


def read_card(path: Path) -> ModelCard:
    """Read a card from ``path`` (a card JSON, or a folder holding ``card.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / CARD_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelCardInvalid(f"cannot read model card {str(path)!r}: {err}") from err
    try:
        card = ModelCard.model_validate(data)
    except ValidationError as err:
        raise ModelCardInvalid(f"invalid model card {str(path)!r}: {err}") from err
    return card.model_copy(update={"source": path.resolve()})
