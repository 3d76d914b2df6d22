"""Workers under failure: an unreadable region, and a worker killed mid-job."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import psutil
import pytest
import zarr

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.slow


def test_unreadable_region_fails_with_reason_and_worker_goes_on(
    stack: Stack, alice: httpx.Client, svc_slides: dict
) -> None:
    # the upload validates (its thumbnail level decodes); level 0 has broken tiles
    broken = stack.upload(alice, svc_slides["corrupt"])
    good = stack.upload(alice, svc_slides["cmu"])
    # level 0 (0.499 µm/px) is read for 1 µm/px; every tile, tissue or not
    params = {
        "target_mpp": 1.0,
        "tile_px": 64,
        "overlap_px": 8,
        "batch_size": 4,
        "min_tissue_fraction": 0.0,
    }
    bad_job = alice.post(
        "/v1/jobs", json={"slide_id": broken["id"], "model": "identity", "parameters": params}
    ).json()["job_id"]
    next_job = alice.post(
        "/v1/jobs",
        json={
            "slide_id": good["id"],
            "model": "identity",
            "parameters": {**params, "target_mpp": 4.0},
        },
    ).json()["job_id"]
    job = stack.wait_job(alice, bad_job)
    assert job["status"] == "failed", job
    assert job["error"].startswith("RegionUnreadable:"), job["error"]
    assert "region" in job["error"]
    assert job["finished_at"] is not None
    # nothing presented as a result
    assert not (stack.data_dir / "results" / f"{bad_job}.zarr").exists()
    assert not list((stack.data_dir / "results").glob(f".{bad_job}.zarr.partial-*"))
    r = alice.get(f"/v1/jobs/{bad_job}/result.zarr/.zattrs")
    assert r.status_code == 409 and "failed" in r.json()["detail"]
    # the same worker serves the next job
    assert stack.wait_job(alice, next_job)["status"] == "succeeded"
    assert all(p.poll() is None for p in stack.workers)


@pytest.fixture
def kill_stack(stack_factory: Callable[..., Stack]) -> Stack:
    """A stack whose broker hands back unacknowledged jobs after 4 s (a dead worker's)."""
    s = stack_factory(
        SLIDEPIPE_BROKER_VISIBILITY_TIMEOUT_S="4",
        SLIDEPIPE_BROKER_RESTORE_INTERVAL_S="1",
        SLIDEPIPE_HEARTBEAT_S="0.5",
    )
    s.start_api()
    return s


def read_result(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {
        "probabilities": np.asarray(group["0"][:]),
        "classes": np.asarray(group["labels/classes/0"][:]),
        "tissue": np.asarray(group["labels/tissue/0"][:]),
    }


@pytest.mark.parametrize("victim", ["worker", "pool-process"])
def test_sigkilled_worker_job_is_requeued_and_matches_uninterrupted_run(
    kill_stack: Stack, svc_slides: dict, victim: str
) -> None:
    """SIGKILL mid-job. ``worker``: the whole worker dies; its unacknowledged message
    returns after the visibility timeout and a new worker runs the job. ``pool-process``:
    only the process running the job dies; the worker rejects the message back to the
    queue (reject_on_worker_lost) and runs it again itself."""
    s = kill_stack
    first = s.start_worker("first")
    with s.client("alice") as alice:
        slide = s.upload(alice, svc_slides["cmu"])
        body = {
            "slide_id": slide["id"],
            "model": "identity",
            "parameters": {"target_mpp": 0.75, "tile_px": 64, "overlap_px": 16, "batch_size": 1},
        }
        job_id = alice.post("/v1/jobs", json=body).json()["job_id"]
        # kill the whole worker (main process and its pool child) mid-inference
        deadline = time.monotonic() + 60
        while True:
            job = alice.get(f"/v1/jobs/{job_id}").json()
            if job["stage"] == "infer" and 0 < job["tiles_done"] < job["tiles_total"]:
                break
            assert job["status"] in ("queued", "running"), job
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        if victim == "worker":
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        else:
            (pool_process,) = psutil.Process(first.pid).children()
            pool_process.kill()
            pool_process.wait(timeout=10)
        killed_at = alice.get(f"/v1/jobs/{job_id}").json()
        assert (
            killed_at["status"] == "running" and killed_at["tiles_done"] < killed_at["tiles_total"]
        )

        if victim == "worker":
            s.start_worker("second")
        job = s.wait_job(alice, job_id, timeout_s=180)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2, job
        assert job["tiles_done"] == job["tiles_total"]

        # an uninterrupted run of the same job gives the same result
        again = alice.post("/v1/jobs", json=body).json()["job_id"]
        assert s.wait_job(alice, again, timeout_s=180)["status"] == "succeeded"
        assert alice.get(f"/v1/jobs/{again}").json()["attempts"] == 1
    requeued = read_result(s.data_dir / "results" / f"{job_id}.zarr")
    clean = read_result(s.data_dir / "results" / f"{again}.zarr")
    for key in requeued:
        np.testing.assert_array_equal(requeued[key], clean[key], err_msg=key)
    # the killed attempt's partial output was cleaned up
    assert not list((s.data_dir / "results").glob(".*partial*"))
