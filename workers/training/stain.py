"""Training a stain CycleGAN into an output folder: checkpoints, model cards, metrics.

``OUT/`` after (and during) training::

    checkpoint.pt             the whole training state (both generators, both
                              discriminators, optimisers, pools, RNGs): resumable
    metrics.jsonl             one JSON line per epoch: losses, and on the validation
                              patches SSIM(source, transform) and the colour-histogram
                              Wasserstein distance to the other domain, before and after
    training.json             the configuration, the domains and the last epoch's metrics
    <name>-a2b/card.json      one model card per direction, with its generator's
    <name>-a2b/weights.safetensors   weights: OUT itself works as a --model-dir
    <name>-b2a/...

Cards and weights are rewritten at every checkpoint, so an interrupted run leaves
usable models of its last finished epoch.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.cyclegan_training import (
    DIRECTIONS,
    CycleGANConfig,
    CycleGANTrainer,
    from_unit_tanh,
    to_unit_tanh,
)
from models.loading import save_weights
from models.stain_metrics import histogram_wasserstein, ssim, tissue_pixels
from workers.training.stain_data import PatchSet

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "training.json"


@dataclass(frozen=True)
class CardGeometry:
    """The whole-slide tiling written into the cards (the paper's by default)."""

    tile_px: int = 2048
    kept_px: int = 1024
    stride_px: int = 512


@torch.inference_mode()
def transform_patches(generator: torch.nn.Module, patches: np.ndarray, device: torch.device,
                      batch: int = 16) -> np.ndarray:
    generator.eval()
    out = [from_unit_tanh(generator(to_unit_tanh(patches[i : i + batch], device)))
           for i in range(0, len(patches), batch)]
    generator.train()
    return np.concatenate(out) if out else patches.copy()


def validation_metrics(trainer: CycleGANTrainer, a: PatchSet, b: PatchSet) -> dict[str, float]:
    """SSIM to the source and histogram Wasserstein distance to the target domain
    (tissue pixels of all validation patches pooled), each direction, and before."""
    out: dict[str, float] = {}
    for direction, src, dst in (("a2b", a.val, b.val), ("b2a", b.val, a.val)):
        if len(src) == 0 or len(dst) == 0:
            continue
        fake = transform_patches(trainer.generator(direction), src, trainer.device)
        m_src, m_dst = tissue_pixels(src), tissue_pixels(dst)
        if not m_src.any() or not m_dst.any():
            continue
        out[f"{direction}_wasserstein_before"] = histogram_wasserstein(src, dst, mask_a=m_src, mask_b=m_dst)
        out[f"{direction}_wasserstein"] = histogram_wasserstein(fake, dst, mask_a=m_src, mask_b=m_dst)
        out[f"{direction}_ssim"] = float(np.mean([ssim(s, f) for s, f in zip(src, fake)]))
    return {k: round(v, 4) for k, v in out.items()}


def export_cards(trainer: CycleGANTrainer, out_dir: Path, name: str, *, target_mpp: float,
                 domain_names: tuple[str, str], geometry: CardGeometry) -> dict[str, Path]:
    """Write ``<name>-a2b`` and ``<name>-b2a`` model folders (card + weights)."""
    paths = {}
    for direction in DIRECTIONS:
        folder = out_dir / f"{name}-{direction}"
        card = trainer.card(f"{name}-{direction}", direction, target_mpp=target_mpp,
                            domain_names=domain_names, **asdict(geometry))
        save_weights(trainer.inference_module(direction), folder / "weights.safetensors")
        paths[direction] = card.save(folder)
    return paths


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def train_stain_cyclegan(
    domain_a: PatchSet,
    domain_b: PatchSet,
    out_dir: Path,
    config: CycleGANConfig,
    *,
    name: str = "cyclegan",
    target_mpp: float = 0.5,
    geometry: CardGeometry | None = None,
    resume: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[CycleGANTrainer, dict[str, Path]]:
    """Train (or resume training) into ``out_dir``; returns the trainer and the cards."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    geometry = geometry or CardGeometry()
    checkpoint = out_dir / CHECKPOINT
    if resume and checkpoint.is_file():
        trainer = CycleGANTrainer.from_checkpoint(
            checkpoint, epochs=config.epochs, device=config.device)
        log.info("resuming %s at epoch %d, step %d", checkpoint, trainer.epoch, trainer.step)
    else:
        trainer = CycleGANTrainer(config)
        (out_dir / METRICS).unlink(missing_ok=True)  # a fresh run starts a fresh log
    domains = (domain_a.name, domain_b.name)
    cards: dict[str, Path] = {}
    started = time.perf_counter()

    def epoch_done(t: CycleGANTrainer, record: dict[str, Any]) -> None:
        record = {**record, **validation_metrics(t, domain_a, domain_b),
                  "elapsed_s": round(time.perf_counter() - started, 2)}
        t.history[-1] = record
        with open(out_dir / METRICS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        t.save_checkpoint(checkpoint)
        cards.update(export_cards(t, out_dir, name, target_mpp=target_mpp,
                                  domain_names=domains, geometry=geometry))
        _write_json(out_dir / SUMMARY, {
            "name": name, "config": asdict(t.config), "target_mpp": target_mpp,
            "geometry": asdict(geometry), "domain_a": domain_a.describe(),
            "domain_b": domain_b.describe(), "epoch": t.epoch, "step": t.step,
            "last": record, "cards": {k: str(v) for k, v in cards.items()},
        })
        if on_epoch is not None:
            on_epoch(record)

    trainer.fit(domain_a.sampler(), domain_b.sampler(), on_step=on_step, on_epoch=epoch_done,
                should_stop=should_stop)
    if not cards:  # nothing left to train (resumed a finished run): export what is there
        cards = export_cards(trainer, out_dir, name, target_mpp=target_mpp,
                             domain_names=domains, geometry=geometry)
    return trainer, cards
