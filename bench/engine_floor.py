"""The least work the engine adds to reading, measured on one thread with nothing else
running, and the best ratio to the reader that this work allows on any number of cores.

    python bench/engine_floor.py [--size 8192] [--rounds 3] [--threads N] [--out-dir DIR]

On the very tiles of an identity run (``bench/engine.py``'s plan), one round is, on
one thread and back to back: the project's own reader decoding every tile (the
baseline, R: CPU ms per tile), the model call on each batch of 8 (uint8 -> float32,
identity), weighting and accumulating each batch into its chunks
(``StreamingMerger.aggregate_batch``) and storing each finished chunk as the engine
does (uint8 conversion, class map, Blosc, file, the pyramid halving of
``wsi/pyramid_stream.py``). Their sum E is the engine's own work per tile with no
thread hand-offs, no cache sharing and no waiting: a floor.

Why a floor says something about the goals of issue #22: the baseline of bench/engine.py
is the reader on ``--threads`` threads, which keeps every core busy at Rn CPU ms per
tile (measured in the same round). The engine's inference stage needs at least R + E
per tile on the same cores, so its rate is at most Rn / (R + E) of the reader's,
however the work is spread over threads. The whole job does more still (tissue,
thumbnail), so the same bound holds for it. The printed bound is to be read
against the goals (0.8x inference stage, 0.6x whole job) and against bench/engine.py's
measured ratios. Medians over ``--rounds``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import cache_dir, ram_dir, real_tissue_slide, table  # noqa: E402
from bench.engine import engine_plan, reader_round  # noqa: E402

BATCH = 8
GOALS = {"inference stage": 0.8, "whole job": 0.6}


def one_round(slide: Path, out_dir: Path) -> dict[str, float]:
    """CPU ms per tile of each step, on this thread."""
    import numpy as np
    import torch

    from models.catalogue import resolve_card
    from models.loading import load_model
    from models.predictor import Predictor
    from workers.engine.chunk_writer import TimedSink
    from workers.engine.part_table import chunk_touches
    from workers.engine.result_layout import ResultLayout
    from workers.engine.streamed_pyramid import StreamedPyramids
    from wsi.blending import StreamingMerger, weight_window
    from wsi.ome_zarr import ResultWriter
    from wsi.reader import Slide

    torch.set_num_threads(1)
    plan = engine_plan(slide, "identity")
    g, tiles = plan.geometry, plan.tiles
    card = resolve_card("identity")
    cpu: dict[str, float] = {}

    start = time.thread_time()
    with Slide(slide, backend="tiffslide") as reader:
        pixels = np.stack([reader.read_scaled(plan.target_mpp, t.x, t.y, g.tile_px, g.tile_px)
                           for t in tiles])
    cpu["read, one thread (R)"] = time.thread_time() - start

    predictor = Predictor(load_model(card), device="cpu")
    start = time.thread_time()
    outputs = [predictor(pixels[i : i + BATCH])["probabilities"]
               for i in range(0, len(tiles), BATCH)]
    cpu["model call (uint8 -> float32)"] = time.thread_time() - start

    with tempfile.TemporaryDirectory(prefix="slidepipe-floor-", dir=out_dir) as folder:
        root = Path(folder) / "r.zarr"
        height, width = plan.output_shape
        writer = ResultWriter(root, height=height, width=width, mpp=plan.output_mpp,
                              chunk_px=512)
        layout = ResultLayout(writer, card, plan)
        dense = layout.sinks["probabilities"]
        pyramids = StreamedPyramids(root, chunk_touches(plan, 512)[0] >= 0, 512)
        pyramids.attach(dense.image, mean=True)
        if dense.classes is not None:
            pyramids.attach(dense.classes, mean=False)
        store = TimedSink(dense)
        merger = StreamingMerger(
            channels=3, shape=plan.output_shape, chunk_px=512,
            boxes=[plan.output_box(t) for t in tiles],
            window=weight_window(g.output_tile_px, g.output_tile_px, kind="tent"),
            sink=store, normalize=False)
        start = time.thread_time()
        for i, batch in enumerate(outputs):
            wheres = [plan.output_box(t)[:2] for t in tiles[i * BATCH : (i + 1) * BATCH]]
            merger.aggregate_batch(batch, wheres)
        merger.finalize()
        total = time.thread_time() - start
        if pyramids.completed() != ["", "labels/classes"]:
            raise RuntimeError("the pyramids were not made to the top: the floor is incomplete")
    cpu["weighting + accumulating"] = total - store.cpu_s
    cpu["storing chunks + pyramid halving"] = store.cpu_s
    return {k: v / len(tiles) * 1e3 for k, v in cpu.items()} | {"tiles": len(tiles)}


def reader_threads_ms(slide: Path, threads: int) -> float:
    """CPU ms per tile of bench/engine.py's baseline: the reader on ``threads`` threads."""
    plan = engine_plan(slide, "identity")
    return reader_round(slide, plan.tiles, plan.geometry.tile_px, threads)["reader_cpu_ms_per_tile"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="slide side in pixels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="threads of the reader baseline, as bench/engine.py's")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="scratch for the stored chunks (default: /dev/shm when writable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    slide = real_tissue_slide(args.size)
    out_dir = args.out_dir or ram_dir() or cache_dir()
    one_round(slide, out_dir)  # warm-up: page cache, imports, allocator
    rounds = []
    for _ in range(max(1, args.rounds)):
        rounds.append({**one_round(slide, out_dir),
                       f"reader, {args.threads} threads (Rn)": reader_threads_ms(slide, args.threads)})
    steps = [k for k in rounds[0] if k != "tiles"]
    median = {k: statistics.median(r[k] for r in rounds) for k in steps}
    reader = median["read, one thread (R)"]
    threaded = median[f"reader, {args.threads} threads (Rn)"]
    engine = sum(v for k, v in median.items() if not k.startswith("read"))
    print(f"identity on {slide.name}: {int(rounds[0]['tiles'])} tiles of 256 px, "
          f"CPU ms per tile (median of {len(rounds)} rounds)")
    rows = [[k, f"{median[k]:.3f}", " ".join(f"{r[k]:.3f}" for r in rounds),
             f"{median[k] / reader:.2f}x"] for k in steps]
    rows.append(["engine's own work E (sum)", f"{engine:.3f}", "", f"{engine / reader:.2f}x"])
    print(table(["step", "ms/tile", "per round", "vs R"], rows))
    bound = threaded / (reader + engine)
    print("best possible engine rate relative to bench/engine.py's reader baseline, which "
          f"fills the cores: Rn / (R + E) = {bound:.2f}x")
    for goal, ratio in GOALS.items():
        verdict = "within reach" if bound >= ratio else "out of reach"
        print(f"  goal {goal} >= {ratio:.1f}x: {verdict} on this machine")


if __name__ == "__main__":
    main()
