"""Faults with real processes, counting jobs: none lost, none run twice (issue #19).

One stack on a private ``redis-server`` started like the one ``slidepipe up`` used to
start (no persistence: the worst case), the API and two workers, with short heartbeats
and a reconciler every second. The broker's visibility timeout stays at an hour, so a
job that comes back, comes back through the reconciler. In order: the API restarted
mid-job (its event stream ends at once), Redis SIGKILLed with queued jobs and restarted
empty, a worker SIGKILLed mid-job. Then a data disk that fills during an upload.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import redis

from tests.service.conftest import (
    REPO,
    _redis_binary,
    free_port,
    make_stack,
    next_redis_url,
    stop,
)

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.slow

#: About 2,000 one-tile batches: seconds of inference, long enough to hit mid-run.
LONG = {"target_mpp": 0.6, "tile_px": 64, "overlap_px": 16, "batch_size": 1,
        "min_tissue_fraction": 0.0}
SHORT = {"target_mpp": 4.0, "tile_px": 64, "overlap_px": 8}
RESUME_LIMIT_S = 60.0
SUCCESS = r"job (\w+) succeeded\n"


class PrivateRedis:
    """A redis-server we may SIGKILL and restart on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port = workdir, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [_redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(redis.exceptions.ConnectionError):
                redis.Redis(port=self.port, socket_connect_timeout=0.5).ping()
                return
            assert time.monotonic() < deadline and self.proc.poll() is None, "redis did not start"
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, PrivateRedis]]:
    tmp = tmp_path_factory.mktemp("faults")
    broker = PrivateRedis(tmp)
    broker.start()
    s = make_stack(
        tmp, broker.url,
        SLIDEPIPE_HEARTBEAT_S="0.5",  # a claim is stale after 1.5 s
        SLIDEPIPE_RECONCILE_INTERVAL_S="1",
        SLIDEPIPE_PROGRESS_INTERVAL_S="0.2",
    )
    try:
        s.start_worker("w1")
        s.start_worker("w2")
        s.start_api()
        yield s, broker
    finally:
        s.close()
        broker.close()


