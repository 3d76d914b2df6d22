"""Running the service: a clear word when Redis is missing, and ``slidepipe up`` from nothing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psutil
import pytest

if TYPE_CHECKING:
    from conftest import Stack

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDEPIPE_")}
    env.update(SLIDEPIPE_DATA_DIR=str(tmp_path / "data"), PYTHONUNBUFFERED="1", **extra)
    return env


def test_worker_without_redis_says_so_and_how_to_start_it(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{_free_port()}/0"
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker", "--device", "cpu"],
        cwd=REPO,
        env=_env(tmp_path, SLIDEPIPE_BROKER_URL=dead),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "not reachable" in done.stderr and "redis-server" in done.stderr
    assert "slidepipe up" in done.stderr


def test_worker_rejects_a_bad_device(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker", "--device", "gpu0"],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "cuda:N" in done.stderr


def test_api_without_broker_is_not_ready_and_refuses_jobs_clearly(
    stack_factory: Callable[..., Stack], svc_slides: dict
) -> None:
    s = stack_factory(SLIDEPIPE_BROKER_URL=f"redis://127.0.0.1:{_free_port()}/0")
    s.start_api(ready=False)
    ready = httpx.get(f"{s.base_url}/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] == "ok"
    assert "unreachable" in ready.json()["checks"]["broker"]
    with s.client("alice") as alice:
        slide = s.upload(alice, svc_slides["cmu"])  # uploads work without the queue
        r = alice.post("/v1/jobs", json={"slide_id": slide["id"], "model": "identity"})
        assert r.status_code == 503 and "broker" in r.json()["detail"]
        jobs = alice.get("/v1/jobs").json()["items"]
        assert [j["status"] for j in jobs] == ["failed"]  # not left queued forever
        assert "could not be queued" in jobs[0]["error"]


@pytest.mark.slow
def test_up_brings_everything_up_and_ctrl_c_stops_it(tmp_path: Path, svc_slides: dict) -> None:
    redis_port, api_port = _free_port(), _free_port()
    log_path = tmp_path / "up.log"
    env = _env(tmp_path, SLIDEPIPE_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0")
    with open(log_path, "wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--port", str(api_port), "--device", "cpu"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{api_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert up.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.3)
        text = log_path.read_text()
        assert "starting a local redis-server" in text
        key = re.search(r"using owner 'local' with key (\S+)", text).group(1)
        children = psutil.Process(up.pid).children()
        assert len(children) == 3  # redis, worker, api

        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            with open(svc_slides["cmu"], "rb") as fh:
                slide = client.post("/v1/slides", files={"file": ("cmu.svs", fh)}).json()
            job_id = client.post(
                "/v1/jobs",
                json={
                    "slide_id": slide["id"],
                    "model": "identity",
                    "parameters": {"target_mpp": 4.0, "tile_px": 64, "overlap_px": 8},
                },
            ).json()["job_id"]
            deadline = time.monotonic() + 120
            while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in (
                "queued",
                "running",
            ):
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            assert job["status"] == "succeeded", job

        up.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        assert up.wait(timeout=60) == 0, log_path.read_text()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{base}/healthz", timeout=2)
    finally:
        if up.poll() is None:
            for child in psutil.Process(up.pid).children(recursive=True):
                child.kill()
            up.kill()
            up.wait()


def test_a_typo_in_a_queue_name_creates_no_queue() -> None:
    """``task_create_missing_queues=False``: a misspelt queue is an error, not a new queue."""
    from celery.exceptions import QueueNotFound

    from workers.jobs.celery_app import QUEUE, app, create_celery_app
    from workers.jobs.settings import Settings

    assert QUEUE == "gpu" and app.conf.task_create_missing_queues is False
    unreachable = create_celery_app(Settings(broker_url=f"redis://127.0.0.1:{_free_port()}/0"))
    with pytest.raises(QueueNotFound):
        unreachable.send_task("slidepipe.run_job", args=["x"], queue="gpuu")
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1


def test_worker_refuses_an_unknown_queue(tmp_path: Path, redis_base_url: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.jobs.celery_app",
            "worker",
            "-Q",
            "gpuu",
            "--pool",
            "solo",
        ],
        cwd=REPO,
        env=_env(tmp_path, SLIDEPIPE_BROKER_URL=f"{redis_base_url}/15"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "gpuu" in done.stderr + done.stdout
