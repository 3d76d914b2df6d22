"""Engine throughput against the project's own best reader and the model alone.

    python bench/engine.py [--size 8192] [--unet-size 2048] [--threads N] [--rounds 5]
                           [--unet-rounds 3] [--skip-unet] [--libraries] [--accumulate auto]
                           [--device cpu] [--batch-size 8] [--out-dir DIR] [--json FILE]

1. The tile list: the engine's own plan (tissue mask + grid) for the identity model on
   a real-tissue JPEG slide (``--size`` px square).
2. ``--rounds`` paired rounds; in each, back to back: slidepipe's own reader
   (``wsi.reader.Slide``'s tiled path with its shared decoded-tile cache, ``--threads``
   threads: the fastest reader this project has, see bench/read.py) over exactly the
   engine's tiles, then the engine (``run_engine`` with ``identity``, the same threads).
   Per round: the engine's inference stage (read + model + blend + store, overlapped)
   and whole job (tissue, plan, pyramids, hash included) in tiles/s, each as a ratio to
   the reader's rate of that round; printed as the median and the range over rounds.
   Why paired: on a shared 2-vCPU VM the machine's speed drifts by tens of percent from
   one minute to the next; a ratio of rates measured seconds apart is steadier than one
   of medians measured a minute apart.
3. Per stage (``workers.engine.infer.InferStages``, median over the rounds): seconds
   waiting for decoded tiles, in the model, blending, storing (thread-seconds over the
   store pool), and the waits between them: which stage limits the job.
4. A seeded U-Net (ResNet-18, 256 px tiles) on a smaller slide, ``--unet-rounds``
   paired rounds: its own forward rate on pre-decoded batches (normalisation and
   softmax included), then the engine with it on the same tiles; the ratio engine/model
   says how well the pipeline hides decoding, blending and storing behind the model.
5. ``--libraries``: also openslide's and tiffslide's own ``read_region`` rates (as
   bench/read.py), for the table in docs/benchmarks.md.
Each run writes its result under ``--out-dir``, by default RAM-backed /dev/shm: the
engine's own cost, not the disk's. Runs start after ``sync``, so that none pays for the
writeback of the one before. The default run takes about 4-5 minutes on 2 loaded cores
(``--skip-unet``: about 1.5). The CPU milliseconds per tile of the reader and of the
whole job (all threads) are printed too: on a shared VM whose speed drifts they say
what idle cores would give, where wall-clock rates cannot.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    cache_dir,
    file_create_ms,
    ram_dir,
    real_tissue_slide,
    scratch,
    settle_disk,
    table,
)
from bench.read import measure_all, raw_rate  # noqa: E402

#: Stage counters printed, in this order (InferStages' fields).
STAGES = ("read_wait_s", "model_s", "handoff_wait_s", "blend_s", "blend_cpu_s",
          "blend_idle_s", "store_wait_s", "store_busy_s", "store_cpu_s", "drain_s", "wall_s")


class _StageCapture(logging.Handler):
    """Keeps the ``infer_stages`` the engine logs at the end of its inference stage."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stages: dict | None = None

    def emit(self, record: logging.LogRecord) -> None:
        stages = getattr(record, "infer_stages", None)
        if stages is not None:
            self.stages = stages


