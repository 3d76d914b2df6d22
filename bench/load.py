"""Hostile input, faults and load against a real stack on loopback (issue #19).

    python bench/load.py [--submits 200] [--uploads 20] [--workers 2]

Starts a private ``redis-server`` (no persistence: the worst case), ``slidepipe serve``
and ``--workers`` ``slidepipe worker`` processes on 127.0.0.1 with the product's default
heartbeat and reconciler settings, then prints three tables: hostile requests (tried,
answered as designed, 4xx with a JSON reason, 5xx), faults (jobs lost, jobs run twice,
time to resume a SIGKILLed worker's job), and load (concurrent uploads and submissions:
accepted, p50/p95 latency, jobs/s to a terminal state). Every loop is bounded and every
wait has a deadline; all traffic goes to loopback; the processes are stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import table  # noqa: E402
from bench._stack import Stack, client, stop, wait_for  # noqa: E402
from tests.hostile import (  # noqa: E402
    UNICODE_FILENAMES,
    bomb_tiff,
    content_disposition_rfc5987,
    giant_tile_tiff,
    multipart_body,
)

SHORT = {"target_mpp": 4.0, "tile_px": 64, "overlap_px": 8}
LONG = {
    "target_mpp": 0.6,
    "tile_px": 64,
    "overlap_px": 16,
    "batch_size": 1,
    "min_tissue_fraction": 0.0,
}
BOUNDARY = "benchboundary"


def hostile_cases(
    slide_id: str, tmp: Path
) -> list[tuple[str, Callable[[httpx.Client], httpx.Response], set[int]]]:
    """(name, request, statuses that are the designed answer)."""
    bombs = {
        "bomb 150k^2 (60 KB)": bomb_tiff(tmp / "b1.tif", 150_000, 150_000),
        "bomb 1M^2 (530 KB)": bomb_tiff(tmp / "b2.tif", 1_000_000, 1_000_000),
        "one 100k^2 tile": giant_tile_tiff(tmp / "b3.tif", 100_000),
    }
    cases: list[tuple[str, Callable[[httpx.Client], httpx.Response], set[int]]] = []
    for name, path in bombs.items():
        cases.append(
            (
                name,
                lambda c, p=path: c.post("/v1/slides", files={"file": (p.name, p.read_bytes())}),
                {413},
            )
        )
    for number in ("NaN", "Infinity", "-Infinity", "1e400"):
        body = f'{{"slide_id": "{slide_id}", "model": "identity", "parameters": {{"target_mpp": {number}}}}}'
        cases.append(
            (
                f"target_mpp {number}",
                lambda c, b=body: c.post(
                    "/v1/jobs", content=b, headers={"Content-Type": "application/json"}
                ),
                {422},
            )
        )
    for i, name in enumerate(UNICODE_FILENAMES):
        for form, disposition in (
            ("raw", f'form-data; name="file"; filename="{name}"'),
            ("rfc5987", content_disposition_rfc5987(name)),
        ):
            ok = {422} if len(name) > 255 else {200, 201}
            cases.append(
                (
                    f"filename {form} {name[:12]!r}",
                    lambda c, d=disposition, i=i: c.post(
                        "/v1/slides",
                        content=multipart_body(d, SLIDE_BYTES + bytes([i]), BOUNDARY),
                        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
                    ),
                    ok,
                )
            )
    for params, what in (
        ({"target_mpp": 256.0}, "target_mpp 256"),
        ({"target_mpp": 0.001}, "target_mpp 0.001"),
        ({"target_mpp": 0.125, "tile_px": 16, "overlap_px": 8}, "1.6 M tiles"),
    ):
        cases.append(
            (
                what,
                lambda c, p=params: c.post(
                    "/v1/jobs", json={"slide_id": slide_id, "model": "identity", "parameters": p}
                ),
                {422},
            )
        )
    big = json.dumps({"slide_ids": [slide_id] * 300_000, "model": "identity"}).encode()
    cases.append(
        (
            "JSON body 10 MB",
            lambda c: c.post(
                "/v1/batches", content=big, headers={"Content-Type": "application/json"}
            ),
            {413},
        )
    )
    cases.append(
        (
            "JSON body 10 MB chunked",
            lambda c: c.post(
                "/v1/batches",
                content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
                headers={"Content-Type": "application/json"},
            ),
            {413},
        )
    )
    cases.append(
        (
            "result path 5,000 chars",
            lambda c: c.get(f"/v1/jobs/{'0' * 32}/result.zarr/{'a' * 5000}"),
            {404},
        )
    )
    cases.append(
        (
            "filename ../../x.svs",
            lambda c: c.post("/v1/slides", files={"file": ("../../x.svs", b"II*\x00")}),
            {422},
        )
    )
    cases.append(
        (
            "truncated multipart",
            lambda c: c.post(
                "/v1/slides",
                content=multipart_body(
                    'form-data; name="file"; filename="a.svs"', b"II*\x00" * 10, BOUNDARY
                )[:-20],
                headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
            ),
            {400},
        )
    )
    cases.append(
        ("not a slide", lambda c: c.post("/v1/slides", files={"file": ("x.svs", b"hello")}), {415})
    )
    cases.append(
        (
            "deeply nested JSON",
            lambda c: c.post(
                "/v1/jobs",
                content=b"[" * 100_000 + b"]" * 100_000,
                headers={"Content-Type": "application/json"},
            ),
            {400, 413, 422},
        )
    )
    return cases


SLIDE_BYTES = b""


def run_hostile(stack: Stack, slide_id: str) -> list[list[object]]:
    rows: Counter[str] = Counter()
    slowest_bomb = 0.0
    with tempfile.TemporaryDirectory() as tmp, client() as c:
        c.base_url = httpx.URL(stack.base)
        for name, request, designed in hostile_cases(slide_id, Path(tmp)):
            started = time.monotonic()
            r = request(c)
            if "bomb" in name or "tile" in name:
                slowest_bomb = max(slowest_bomb, time.monotonic() - started)
            rows["tried"] += 1
            rows["as designed"] += r.status_code in designed
            if 400 <= r.status_code < 500:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    body = r.json()
                    rows["4xx with reason"] += bool(body["detail"]) and bool(body["error"])
                rows["4xx"] += 1
            rows["5xx"] += r.status_code >= 500
            if r.status_code not in designed:
                print(f"  unexpected: {name}: {r.status_code} {r.text[:200]}", file=sys.stderr)
    return [
        [
            rows["tried"],
            rows["as designed"],
            rows["4xx"],
            rows["4xx with reason"],
            rows["5xx"],
            f"{slowest_bomb:.2f}",
        ]
    ]


# -- load ------------------------------------------------------------------------------
def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def terminal_total(c: httpx.Client, stack: Stack) -> int:
    """Jobs in a terminal state, all of them."""
    return sum(
        int(c.get(f"{stack.base}/v1/jobs", params={"status": s, "limit": 1}).json()["total"])
        for s in ("succeeded", "failed", "cancelled")
    )


def run_load(stack: Stack, slide_id: str, n_submits: int, n_uploads: int) -> list[list[object]]:
    rows: list[list[object]] = []
    with client() as c:
        before = terminal_total(c, stack)

    def upload(i: int) -> tuple[int, float]:
        with client() as c:
            started = time.monotonic()
            r = c.post(
                f"{stack.base}/v1/slides",
                files={"file": (f"u{i}.svs", SLIDE_BYTES + os.urandom(8))},
            )
            return r.status_code, time.monotonic() - started

    with ThreadPoolExecutor(n_uploads) as pool:
        done = list(pool.map(upload, range(n_uploads)))
    p50, p95 = percentiles([t for _, t in done])
    rows.append(
        [
            f"{n_uploads} concurrent uploads",
            sum(s == 201 for s, _ in done),
            f"{p50:.2f}",
            f"{p95:.2f}",
            "-",
        ]
    )

    def submit(_: int) -> tuple[int, float, str]:
        with client() as c:
            started = time.monotonic()
            r = c.post(
                f"{stack.base}/v1/jobs",
                json={"slide_id": slide_id, "model": "identity", "parameters": SHORT},
            )
            return r.status_code, time.monotonic() - started, r.json().get("job_id", "")

    started = time.monotonic()
    with ThreadPoolExecutor(n_submits) as pool:
        subs = list(pool.map(submit, range(n_submits)))
    ids = [j for s, _, j in subs if s == 202]
    with client() as c:
        wait_for("the submitted jobs", lambda: terminal_total(c, stack) >= before + len(ids), 900)
    elapsed = time.monotonic() - started
    p50, p95 = percentiles([t for _, t, _ in subs])
    rows.append(
        [
            f"{n_submits} concurrent submits",
            len(ids),
            f"{p50:.2f}",
            f"{p95:.2f}",
            f"{len(ids) / elapsed:.2f}",
        ]
    )
    return rows


# -- faults ----------------------------------------------------------------------------
def submit_one(c: httpx.Client, stack: Stack, slide_id: str, params: dict) -> str:
    r = c.post(
        f"{stack.base}/v1/jobs",
        json={"slide_id": slide_id, "model": "identity", "parameters": params},
    )
    r.raise_for_status()
    return str(r.json()["job_id"])


def job(c: httpx.Client, stack: Stack, job_id: str) -> dict:
    return dict(c.get(f"{stack.base}/v1/jobs/{job_id}").json())


def count_outcome(stack: Stack, c: httpx.Client, ids: list[str]) -> tuple[int, int]:
    """(lost, run twice) among ``ids`` once they are terminal."""
    wait_for(
        "the fault case's jobs",
        lambda: all(
            job(c, stack, j)["status"] in ("succeeded", "failed", "cancelled") for j in ids
        ),
        300,
    )
    time.sleep(1)
    wins = stack.log_counts(r"job (\w+) succeeded\n")
    claims = stack.log_counts(r"job (\w+) \(slide \w+, model \w+\) claimed by")
    lost = sum(job(c, stack, j)["status"] != "succeeded" for j in ids)
    twice = sum(wins[j] > 1 or claims[j] > job(c, stack, j)["attempts"] for j in ids)
    return lost, twice


def run_faults(stack: Stack, slide_id: str) -> tuple[list[list[object]], float]:
    rows: list[list[object]] = []
    with client() as c:
        # a worker SIGKILLed mid-job
        jid = submit_one(c, stack, slide_id, LONG)
        wait_for("inference", lambda: job(c, stack, jid)["tiles_done"] > 0, 120)
        victim = next(p for p in stack.workers if p.poll() is None)
        for path in stack.root.glob("worker-*.log"):
            if f"job {jid} (slide" in path.read_text(errors="replace"):
                victim = stack.workers[int(path.stem.removeprefix("worker-w")) - 1]
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        resume_s = wait_for("the job resumed", lambda: job(c, stack, jid)["attempts"] >= 2, 120)
        stack.start_worker()
        rows.append(["worker SIGKILL mid-job", 1, *count_outcome(stack, c, [jid])])

        # Redis SIGKILLed with queued jobs, restarted empty
        busy = [submit_one(c, stack, slide_id, LONG) for _ in stack.workers if _.poll() is None]
        wait_for("busy workers", lambda: all(job(c, stack, j)["tiles_done"] > 0 for j in busy), 120)
        queued = [submit_one(c, stack, slide_id, SHORT) for _ in range(5)]
        assert stack.redis is not None
        stop(stack.redis, signal.SIGKILL)
        stack.start_redis()
        rows.append(
            ["Redis SIGKILL, 5 queued", len(busy) + 5, *count_outcome(stack, c, busy + queued)]
        )

        # the API restarted mid-job
        jid = submit_one(c, stack, slide_id, LONG)
        wait_for("inference", lambda: job(c, stack, jid)["tiles_done"] > 0, 120)
        assert stack.api is not None
        stop(stack.api)
        stack.start_api()
        rows.append(["API restart mid-job", 1, *count_outcome(stack, c, [jid])])
    return rows, resume_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submits", type=int, default=200)
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from workers.demo.sample_data import fetch_cmu_small_region

    global SLIDE_BYTES
    SLIDE_BYTES = fetch_cmu_small_region().read_bytes()
    root = Path(tempfile.mkdtemp(prefix="slidepipe-load-"))
    stack = Stack(root)
    try:
        stack.start_redis()
        for _ in range(args.workers):
            stack.start_worker()
        stack.start_api()
        with client() as c:
            r = c.post(f"{stack.base}/v1/slides", files={"file": ("cmu.svs", SLIDE_BYTES)})
            slide_id = r.json()["id"]
        print(
            table(
                ["hostile cases", "as designed", "4xx", "4xx with reason", "5xx", "slowest bomb s"],
                run_hostile(stack, slide_id),
            )
        )
        print()
        faults, resume_s = run_faults(stack, slide_id)
        print(table(["fault case", "jobs", "lost", "run twice"], faults))
        print(f"time to resume a SIGKILLed worker's job: {resume_s:.1f} s")
        print()
        print(
            table(
                ["load", "accepted", "p50 s", "p95 s", "jobs/s to terminal"],
                run_load(stack, slide_id, args.submits, args.uploads),
            )
        )
    finally:
        stack.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
