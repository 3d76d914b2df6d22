"""Training runs of the segmenters (``unet``, ``joint``): data in, a model folder out.

:func:`run_training` is the plain function behind ``slidepipe train {unet,joint}``: it
reads the data (``workers.training.data``), splits it by group (slide/patient), builds
the card and the module, trains (``models.seg_training.fit``) and leaves in ``out_dir``::

    card.json, weights.safetensors   the model, runnable by the engine and the service
    checkpoint.pt                    optimiser/step/RNG state, for --resume
    metrics.jsonl                    one JSON object per step ("train") and evaluation ("val")
    training.json                    data summary, configuration, final metrics
                                     (and, with several annotators, their alpha/beta/S)

With ``TrainSpec.aggregate`` the data come from several annotators
(``workers.training.crowd_data``): ``majority`` trains on their majority vote, ``aggnet``
on AggNet's EM aggregation of their labels inside training (``models.aggnet.AggNet``);
either way the card's ``crowd`` and ``training.json`` record each annotator's
sensitivity, specificity and spammer score.

:func:`init_model` writes a card with freshly initialised weights (``slidepipe models init``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.aggnet import AggNet, majority_report
from models.architectures import build_module, count_parameters
from models.card import CARD_FILE, ClassSpec, CrowdRecord, ModelCard, read_card
from models.catalogue import BUILTIN_CARDS
from models.checkpoint import STATE_FILE, WEIGHTS_FILE, has_checkpoint
from models.crowd import CrowdLabels, labelled_patches
from models.errors import ModelCardInvalid
from models.loading import save_weights
from models.metrics import IGNORE
from models.patches import (
    PatchDataset,
    TrainingDataInvalid,
    group_split,
    limit_masks,
    masked_area_share,
)
from models.seg_training import FitConfig, FitResult, fit, uses_labels
from workers.training.crowd_data import load_crowd_sources
from workers.training.data import (
    SlideSource,
    find_annotations,
    load_slides,
    load_tile_folder,
    read_manifest,
)

log = logging.getLogger(__name__)

TRAINABLE = ("unet", "joint")
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "training.json"
PALETTE = ("000000", "E6194B", "3CB44B", "4363D8", "F58231", "911EB4", "42D4F4", "F032E6",
           "BFEF45", "FABED4", "469990", "DCBEFF", "9A6324", "800000", "AAFFC3", "000075")


def parse_classes(values: Sequence[str]) -> list[ClassSpec]:
    """``["tumour", "stroma:00FF00"]`` or ``["tumour,stroma"]`` -> class specs (colours
    from a palette unless given as ``name:RRGGBB``)."""
    names: list[str] = [v.strip() for value in values for v in value.split(",") if v.strip()]
    specs = []
    for i, item in enumerate(names):
        name, _, color = item.partition(":")
        specs.append(ClassSpec(name=name.strip(), color=(color.strip().lstrip("#")
                                                         or PALETTE[i % len(PALETTE)])))
    if len({s.name for s in specs}) != len(specs):
        raise ModelCardInvalid(f"class names must be unique, got {[s.name for s in specs]}")
    return specs


def make_card(architecture: str, *, name: str, classes: Sequence[ClassSpec] | None = None,
              target_mpp: float | None = None, tile_px: int | None = None,
              overlap_px: int | None = None, encoder: str | None = None,
              classifier: str | None = None, description: str | None = None) -> ModelCard:
    """The built-in card of ``architecture`` with the given changes, naming its weights."""
    if architecture not in BUILTIN_CARDS or architecture == "identity":
        raise ModelCardInvalid(f"cannot make a trainable card for {architecture!r}")
    base = BUILTIN_CARDS[architecture]
    update: dict[str, Any] = {"name": name, "weights": WEIGHTS_FILE}
    if classes:
        update["classes"] = list(classes)
    if target_mpp is not None:
        update["target_mpp"] = target_mpp
    if tile_px is not None:
        update["tile_px"] = tile_px
        update["overlap_px"] = overlap_px if overlap_px is not None else tile_px // 4
    elif overlap_px is not None:
        update["overlap_px"] = overlap_px
    if encoder is not None:
        if architecture != "unet":
            raise ModelCardInvalid("--encoder applies to unet only")
        update["params"] = {**base.params, "encoder_name": encoder}
    if classifier is not None:
        if architecture != "joint":
            raise ModelCardInvalid("--classifier applies to joint only")
        update["params"] = {**base.params, "classifier": classifier}
    if description is not None:
        update["description"] = description
    return ModelCard.model_validate({**base.model_dump(), **update})


def init_model(architecture: str, out_dir: Path, *, name: str | None = None,
               classes: Sequence[ClassSpec] | None = None, seed: int = 0,
               **card_args: Any) -> tuple[Path, int]:
    """A card with freshly initialised (seeded) weights in ``out_dir``; returns the card
    path and the parameter count."""
    out_dir = Path(out_dir)
    card = make_card(architecture, name=name or out_dir.name, classes=classes,
                     description=f"{BUILTIN_CARDS[architecture].description} Freshly "
                     f"initialised weights (seed {seed}): a starting point, not a trained model.",
                     **card_args)
    torch.manual_seed(seed)
    module = build_module(card)
    save_weights(module, out_dir / WEIGHTS_FILE)
    return card.save(out_dir), count_parameters(module)


@dataclass(frozen=True)
class TrainSpec:
    """One training run. Data: any of ``tiles`` (folders), ``labels_csv``, ``slides``
    (annotations found beside them) and ``manifest``."""

    architecture: str
    out_dir: Path
    name: str | None = None
    classes: tuple[ClassSpec, ...] = ()
    tiles: tuple[Path, ...] = ()
    labels_csv: Path | None = None
    slides: tuple[Path, ...] = ()
    manifest: Path | None = None
    mpp: float | None = None  # default: the card's target_mpp
    tile_px: int | None = None  # default: the card's
    stride_px: int | None = None  # patch grid stride on slides (default: tile_px)
    min_tissue: float = 0.75
    unannotated: str | None = None
    label_rule: tuple[float, ...] | None = None
    mask_fraction: float = 1.0
    val_fraction: float = 0.2
    encoder: str | None = None
    classifier: str | None = None  # joint: "head" (the paper's) or "max" (the authors' code)
    fit: FitConfig = field(default_factory=FitConfig)
    #: several annotators (``workers.training.crowd_data``): "majority" or "aggnet"
    aggregate: str | None = None
    em_every: int = 0  # aggnet: steps per EM round (one M-step); 0: one epoch
    gold_annotator: str | None = None  # aggnet: whose answers are the truth
    gold_weight: float = 0.5  # aggnet: tau, the pull towards agreement with the gold
    resume: bool = False
    overwrite: bool = False


@dataclass
class TrainResult:
    out_dir: Path
    card_path: Path
    data: dict[str, dict[str, Any]]  # "train", "val": PatchDataset.summary() and more
    fit: FitResult
    seconds: float


def load_training_data(spec: TrainSpec, card: ModelCard,
                       progress: Callable[[int, int], None] | None = None,
                       ) -> tuple[PatchDataset, PatchDataset]:
    """(train, validation) patches of ``spec``'s sources, split by group."""
    parts: list[PatchDataset] = []
    splits: list[np.ndarray] = []
    rule = list(spec.label_rule) if spec.label_rule else None
    if spec.labels_csv is not None and not spec.tiles:
        raise TrainingDataInvalid("a labels CSV belongs to a tile folder: pass --tiles too")
    for i, folder in enumerate(spec.tiles):
        part = load_tile_folder(folder, card.classes, tile_px=card.tile_px,
                                labels_csv=spec.labels_csv if i == 0 else None, label_rule=rule)
        parts.append(part)
        splits.append(np.full(len(part), "", object))
    sources = [SlideSource(Path(s), find_annotations(Path(s))) for s in spec.slides]
    if spec.manifest is not None:
        sources += read_manifest(spec.manifest)
    if sources:
        part, split = load_slides(sources, card.classes, progress=progress,
                                  mpp=card.target_mpp, patch_px=card.tile_px,
                                  stride_px=spec.stride_px, min_tissue=spec.min_tissue,
                                  label_rule=rule, unannotated=spec.unannotated)
        parts.append(part)
        splits.append(split)
    if not parts:
        raise TrainingDataInvalid("no training data: pass --tiles, --slides or --manifest")
    data = PatchDataset.concat(parts)
    if not len(data):
        raise TrainingDataInvalid("the training data hold no usable patch")
    train_idx, val_idx = split_indices(data, np.concatenate(splits), spec)
    return data.subset(train_idx), data.subset(val_idx)