def submit(client: httpx.Client, slide_id: str, params: dict) -> str:
    r = client.post("/v1/jobs", json={"slide_id": slide_id, "model": "identity",
                                      "parameters": params})
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def wait_until(what: str, predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def log_counts(s: Stack, pattern: str) -> Counter[str]:
    """Job ids matched by ``pattern`` (one group) across the workers' logs."""
    assert s.logs is not None
    found: Counter[str] = Counter()
    for path in s.logs.glob("worker-*.log"):
        found.update(re.findall(pattern, path.read_text(errors="replace")))
    return found


def assert_each_ran_once(s: Stack, client: httpx.Client, job_ids: list[str]) -> None:
    """Every job succeeded, published one result, and was claimed as often as it was
    attempted, with exactly one run reporting success."""
    jobs = {job_id: s.wait_job(client, job_id, timeout_s=180) for job_id in job_ids}
    # a run records success in the store, then logs it: give the last lines a moment
    wait_until("the success lines", lambda: set(job_ids) <= set(log_counts(s, SUCCESS)), 10)
    time.sleep(0.5)
    successes = log_counts(s, SUCCESS)
    claims = log_counts(s, r"job (\w+) \(slide \w+, model \w+\) claimed by")
    for job_id, job in jobs.items():
        assert job["status"] == "succeeded", job
        assert successes[job_id] == 1, (job_id, successes[job_id])
        assert claims[job_id] == job["attempts"], (job_id, claims[job_id], job["attempts"])
        assert (s.data_dir / "results" / f"{job_id}.zarr").is_dir()
    assert not list((s.data_dir / "results").glob(".*partial*"))


def running_on(s: Stack, job_id: str) -> str:
    """The worker log name (w1/w2) whose worker claimed ``job_id`` last."""
    assert s.logs is not None
    last, name = -1.0, ""
    for path in s.logs.glob("worker-*.log"):
        if f"job {job_id} (slide" in path.read_text(errors="replace"):
            if path.stat().st_mtime > last:
                last, name = path.stat().st_mtime, path.stem.removeprefix("worker-")
    assert name, f"no worker claimed {job_id}"
    return name


@pytest.fixture(scope="module")
def slide_id(fault_stack: tuple[Stack, PrivateRedis], svc_slides: dict) -> str:
    s, _ = fault_stack
    with s.client("alice") as alice:
        return str(s.upload(alice, svc_slides["cmu"])["id"])


def test_api_restart_mid_job_loses_nothing_and_ends_event_streams(
    fault_stack: tuple[Stack, PrivateRedis], slide_id: str
) -> None:
    s, _ = fault_stack
    with s.client("alice") as alice:
        job_id = submit(alice, slide_id, LONG)
        wait_until("inference", lambda: alice.get(f"/v1/jobs/{job_id}").json()["tiles_done"] > 0)
        lines: list[bytes] = []
        ended = threading.Event()

        def follow() -> None:
            try:
                with s.client("alice", timeout=120) as c, c.stream(
                    "GET", f"/v1/jobs/{job_id}/events"
                ) as r:
                    for line in r.iter_lines():
                        lines.append(line.encode())
            except Exception as err:  # surfaces in the assertions below
                lines.append(f"error: {err!r}".encode())
            ended.set()

        threading.Thread(target=follow, daemon=True).start()
        wait_until("the first event", lambda: any(b"progress" in x for x in lines) or ended.is_set())
        assert any(b"progress" in x for x in lines), lines
        assert s.api is not None
        started = time.monotonic()
        stop(s.api)  # SIGTERM
        stopped_s = time.monotonic() - started
        assert ended.wait(5)
        assert stopped_s < 5.0, stopped_s  # before: held until the job ended
        assert b": server shutting down" in lines and b"event: end" not in lines
        s.start_api()
        assert_each_ran_once(s, alice, [job_id])


def test_redis_killed_with_queued_jobs_loses_none(
    fault_stack: tuple[Stack, PrivateRedis], slide_id: str
) -> None:
    s, broker = fault_stack
    with s.client("alice") as alice:
        running = [submit(alice, slide_id, LONG) for _ in range(2)]  # both workers busy
        wait_until(
            "both workers running",
            lambda: all(alice.get(f"/v1/jobs/{j}").json()["tiles_done"] > 0 for j in running),
        )
        queued = [submit(alice, slide_id, SHORT) for _ in range(5)]
        # (a long job that just ended may have let its worker take one of them)
        assert redis.Redis.from_url(broker.url).llen("gpu") >= 3
        broker.kill()
        broker.start()  # empty: the queued messages are gone
        assert redis.Redis.from_url(broker.url).llen("gpu") == 0
        stranded = [j for j in queued if alice.get(f"/v1/jobs/{j}").json()["status"] == "queued"]
        assert len(stranded) >= 3
        assert_each_ran_once(s, alice, running + queued)
        for job_id in stranded:  # each ran once, from the reconciler's message
            assert alice.get(f"/v1/jobs/{job_id}").json()["attempts"] == 1


def test_sigkilled_worker_job_resumes_within_a_minute(
    fault_stack: tuple[Stack, PrivateRedis], slide_id: str
) -> None:
    s, _ = fault_stack
    with s.client("alice") as alice:
        job_id = submit(alice, slide_id, LONG)
        wait_until("inference", lambda: alice.get(f"/v1/jobs/{job_id}").json()["tiles_done"] > 0)
        victim = running_on(s, job_id)
        proc = s.workers[int(victim[1:]) - 1]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        killed = time.monotonic()
        wait_until(
            "the job claimed again",
            lambda: alice.get(f"/v1/jobs/{job_id}").json()["attempts"] == 2,
            timeout_s=RESUME_LIMIT_S,
        )
        resumed_s = time.monotonic() - killed
        assert resumed_s < RESUME_LIMIT_S  # before: the visibility timeout, an hour
        assert_each_ran_once(s, alice, [job_id])


# -- a disk that fills ------------------------------------------------------------------
@pytest.fixture(params=["tmpfs", "rlimit"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A data dir on a 4 MiB tmpfs (we are root), or an API under a 3 MiB RLIMIT_FSIZE."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if request.param == "rlimit":
        yield mount, "rlimit"
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); "
                    "the RLIMIT_FSIZE case covers a full disk")
    try:
        yield mount, "tmpfs"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_answers_507_and_recovers(
    small_disk: tuple[Path, str], redis_base_url: str, svc_slides: dict, tmp_path: Path
) -> None:
    data_dir, how = small_disk
    s = make_stack(tmp_path / "s", next_redis_url(redis_base_url),
                   SLIDEPIPE_DATA_DIR=str(data_dir),
                   SLIDEPIPE_DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}")
    assert s.logs is not None
    limit = 3 * 1024**2

    def rlimit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with open(s.logs / "api.log", "ab") as log_file:
        s.api = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port",
             s.base_url.rsplit(":", 1)[1], "--log-level", "warning"],
            cwd=REPO, env=s.env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=rlimit if how == "rlimit" else None,
        )
    try:
        wait_until("the API", lambda: _up(s.base_url), timeout_s=90)
        with s.client("alice") as alice:
            big = svc_slides["cmu"].read_bytes() * 3  # 5.8 MB: more than the disk holds
            r = alice.post("/v1/slides", files={"file": ("big.svs", big)})
            assert r.status_code == 507, (how, r.status_code, r.text)
            assert "storage is full" in r.json()["detail"] and r.json()["error"]
            assert s.leftovers() == []  # the partial upload is gone, the space is back
            ok = alice.post("/v1/slides", files={"file": ("ok.svs", svc_slides["pyramid"]
                                                          .read_bytes())})
            assert ok.status_code == 201, ok.text
            assert alice.get("/v1/slides").json()["total"] == 1
    finally:
        s.close()


def _up(base_url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
    return False
