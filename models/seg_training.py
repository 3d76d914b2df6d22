"""Training the segmenters: ``joint`` (Ciga & Martel) and ``unet``, CPU or CUDA.

Data come in as a :class:`PatchDataset` (numpy arrays, built by ``workers.training.data``
from tile folders, CSVs of patch labels, or slides with annotations): every patch may
have a mask (pixel classes, ``IGNORE`` where unannotated), a patch class label, both or
neither, and a group (slide or patient) for the train/validation split.

Losses (``joint``): ``L = L_seg + cls_weight * L_cls``. ``L_seg`` is pixel cross-entropy
with class weights on the patches of the batch that have masks; ``L_cls`` is
cross-entropy of the classification head (which sees only the segmentation map) on the
patches that have a class label, or (``cls_loss="presence"``) binary cross-entropy of
each class's presence in the segmentation map itself (:func:`presence_loss`). A batch
takes ``masked_per_batch`` patches with masks and fills the rest with label-only
patches, so that a few percent of masked patches still train the segmentation every
step. ``label_bn`` decides how the label-only patches meet BatchNorm: in the same
pass their batch statistics normalise the masked patches too, which on its own
(``cls_weight`` 0) cost the CMU experiment (``experiments.joint_vs_masks``)
about 0.2 held-out Dice. ``unet`` uses masks only: cross-entropy, plus soft Dice when
``dice_weight`` > 0. Augmentation: 90° rotations, flips, brightness, contrast and an
HSV shift.

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch import nn

from models.card import ModelCard
from models.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from models.errors import ModelError
from models.metrics import IGNORE, classification_metrics, segmentation_metrics
from models.predictor import resolve_device

log = logging.getLogger(__name__)


class TrainingDataInvalid(ModelError):
    """The training data cannot train this model (no masks for a U-Net, bad labels...)."""


# -- data -------------------------------------------------------------------------------
@dataclass
class PatchDataset:
    """Patches and what is known about them; arrays share their first axis.

    ``images`` (N, H, W, 3) uint8; ``masks`` (N, H, W) uint8 class indices, ``IGNORE``
    where unknown (all of it for patches without a mask); ``has_mask`` (N,) bool;
    ``labels`` (N,) int64 patch classes, -1 where unknown; ``groups`` (N,) str, the
    slide or patient each patch comes from; ``boxes`` (N, 4) int64, where in its group's
    slide the patch lies (x, y, width, height in pixels at the patch resolution), -1
    where unknown (tiles from a folder): overlapping patches count the same tissue more
    than once, which :func:`masked_area_share` corrects for.
    """

    images: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    boxes: np.ndarray

    @classmethod
    def build(cls, images: np.ndarray, masks: np.ndarray | None = None,
              labels: Sequence[int] | np.ndarray | None = None,
              groups: Sequence[str] | np.ndarray | None = None,
              has_mask: np.ndarray | None = None,
              boxes: np.ndarray | None = None) -> PatchDataset:
        images = np.asarray(images)
        n = len(images)
        if masks is None:
            masks = np.full(images.shape[:3], IGNORE, np.uint8)
            has_mask = np.zeros(n, bool)
        elif has_mask is None:
            has_mask = (np.asarray(masks) != IGNORE).reshape(n, -1).any(axis=1)
        return cls(
            images=images,
            masks=np.asarray(masks, dtype=np.uint8),
            has_mask=np.asarray(has_mask, dtype=bool),
            labels=np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64),
            groups=np.full(n, "all", object) if groups is None else np.asarray(groups, object),
            boxes=(np.full((n, 4), -1, np.int64) if boxes is None
                   else np.asarray(boxes, np.int64).reshape(n, 4)),
        )

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray | Sequence[int]) -> PatchDataset:
        index = np.asarray(index, dtype=np.int64)
        return PatchDataset(self.images[index], self.masks[index], self.has_mask[index],
                            self.labels[index], self.groups[index], self.boxes[index])

    def without_masks(self, index: np.ndarray) -> PatchDataset:
        """A copy whose patches ``index`` lose their masks (their labels stay)."""
        masks, has_mask = self.masks.copy(), self.has_mask.copy()
        masks[index] = IGNORE
        has_mask[index] = False
        return dataclasses.replace(self, masks=masks, has_mask=has_mask)

    def without_labels(self) -> PatchDataset:
        return dataclasses.replace(self, labels=np.full(len(self), -1, np.int64))

    @staticmethod
    def concat(parts: Sequence[PatchDataset]) -> PatchDataset:
        if not parts:
            raise TrainingDataInvalid("no patches")
        return PatchDataset(*(np.concatenate([getattr(p, f.name) for p in parts])
                              for f in dataclasses.fields(PatchDataset)))

    def check(self, n_classes: int) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise TrainingDataInvalid(f"images must be (N, H, W, 3) uint8, got "
                                      f"{self.images.shape} {self.images.dtype}")
        if self.masks.shape != self.images.shape[:3]:
            raise TrainingDataInvalid(f"masks {self.masks.shape} do not match images "
                                      f"{self.images.shape[:3]}")
        if not (len(self.has_mask) == len(self.labels) == len(self.groups) == len(self.boxes)
                == n):
            raise TrainingDataInvalid("has_mask, labels, groups and boxes need one entry "
                                      "per patch")
        known = self.masks[self.masks != IGNORE]
        if known.size and known.max() >= n_classes:
            raise TrainingDataInvalid(f"mask values must be below {n_classes} (or {IGNORE}), "
                                      f"found {int(known.max())}")
        if self.labels.size and self.labels.max() >= n_classes:
            raise TrainingDataInvalid(f"patch labels must be below {n_classes}, "
                                      f"found {int(self.labels.max())}")

    def summary(self) -> dict[str, int]:
        return {"patches": len(self), "with_mask": int(self.has_mask.sum()),
                "with_label": int((self.labels >= 0).sum()),
                "label_only": int(((self.labels >= 0) & ~self.has_mask).sum()),
                "groups": len(set(self.groups.tolist()))}


def patch_label_from_mask(mask: np.ndarray, n_classes: int,
                          min_fraction: Sequence[float] | None = None) -> int:
    """The class label a patch gets from its mask (-1 when nothing is annotated).

    With ``min_fraction`` (one value per class): the *highest* class whose share of the
    annotated pixels reaches its minimum, as BACH labels an image by its most severe
    class present (classes ordered by severity); class 0 applies when none does. Without
    it: the majority class.
    """
    known = mask[mask != IGNORE]
    if known.size == 0:
        return -1
    shares = np.bincount(known.ravel(), minlength=n_classes)[:n_classes] / known.size
    if min_fraction is None:
        return int(shares.argmax())
    for c in range(n_classes - 1, 0, -1):
        if shares[c] >= min_fraction[c]:
            return c
    return 0


def limit_masks(data: PatchDataset, fraction: float, seed: int) -> PatchDataset:
    """Keep the masks of about ``fraction`` of the patches that have one (at least one
    patch), drawn with ``seed``; the others keep only their class labels."""
    if not 0 < fraction <= 1:
        raise ValueError(f"mask fraction must be in (0, 1], got {fraction}")
    masked = np.flatnonzero(data.has_mask)
    if fraction >= 1 or masked.size == 0:
        return data
    n_keep = max(1, round(fraction * masked.size))
    keep = np.random.default_rng(seed).choice(masked, size=n_keep, replace=False)
    return data.without_masks(np.setdiff1d(masked, keep))


def group_split(groups: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) with whole groups (slides/patients) on one side.

    About ``val_fraction`` of the groups (at least one when there are two or more) go to
    validation, drawn with ``seed``. One group only: no validation.
    """
    names = sorted(set(groups.tolist()))
    if val_fraction <= 0 or len(names) < 2:
        return np.arange(len(groups)), np.array([], np.int64)
    rng = np.random.default_rng(seed)
    n_val = min(len(names) - 1, max(1, round(len(names) * val_fraction)))
    val_names = set(rng.choice(names, size=n_val, replace=False).tolist())
    is_val = np.array([g in val_names for g in groups.tolist()])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def to_tensor(images: np.ndarray, card: ModelCard, device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 patches -> normalised (N, 3, H, W) float32 on ``device``."""
    norm = card.normalization
    mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1) * 255
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    return (x - mean) / std


# -- augmentation -----------------------------------------------------------------------
def augment(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
            ) -> tuple[np.ndarray, np.ndarray]:
    """90° rotations and flips (images and masks), then brightness, contrast and an HSV
    shift (hue ±8°, saturation and value x0.9-1.1) of the images."""
    out_i, out_m = np.empty_like(images), np.empty_like(masks)
    for n in range(len(images)):
        k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
        dh, ds, dv = rng.uniform(-4, 4), rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)
        contrast, brightness = rng.uniform(0.85, 1.15), rng.uniform(-12, 12)
        img, mask = np.rot90(images[n], k), np.rot90(masks[n], k)
        if flip:
            img, mask = img[:, ::-1], mask[:, ::-1]
        hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + dh) % 180  # OpenCV hue: 0-180
        hsv[..., 1] *= ds
        hsv[..., 2] *= dv
        rgb = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)
        rgb = rgb.astype(np.float32)
        mean = rgb.mean(axis=(0, 1), keepdims=True)
        rgb = (rgb - mean) * contrast + mean + brightness
        out_i[n] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        out_m[n] = mask
    return out_i, out_m


# -- training ---------------------------------------------------------------------------
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
    #: ``joint``: how the label-only patches of a batch meet BatchNorm. ``shared``: one
    #: pass over the whole batch, so the label-only patches shift the statistics that
    #: normalise the masked ones; ``separate``: two passes, each group normalised by its
    #: own batch statistics (both update the running ones); ``masked-running``: the same
    #: two passes, but only the masked one updates the running statistics used at
    #: inference; ``frozen``: two passes, the label-only one with BatchNorm in eval mode
    #: (normalised by the running statistics, which it leaves as the masked patches made
    #: them).
    label_bn: Literal["shared", "separate", "masked-running", "frozen"] = "shared"
    #: ``joint``: what L_cls compares a patch label with. ``softmax`` (the paper): the
    #: classifier's logits, cross-entropy over the classes. ``presence``: each class's
    #: presence in the segmentation map itself (see :func:`presence_loss`), read as BACH
    #: labels are meant: the label's class is present, more severe ones are absent.
    cls_loss: Literal["softmax", "presence"] = "softmax"
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
        if self.cls_loss not in ("softmax", "presence"):
            raise ValueError(f"cls_loss must be softmax or presence, got {self.cls_loss!r}")


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
    """Indices of each batch: ``k`` patches with masks plus the rest label-only."""

    def __init__(self, data: PatchDataset, config: FitConfig, with_labels: bool) -> None:
        self.masked = np.flatnonzero(data.has_mask)
        self.label_only = (np.flatnonzero(~data.has_mask & (data.labels >= 0))
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

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        parts = []
        if self.k:
            parts.append(rng.choice(self.masked, size=self.k))
        if self.b - self.k:
            parts.append(rng.choice(self.label_only, size=self.b - self.k))
        return np.concatenate(parts)


def masked_pixel_counts(data: PatchDataset, n_classes: int) -> np.ndarray:
    """(n_classes,) how many annotated pixels of each class the patches' masks hold."""
    known = data.masks[data.has_mask]
    return np.bincount(known[known != IGNORE].ravel(), minlength=n_classes)[:n_classes]


def masked_area_share(data: PatchDataset) -> float | None:
    """The share of the area the patches span (the union of their boxes, per group)
    that lies under a mask; None where the boxes are unknown.

    Why not the share of patches: patches cut on a stride below their size overlap, so
    one masked patch of 139 can cover 6.5% of the tissue they span. The union is counted
    on the grid of the boxes' own edges (cells of unequal size), never per pixel, so a
    100k px slide costs no more than its number of patch rows times columns."""
    if not len(data) or (data.boxes < 0).any():
        return None
    covered = total = 0
    for group in sorted(set(data.groups.tolist())):
        mine = data.groups == group
        boxes = data.boxes[mine]
        xs = np.unique(np.concatenate([boxes[:, 0], boxes[:, 0] + boxes[:, 2]]))
        ys = np.unique(np.concatenate([boxes[:, 1], boxes[:, 1] + boxes[:, 3]]))
        cell_area = np.outer(np.diff(ys), np.diff(xs))
        spanned = np.zeros(cell_area.shape, bool)
        under_mask = np.zeros_like(spanned)
        for (x, y, w, h), masked in zip(boxes, data.has_mask[mine]):
            cols = slice(np.searchsorted(xs, x), np.searchsorted(xs, x + w))
            rows = slice(np.searchsorted(ys, y), np.searchsorted(ys, y + h))
            spanned[rows, cols] = True
            if masked:
                under_mask[rows, cols] = True
        covered += int(cell_area[under_mask].sum())
        total += int(cell_area[spanned].sum())
    return covered / total


def pixel_class_weights(data: PatchDataset, n_classes: int) -> np.ndarray:
    counts = masked_pixel_counts(data, n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0) ** 0.5
    return weights if weights.any() else np.ones(n_classes)


def _split_outputs(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(out, dict):
        return out["probabilities"], out.get("tile_scores")
    return out, None


@contextmanager
def _label_pass_batchnorm(module: nn.Module, label_bn: str) -> Iterator[None]:
    """BatchNorm layers of ``module`` set up for the label-only pass (see
    :class:`FitConfig`): in eval mode (``frozen``), or normalising by the batch without
    updating the running statistics (``masked-running``); unchanged otherwise."""
    layers = [m for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
              and m.track_running_stats] if label_bn in ("frozen", "masked-running") else []
    for layer in layers:
        if label_bn == "frozen":
            layer.eval()
        else:
            layer.track_running_stats = False  # batch statistics, running ones untouched
    try:
        yield
    finally:
        for layer in layers:
            layer.train()
            layer.track_running_stats = True


def _forward(module: nn.Module, x: torch.Tensor, split: int,
             label_bn: str = "shared") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module(x)`` of a batch whose first ``split`` patches have masks; unless
    ``label_bn`` is ``shared`` (see :class:`FitConfig`), the two groups go through in two
    passes whose outputs are concatenated."""
    if label_bn == "shared" or not 0 < split < len(x):
        return _split_outputs(module(x))
    seg_a, cls_a = _split_outputs(module(x[:split]))
    with _label_pass_batchnorm(module, label_bn):
        seg_b, cls_b = _split_outputs(module(x[split:]))
    cls = None if cls_a is None or cls_b is None else torch.cat([cls_a, cls_b])
    return torch.cat([seg_a, seg_b]), cls


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over classes present in the batch (ignored pixels excluded)."""
    probs = logits.softmax(1)
    valid = (target != IGNORE).unsqueeze(1).float()
    onehot = nn.functional.one_hot(target.clamp(max=logits.shape[1] - 1), logits.shape[1])
    onehot = onehot.permute(0, 3, 1, 2).float() * valid
    probs = probs * valid
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    dice = (2 * inter + 1) / (denom + 1)
    return 1 - dice[present].mean() if present.any() else logits.sum() * 0


def presence_loss(seg_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of class presence against "most severe class present" labels.

    A class's presence in a patch is its highest pixel probability in the segmentation
    map (classes ordered by severity). A label ``c`` says class ``c`` is present and every
    class above ``c`` absent; it says nothing of the milder classes, which a patch of a
    severe class usually contains too (softmax cross-entropy over per-class maxima would
    push them down). Mean over the (patch, class) pairs the labels constrain.
    """
    log_present = seg_logits.log_softmax(1).amax(dim=(2, 3))  # (N, C)
    log_absent = torch.log1p(-log_present.exp().clamp(max=1 - 1e-6))
    classes = torch.arange(seg_logits.shape[1], device=seg_logits.device)[None]
    is_label = classes == labels[:, None]
    known = (classes >= labels[:, None]).float()
    nll = torch.where(is_label, -log_present, -log_absent)
    return (nll * known).sum() / known.sum()


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
) -> FitResult:
    """Train ``module`` (built from ``card``) for ``config.steps`` steps in all.

    Build the module after ``torch.manual_seed(config.seed)`` for a reproducible start.
    With ``checkpoint_dir``, a checkpoint is written every ``checkpoint_every`` steps and
    at the end; with ``resume``, training continues from the one there (if any).
    ``on_step`` gets each step's losses, ``on_eval`` the validation metrics.
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
    cls_loss = nn.CrossEntropyLoss()
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
        if config.augment:
            images, masks = augment(images, masks, rng)
        x = to_tensor(images, card, device)
        target = torch.from_numpy(np.ascontiguousarray(masks)).long().to(device)
        has_mask = torch.from_numpy(train.has_mask[index]).to(device)
        labels = torch.from_numpy(train.labels[index]).to(device)
        seg_logits, cls_logits = _forward(module, x, batches.k, config.label_bn)
        record: dict[str, float] = {"step": step + 1, "lr": optimiser.param_groups[0]["lr"]}
        total = seg_logits.sum() * 0
        if has_mask.any() and bool((target[has_mask] != IGNORE).any()):
            l_seg = seg_loss(seg_logits[has_mask], target[has_mask])
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
            l_cls = (presence_loss(seg_logits[labelled], labels[labelled])
                     if config.cls_loss == "presence"
                     else cls_loss(cls_logits[labelled], labels[labelled]))
            total = total + config.cls_weight * l_cls
            record["loss_cls"] = l_cls.item()
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()
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
def predict(module: nn.Module, card: ModelCard, images: np.ndarray, *, device: str = "cpu",
            batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
    """(argmax segmentation (N, H, W) uint8, class logits (N, C) or None)."""
    module.to(device).eval()
    segs, clss = [], []
    for i in range(0, len(images), batch_size):
        seg, cls = _split_outputs(module(to_tensor(images[i:i + batch_size], card,
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
