"""One large slide on 1 worker vs split across 2 workers: wall time and pixel identity.

Two real stacks on loopback (redis-server, API, Celery workers with concurrency 1 on the
CPU, bench/_stack.py), one after the other, on the same slide and parameters:

1. one worker, splitting off: the job runs whole;
2. two workers, ``SLIDEPIPE_SPLIT_MIN_TILES`` low and ``SLIDEPIPE_SPLIT_PARTS=2``: the
   job is prepared by one worker and its two parts run on both (workers/jobs/split.py).

Each stack first runs two small warm-up jobs (torch imported, model loaded in both
workers), then ``--repeats`` jobs one after another. Wall time is from a job's
submission to ``succeeded`` as the API reports it; the median is compared. The two results are then compared file by file (every chunk of every array,
metadata; provenance aside): they must be byte-identical.

    python -m bench.split [--size-px 16384] [--target-mpp 1.0] [--tile-px 256]
                          [--overlap-px 32] [--chunk-px 256] [--core-per-worker]

On a 2-core machine two workers share the cores that one worker's reading, blending and
storing threads already use, so the ratio says more about overheads than about
scaling; ``--core-per-worker`` pins each worker to a core of its own (the one-worker run
to one core), a stand-in for workers on separate machines. There the ratio approaches
the number of parts, less the tiles that both parts run at their cut (about one strip,
docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench._common import real_tissue_slide, table
from bench._stack import Stack, client, wait_for


@dataclass
class SplitStack(Stack):
    """A bench stack with extra ``SLIDEPIPE_*`` settings for its processes."""

    extra: dict[str, str] = field(default_factory=dict)
    #: pin worker i to CPU i (``taskset``): a core per worker, as on separate machines
    pin: bool = False

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, **self.extra}

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        if self.pin and "worker" in args:
            args = ["taskset", "-c", str(len(self.workers) % (os.cpu_count() or 1)), *args]
        return super()._spawn(args, log)


def upload(http: httpx.Client, base: str, path: Path) -> str:
    with open(path, "rb") as fh:
        r = http.post(f"{base}/v1/slides", files={"file": (path.name, fh)})
    r.raise_for_status()
    return str(r.json()["id"])


def run_job(http: httpx.Client, base: str, slide_id: str, params: dict[str, Any]) -> str:
    r = http.post(f"{base}/v1/jobs", json={"slide_id": slide_id, "model": "identity",
                                         "parameters": params})
    r.raise_for_status()
    return str(r.json()["job_id"])


def wait_done(http: httpx.Client, base: str, job_id: str, timeout_s: float) -> dict[str, Any]:
    job: dict[str, Any] = {}

    def done() -> bool:
        nonlocal job
        job = http.get(f"{base}/v1/jobs/{job_id}").json()
        return job["status"] in ("succeeded", "failed", "cancelled")

    wait_for(f"job {job_id}", done, timeout_s)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id}: {job['status']}: {job.get('error')}")
    return job


def measure(root: Path, slide: Path, warmup: Path, params: dict[str, Any], workers: int,
            extra: dict[str, str], timeout_s: float, pin: bool,
            repeats: int) -> tuple[list[float], dict[str, Any], Path]:
    root.mkdir(parents=True)
    stack = SplitStack(root, extra=extra, pin=pin)
    try:
        stack.start_redis()
        stack.start_api()
        for _ in range(workers):
            stack.start_worker()
        with client() as http:
            small = upload(http, stack.base, warmup)
            warm = [run_job(http, stack.base, small, {"target_mpp": 8.0, "tile_px": 64})
                    for _ in range(2)]
            for job_id in warm:
                wait_done(http, stack.base, job_id, 300)
            slide_id = upload(http, stack.base, slide)
            walls = []
            for _ in range(repeats):  # one job at a time, each timed alone
                start = time.perf_counter()
                job_id = run_job(http, stack.base, slide_id, params)
                job = wait_done(http, stack.base, job_id, timeout_s)
                walls.append(time.perf_counter() - start)
        return walls, job, root / "data" / "results" / f"{job_id}.zarr"
    finally:
        stack.close()


def result_files(root: Path) -> dict[str, bytes]:
    """Every file of a result; the root attributes without the provenance."""
    files = {p.relative_to(root).as_posix(): p.read_bytes()
             for p in sorted(root.rglob("*")) if p.is_file()}
    attrs = json.loads(files.pop(".zattrs"))
    attrs.pop("slidepipe", None)
    files[".zattrs"] = json.dumps(attrs, sort_keys=True).encode()
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-px", type=int, default=16384)
    parser.add_argument("--target-mpp", type=float, default=1.0)
    parser.add_argument("--tile-px", type=int, default=256)
    parser.add_argument("--overlap-px", type=int, default=32)
    parser.add_argument("--chunk-px", type=int, default=256)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--repeats", type=int, default=3,
                        help="jobs per stack, one at a time; the median wall time is shown")
    parser.add_argument("--core-per-worker", action="store_true",
                        help="pin worker i to CPU i (taskset): one core each, as on separate "
                        "machines; the one-worker run then has one core too")
    args = parser.parse_args()
    params = {"target_mpp": args.target_mpp, "tile_px": args.tile_px,
              "overlap_px": args.overlap_px, "chunk_px": args.chunk_px}
    slide = real_tissue_slide(args.size_px)
    warmup = real_tissue_slide(2048)
    root = Path(tempfile.mkdtemp(prefix="bench-split-"))
    try:
        one_walls, one, one_result = measure(root / "one", slide, warmup, params, 1,
                                         {"SLIDEPIPE_SPLIT_MIN_TILES": "0"}, args.timeout_s,
                                         args.core_per_worker, args.repeats)
        two_walls, two, two_result = measure(
            root / "two", slide, warmup, params, 2,
            {"SLIDEPIPE_SPLIT_MIN_TILES": "100", "SLIDEPIPE_SPLIT_PARTS": "2"}, args.timeout_s,
            args.core_per_worker, args.repeats)
        one_s, two_s = statistics.median(one_walls), statistics.median(two_walls)
        a, b = result_files(one_result), result_files(two_result)
        same = sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
        parts = two["result_info"].get("parts", [])
        print(f"slide {slide.name} ({os.path.getsize(slide) / 1e6:.0f} MB), identity, {params}, "
              f"{os.cpu_count()} CPUs"
              + (", one core per worker (taskset)" if args.core_per_worker else ""))
        print(table(["workers", "parts", "tiles", "tiles run", "wall s (median)", "wall s (all)",
                     "infer s (summed, last)"], [
            [1, 1, one["result_info"]["tiles_total"], one["tiles_total"], f"{one_s:.1f}",
             " ".join(f"{w:.1f}" for w in one_walls), one["result_info"]["timings_s"]["infer"]],
            [2, len(parts), two["result_info"]["tiles_total"],
             " + ".join(str(p["tiles_run"]) for p in parts), f"{two_s:.1f}",
             " ".join(f"{w:.1f}" for w in two_walls), two["result_info"]["timings_s"]["infer"]],
        ]))
        print(f"speed-up 1 -> 2 workers: {one_s / two_s:.2f}x by the medians "
              f"({one_s:.1f} s / {two_s:.1f} s), {min(one_walls) / min(two_walls):.2f}x by the "
              f"best runs ({min(one_walls):.1f} s / {min(two_walls):.1f} s)")
        print(f"split result identical to the whole run: {same} ({len(a)} files compared)")
        if not same:
            raise SystemExit(1)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