def split_indices(data: PatchDataset, split: np.ndarray,
                  spec: TrainSpec) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: a manifest's ``split`` column decides where it gives
    one (``"train"``/``"val"``); whole groups of the rest go by ``spec.val_fraction``."""
    fixed_val, fixed_train = split == "val", split == "train"
    free = np.flatnonzero(~fixed_val & ~fixed_train)
    if fixed_val.any():  # a manifest decides; the rest trains
        return np.flatnonzero(~fixed_val), np.flatnonzero(fixed_val)
    tr, va = group_split(data.groups[free], spec.val_fraction, spec.fit.seed)
    return np.concatenate([np.flatnonzero(fixed_train), free[tr]]), free[va]


def load_crowd_training_data(spec: TrainSpec, card: ModelCard,
                             ) -> tuple[PatchDataset, PatchDataset, CrowdLabels]:
    """(train, validation, the training patches' annotators) of ``spec``'s sources
    read as several annotators' labels; train and validation hold the majority vote."""
    if spec.labels_csv is not None and not spec.tiles:
        raise TrainingDataInvalid("a labels CSV belongs to a tile folder: pass --tiles too")
    sources = [SlideSource(Path(s)) for s in spec.slides]
    if spec.manifest is not None:
        sources += read_manifest(spec.manifest)
    data, crowd, split = load_crowd_sources(
        card.classes, tiles=spec.tiles, labels_csv=spec.labels_csv, slides=sources,
        tile_px=card.tile_px, mpp=card.target_mpp, stride_px=spec.stride_px,
        min_tissue=spec.min_tissue, label_rule=list(spec.label_rule) if spec.label_rule else None,
        unannotated=spec.unannotated)
    train_idx, val_idx = split_indices(data, split, spec)
    return data.subset(train_idx), data.subset(val_idx), crowd.subset(train_idx)


def aggnet_for(spec: TrainSpec, card: ModelCard, train: PatchDataset,
               crowd: CrowdLabels | None) -> tuple[PatchDataset, AggNet | None]:
    """``--aggregate aggnet``: the EM over ``crowd``, and ``train`` with every patch an
    annotator labelled counted as labelled (a tie of the vote too: AggNet reads the
    votes). The masks ``--mask-fraction`` dropped go for every annotator."""
    if crowd is None or spec.aggregate != "aggnet":
        return train, None
    crowd.masks[~train.has_mask] = IGNORE
    train = dataclasses.replace(train, labels=labelled_patches(train.labels, crowd,
                                                               len(card.classes)))
    epoch = max(1, math.ceil(len(train) / spec.fit.batch_size))
    return train, AggNet(crowd, len(card.classes), em_every=spec.em_every or epoch,
                         gold=spec.gold_annotator, gold_weight=spec.gold_weight,
                         balanced=spec.fit.class_weights == "balanced")


class MetricsLog:
    """``metrics.jsonl``: appended line by line (NaN written as null); on resume, the
    lines after the checkpoint's step are dropped (they were not kept)."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        if resume_step and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()
        self._fh = open(path, "a")  # noqa: SIM115 - closed in close()

    def write(self, kind: str, row: dict[str, float]) -> None:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                 for k, v in row.items()}
        self._fh.write(json.dumps({"kind": kind, **clean}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _resume_step(out_dir: Path) -> int:
    state = torch.load(out_dir / STATE_FILE, map_location="cpu", weights_only=True)
    return int(state["step"])


def run_training(
    spec: TrainSpec,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    on_data: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Run ``spec`` and leave the model folder in ``spec.out_dir`` (module docstring)."""
    if spec.architecture not in TRAINABLE:
        raise ModelCardInvalid(f"trainable architectures: {', '.join(TRAINABLE)}; "
                               f"got {spec.architecture!r}")
    started = time.perf_counter()
    out_dir = Path(spec.out_dir)
    resuming = spec.resume and has_checkpoint(out_dir)
    if has_checkpoint(out_dir) and not (spec.resume or spec.overwrite):
        raise FileExistsError(f"{str(out_dir)!r} holds a checkpoint: pass --resume to "
                              "continue it or --overwrite to start again")
    if spec.overwrite and not spec.resume:
        for name in (STATE_FILE, WEIGHTS_FILE, CARD_FILE, METRICS_FILE, SUMMARY_FILE):
            (out_dir / name).unlink(missing_ok=True)
    if resuming:
        card = read_card(out_dir)
        if card.architecture != spec.architecture:
            raise ModelCardInvalid(f"{str(out_dir)!r} holds a {card.architecture} checkpoint, "
                                   f"not {spec.architecture}")
    else:
        card = make_card(
            spec.architecture, name=spec.name or out_dir.name, classes=spec.classes or None,
            target_mpp=spec.mpp, tile_px=spec.tile_px, encoder=spec.encoder,
            classifier=spec.classifier,
            description=(f"{spec.architecture} trained by slidepipe train (seed "
                         f"{spec.fit.seed}, {spec.fit.steps} steps); see training.json."))
    if spec.aggregate not in (None, "majority", "aggnet"):
        raise ValueError(f"aggregate must be majority or aggnet, got {spec.aggregate!r}")
    if spec.aggregate == "aggnet" and spec.fit.dice_weight > 0:
        raise ValueError("--dice-weight compares with the majority vote: it does not "
                         "combine with --aggregate aggnet")
    crowd: CrowdLabels | None = None
    if spec.aggregate is None:
        train, val = load_training_data(spec, card, progress=on_data)
    else:
        train, val, crowd = load_crowd_training_data(spec, card)
    n_masked_all = int(train.has_mask.sum())
    train = limit_masks(train, spec.mask_fraction, spec.fit.seed)
    train, aggnet = aggnet_for(spec, card, train, crowd)
    log.info("training %s on %s, validating on %s", card.name, train.summary(), val.summary())
    torch.manual_seed(spec.fit.seed)
    module = build_module(card)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_log = MetricsLog(out_dir / METRICS_FILE, _resume_step(out_dir) if resuming else 0)

    def step_cb(step: int, row: dict[str, float]) -> None:
        metrics_log.write("train", row)
        if on_step is not None:
            on_step(step, row)

    def eval_cb(step: int, row: dict[str, float]) -> None:
        metrics_log.write("val", row)
        if on_eval is not None:
            on_eval(step, row)

    try:
        if not resuming:  # a card from the start, so a partial run is already loadable
            card.save(out_dir)
        result = fit(module, card, train, spec.fit, val=val if len(val) else None,
                     checkpoint_dir=out_dir, resume=resuming, on_step=step_cb, on_eval=eval_cb,
                     crowd=aggnet)
    finally:
        metrics_log.close()
    crowd_record = None
    if crowd is not None and spec.aggregate is not None:
        levels = ("pixel", "tile") if uses_labels(card) else ("pixel",)
        rows = (aggnet.report(card.class_names, levels) if aggnet is not None
                else majority_report(crowd, card.class_names, levels=levels))
        crowd_record = CrowdRecord.model_validate({"aggregate": spec.aggregate,
                                                   "annotators": rows})
        card = card.model_copy(update={"crowd": crowd_record, "weights": WEIGHTS_FILE})
        card.save(out_dir)
    data: dict[str, dict[str, Any]] = {
        "train": {**train.summary(), "with_mask_before_limit": n_masked_all,
                  "masked_area_share": masked_area_share(train)},
        "val": dict(val.summary())}
    seconds = round(time.perf_counter() - started, 2)
    summary = {
        "architecture": card.architecture, "card": card.name,
        "classes": card.class_names, "target_mpp": card.target_mpp, "tile_px": card.tile_px,
        "data": data,
        "spec": _jsonable(spec),
        "resumed_from_step": result.resumed_from, "steps": result.steps,
        "final_train": result.history[-1] if result.history else None,
        "final_val": result.last_eval, "weights_sha256": result.weights_sha256,
        "crowd": None if crowd is None or crowd_record is None else {
            **crowd_record.model_dump(mode="json"), "labels": crowd.summary(),
            "em_rounds": aggnet.rounds if aggnet is not None else None,
            "em_every": aggnet.em_every if aggnet is not None else None,
            "validation_against": "majority vote"},
        "seconds": seconds,
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return TrainResult(out_dir, out_dir / CARD_FILE, data, result, seconds)


def _jsonable(spec: TrainSpec) -> dict[str, Any]:
    data = asdict(spec)
    data["classes"] = [c.name for c in spec.classes]
    record: dict[str, Any] = json.loads(json.dumps(data, default=str))
    return record
