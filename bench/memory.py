"""Peak memory of the engine as the slide grows: it must follow a band, not the area.

    python bench/memory.py [--sizes 10000,30000,60000,100000] [--tissue 0.1] [--mpp 0.25]

For each size a mostly-background slide with horizontal tissue bands across its whole
width is generated (streaming, cached; 0.25 µm/px, a 40x scan, so 100k px is 25 mm),
then the engine runs it with the identity model at the slide's full resolution (every
level-0 pixel goes through the blend) in a fresh process whose peak RSS (ru_maxrss) is
reported beside what a whole-slide float32 canvas would have needed. The baseline, measured in the same run,
is the engine's RSS on the smallest slide.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import banded_slide, run_child, table  # noqa: E402

GIB = 2**30


def child(slide: str, model: str, out: str, target_mpp: str) -> None:
    """Run the engine once and print its figures as JSON (runs in the measured process)."""
    import shutil

    from workers.engine.run import run_engine
    from workers.engine.spec import RunSpec

    start = time.perf_counter()
    try:
        result = run_engine(RunSpec(slide_path=Path(slide), model=model, out_path=Path(out),
                                    device="cpu", overwrite=True, target_mpp=float(target_mpp)))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"tiles": result.tiles_total, "seconds": time.perf_counter() - start,
                      "timings": result.timings_s}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,30000,60000")
    parser.add_argument("--tissue", type=float, default=0.1, help="tissue fraction of the slide")
    parser.add_argument("--model", default="identity")
    parser.add_argument("--mpp", type=float, default=0.25, help="slide resolution; the run uses it too")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows, figures = [], []
    base_rss = None
    for size in (int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        slide = banded_slide(size, args.tissue, args.mpp)
        made = time.perf_counter() - t0
        out = slide.with_suffix(".result.zarr")
        report, rss = run_child(["bench/memory.py", "--child", str(slide), args.model, str(out),
                                 str(args.mpp)])
        base_rss = base_rss or rss
        canvas = size * size * 4 * 4  # C=3 sums + weights, float32, whole slide
        figures.append({"size_px": size, "peak_rss_bytes": rss, **report})
        rows.append([f"{size:,}", f"{report['tiles']:,}", f"{report['seconds']:.1f}",
                     f"{rss / GIB:.2f}", f"{rss / base_rss:.2f}x", f"{canvas / GIB:,.1f}",
                     f"{made:.0f}"])
    print(table(["slide px", "tiles", "engine s", "peak RSS GiB", "vs smallest",
                 "float canvas GiB", "generate s"], rows))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
