"""Training the segmenters: ``joint`` (Ciga & Martel) and ``unet``, CPU or CUDA, on a
:class:`models.patches.PatchDataset` (patches with a mask, a class label, both or neither).

Losses (``joint``): ``L = L_seg + cls_weight * L_cls``. ``L_seg`` is pixel cross-entropy
with class weights on the patches of the batch that have masks; ``L_cls`` is
cross-entropy of the classification head (which sees only the segmentation map) on the
patches that have a class label (the paper's). A batch takes ``masked_per_batch``
patches with masks and fills the rest with label-only patches, so that a few percent of
masked patches still train the segmentation every step. The two groups go through the
network in two passes (:func:`masked_running_forward`): the label-only patches are
normalised by their own batch statistics and leave BatchNorm's running statistics, the
ones used at inference, to the masked patches. In one shared pass their statistics
would normalise the masked patches too, which on its own (``cls_weight`` 0) cost the CMU
experiment (``experiments.joint_vs_masks``) about 0.2 held-out Dice. ``unet`` uses masks
only: cross-entropy, plus soft Dice when ``dice_weight`` > 0. Augmentation
(:func:`models.patches.augment`): 90° rotations, flips, brightness, contrast and an HSV
shift.

Extension point: :func:`fit`'s ``forward`` (a batch through the network) and
``label_loss`` (L_cls); the product keeps the defaults above, the experiments build
their arms with others (``experiments.arms``). ``crowd`` (:class:`models.aggnet.AggNet`)
trains from several annotators' labels, aggregated by AggNet's EM as training goes.

Resumable and deterministic: the batches and augmentations come from one numpy
generator seeded by ``seed``; its state, torch's, the optimiser's and the step are saved
with every checkpoint (``models.checkpoint``), and a resumed run continues exactly as an
uninterrupted one would. The only file I/O here is those checkpoints; metrics are
handed to the caller's callbacks (the worker writes the log).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.aggnet import AggNet
from models.card import ModelCard
from models.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from models.metrics import IGNORE, classification_metrics, segmentation_metrics
from models.patches import (
    Images,
    Index,
    PatchDataset,
    TrainingDataInvalid,
    augment,
    pixel_class_weights,
)
from models.predictor import resolve_device
from models.seg_passes import (
    Forward,
    LabelLoss,
    masked_running_forward,
    soft_dice_loss,
    softmax_label_loss,
    split_outputs,
)

log = logging.getLogger(__name__)

def to_tensor(images: Images, card: ModelCard, device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 patches -> normalised (N, 3, H, W) float32 on ``device``."""
    norm = card.normalization
    mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1) * 255
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    return (x - mean) / std


@dataclass(frozen=True)
class FitConfig:
    """How to train; the defaults are the paper's for ``joint`` (Adam 1e-4, batch 20)."""

    steps: int = 1000
    batch_size: int = 20
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    seed: int = 0
    device: str = "cpu"
    augment: bool = True
    #: ``joint``: weight of L_cls, and masked patches per batch (default: half of it).
    cls_weight: float = 1.0
    masked_per_batch: int | None = None
    #: Weight of a soft Dice term beside cross-entropy (``unet``; 0 = cross-entropy only).
    dice_weight: float = 0.0
    #: Pixel class weights of L_seg: inverse-frequency square roots, or none.
    class_weights: Literal["balanced", "none"] = "balanced"
    eval_every: int = 50
    checkpoint_every: int = 50
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps, batch_size and lr must be positive")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            raise ValueError("eval_every and checkpoint_every must be positive")


@dataclass
class FitResult:
    steps: int
    resumed_from: int
    history: list[dict[str, float]]
    last_eval: dict[str, float] | None
    weights_sha256: str | None


StepCallback = Callable[[int, dict[str, float]], None]


def uses_labels(card: ModelCard) -> bool:
    """Whether ``card``'s model can learn from patch class labels (``joint`` can)."""
    return card.architecture == "joint"