def engine_run(slide_path: Path, model: str, threads: int, out_dir: Path,
               weights: Path | None = None, accumulate: str = "auto",
               device: str = "cpu") -> dict:
    """One engine run into a scratch folder under ``out_dir``, after flushing the
    previous run's writes; its rates and per-stage seconds."""
    from workers.engine.run import run_engine
    from workers.engine.spec import RunSpec

    capture = _StageCapture()
    logger = logging.getLogger("workers.engine.infer")
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        with scratch("slidepipe-engine-", out_dir) as folder:
            spec = RunSpec(slide_path=slide_path, model=model, weights=weights,
                           read_workers=threads, device=device, out_path=folder / "r.zarr",
                           extra={"accumulate": accumulate})
            settle_disk()
            busy = GpuBusy() if device.startswith("cuda") else None
            start, cpu_start = time.perf_counter(), process_cpu_s()
            try:
                result = run_engine(spec)
            finally:
                gpu_busy = busy.stop() if busy is not None else None
            total, cpu = time.perf_counter() - start, process_cpu_s() - cpu_start
    finally:
        logger.removeHandler(capture)
    stages = capture.stages or {}  # the last (or only) inference stage's counters
    return {"gpu_busy_fraction": gpu_busy,"tiles": result.tiles_total, "infer_s": result.timings_s["infer"], "total_s": total,
            "infer_tiles_per_s": result.tiles_total / result.timings_s["infer"],
            "job_tiles_per_s": result.tiles_total / total,
            "job_cpu_ms_per_tile": cpu / result.tiles_total * 1e3,
            "timings": result.timings_s, "stages": stages}


class GpuBusy:
    """The GPU's busy fraction over a run: ``torch.cuda.utilization()`` (NVML: the share
    of the last sample period in which a kernel ran) sampled every 50 ms in a thread.
    ``None`` where NVML (the ``nvidia-ml-py`` package) is missing."""

    def __init__(self, period_s: float = 0.05) -> None:
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(period_s,), daemon=True)
        self._thread.start()

    def _sample(self, period_s: float) -> None:
        import torch

        while not self._stop.wait(period_s):
            try:
                self.samples.append(torch.cuda.utilization() / 100)
            except Exception:  # noqa: BLE001 - no NVML: report None
                return

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return statistics.fmean(self.samples) if self.samples else None


def process_cpu_s() -> float:
    """CPU seconds of this process, all threads: on a shared VM whose speed drifts, CPU
    per tile says what two idle cores would give, where wall-clock rates cannot."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reader_round(slide: Path, tiles: list, tile_px: int, threads: int) -> dict:
    cpu_start = process_cpu_s()
    rate = raw_rate(slide, "slidepipe", tiles, tile_px, threads)
    return {"reader_tiles_per_s": rate,
            "reader_cpu_ms_per_tile": (process_cpu_s() - cpu_start) / len(tiles) * 1e3}


def engine_plan(slide_path: Path, model: str):
    """The plan ``run_engine`` makes with default parameters (tissue tiles in strips,
    stray tissue covered): the reader reads exactly the engine's tiles."""
    from models.catalogue import resolve_card
    from workers.engine.geometry import run_geometry, strip_px
    from workers.engine.spec import RunSpec
    from wsi.reader import Slide
    from wsi.tiling import plan_tiles
    from wsi.tissue import TissueParams, tissue_mask

    spec = RunSpec(slide_path=slide_path, model=model, out_path=Path("unused.zarr"))
    card = resolve_card(model)
    geometry = run_geometry(card, None, None)
    with Slide(slide_path) as slide:
        mpp = slide.grid_mpp(card.target_mpp)
        width, height = slide.scaled_dimensions(mpp)
        return plan_tiles(width=width, height=height, target_mpp=mpp, slide_mpp=slide.mpp,
                          geometry=geometry, mask=tissue_mask(slide, TissueParams(
                              **spec.tissue_values())),
                          min_tissue_fraction=spec.min_tissue_fraction,
                          strip_px=strip_px(spec.chunk_px, geometry),
                          cover_all_tissue=spec.cover_all_tissue)


def unet_card(folder: Path) -> Path:
    """A seeded U-Net (ResNet-18 encoder, smp defaults) card, 256 px tiles at 0.5 µm/px."""
    import torch

    from models.architectures import build_module
    from models.card import IMAGENET, ClassSpec, ModelCard
    from models.loading import save_weights

    if (folder / "card.json").is_file():
        return folder / "card.json"
    torch.manual_seed(0)
    card = ModelCard(
        name="bench-unet-r18", architecture="unet", weights="weights.safetensors",
        classes=[ClassSpec(name="a", color="000000"), ClassSpec(name="b", color="FF00FF")],
        target_mpp=0.5, tile_px=256, overlap_px=32, normalization=IMAGENET,
        params={"encoder_name": "resnet18"},
    )
    save_weights(build_module(card), folder / "weights.safetensors")
    return card.save(folder)


