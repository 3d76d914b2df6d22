"""Viewer tile latency over HTTP: overlay tiles (256 px PNG, rendered from the result's
OME-Zarr pyramid) and slide tiles (254 px JPEG, openslide's DeepZoomGenerator), served by
``slidepipe view`` (uvicorn) on the loopback address.

    python bench/viewer.py [--size 8192] [--requests 300]

A real H&E slide of ``size`` px (cmu_small_region mirrored, 0.5 µm/px) is run through
``identity`` at 1 µm/px once (cached), then ``--requests`` tiles at random addresses of
every deep-zoom level are requested one at a time, each address once (a viewer's cache
never asks twice), classes and probability modes alternating. Reported: p50 and p95 per
kind, over all levels and over the full-resolution levels only.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import REPO, cache_dir, real_tissue_slide, table  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    import httpx

    slide = real_tissue_slide(args.size)
    result = cache_dir() / f"viewer-{args.size}.zarr"
    if not (result / ".zattrs").is_file():
        subprocess.run([sys.executable, "-m", "service.cli", "run", str(slide), "--model",
                        "identity", "--target-mpp", "1.0", "--out", str(result), "--quiet",
                        "--overwrite"], check=True, cwd=REPO)
    port = _port()
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "view", str(result),
                               "--slide", str(slide), "--port", str(port)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1/view/local/"
    try:
        with httpx.Client(timeout=30) as client:
            for _ in range(300):
                try:
                    if client.get(base + "info.json").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            info = client.get(base + "info.json").json()
            overlay = info["overlay"]
            top = overlay["max_level"]
            rng = random.Random(0)
            times: dict[str, list[tuple[int, float]]] = {"overlay": [], "slide": []}
            seen: set[str] = set()
            slide_levels = math.ceil(math.log2(max(info["slide"]["width"], info["slide"]["height"])))
            while len(seen) < 2 * args.requests:
                kind = "overlay" if len(seen) % 2 == 0 else "slide"
                if kind == "overlay":
                    level = rng.randint(max(0, top - 6), top)
                    f = 2 ** (top - level)
                    cols = math.ceil(overlay["width"] / f / 256)
                    rows = math.ceil(overlay["height"] / f / 256)
                    mode = "mode=classes&classes=1,2,3" if rng.random() < 0.5 else "mode=probability&class=1"
                    path = f"overlay/{level}/{rng.randrange(cols)}_{rng.randrange(rows)}.png?{mode}"
                    full = level == top
                else:
                    level = rng.randint(max(0, slide_levels - 6), slide_levels)
                    f = 2 ** (slide_levels - level)
                    cols = math.ceil(info["slide"]["width"] / f / 254)
                    rows = math.ceil(info["slide"]["height"] / f / 254)
                    path = f"slide_files/{level}/{rng.randrange(cols)}_{rng.randrange(rows)}.jpeg"
                    full = level == slide_levels
                if path in seen:
                    continue
                seen.add(path)
                start = time.perf_counter()
                r = client.get(base + path)
                elapsed = (time.perf_counter() - start) * 1000
                assert r.status_code == 200, (path, r.status_code, r.text[:200])
                times[kind].append((int(full), elapsed))
    finally:
        server.terminate()
        server.wait(timeout=10)
    rows, figures = [], {}
    for kind, samples in times.items():
        every = [t for _, t in samples]
        finest = [t for full, t in samples if full] or every
        figures[kind] = {"n": len(every), "p50_ms": _pct(every, 0.5), "p95_ms": _pct(every, 0.95),
                         "full_res_p50_ms": _pct(finest, 0.5), "full_res_p95_ms": _pct(finest, 0.95),
                         "mean_ms": statistics.fmean(every)}
        f = figures[kind]
        rows.append([kind, f["n"], f"{f['p50_ms']:.1f}", f"{f['p95_ms']:.1f}",
                     f"{f['full_res_p50_ms']:.1f}", f"{f['full_res_p95_ms']:.1f}"])
    print(table(["tiles", "n", "p50 ms", "p95 ms", "full-res p50 ms", "full-res p95 ms"], rows))
    print(json.dumps({"size_px": args.size, **figures}))


if __name__ == "__main__":
    main()