class _Batches:
    """Indices of each batch: ``k`` patches with masks first, then the label-only ones."""

    def __init__(self, data: PatchDataset, config: FitConfig, with_labels: bool) -> None:
        self.masked: Index = np.flatnonzero(data.has_mask)
        self.label_only: Index = (np.flatnonzero(~data.has_mask & (data.labels >= 0))
                                  if with_labels else np.array([], np.int64))
        if self.masked.size == 0 and self.label_only.size == 0:
            raise TrainingDataInvalid(
                "no patch has a mask" + (" or a class label" if with_labels else
                                         " (this architecture learns from masks only)"))
        b = config.batch_size
        if self.masked.size == 0:
            self.k = 0
        elif self.label_only.size == 0:
            self.k = b
        else:
            self.k = min(b, config.masked_per_batch if config.masked_per_batch is not None
                         else max(1, b // 2))
        self.b = b

    def sample(self, rng: np.random.Generator) -> Index:
        parts: list[Index] = []
        if self.k:
            parts.append(rng.choice(self.masked, size=self.k))
        if self.b - self.k:
            parts.append(rng.choice(self.label_only, size=self.b - self.k))
        return np.concatenate(parts)


def _lr_at(config: FitConfig, step: int) -> float:
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps))
    return config.lr


def fit(
    module: nn.Module,
    card: ModelCard,
    train: PatchDataset,
    config: FitConfig,
    *,
    val: PatchDataset | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    on_step: StepCallback | None = None,
    on_eval: StepCallback | None = None,
    forward: Forward = masked_running_forward,
    label_loss: LabelLoss = softmax_label_loss,
    crowd: AggNet | None = None,
) -> FitResult:
    """Train ``module`` (built from ``card``) for ``config.steps`` steps in all.

    Build the module after ``torch.manual_seed(config.seed)`` for a reproducible start.
    With ``checkpoint_dir``, a checkpoint is written every ``checkpoint_every`` steps and
    at the end; with ``resume``, training continues from the one there (if any).
    ``on_step`` gets each step's losses, ``on_eval`` the validation metrics.

    The extension point, for experiments (the product keeps the defaults): ``forward``
    (a :data:`Forward`) takes each training batch through ``module``, masked patches
    first (default: :func:`masked_running_forward`); ``label_loss`` (a
    :data:`LabelLoss`) is L_cls of the batch's labelled patches (``joint``; default:
    :func:`softmax_label_loss`). Checkpoints do not record them: resume with the same.
    ``crowd``: L_seg (and ``joint``'s L_cls where patches have several annotators'
    labels) against AggNet's posteriors instead of ``train``'s (majority-vote) targets;
    its EM state is checkpointed.
    """
    n_classes = len(card.classes)
    train.check(n_classes)
    if val is not None:
        val.check(n_classes)
    with_labels = uses_labels(card)
    batches = _Batches(train, config, with_labels)
    device = resolve_device(config.device)
    rng = np.random.default_rng(config.seed)
    weights = torch.tensor(
        pixel_class_weights(train, n_classes) if config.class_weights == "balanced"
        else np.ones(n_classes), dtype=torch.float32, device=device)
    seg_loss = nn.CrossEntropyLoss(weight=weights, ignore_index=IGNORE)
    start = 0
    state: dict[str, Any] | None = None
    if resume and checkpoint_dir is not None and has_checkpoint(checkpoint_dir):
        state = load_checkpoint(checkpoint_dir, module)
        start = int(state["step"])
        log.info("resuming %s from step %d of %s", card.name, start, checkpoint_dir)
    module.to(device).train()
    optimiser = torch.optim.Adam(module.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    if state is not None:
        optimiser.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if crowd is not None and "crowd" in state:
            crowd.load_state_dict(state["crowd"])
        if state.get("config") != _config_record(config):
            log.warning("resuming with a changed training configuration: %s -> %s",
                        state.get("config"), _config_record(config))
    else:
        torch.manual_seed(config.seed)
    history: list[dict[str, float]] = []
    last_eval: dict[str, float] | None = None
    sha: str | None = None
    for step in range(start, config.steps):
        for group in optimiser.param_groups:
            group["lr"] = _lr_at(config, step)
        index = batches.sample(rng)
        images, masks = train.images[index], train.masks[index]
        if crowd is not None:  # the annotators' masks are augmented alike, behind it
            masks = crowd.batch_masks(index, masks)
        if config.augment:
            images, masks = augment(images, masks, rng)
        masks, votes = crowd.split_batch(masks, device) if crowd is not None else (masks, None)
        x = to_tensor(images, card, device)
        target = torch.from_numpy(np.ascontiguousarray(masks)).long().to(device)
        has_mask = torch.from_numpy(train.has_mask[index]).to(device)
        labels = torch.from_numpy(train.labels[index]).to(device)
        seg_logits, cls_logits = forward(module, x, batches.k)
        record: dict[str, float] = {"step": step + 1, "lr": optimiser.param_groups[0]["lr"]}
        total = seg_logits.sum() * 0
        if has_mask.any() and bool((target[has_mask] != IGNORE).any()):
            l_seg = (seg_loss(seg_logits[has_mask], target[has_mask])
                     if crowd is None or votes is None
                     else crowd.seg_loss(seg_logits[has_mask], votes[has_mask]))
            if config.dice_weight > 0:
                l_seg = l_seg + config.dice_weight * soft_dice_loss(seg_logits[has_mask],
                                                                    target[has_mask])
            total = total + l_seg
            record["loss_seg"] = l_seg.item()
            with torch.no_grad():
                pred = seg_logits[has_mask].argmax(1).cpu().numpy()
            record["train_dice"] = segmentation_metrics(
                pred, masks[train.has_mask[index]], card.class_names)["mean_dice"]
        labelled = labels >= 0
        if with_labels and cls_logits is not None and labelled.any():
            l_cls = (crowd.label_loss(cls_logits[labelled],
                                      crowd.tile_votes(index, device)[labelled])
                     if crowd is not None and crowd.has_tile_labels else
                     label_loss(seg_logits[labelled], cls_logits[labelled], labels[labelled]))
            total = total + config.cls_weight * l_cls
            record["loss_cls"] = l_cls.item()
        optimiser.zero_grad(set_to_none=True)
        torch.autograd.backward(total)
        optimiser.step()
        if crowd is not None:
            crowd.step_done(step + 1)
        record["loss"] = total.item()
        history.append(record)
        if on_step is not None:
            on_step(step + 1, record)
        done = step + 1
        last = done == config.steps
        if val is not None and len(val) and (done % config.eval_every == 0 or last):
            last_eval = {"step": done, **flatten_metrics(
                evaluate(module, card, val, device=str(device), batch_size=config.eval_batch_size),
                prefix="val_")}
            module.train()
            if on_eval is not None:
                on_eval(done, last_eval)
        if checkpoint_dir is not None and (done % config.checkpoint_every == 0 or last):
            sha = save_checkpoint(checkpoint_dir, card, module, {
                "step": done,
                "optimizer": optimiser.state_dict(),
                "numpy_rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "config": _config_record(config),
                **({"crowd": crowd.state_dict()} if crowd is not None else {}),
            })
    module.eval()
    return FitResult(steps=config.steps, resumed_from=start, history=history,
                     last_eval=last_eval, weights_sha256=sha)


def _config_record(config: FitConfig) -> dict[str, Any]:
    """What must not change across a resume (the step count may grow)."""
    record = dataclasses.asdict(config)
    for key in ("steps", "device", "eval_every", "checkpoint_every", "eval_batch_size"):
        record.pop(key)
    return record


# -- evaluation -------------------------------------------------------------------------
@torch.inference_mode()
def predict(module: nn.Module, card: ModelCard, images: Images, *, device: str = "cpu",
            batch_size: int = 32,
            ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32] | None]:
    """(argmax segmentation (N, H, W) uint8, class logits (N, C) or None)."""
    module.to(device).eval()
    segs: list[npt.NDArray[np.uint8]] = []
    clss: list[npt.NDArray[np.float32]] = []
    for i in range(0, len(images), batch_size):
        seg, cls = split_outputs(module(to_tensor(images[i:i + batch_size], card,
                                                   torch.device(device))))
        segs.append(seg.argmax(1).to(torch.uint8).cpu().numpy())
        if cls is not None:
            clss.append(cls.float().cpu().numpy())
    return np.concatenate(segs), (np.concatenate(clss) if clss else None)


def evaluate(module: nn.Module, card: ModelCard, data: PatchDataset, *, device: str = "cpu",
             batch_size: int = 32) -> dict[str, Any]:
    """Segmentation metrics on the patches with masks; classification metrics of the
    classification head (``joint``) on the patches with labels."""
    out: dict[str, Any] = {}
    pred, cls = predict(module, card, data.images, device=device, batch_size=batch_size)
    if data.has_mask.any():
        out["seg"] = segmentation_metrics(pred[data.has_mask], data.masks[data.has_mask],
                                          card.class_names)
    labelled = data.labels >= 0
    if cls is not None and labelled.any():
        out["cls"] = classification_metrics(cls[labelled].argmax(1), data.labels[labelled],
                                            card.class_names)
    return out


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"seg": {"dice": {"nuclei": 0.7}}}`` -> ``{"seg_dice_nuclei": 0.7}`` (log rows)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}".replace(" ", "_")
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, prefix=f"{name}_"))
        else:
            flat[name] = float(value)
    return flat
