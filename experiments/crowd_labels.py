"""Training from a crowd with spammers: majority vote against AggNet's EM, on real tissue.

    python -m experiments.crowd_labels --out OUT [--crowd good,good,noisy,yes,yes,yes,random]
        [--crowd ...] [--seeds 0,1,2] [--steps 300] [--em-every 0] [--arms truth,majority,aggnet]
        [--mpp 2] [--patch-px 64] [--coverage 0.6] [--noise-block-um 8]

Data. The real H&E region ``cmu_small_region.svs`` cut, as in ``experiments.joint_vs_masks``,
into a training slide (the upper 60% of the rows) and a spatially separate held-out slide
(the rows below), with colour-deconvolution region pseudo-labels (background / stroma /
cellular) as the truth. Patches of ``patch_px`` at ``mpp`` where tissue covers 75%.

The crowd. Annotators are simulated on the training slide's truth (level 0), each of a
kind: ``good`` keeps the true class with probability 0.9 (else another class at random),
``noisy`` with 0.7, ``random`` answers a class at random, ``yes`` always answers the
"yes" class (the last, ``cellular``): the two kinds of spammer. Errors are drawn per
square block of ``noise_block_um`` (an annotator mislabels a region, not single pixels),
and each annotator labels each ``cover_um`` square of the slide with probability
``coverage`` (missing elsewhere: not everyone labels everything). One ``--crowd`` is a
comma-separated list of kinds; each seed draws its own crowd. The annotators are written
as label masks (``train.annotators/<name>.mask.png``) and read back by the product
(``workers.training.crowd_data.load_crowd_slide``).

Arms (same seed, steps, learning rate, augmentation, network): ``truth`` (the
pseudo-labels of every training patch: the upper bound); on the patches someone of the
crowd labelled, ``majority`` (their majority vote, as ``--aggregate majority`` trains)
and ``aggnet`` (AggNet's EM inside training, as ``--aggregate aggnet``, one M-step every
``em_every`` steps, by default one epoch). Reported: held-out Dice against the truth;
for ``aggnet`` each annotator's estimated sensitivity alpha and specificity beta per
class against the realised ones (measured against the truth on the training patches'
pixels) and its spammer score; for ``majority`` how often the vote is right. Results go
to ``OUT/results.json`` and tables on stdout.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import cv2
import numpy as np
import torch

from experiments import joint_vs_masks as jvm
from models.aggnet import AggNet
from models.architectures import build_module
from models.card import ModelCard
from models.crowd import CrowdLabels, MStepSums, one_hot_votes, spammer_scores
from models.metrics import IGNORE
from models.patches import PatchDataset
from models.seg_training import FitConfig, evaluate, fit
from workers.training.crowd_data import load_crowd_slide
from workers.training.data import SlideSource, load_slide_patches
from workers.training.segmentation import make_card
from wsi.reader import Slide

log = logging.getLogger(__name__)

#: probability that an annotator of the kind keeps the true class
KEEP = {"good": 0.9, "noisy": 0.7}
KINDS = (*KEEP, "random", "yes")
ARMS = ("truth", "majority", "aggnet")
DEFAULT_CROWDS = ("good,good,good,noisy,noisy", "good,good,noisy,yes,yes,yes,random")


@dataclass
class CrowdConfig:
    out_dir: Path
    cache_dir: Path | None = None
    source: Path | None = None
    crop: tuple[int, int, int, int] | None = None  # x, y, w, h of the source (tests)
    crowds: tuple[str, ...] = DEFAULT_CROWDS
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    mpp: float = 2.0
    patch_px: int = 64
    train_stride: int = 32
    test_stride: int = 32
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    em_every: int = 0  # 0: one epoch (training patches / batch size), as AggNet
    coverage: float = 0.6
    cover_um: float = 128.0
    noise_block_um: float = 8.0
    device: str = "cpu"


def annotator_names(kinds: list[str]) -> list[str]:
    """``[good, good, yes]`` -> ``[good1, good2, yes1]``."""
    seen: dict[str, int] = {}
    names = []
    for kind in kinds:
        if kind not in KINDS:
            raise click.BadParameter(f"annotator kinds are {', '.join(KINDS)}; got {kind!r}")
        seen[kind] = seen.get(kind, 0) + 1
        names.append(f"{kind}{seen[kind]}")
    return names


def _blocks(values: np.ndarray, block: int, shape: tuple[int, int]) -> np.ndarray:
    """A grid of per-block values repeated up to a ``shape`` image."""
    return np.repeat(np.repeat(values, block, 0), block, 1)[:shape[0], :shape[1]]


def simulate_annotator(truth: np.ndarray, kind: str, n_classes: int, rng: np.random.Generator,
                       *, block_px: int, cover_px: int, coverage: float) -> np.ndarray:
    """One annotator's label mask of a truth label image (module docstring)."""
    h, w = truth.shape
    grid = (-(-h // block_px), -(-w // block_px))
    if kind in KEEP:
        keep = _blocks(rng.random(grid) < KEEP[kind], block_px, (h, w))
        shift = _blocks(rng.integers(1, n_classes, grid), block_px, (h, w))
        out = np.where(keep, truth, (truth.astype(np.int64) + shift) % n_classes)
    elif kind == "random":
        out = _blocks(rng.integers(0, n_classes, grid), block_px, (h, w))
    else:  # "yes"
        out = np.full((h, w), n_classes - 1)
    cover_grid = (-(-h // cover_px), -(-w // cover_px))
    covered = _blocks(rng.random(cover_grid) < coverage, cover_px, (h, w))
    return np.where(covered, out, IGNORE).astype(np.uint8)


def realised_rates(crowd: CrowdLabels, truth: np.ndarray,
                   n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Each annotator's sensitivity and specificity (J, K) against the truth masks of
    the same patches: what the EM should find."""
    sums = MStepSums.zeros(len(crowd.annotators), n_classes)
    for i in range(len(crowd)):
        votes = torch.from_numpy(crowd.masks[i].reshape(-1, len(crowd.annotators)))
        t = torch.from_numpy(truth[i].reshape(-1).astype(np.int64))
        y, labelled = one_hot_votes(votes, n_classes)
        known = t < n_classes
        sums += MStepSums.of(torch.nn.functional.one_hot(t[known], n_classes).double(),
                             y[known], labelled[known])
    half = torch.full((len(crowd.annotators), n_classes), 0.5, dtype=torch.float64)
    alpha, beta = sums.estimate(half, half, 1e-9)
    return alpha.numpy(), beta.numpy()


def build_crowd(config: CrowdConfig, train_source: SlideSource, spec: str, seed: int,
                classes: list[str]) -> tuple[SlideSource, list[str]]:
    """Simulated annotators of ``spec`` (kinds) as label masks in a folder of their own."""
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    names = annotator_names(kinds)
    assert train_source.annotations is not None
    truth = cv2.imread(str(train_source.annotations), cv2.IMREAD_UNCHANGED)
    with Slide(train_source.slide) as slide:
        level0_mpp = slide.mpp
    folder = config.out_dir / "crowds" / f"{spec.replace(',', '-')}-seed{seed}" / \
        "train.annotators"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(10_000 + seed)
    for kind, name in zip(kinds, names):
        mask = simulate_annotator(truth, kind, len(classes), rng,
                                  block_px=max(1, round(config.noise_block_um / level0_mpp)),
                                  cover_px=max(1, round(config.cover_um / level0_mpp)),
                                  coverage=config.coverage)
        cv2.imwrite(str(folder / f"{name}.mask.png"), mask)
    return SlideSource(train_source.slide, folder, group="train"), kinds


def run_arm(arm: str, seed: int, card: ModelCard, data: PatchDataset, crowd: CrowdLabels | None,
            test: PatchDataset, config: CrowdConfig) -> tuple[dict[str, Any], AggNet | None]:
    fit_config = FitConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                           seed=seed, device=config.device, eval_every=max(config.steps, 1),
                           checkpoint_every=max(config.steps, 1))
    epoch = max(1, math.ceil(len(data) / config.batch_size))
    aggnet = (AggNet(crowd, len(card.classes), em_every=config.em_every or epoch)
              if arm == "aggnet" and crowd is not None else None)
    torch.manual_seed(seed)
    module = build_module(card)
    started = time.perf_counter()
    fit(module, card, data, fit_config, crowd=aggnet)
    seconds = time.perf_counter() - started
    metrics = evaluate(module, card, test, device=config.device)["seg"]
    log.info("%s seed %d: held-out mean Dice %.3f (%.0fs)", arm, seed, metrics["mean_dice"],
             seconds)
    return {"arm": arm, "seed": seed, "seconds": round(seconds, 1),
            "heldout": {"mean_dice": metrics["mean_dice"], "dice": metrics["dice"]}}, aggnet


def annotator_rows(names: list[str], kinds: list[str], classes: list[str], alpha: np.ndarray,
                   beta: np.ndarray, aggnet: AggNet) -> list[dict[str, Any]]:
    est_a, est_b = aggnet.pixel.alpha.numpy(), aggnet.pixel.beta.numpy()
    rows = []
    for j, (name, kind) in enumerate(zip(names, kinds)):
        rows.append({
            "name": name, "kind": kind,
            "alpha": dict(zip(classes, np.round(alpha[j], 4).tolist())),
            "beta": dict(zip(classes, np.round(beta[j], 4).tolist())),
            "alpha_hat": dict(zip(classes, np.round(est_a[j], 4).tolist())),
            "beta_hat": dict(zip(classes, np.round(est_b[j], 4).tolist())),
            "abs_error_alpha": float(np.abs(est_a[j] - alpha[j]).mean()),
            "abs_error_beta": float(np.abs(est_b[j] - beta[j]).mean()),
            "spammer_score": dict(zip(classes, np.round(
                spammer_scores(est_a[j], est_b[j]), 4).tolist())),
            "spammer_score_true": dict(zip(classes, np.round(
                spammer_scores(alpha[j], beta[j]), 4).tolist())),
        })
    return rows


def run_experiment(config: CrowdConfig) -> dict[str, Any]:
    config.out_dir.mkdir(parents=True, exist_ok=True)
    jconfig = jvm.ExperimentConfig(out_dir=config.out_dir, cache_dir=config.cache_dir,
                                   source=config.source, crop=config.crop, labels="region")
    train_source, test_source, _ = jvm.build_slides(jconfig)
    classes = jvm.REGION_CLASSES
    names_k = [c.name for c in classes]
    card = make_card("unet", name="crowd", classes=classes, target_mpp=config.mpp,
                     tile_px=config.patch_px)
    card = card.model_copy(update={"params": {
        "encoder_name": "resnet18", "encoder_depth": 4, "decoder_channels": [128, 64, 32, 16]}})
    read = {"mpp": config.mpp, "patch_px": config.patch_px, "min_tissue": 0.75}
    truth_all = load_slide_patches(train_source, classes, stride_px=config.train_stride, **read)
    test = load_slide_patches(test_source, classes, stride_px=config.test_stride, **read)
    truth_by_box = {tuple(b): i for i, b in enumerate(truth_all.boxes.tolist())}
    runs: list[dict[str, Any]] = []
    crowds: list[dict[str, Any]] = []
    for seed in config.seeds:
        if "truth" in config.arms:
            row, _ = run_arm("truth", seed, card, truth_all, None, test, config)
            runs.append({**row, "crowd": None})
        for spec in config.crowds:
            source, kinds = build_crowd(config, train_source, spec, seed, names_k)
            data, crowd = load_crowd_slide(source, classes, stride_px=config.train_stride,
                                           **read)
            truth = truth_all.masks[[truth_by_box[tuple(b)] for b in data.boxes.tolist()]]
            alpha, beta = realised_rates(crowd, truth, len(classes))
            voted = data.masks != IGNORE
            entry: dict[str, Any] = {
                "crowd": spec, "seed": seed, "patches": len(data),
                "annotators": list(crowd.annotators),
                "votes_per_pixel": float((crowd.masks != IGNORE).sum(-1).mean()),
                "majority_share_decided": float(voted.mean()),
                "majority_accuracy": float((data.masks[voted] == truth[voted]).mean()),
            }
            kinds_by_name = dict(zip(annotator_names(kinds), kinds))
            for arm in config.arms:
                if arm == "truth":
                    continue
                row, aggnet = run_arm(arm, seed, card, data, crowd, test, config)
                runs.append({**row, "crowd": spec})
                if aggnet is not None:
                    entry["aggnet_annotators"] = annotator_rows(
                        list(crowd.annotators), [kinds_by_name[a] for a in crowd.annotators],
                        names_k, alpha, beta, aggnet)
                    entry["em_rounds"] = aggnet.rounds
            crowds.append(entry)
    results = {"config": {k: (str(v) if isinstance(v, Path) else v)
                          for k, v in asdict(config).items()},
               "train_patches": truth_all.summary(), "heldout_patches": test.summary(),
               "torch_threads": torch.get_num_threads(), "runs": runs, "crowds": crowds,
               "summary": summarise(runs, names_k)}
    (config.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def summarise(runs: list[dict[str, Any]], classes: list[str]) -> list[dict[str, Any]]:
    table = []
    for crowd in dict.fromkeys(r["crowd"] for r in runs):
        for arm in dict.fromkeys(r["arm"] for r in runs if r["crowd"] == crowd):
            mine = [r for r in runs if r["crowd"] == crowd and r["arm"] == arm]
            values = [r["heldout"]["mean_dice"] for r in mine]
            table.append({"crowd": crowd, "arm": arm, "seeds": [r["seed"] for r in mine],
                          "mean_dice": float(np.mean(values)), "sd": float(np.std(values)),
                          "per_seed": values,
                          "dice": {c: float(np.nanmean([r["heldout"]["dice"][c] for r in mine]))
                                   for c in classes}})
    return table


def merge_results(folders: Sequence[Path]) -> dict[str, Any]:
    """The runs and crowds of several ``results.json`` (one per process), summarised
    together."""
    parts = [json.loads((Path(f) / "results.json").read_text()) for f in folders]
    runs = [r for p in parts for r in p["runs"]]
    classes = list(runs[0]["heldout"]["dice"]) if runs else []
    return {"runs": runs, "crowds": [c for p in parts for c in p["crowds"]],
            "summary": summarise(runs, classes)}


def format_tables(results: dict[str, Any]) -> str:
    lines = ["| crowd | arm | held-out mean Dice (sd) | per seed | Dice per class |",
             "|---|---|---|---|---|"]
    for e in results["summary"]:
        lines.append(f"| {e['crowd'] or '-'} | {e['arm']} | {e['mean_dice']:.3f} "
                     f"({e['sd']:.3f}) | {' '.join(f'{v:.3f}' for v in e['per_seed'])} | "
                     + " / ".join(f"{v:.3f}" for v in e["dice"].values()) + " |")
    lines += ["", "| crowd, seed | majority vote right | annotator: alpha-hat/alpha, "
              "beta-hat/beta (yes class); mean |error| alpha, beta; S (yes class) |",
              "|---|---|---|"]
    for c in results["crowds"]:
        cells = []
        for a in c.get("aggnet_annotators", []):
            yes = list(a["alpha"])[-1]
            cells.append(f"{a['name']} {a['alpha_hat'][yes]:.2f}/{a['alpha'][yes]:.2f}, "
                         f"{a['beta_hat'][yes]:.2f}/{a['beta'][yes]:.2f}; "
                         f"{a['abs_error_alpha']:.3f}, {a['abs_error_beta']:.3f}; "
                         f"S {a['spammer_score'][yes]:.2f}")
        lines.append(f"| {c['crowd']}, {c['seed']} | {c['majority_accuracy']:.3f} of "
                     f"{c['majority_share_decided']:.2f} | {'<br>'.join(cells) or '-'} |")
    return "\n".join(lines)


@click.command(help=(__doc__ or "").split("\n")[0])
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              default=Path("experiment-output"), show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None)
@click.option("--crowd", "crowds", multiple=True,
              help=f"annotator kinds, comma-separated ({', '.join(KINDS)}); repeatable; "
              f"default: {' and '.join(DEFAULT_CROWDS)}")
@click.option("--arms", "arm_list", default=",".join(ARMS), show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="comma-separated")
@click.option("--steps", type=int, default=300, show_default=True)
@click.option("--em-every", type=int, default=0, show_default=True,
              help="aggnet: training steps per EM round (0: one epoch)")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--mpp", type=float, default=2.0, show_default=True)
@click.option("--patch-px", type=int, default=64, show_default=True)
@click.option("--train-stride", type=int, default=32, show_default=True)
@click.option("--test-stride", type=int, default=32, show_default=True)
@click.option("--coverage", type=float, default=0.6, show_default=True,
              help="share of the slide's squares each annotator labels")
@click.option("--cover-um", type=float, default=128.0, show_default=True)
@click.option("--noise-block-um", type=float, default=8.0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--merge", "merge_dirs", multiple=True, type=click.Path(path_type=Path),
              help="train nothing: print the tables of these runs' results.json together "
              "(seeds run in processes side by side)")
def main(crowds: tuple[str, ...], arm_list: str, seeds: str, merge_dirs: tuple[Path, ...],
         **options: Any) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if merge_dirs:
        sys.stdout.write(format_tables(merge_results(merge_dirs)) + "\n")
        return
    arms = tuple(a for a in arm_list.split(",") if a)
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise click.BadParameter(f"arms are {', '.join(ARMS)}; got {sorted(unknown)}")
    config = CrowdConfig(crowds=crowds or DEFAULT_CROWDS, arms=arms,
                         seeds=tuple(int(s) for s in seeds.split(",")), **options)
    for spec in config.crowds:
        annotator_names([k.strip() for k in spec.split(",") if k.strip()])
    results = run_experiment(config)
    sys.stdout.write(f"train: {results['train_patches']}\nheld-out: "
                     f"{results['heldout_patches']}\n" + format_tables(results) + "\n")


if __name__ == "__main__":
    main()
