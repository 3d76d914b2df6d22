"""Tissue-mask time per slide at the default working resolution (about 8 µm/px).

    python bench/tissue.py [--sizes 10000,30000,60000,100000] [--mpp 0.25]

Banded slides (cached; the same 40x slides as bench/memory by default) and one real-tissue slide; the baseline is reading the working
view alone (the mask's own cost is the difference). Each measured 3 times, best kept.
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
    from wsi.tissue import TissueParams, tissue_mask, working_view

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,30000,60000,100000")
    parser.add_argument("--mpp", type=float, default=0.25, help="banded slides' resolution")
    args = parser.parse_args()
    slides = [real_tissue_slide(8192)] + [banded_slide(int(s), mpp=args.mpp)
                                          for s in args.sizes.split(",")]
    rows = []
    params = TissueParams()
    for path in slides:
        with Slide(path) as slide:
            read_s = best_of(lambda s=slide: working_view(s, params.working_mpp))
            mask_s = best_of(lambda s=slide: tissue_mask(s, params))
            mask = tissue_mask(slide, params)
            rows.append([path.name, f"{slide.dimensions[0]:,}", f"{mask.mask.shape[1]}x{mask.mask.shape[0]}",
                         f"{read_s:.3f}", f"{mask_s:.3f}", f"{mask_s - read_s:.3f}",
                         f"{mask.area_um2 / 1e6:.1f}"])
    print(table(["slide", "width px", "mask px", "read view s", "tissue mask s",
                 "mask minus read s", "tissue mm²"], rows))


if __name__ == "__main__":
    main()
