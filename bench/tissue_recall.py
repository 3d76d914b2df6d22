"""Tissue recall and precision, before and after, against tissue known at full resolution.

    python bench/tissue_recall.py [--target-mpp 0.5] [--tile-px 256] [--overlap-px 32]

Two slides, each scored at level 0 (0.5 µm/px):

* ``scene``: real H&E of cmu_small_region.svs pasted at known places, with thin strands,
  small fragments, marker strokes (blue, green, black), dust, a bubble's rim and the
  slide's edge (``tests/tissue_scenes.py``); the reference tissue is what was pasted
  (where its source is stained).
* ``cmu``: cmu_small_region.svs itself against a reference made at level 0: chroma
  (max - min of R, G, B) of at least 20 after a 2.5 µm median, pieces of at least
  50 µm² (``tests.tissue_scenes.reference_tissue``); its strand (x 58-870, y 985-1145)
  and two detached fragments (top left, right edge) were checked by eye.

``before`` is the default until 2026-12 (hsv-otsu at 8 µm/px, 40 µm median, 60 µm
closing, fragments of at least 20 000 µm², tiles below 10% tissue skipped); ``after`` is
today's default (``stain`` at 4 µm/px, tiles below 10% kept where they hold tissue no
other tile covers). Tiles are planned as the engine plans them, for the identity model's
geometry unless told otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import table  # noqa: E402

BEFORE = {"method": "hsv-otsu", "working_mpp": 8.0, "median_um": 40.0, "closing_um": 60.0,
          "min_fragment_um2": 20_000.0, "max_hole_um2": 50_000.0}


def tile_coverage(plan, shape: tuple[int, int],  # type: ignore[no-untyped-def]
                  slide_mpp: float) -> np.ndarray:
    """Level-0 pixels inside the kept region of some planned tile."""
    covered = np.zeros(shape, bool)
    g = plan.geometry
    f = plan.target_mpp / slide_mpp
    for t in plan.tiles:
        x, y = t.x + g.output_crop_px, t.y + g.output_crop_px
        x0, y0 = int(np.floor(x * f)), int(np.floor(y * f))
        x1, y1 = int(np.ceil((x + g.kept_px) * f)), int(np.ceil((y + g.kept_px) * f))
        covered[max(y0, 0):y1, max(x0, 0):x1] = True
    return covered


def score(path: Path, tissue: np.ndarray, objects: list[tuple[str, str, np.ndarray]],
          after: bool, args: argparse.Namespace, pen_filter: bool = True) -> dict[str, object]:
    import cv2

    from wsi.reader import Slide
    from wsi.tiling import TileGeometry, plan_tiles
    from wsi.tissue import TissueParams, tissue_mask

    params = TissueParams(pen_filter=pen_filter) if after else TissueParams(**BEFORE)
    with Slide(path) as slide:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            mask = tissue_mask(slide, params)
            times.append(time.perf_counter() - start)
        target = slide.grid_mpp(args.target_mpp)
        width, height = slide.scaled_dimensions(target)
        plan = plan_tiles(width=width, height=height, target_mpp=target, slide_mpp=slide.mpp,
                          geometry=TileGeometry(args.tile_px, args.overlap_px), mask=mask,
                          min_tissue_fraction=0.1, cover_all_tissue=after)
        shape = (slide.dimensions[1], slide.dimensions[0])
        covered = tile_coverage(plan, shape, slide.mpp)
    up = cv2.resize(mask.mask.view(np.uint8), (shape[1], shape[0]),
                    interpolation=cv2.INTER_NEAREST) > 0
    ref_px = int(tissue.sum())
    hit = int((up & tissue).sum())
    row: dict[str, object] = {
        "mask recall": hit / ref_px, "mask precision": hit / max(1, int(up.sum())),
        "tissue in tiles": float((covered & tissue).sum()) / ref_px,
        "tiles": len(plan.tiles), "tissue s": min(times),
        "tissue mm²": mask.area_um2 / 1e6,
    }
    for name, kind, m in objects:
        row[f"{kind}:{name}"] = float((covered & m).sum()) / max(1, int(m.sum()))
    return row


def main() -> None:
    import cv2
    import tifffile

    from tests.tissue_scenes import TISSUE_KINDS, build_scene, reference_tissue, write_scene
    from workers.demo.sample_data import fetch_cmu_small_region

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-mpp", type=float, default=0.5)
    parser.add_argument("--tile-px", type=int, default=256)
    parser.add_argument("--overlap-px", type=int, default=32)
    args = parser.parse_args()

    cmu = fetch_cmu_small_region()
    cmu_rgb = tifffile.imread(cmu, key=0)
    scene = build_scene(cmu_rgb)
    slides = []
    with tempfile.TemporaryDirectory(prefix="tissue-recall-") as tmp:
        scene_path = write_scene(scene, Path(tmp) / "scene.svs").path
        objects = [(o.name, o.kind, scene.object_mask(i)) for i, o in enumerate(scene.objects)
                   if o.kind != "main"]
        objects.append(("dust specks", "dust", scene.labels == scene.dust_label))
        slides.append(("scene", scene_path, scene.tissue, objects))
        cmu_ref = reference_tissue(cmu_rgb)
        boxes = {"strand": (58, 985, 870, 1145), "fragment top left": (0, 40, 60, 140),
                 "fragment right edge": (2040, 570, 2140, 660)}
        cmu_objects = []
        for name, (x0, y0, x1, y1) in boxes.items():
            m = np.zeros_like(cmu_ref)
            m[y0:y1, x0:x1] = cmu_ref[y0:y1, x0:x1]
            cmu_objects.append((name, "strand" if "strand" in name else "fragment", m))
        slides.append(("cmu", cmu, cmu_ref, cmu_objects))
        del cv2
        results = {}
        for name, path, tissue, objs in slides:
            for after in (False, True):
                results[(name, after)] = score(path, tissue, objs, after, args)
        no_pen = score(scene_path, scene.tissue, objects, True, args, pen_filter=False)

    print(f"tiles: {args.tile_px} px, overlap {args.overlap_px}, at {args.target_mpp} µm/px\n")
    keys = ["mask recall", "mask precision", "tissue in tiles", "tiles", "tissue mm²",
            "tissue s"]
    rows = []
    for name, *_ in slides:
        for after in (False, True):
            r = results[(name, after)]
            rows.append([name, "after" if after else "before",
                         *(f"{r[k]:.4f}" if isinstance(r[k], float) and k != "tissue s"
                           else (f"{r[k]:.3f}" if k == "tissue s" else r[k]) for k in keys)])
    print(table(["slide", "params", *keys], rows))
    for name, *_ in slides:
        b, a = results[(name, False)], results[(name, True)]
        gained = (float(a["tissue in tiles"]) - float(b["tissue in tiles"])) / float(
            b["tissue in tiles"])
        grown = (int(a["tiles"]) - int(b["tiles"])) / max(1, int(b["tiles"]))
        area = float(a["tissue mm²"]) / float(b["tissue mm²"]) - 1
        density = [int(r["tiles"]) / float(r["tissue mm²"]) for r in (b, a)]
        print(f"\n{name}: tiles {grown:+.1%}, reference tissue in tiles {gained:+.1%}, "
              f"mask tissue {area:+.1%}; tiles per mm² of mask tissue {density[0]:.1f} -> "
              f"{density[1]:.1f} ({density[1] / density[0] - 1:+.1%})")
    print(f"\nscene with the pen filter off: {no_pen['tiles']} tiles, pens in tiles: "
          + ", ".join(f"{k.split(':', 1)[1]} {float(str(v)):.3f}" for k, v in no_pen.items()
                      if k.startswith("pen:"))
          + f"; the filter saves {int(no_pen['tiles']) - int(results[('scene', True)]['tiles'])}"
          " tiles")
    print()
    rows = []
    for name, *_ in slides:
        b, a = results[(name, False)], results[(name, True)]
        for key in b:
            if ":" in key:
                kind, obj = key.split(":", 1)
                what = "tissue" if kind in TISSUE_KINDS else "artefact"
                rows.append([name, obj, what, f"{float(b[key]):.3f}", f"{float(a[key]):.3f}"])
    print(table(["slide", "object", "is", "in tiles before", "in tiles after"], rows))


if __name__ == "__main__":
    main()
