"""Tissue-mask time per slide: today's default (``stain`` at 4 µm/px) and the one before
(``hsv-otsu`` at 8 µm/px, as in bench/tissue_recall.py).

    python bench/tissue.py [--sizes 10000,30000,60000,100000] [--mpp 0.25]

Banded slides (cached; the same 40x slides as bench/memory by default, ``--mpp 0.5`` for
20x ones, whose pyramid has no 4 µm/px level) and one real-tissue slide. Each measured 3
times, best kept; CPU seconds (all threads) beside wall seconds, as the development VM
is shared; "view decoded" is the share of the 4 µm/px view decoded at full quality
(``wsi/tissue_view.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import banded_slide, real_tissue_slide, table  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    from wsi.reader import Slide
    from wsi.tissue import TissueParams, tissue_mask

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,30000,60000,100000")
    parser.add_argument("--mpp", type=float, default=0.25, help="banded slides' resolution")
    args = parser.parse_args()
    slides = [real_tissue_slide(8192)] + [banded_slide(int(s), mpp=args.mpp)
                                          for s in args.sizes.split(",")]
    rows = []
    params = TissueParams()
    before = TissueParams(method="hsv-otsu", working_mpp=8.0, median_um=40.0, closing_um=60.0,
                          min_fragment_um2=20_000.0)
    for path in slides:
        with Slide(path) as slide:
            before_s = best_of(lambda s=slide: tissue_mask(s, before))
            cpu = time.process_time()
            mask_s = best_of(lambda s=slide: tissue_mask(s, params))
            cpu_s = (time.process_time() - cpu) / 3
            mask = tissue_mask(slide, params)
            view = f"{mask.mask.shape[1]}x{mask.mask.shape[0]}"
            rows.append([path.name, f"{slide.dimensions[0]:,}", view, f"{before_s:.3f}",
                         f"{mask_s:.3f}", f"{cpu_s:.3f}",
                         f"{mask.findings['decoded_share']:.2f}", f"{mask.area_um2 / 1e6:.1f}"])
    print(table(["slide", "width px", "mask px", "before s", "tissue mask s", "mask CPU s",
                 "view decoded", "tissue mm²"], rows))


if __name__ == "__main__":
    main()
