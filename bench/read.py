"""Raw tile decode rate: the ceiling the engine works under.

    python bench/read.py [--size 8192] [--threads N] [--repeats 3]

openslide's and tiffslide's own ``read_region`` over the engine's tile list (tissue
tiles of the identity model) on one real-tissue JPEG slide, with 1 and N threads (one
slide handle per thread), after one warm-up pass so the page cache is equal for all;
each rate is the median of ``--repeats`` passes.
Beside them, slidepipe's own reader (``wsi.reader.Slide``, tiffslide's tiled path: one
handle shared by the threads, each slide tile decoded once into a shared cache), which
is what the engine reads through by default.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import median_of, real_tissue_slide, table  # noqa: E402


def plan_for(slide_path: Path, model: str):  # type: ignore[no-untyped-def]
    from models.catalogue import resolve_card
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
    shared = None
    if backend == "slidepipe":
        from wsi.reader import Slide

        shared = Slide(slide_path, backend="tiffslide")
        opened.append(shared)

    def read(tile) -> int:  # type: ignore[no-untyped-def]
        if shared is not None:
            return int(shared.read_level(0, tile.x0, tile.y0, tile_px, tile_px).shape[0])
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


LIBRARIES = ("openslide", "tiffslide")


def measure_all(slide: Path, tiles: list, tile_px: int, threads: int,
                backends: tuple[str, ...] = (*LIBRARIES, "slidepipe"),
                repeats: int = 1) -> dict[tuple[str, int], float]:
    """Tiles/s per (backend, threads): the median of ``repeats`` passes after a warm-up."""
    rates = {}
    for backend in backends:
        for n in sorted({1, threads}):
            raw_rate(slide, backend, tiles[:64], tile_px, n)  # warm the page cache
            rates[(backend, n)] = median_of(
                repeats, lambda b=backend, n=n: raw_rate(slide, b, tiles, tile_px, n))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many passes")
    args = parser.parse_args()
    slide = real_tissue_slide(args.size)
    plan = plan_for(slide, "identity")
    rates = measure_all(slide, plan.tiles, plan.geometry.tile_px, args.threads,
                        repeats=args.repeats)
    base = rates[("openslide", 1)]
    print(f"slide {slide.name}: {len(plan.tiles)} tiles of {plan.geometry.tile_px} px")
    print(table(["backend", "threads", "tiles/s", "vs openslide/1"],
                [[b, n, f"{r:.0f}", f"{r / base:.2f}x"] for (b, n), r in rates.items()]))


if __name__ == "__main__":
    main()
