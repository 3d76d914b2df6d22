"""Supervised training of a segmenter on (image, label) patches, CPU or CUDA.

Small and deterministic on purpose: it is what ``slidepipe demo`` uses to build an
honest model in about a minute on a laptop CPU, and what the segmentation training
commands build on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.card import ModelCard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    augment: bool = True


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def augment_batch(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flips, 90° rotations, brightness/contrast and a saturation/hue-ish colour shift."""
    images = images.astype(np.float32)
    out_i, out_l = np.empty_like(images), np.empty_like(labels)
    for n in range(len(images)):
        img, lab = images[n], labels[n]
        k = int(rng.integers(4))
        img, lab = np.rot90(img, k, axes=(0, 1)), np.rot90(lab, k, axes=(0, 1))
        if rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        contrast = rng.uniform(0.85, 1.15)
        brightness = rng.uniform(-15, 15)
        per_channel = rng.uniform(-10, 10, size=3)  # a cheap stand-in for an HSV shift
        mean = img.mean(axis=(0, 1), keepdims=True)
        img = (img - mean) * contrast + mean + brightness + per_channel
        out_i[n], out_l[n] = img, lab
    return np.clip(out_i, 0, 255), out_l


def to_tensor(images: np.ndarray, card: ModelCard, device: torch.device) -> torch.Tensor:
    norm = card.normalization
    mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1) * 255
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    return (x - mean) / std


def dice_per_class(pred: np.ndarray, target: np.ndarray, n_classes: int) -> list[float]:
    """Dice of each class over all pixels (NaN where the class is absent in both)."""
    scores = []
    for c in range(n_classes):
        p, t = pred == c, target == c
        denom = p.sum() + t.sum()
        scores.append(float(2 * (p & t).sum() / denom) if denom else math.nan)
    return scores


def train_segmenter(
    module: nn.Module,
    card: ModelCard,
    images: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``module`` with pixel cross-entropy (class-balanced); returns the losses."""
    rng = seed_everything(config.seed)
    device = torch.device(config.device)
    module.to(device).train()
    counts = np.bincount(labels.ravel(), minlength=len(card.classes)).astype(np.float64)
    weights = torch.tensor(
        np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0) ** 0.5,
        dtype=torch.float32, device=device,
    )
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    optimiser = torch.optim.Adam(module.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.steps)
    losses = []
    for step in range(config.steps):
        pick = rng.integers(0, len(images), size=config.batch_size)
        x, y = images[pick], labels[pick]
        if config.augment:
            x, y = augment_batch(x, y, rng)
        logits = module(to_tensor(x, card, device))
        loss = loss_fn(logits, torch.from_numpy(np.ascontiguousarray(y)).long().to(device))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss))
        if on_step is not None:
            on_step(step, losses[-1])
    module.eval()
    return losses


@torch.inference_mode()
def predict_labels(module: nn.Module, card: ModelCard, images: np.ndarray, device: str = "cpu") -> np.ndarray:
    module.to(device).eval()
    out = [module(to_tensor(images[i : i + 16], card, torch.device(device))).argmax(1).cpu().numpy()
           for i in range(0, len(images), 16)]
    return np.concatenate(out).astype(np.uint8)
