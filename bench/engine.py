"""Engine throughput against the raw decode ceiling, on one slide, in one run.

    python bench/engine.py [--size 8192] [--threads N] [--model identity]

1. The tile list: the engine's own plan (tissue mask + grid) for the identity model.
2. Raw ``read_region`` tiles/s for openslide and tiffslide on exactly those tiles, with
   1 and N threads (one slide handle per thread): the ceiling the engine works under.
3. The engine (``run_engine`` with ``identity``) on the same slide and tiles with N read
   threads: tiles/s of its inference stage (read + model + blend + write overlapped)
   and of the whole job, and the ratio to the best raw rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import real_tissue_slide, table  # noqa: E402


def plan_for(slide_path: Path, model: str):  # type: ignore[no-untyped-def]
    from models.registry import resolve_card
    from wsi.reader import Slide
    from wsi.tiling import TileGeometry, plan_tiles
    from wsi.tissue import tissue_mask

    card = resolve_card(model)
    with Slide(slide_path) as slide:
        mpp = slide.grid_mpp(card.target_mpp)
        width, height = slide.scaled_dimensions(mpp)
        geometry = TileGeometry(card.tile_px, card.overlap_px, card.output_crop_px, card.output_stride)
        return plan_tiles(width=width, height=height, target_mpp=mpp, slide_mpp=slide.mpp,
                          geometry=geometry, mask=tissue_mask(slide))


def raw_rate(slide_path: Path, backend: str, tiles: list, tile_px: int, threads: int) -> float:
    """Tiles/s of the library's own read_region over ``tiles`` (level 0), ``threads`` handles."""
    import numpy as np
    import openslide
    import tiffslide

    local = threading.local()
    opened = []

    def read(tile) -> int:  # type: ignore[no-untyped-def]
        handle = getattr(local, "h", None)
        if handle is None:
            handle = (openslide.OpenSlide if backend == "openslide" else tiffslide.TiffSlide)(str(slide_path))
            local.h = handle
            opened.append(handle)
        if backend == "openslide":
            region = np.asarray(handle.read_region((tile.x0, tile.y0), 0, (tile_px, tile_px)))
        else:
            region = handle.read_region((tile.x0, tile.y0), 0, (tile_px, tile_px), as_array=True)
        return int(region.shape[0])

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(read, tiles, chunksize=8):
            pass
    elapsed = time.perf_counter() - start
    for handle in opened:
        handle.close()
    return len(tiles) / elapsed


def engine_rate(slide_path: Path, model: str, backend: str, threads: int, weights: Path | None) -> dict:
    from workers.engine import run_engine
    from workers.spec import RunSpec

    out = Path(tempfile.mkdtemp(prefix="bench-engine-")) / "result.zarr"
    try:
        start = time.perf_counter()
        result = run_engine(RunSpec(slide_path=slide_path, model=model, out_path=out, weights=weights,
                                    backend=backend, read_workers=threads, device="cpu"))
        total = time.perf_counter() - start
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    return {"tiles": result.tiles_total, "infer_s": result.timings_s["infer"], "total_s": total,
            "timings": result.timings_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="slide side in pixels (real tissue, mirrored)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    slide = real_tissue_slide(args.size)
    plan = plan_for(slide, "identity")
    tiles, tile_px = plan.tiles, plan.geometry.tile_px
    print(f"slide {slide.name}: {args.size}x{args.size} px, {len(tiles)} tissue tiles of {tile_px} px")
    rows, raw = [], {}
    for backend in ("openslide", "tiffslide"):
        for threads in sorted({1, args.threads}):
            raw_rate(slide, backend, tiles[:64], tile_px, threads)  # warm the page cache
            rate = raw_rate(slide, backend, tiles, tile_px, threads)
            raw[(backend, threads)] = rate
            rows.append([f"raw read_region {backend}", threads, f"{rate:.0f}", ""])
    best_key = max(raw, key=raw.get)  # type: ignore[arg-type]
    best = raw[best_key]
    figures = {"slide_px": args.size, "tiles": len(tiles), "raw_tiles_per_s": {f"{b}/{t}": r for (b, t), r in raw.items()}}
    for backend in ("openslide", "tiffslide"):
        e = engine_rate(slide, "identity", backend, args.threads, None)
        infer_rate, job_rate = e["tiles"] / e["infer_s"], e["tiles"] / e["total_s"]
        rows.append([f"engine identity ({backend}), infer stage", args.threads, f"{infer_rate:.0f}",
                     f"{infer_rate / best:.2f}x"])
        rows.append([f"engine identity ({backend}), whole job", args.threads, f"{job_rate:.0f}",
                     f"{job_rate / best:.2f}x"])
        figures[f"engine_{backend}"] = {**e, "infer_tiles_per_s": infer_rate, "job_tiles_per_s": job_rate,
                                        "ratio_infer_vs_best_raw": infer_rate / best}
    print(table(["what", "threads", "tiles/s", f"vs best raw ({best_key[0]}/{best_key[1]})"], rows))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
