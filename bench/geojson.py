"""QuPath GeoJSON export of large results: time and peak memory as the result grows.

    python bench/geojson.py [--sizes 4096,16384,32768] [--pitch 32]

For each size a result of ``size`` x ``size`` px with a grid of square regions (``pitch``
px apart, alternately two classes, a third of them with a hole; tests/result_scenes.py)
is written chunk by chunk, then exported in a fresh process whose peak RSS (ru_maxrss)
is reported beside the result's uncompressed size (two uint8 probability channels plus
the uint8 class map). The baseline is the smallest result's RSS in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import cache_dir, run_child, table  # noqa: E402

MIB = 2**20


def child(result: str, out: str) -> None:
    from wsi.geojson_export import export_geojson

    start = time.perf_counter()
    n = export_geojson(Path(result), Path(out))
    print(json.dumps({"features": n, "seconds": time.perf_counter() - start,
                      "bytes": Path(out).stat().st_size}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4096,16384,32768")
    parser.add_argument("--pitch", type=int, default=32)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from tests.result_scenes import write_square_result

    rows, figures, base = [], [], None
    for size in (int(s) for s in args.sizes.split(",")):
        result = cache_dir() / f"squares-{size}-{args.pitch}.zarr"
        if not (result / ".zattrs").is_file():
            write_square_result(result, height=size, width=size, pitch=args.pitch)
        out = result.with_suffix(".geojson")
        report, rss = run_child(["bench/geojson.py", "--child", str(result), str(out)])
        out.unlink(missing_ok=True)
        base = base or rss
        raw = size * size * 3
        figures.append({"size_px": size, "peak_rss_bytes": rss, "raw_bytes": raw, **report})
        rows.append([f"{size:,}", f"{report['features']:,}", f"{report['seconds']:.1f}",
                     f"{report['features'] / report['seconds']:,.0f}",
                     f"{report['bytes'] / MIB:,.0f}", f"{rss / MIB:,.0f}",
                     f"{rss / base:.2f}x", f"{raw / MIB:,.0f}"])
    print(table(["result px", "features", "export s", "features/s", "GeoJSON MiB",
                 "peak RSS MiB", "vs smallest", "result raw MiB"], rows))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
