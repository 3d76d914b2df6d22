"""Segmentation and classification metrics: Dice, IoU, F1, accuracy and the BACH score.

All functions take integer label arrays (any shape) and ignore pixels labelled
``IGNORE`` (255: unannotated). Per-class values are NaN where a class is absent from
both prediction and target; means skip NaNs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NotRequired, TypedDict

import numpy as np
import numpy.typing as npt

IGNORE = 255

#: The classes of the BACH challenge (ICIAR 2018), in the order of the BACH score.
BACH_CLASSES = ("normal", "benign", "in situ", "invasive")

#: Integer labels of any width (uint8 masks, int64 patch labels with -1 unlabelled).
Labels = npt.NDArray[np.integer[Any]]


class SegmentationMetrics(TypedDict):
    dice: dict[str, float]
    iou: dict[str, float]
    mean_dice: float
    mean_iou: float
    pixel_accuracy: float
    bach_score: NotRequired[float]


class ClassificationMetrics(TypedDict):
    accuracy: float
    f1: dict[str, float]
    macro_f1: float
    n: int
    bach_score: NotRequired[float]


def confusion_matrix(pred: Labels, target: Labels, n_classes: int) -> npt.NDArray[np.int64]:
    """(n_classes, n_classes) counts, rows = target, columns = prediction."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    keep = target != IGNORE
    pred, target = pred[keep].astype(np.int64), target[keep].astype(np.int64)
    if pred.size and (pred.max() >= n_classes or target.max() >= n_classes):
        raise ValueError(f"labels must be below {n_classes}")
    return np.bincount(target * n_classes + pred, minlength=n_classes**2).reshape(
        n_classes, n_classes
    )


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else math.nan


def dice_from_confusion(cm: npt.NDArray[np.int64]) -> list[float]:
    tp = np.diag(cm)
    return [_ratio(2 * tp[c], cm[c].sum() + cm[:, c].sum()) for c in range(len(cm))]


def iou_from_confusion(cm: npt.NDArray[np.int64]) -> list[float]:
    tp = np.diag(cm)
    return [_ratio(tp[c], cm[c].sum() + cm[:, c].sum() - tp[c]) for c in range(len(cm))]


def nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def segmentation_metrics(
    pred: Labels, target: Labels, classes: Sequence[str]
) -> SegmentationMetrics:
    """Per-class and mean Dice and IoU (pixel-level F1 equals Dice), pixel accuracy."""
    cm = confusion_matrix(pred, target, len(classes))
    dice, iou = dice_from_confusion(cm), iou_from_confusion(cm)
    total = cm.sum()
    out: SegmentationMetrics = {
        "dice": dict(zip(classes, dice)),
        "iou": dict(zip(classes, iou)),
        "mean_dice": nanmean(dice),
        "mean_iou": nanmean(iou),
        "pixel_accuracy": _ratio(np.trace(cm), total),
    }
    if is_bach(classes):
        out["bach_score"] = bach_score(pred, target)
    return out


def classification_metrics(
    pred: Labels, target: Labels, classes: Sequence[str]
) -> ClassificationMetrics:
    """Accuracy, per-class and macro F1 of patch labels (targets < 0 are unlabelled)."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    keep = target >= 0
    pred, target = pred[keep], target[keep]
    cm = confusion_matrix(pred, target, len(classes))
    f1 = dice_from_confusion(cm)  # F1 = 2TP / (2TP + FP + FN), the same formula as Dice
    out: ClassificationMetrics = {
        "accuracy": _ratio(np.trace(cm), cm.sum()),
        "f1": dict(zip(classes, f1)),
        "macro_f1": nanmean(f1),
        "n": int(cm.sum()),
    }
    if is_bach(classes):
        out["bach_score"] = bach_score(pred, target)
    return out


def is_bach(classes: Sequence[str]) -> bool:
    """Whether ``classes`` are BACH's four, in order (``in_situ``/``in-situ`` accepted)."""
    norm = [c.lower().replace("_", " ").replace("-", " ") for c in classes]
    return tuple(norm) == BACH_CLASSES


def bach_score(pred: Labels, target: Labels) -> float:
    """The BACH part-B score (Aresta et al., 2019) for labels 0 normal .. 3 invasive::

        s = 1 - sum |pred - gt| / sum max(|gt - 0|, |gt - 3|) * [pred_bin or gt_bin]

    where ``bin`` is 0 for normal and 1 otherwise: distance errors are weighted by how far
    apart the classes are, and pixels that are normal in both do not count. 1 is perfect;
    it is 1 when nothing but normal is present anywhere (no error is possible then).
    """
    pred, target = np.asarray(pred).ravel().astype(np.int64), np.asarray(target).ravel()
    keep = (target != IGNORE) & (target >= 0)
    pred, target = pred[keep], target[keep].astype(np.int64)
    error = np.abs(pred - target).sum()
    weight = np.maximum(target, 3 - target) * ((pred > 0) | (target > 0))
    den = weight.sum()
    return float(1.0 - error / den) if den else 1.0
