"""One slide across two real Celery workers (workers/jobs/split.py), through the API.

A job above ``SLIDEPIPE_SPLIT_MIN_TILES`` is prepared by the worker that claims it and
run as two part tasks plus a merge; part 1's first attempt dies half-way (the
``SLIDEPIPE_TEST_FAIL_PART_ONCE`` hook, after storing some chunks) and is retried alone.
The published result equals a one-worker run of the engine byte for byte, the job's
summed tile progress reaches its total, and both workers ran parts."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from tests.service.conftest import Stack
from tests.workers.engine.test_split import assert_same_result
from workers.engine.run import run_engine
from workers.engine.spec import RunSpec
from workers.jobs.split import TEST_FAIL_PART_ENV

PARAMS = {"target_mpp": 1.0, "tile_px": 64, "overlap_px": 16, "chunk_px": 64, "batch_size": 8}


def test_split_job_equals_one_worker_run(stack_factory: Callable[..., Stack], cmu_svs: Path,
                                         tmp_path: Path) -> None:
    stack = stack_factory(SLIDEPIPE_SPLIT_MIN_TILES="50", SLIDEPIPE_SPLIT_PARTS="2",
                          SLIDEPIPE_PART_RETRY_DELAY_S="0.2", **{TEST_FAIL_PART_ENV: "1"})
    stack.start_worker("w1")
    stack.start_worker("w2")
    stack.start_api()
    with stack.client() as client:
        slide = stack.upload(client, cmu_svs)
        r = client.post("/v1/jobs", json={"slide_id": slide["id"], "model": "identity",
                                          "parameters": PARAMS})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        job = stack.wait_job(client, job_id, timeout_s=180)
    assert job["status"] == "succeeded", f"{job}\n{stack.log_tail()}"
    assert job["percent"] == 100.0

    parts = job["result_info"]["parts"]
    assert len(parts) == 2
    # progress summed over the parts reached the tiles they ran, the retried part once
    assert job["tiles_done"] == job["tiles_total"] == sum(p["tiles_run"] for p in parts)
    assert job["tiles_total"] >= job["result_info"]["tiles_total"]

    assert stack.logs is not None
    attempts: dict[str, list[tuple[int, int]]] = {}
    for name in ("w1", "w2"):
        text = (stack.logs / f"worker-{name}.log").read_text()
        attempts[name] = [(int(part), int(attempt)) for part, attempt in re.findall(
            rf"part (\d+) of job {job_id}: attempt (\d+)", text)]
    assert all(attempts.values()), f"both workers ran parts: {attempts}"
    ran = sorted(a for found in attempts.values() for a in found)
    assert ran == [(0, 0), (1, 0), (1, 1)], "part 1 failed once and was retried alone"

    # the same job as one run of the engine in this process (on the uploaded file)
    whole = tmp_path / "whole.zarr"
    run_engine(RunSpec(slide_path=cmu_svs, model="identity", out_path=whole, device="cpu",
                       **PARAMS))  # type: ignore[arg-type]
    assert_same_result(whole, stack.data_dir / "results" / f"{job_id}.zarr")
    leftovers = [p.name for p in (stack.data_dir / "results").iterdir()
                 if p.name != f"{job_id}.zarr"]
    assert not leftovers, "no staged folder or record is left behind"
