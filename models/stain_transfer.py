"""Stain steps: callables that map a batch of uint8 RGB tiles to uint8 RGB tiles.

A job may run a stain step before its model, in the same pass over the tiles: the
engine reads a batch, the step transforms it, the model sees the transformed batch.
Two steps exist:

* :class:`CycleGANStep` runs one generator of a trained stain-transforming CycleGAN
  (de Bel et al.) on each whole tile (the segmenter's tile, no crop).
* :class:`MacenkoStep` applies Macenko normalisation with source stains fitted once per
  slide, so that every tile of the slide gets the same transform.

:class:`StainedPredictor` chains a step before a :class:`~models.predictor.Predictor`
and, on request, also returns the stained tiles as an extra dense ``stained`` output
(cropped and strided to the model's output grid), so that the intermediate slide is
written only when asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from models.card import ModelCard, OutputSpec
from models.loading import LoadedModel, load_model
from models.macenko import MacenkoNormalizer
from models.predictor import Predictor

#: The name of the stained RGB output a chain stores when asked to.
STAINED_OUTPUT = OutputSpec(name="stained", channels="rgb")


class StainStep(Protocol):
    """uint8 (n, h, w, 3) -> uint8 (n, h, w, 3), and what provenance records of it."""

    def __call__(self, batch: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]: ...

    def describe(self) -> dict[str, Any]: ...


class CycleGANStep:
    """One CycleGAN generator applied to whole tiles (the card's crop is not used)."""

    def __init__(
        self, card: ModelCard, *, device: str = "auto", weights: Path | None = None
    ) -> None:
        if card.architecture != "cyclegan":
            raise ValueError(f"model {card.name!r} is a {card.architecture}, not a cyclegan")
        full = card.model_copy(update={"output_crop_px": 0})
        self.loaded: LoadedModel = load_model(full, weights=weights)
        self.card = card
        self.predictor = Predictor(self.loaded, device=device)

    def __call__(self, batch: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        rgb = self.predictor(batch)[self.card.outputs[0].name]  # (n, 3, h, w) in [0, 1]
        out = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(out.transpose(0, 2, 3, 1))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "stain",
            "method": "cyclegan",
            "model_card": self.card.model_dump(mode="json"),
            "weights_sha256": self.loaded.weights_sha256,
            "device": str(self.predictor.device),
        }


class MacenkoStep:
    """Macenko normalisation with the source's stains fitted beforehand (:meth:`fit`)."""

    def __init__(self, normalizer: MacenkoNormalizer, reference_name: str) -> None:
        self.normalizer = normalizer
        self.reference_name = reference_name

    def __call__(self, batch: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        return self.normalizer(batch)

    def describe(self) -> dict[str, Any]:
        source = self.normalizer.source
        return {
            "kind": "stain",
            "method": "macenko",
            "reference": self.reference_name,
            "reference_stains": self.normalizer.reference.to_dict(),
            "source_stains": source.to_dict() if source is not None else None,
        }


def crop_to_output(
    batch: npt.NDArray[np.uint8], crop_px: int, stride: int
) -> npt.NDArray[np.float32]:
    """uint8 (n, h, w, 3) tiles -> float32 (n, 3, h', w') in [0, 1] on a model's output
    grid: ``crop_px`` dropped per side, ``stride`` x ``stride`` blocks averaged."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 255.0
    if crop_px:
        x = x[..., crop_px:-crop_px, crop_px:-crop_px]
    if stride > 1:
        x = torch.nn.functional.avg_pool2d(x, stride)
    return x.numpy()


class StainedPredictor:
    """A stain step, then a model: quacks like the :class:`Predictor` it wraps."""

    def __init__(self, step: StainStep, predictor: Predictor, *, keep_stained: bool = False) -> None:
        self.step, self.predictor, self.keep_stained = step, predictor, keep_stained
        self.card = predictor.card
        self.device = predictor.device

    def __call__(self, batch: npt.NDArray[np.uint8]) -> dict[str, npt.NDArray[np.float32]]:
        stained = self.step(batch)
        outputs = self.predictor(stained)
        if self.keep_stained:
            outputs[STAINED_OUTPUT.name] = crop_to_output(
                stained, self.card.output_crop_px, self.card.output_stride)
        return outputs

    @property
    def extra_outputs(self) -> list[OutputSpec]:
        """The wrapped predictor's extra dense outputs, then ``stained`` when kept."""
        extra = list(getattr(self.predictor, "extra_outputs", []))
        return extra + ([STAINED_OUTPUT] if self.keep_stained else [])

    def check_output_geometry(self, tile_px: int, expected_px: int) -> None:
        self.predictor.check_output_geometry(tile_px, expected_px)
