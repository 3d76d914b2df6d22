"""The demo job: a real slide in, a real (small, honest) model, a zarr and heatmap out.

The model is a U-Net trained in a minute or two on the CPU, on the demo slide's upper
two thirds, to reproduce stain-based pseudo-labels (colour deconvolution: background /
stroma / nuclei, see ``models.stain``); its Dice against the same rule on the held-out
lower third is reported. It is not a diagnostic model, and its card says so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.architectures import build_module
from models.card import IMAGENET, ClassSpec, ModelCard
from models.loading import save_weights
from models.patches import PatchDataset
from models.seg_training import FitConfig, evaluate, fit
from models.stain import PSEUDO_CLASSES, PSEUDO_COLORS, stain_pseudo_labels
from workers.demo.sample_data import fetch_cmu_small_region
from workers.engine.run import run_engine
from workers.engine.spec import ProgressCallback, RunResult, RunSpec
from wsi.heatmap import render_heatmap_png
from wsi.reader import Slide

log = logging.getLogger(__name__)

DEMO_MPP = 1.0
PATCH_PX = 128


@dataclass(frozen=True)
class DemoOutputs:
    slide: Path
    model_card: Path
    result: Path
    heatmap: Path
    validation_dice: dict[str, float]


def demo_card() -> ModelCard:
    return ModelCard(
        name="demo-stain-unet",
        architecture="unet",
        description=(
            "U-Net (ResNet-18 encoder, depth 4) trained by `slidepipe demo` on the upper "
            "two thirds of cmu_small_region.svs at 1 µm/px to reproduce colour-deconvolution "
            "pseudo-labels (Ruifrok-Johnston H&E; nuclei = haematoxylin above Otsu within "
            "tissue). A demonstration, not a diagnostic model."
        ),
        classes=[ClassSpec(name=n, color=c) for n, c in zip(PSEUDO_CLASSES, PSEUDO_COLORS)],
        target_mpp=DEMO_MPP,
        tile_px=256,
        overlap_px=64,
        normalization=IMAGENET,
        params={"encoder_name": "resnet18", "encoder_depth": 4,
                "decoder_channels": [128, 64, 32, 16]},
        weights="weights.safetensors",
    )


def patches(image: np.ndarray, labels: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """All PATCH_PX patches on a ``stride`` grid that hold some tissue."""
    xs, ys = [], []
    h, w = labels.shape
    for y in range(0, h - PATCH_PX + 1, stride):
        for x in range(0, w - PATCH_PX + 1, stride):
            lab = labels[y : y + PATCH_PX, x : x + PATCH_PX]
            if (lab > 0).mean() >= 0.2:
                xs.append(image[y : y + PATCH_PX, x : x + PATCH_PX])
                ys.append(lab)
    return np.stack(xs), np.stack(ys)


def train_demo_model(
    slide_path: Path, model_dir: Path, *, steps: int = 150, seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Path, dict[str, float]]:
    """Train the demo U-Net and write ``model_dir/card.json`` + weights; returns the
    card path and per-class Dice on the held-out third of the slide."""
    with Slide(slide_path) as slide:
        width, height = slide.scaled_dimensions(DEMO_MPP)
        rgb = slide.read_scaled(DEMO_MPP, 0, 0, width, height)
    split = (2 * height) // 3
    train_labels, threshold = stain_pseudo_labels(rgb[:split])
    val_labels, _ = stain_pseudo_labels(rgb[split:], nuclei_threshold=threshold)
    train_x, train_y = patches(rgb[:split], train_labels, PATCH_PX // 2)
    val_x, val_y = patches(rgb[split:], val_labels, PATCH_PX)
    card = demo_card()
    torch.manual_seed(seed)
    module = build_module(card)
    config = FitConfig(steps=steps, batch_size=8, lr=1e-3, lr_schedule="cosine", seed=seed,
                       eval_every=steps, checkpoint_every=steps)
    result = fit(module, card, PatchDataset.build(train_x, train_y), config,
                 on_step=(lambda step, record: on_step(step, record["loss"])) if on_step else None)
    losses = [record["loss"] for record in result.history]
    dice = evaluate(module, card, PatchDataset.build(val_x, val_y))["seg"]["dice"]
    card_path = card.save(model_dir)
    sha = save_weights(module, model_dir / "weights.safetensors")
    (model_dir / "training.json").write_text(json.dumps({
        "slide": slide_path.name, "train_patches": len(train_x), "val_patches": len(val_x),
        "steps": steps, "seed": seed, "final_loss": losses[-1], "val_dice": dice,
        "nuclei_h_threshold": threshold, "weights_sha256": sha,
    }, indent=2))
    log.info("demo model: %d train patches, val Dice %s", len(train_x), dice)
    return card_path, dice


def run_demo(
    out_dir: Path, *, cache_dir: Path | None = None, steps: int = 150,
    progress: ProgressCallback | None = None, device: str = "auto",
    on_step: Callable[[int, float], None] | None = None,
) -> DemoOutputs:
    """Fetch the real slide, train (or reuse) the demo model, run it, render a heatmap."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slide = fetch_cmu_small_region(cache_dir)
    model_dir = out_dir / "demo-model"
    card_path = model_dir / "card.json"
    training = model_dir / "training.json"
    if card_path.is_file() and (model_dir / "weights.safetensors").is_file() and training.is_file():
        dice = json.loads(training.read_text())["val_dice"]
    else:
        card_path, dice = train_demo_model(slide, model_dir, steps=steps, on_step=on_step)
    result_path = out_dir / "cmu_small_region.zarr"
    result: RunResult = run_engine(
        RunSpec(slide_path=slide, model=str(card_path), out_path=result_path,
                overwrite=True, device=device),
        progress=progress,
    )
    heatmap = out_dir / "cmu_small_region-nuclei.png"
    heatmap.write_bytes(render_heatmap_png(result.out_path, class_name="nuclei", max_px=1024))
    return DemoOutputs(slide, card_path, result.out_path, heatmap, dice)