def forward_rate(card_path: Path, slide: Path, tiles: list, batch_size: int,
                 device: str = "cpu") -> float:
    """The model's own rate on pre-decoded batches (normalisation and softmax included),
    one pass after a warm-up batch."""
    import numpy as np

    from models.card import read_card
    from models.loading import load_model
    from models.predictor import Predictor
    from wsi.reader import Slide

    card = read_card(card_path)
    with Slide(slide) as s:
        pixels = np.stack([s.read_scaled(card.target_mpp, t.x, t.y, card.tile_px, card.tile_px)
                           for t in tiles])
    predictor = Predictor(load_model(card), device=device)
    predictor(pixels[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        predictor(pixels[i : i + batch_size])
    return len(pixels) / (time.perf_counter() - start)


def spread(values: list[float]) -> str:
    """``median (min-max)`` of per-round ratios."""
    ordered = sorted(values)
    return f"{statistics.median(ordered):.2f}x ({ordered[0]:.2f}-{ordered[-1]:.2f})"


def median_stages(runs: list[dict]) -> dict[str, float]:
    return {k: statistics.median(r["stages"][k] for r in runs)
            for k in STAGES if runs and all(k in r["stages"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="slide side in pixels (real tissue, mirrored)")
    parser.add_argument("--unet-size", type=int, default=2048, help="slide side for the U-Net part")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=5, help="paired reader/engine rounds")
    parser.add_argument("--unet-rounds", type=int, default=3, help="paired model/engine rounds")
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--libraries", action="store_true",
                        help="also openslide's and tiffslide's read_region rates")
    parser.add_argument("--accumulate", default="auto", choices=("auto", "numpy", "torch"),
                        help="the engine's blending path (auto: on the model's device if a GPU)")
    parser.add_argument("--device", default="cpu", help="the model's device: cpu, cuda")
    parser.add_argument("--batch-size", type=int, default=8, help="U-Net tiles per model call")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the engine writes its results (default: /dev/shm when "
                        "writable, else the bench cache)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    out_dir = args.out_dir or ram_dir() or cache_dir()
    slide = real_tissue_slide(args.size)
    plan = engine_plan(slide, "identity")
    tiles, tile_px = plan.tiles, plan.geometry.tile_px
    print(f"identity: slide {slide.name}, {len(tiles)} tissue tiles of {tile_px} px, "
          f"{args.threads} threads, device {args.device}, blending: {args.accumulate}")
    raw_rate(slide, "slidepipe", tiles[:64], tile_px, args.threads)  # warm the page cache
    engine_run(slide, "identity", args.threads, out_dir, accumulate=args.accumulate, device=args.device)  # warm-up
    rounds = []
    for _ in range(max(1, args.rounds)):
        rounds.append({**reader_round(slide, tiles, tile_px, args.threads),
                       **engine_run(slide, "identity", args.threads, out_dir,
                                    accumulate=args.accumulate, device=args.device)})
    infer_ratio = [r["infer_tiles_per_s"] / r["reader_tiles_per_s"] for r in rounds]
    job_ratio = [r["job_tiles_per_s"] / r["reader_tiles_per_s"] for r in rounds]
    rows = [
        ["slidepipe reader (tiled path)", args.threads,
         " ".join(f"{r['reader_tiles_per_s']:.0f}" for r in rounds), "1.00x"],
        ["engine identity, infer stage", args.threads,
         " ".join(f"{r['infer_tiles_per_s']:.0f}" for r in rounds), spread(infer_ratio)],
        ["engine identity, whole job", args.threads,
         " ".join(f"{r['job_tiles_per_s']:.0f}" for r in rounds), spread(job_ratio)],
    ]
    cpu_rows = [[f"{statistics.median(r['reader_cpu_ms_per_tile'] for r in rounds):.2f}",
                 f"{statistics.median(r['job_cpu_ms_per_tile'] for r in rounds):.2f}"]]
    figures: dict = {"slide_px": args.size, "tiles": len(tiles), "threads": args.threads,
                     "accumulate": args.accumulate, "identity_rounds": rounds,
                     "identity_infer_vs_reader": infer_ratio, "identity_job_vs_reader": job_ratio}
    stage_rows = [["identity", *(f"{v:.3f}" for v in median_stages(rounds).values())]]
    if not args.skip_unet:
        card = unet_card(cache_dir() / "engine-unet-r18")
        uslide = real_tissue_slide(args.unet_size)
        utiles = engine_plan(uslide, str(card)).tiles
        engine_run(uslide, str(card), args.threads, out_dir, accumulate=args.accumulate, device=args.device)
        unet_rounds = []
        for _ in range(max(1, args.unet_rounds)):
            model = forward_rate(card, uslide, utiles, args.batch_size, args.device)
            unet_rounds.append({"model_tiles_per_s": model,
                                **engine_run(uslide, str(card), args.threads, out_dir,
                                             accumulate=args.accumulate, device=args.device)})
        unet_ratio = [r["infer_tiles_per_s"] / r["model_tiles_per_s"] for r in unet_rounds]
        rows += [
            [f"unet forward, pre-decoded ({len(utiles)} tiles)", "-",
             " ".join(f"{r['model_tiles_per_s']:.1f}" for r in unet_rounds), "1.00x"],
            ["engine unet, infer stage", args.threads,
             " ".join(f"{r['infer_tiles_per_s']:.1f}" for r in unet_rounds), spread(unet_ratio)],
        ]
        figures |= {"unet_tiles": len(utiles), "unet_rounds": unet_rounds,
                    "unet_engine_vs_model": unet_ratio}
        stage_rows.append(["unet", *(f"{v:.3f}" for v in median_stages(unet_rounds).values())])
    if args.libraries:
        raw = measure_all(slide, tiles, tile_px, args.threads)
        rows += [[f"raw {b} {'read_region' if b != 'slidepipe' else 'reader'}", n, f"{r:.0f}",
                  ""] for (b, n), r in raw.items()]
        figures["raw_tiles_per_s"] = {f"{b}/{n}": r for (b, n), r in raw.items()}
    print(table(["what", "threads", "tiles/s per round", "ratio: median (range)"], rows))
    for run, runs in (("identity", rounds), ("unet", figures.get("unet_rounds", []))):
        busy = [r["gpu_busy_fraction"] for r in runs if r.get("gpu_busy_fraction") is not None]
        if busy:
            print(f"GPU busy over the {run} job (NVML, median over rounds): "
                  f"{statistics.median(busy):.0%}")
    if all(len(r) > 1 for r in stage_rows):
        print("seconds per stage of the inference stage (median over rounds; blend_* and "
              "store_* are summed over the threads that blend and store):")
        print(table(["run", *STAGES], stage_rows))
    else:
        print("per-stage counters: not reported by this engine")
    print("CPU ms per tile, all threads (median over rounds): reader "
          f"{cpu_rows[0][0]}, engine whole job {cpu_rows[0][1]}")
    create_ms = file_create_ms(out_dir)
    figures["out_dir"], figures["output_file_create_ms"] = str(out_dir), create_ms
    print(f"results written under {out_dir} (creating a 200 kB file there: {create_ms:.2f} ms); "
          f"whole job, seconds per stage (last round): "
          + ", ".join(f"{k} {v:.2f}" for k, v in rounds[-1]["timings"].items()))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
