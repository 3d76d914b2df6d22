"""Training patches for the segmenters, as numpy arrays: :class:`PatchDataset` and what
is computed on it before training (patch labels from masks, the few-masks setting, the
split by slide/patient, the masks' share of the tissue, pixel class weights) and during
it (augmentation).

Built by ``workers.training.data`` from tile folders, CSVs of patch labels, or slides
with annotations: every patch may have a mask (pixel classes, ``IGNORE`` where
unannotated), a patch class label, both or neither, and a group (slide or patient) for
the train/validation split. The training loop is ``models.seg_training``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from models.errors import ModelError
from models.metrics import IGNORE

Images = npt.NDArray[np.uint8]  # (N, H, W, 3) RGB
Masks = npt.NDArray[np.uint8]  # (N, H, W) class indices or IGNORE
Index = npt.NDArray[np.int64]


class TrainingDataInvalid(ModelError):
    """The training data cannot train this model (no masks for a U-Net, bad labels...)."""


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

    images: Images
    masks: Masks
    has_mask: npt.NDArray[np.bool_]
    labels: Index
    groups: npt.NDArray[np.object_]
    boxes: Index

    @classmethod
    def build(cls, images: npt.ArrayLike, masks: npt.ArrayLike | None = None,
              labels: Sequence[int] | npt.NDArray[np.integer] | None = None,
              groups: Sequence[str] | npt.NDArray[np.object_] | None = None,
              has_mask: npt.ArrayLike | None = None,
              boxes: npt.ArrayLike | None = None) -> PatchDataset:
        image_arr = np.asarray(images)
        n = len(image_arr)
        if masks is None:
            masks = np.full(image_arr.shape[:3], IGNORE, np.uint8)
            has_mask = np.zeros(n, bool)
        elif has_mask is None:
            has_mask = (np.asarray(masks) != IGNORE).reshape(n, -1).any(axis=1)
        return cls(
            images=image_arr,
            masks=np.asarray(masks, dtype=np.uint8),
            has_mask=np.asarray(has_mask, dtype=bool),
            labels=np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64),
            groups=np.full(n, "all", object) if groups is None else np.asarray(groups, object),
            boxes=(np.full((n, 4), -1, np.int64) if boxes is None
                   else np.asarray(boxes, np.int64).reshape(n, 4)),
        )

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: npt.ArrayLike) -> PatchDataset:
        i = np.asarray(index, dtype=np.int64)
        return PatchDataset(self.images[i], self.masks[i], self.has_mask[i], self.labels[i],
                            self.groups[i], self.boxes[i])

    def without_masks(self, index: npt.ArrayLike) -> PatchDataset:
        """A copy whose patches ``index`` lose their masks (their labels stay)."""
        masks, has_mask = self.masks.copy(), self.has_mask.copy()
        i = np.asarray(index)
        masks[i] = IGNORE
        has_mask[i] = False
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


def patch_label_from_mask(mask: npt.NDArray[np.uint8], n_classes: int,
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


def group_split(groups: npt.NDArray[np.object_], val_fraction: float,
                seed: int) -> tuple[Index, Index]:
    """Indices (train, validation) with whole groups (slides/patients) on one side.

    About ``val_fraction`` of the groups (at least one when there are two or more) go to
    validation, drawn with ``seed``. One group only: no validation.
    """
    names = sorted(set(groups.tolist()))
    if val_fraction <= 0 or len(names) < 2:
        return np.arange(len(groups), dtype=np.int64), np.array([], np.int64)
    rng = np.random.default_rng(seed)
    n_val = min(len(names) - 1, max(1, round(len(names) * val_fraction)))
    val_names = set(rng.choice(names, size=n_val, replace=False).tolist())
    is_val = np.array([g in val_names for g in groups.tolist()], dtype=bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def masked_pixel_counts(data: PatchDataset, n_classes: int) -> Index:
    """(n_classes,) how many annotated pixels of each class the patches' masks hold."""
    known = data.masks[data.has_mask]
    counts = np.bincount(known[known != IGNORE].ravel(), minlength=n_classes)[:n_classes]
    return counts.astype(np.int64)


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


def pixel_class_weights(data: PatchDataset, n_classes: int) -> npt.NDArray[np.float64]:
    """Weights of L_seg: the square root of each class's inverse pixel frequency under
    the masks (relative to a uniform share), 0 for absent classes; all 1 without masks."""
    counts = masked_pixel_counts(data, n_classes).astype(np.float64)
    ratio = counts.sum() / np.maximum(counts, 1) / n_classes
    weights: npt.NDArray[np.float64] = np.where(counts > 0, ratio, 0.0) ** 0.5
    return weights if weights.any() else np.ones(n_classes)


def augment(images: Images, masks: Masks, rng: np.random.Generator) -> tuple[Images, Masks]:
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
