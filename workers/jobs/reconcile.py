"""The reconciler: the database is the truth about jobs, the broker only carries them.

Redis as ``slidepipe up`` used to start it kept nothing on disk: a restart emptied the
queue while the database still held those jobs ``queued``, forever. And a worker lost
outright (SIGKILL, a dead machine) kept its job's message unacknowledged until the
visibility timeout (an hour) handed it back. So every worker runs a reconciler thread
(on start, then every ``SLIDEPIPE_RECONCILE_INTERVAL_S``; one pass at a time across all
workers, under a Redis lock) that re-queues

- every job the database holds ``queued`` (for longer than ``stale_after_s``) that no
  message in the queue carries, and no worker received in the last ``stale_after_s``;
- every job ``running`` whose heartbeat is older than ``stale_after_s`` (its worker is
  dead or hung) that no message in the queue carries.

Re-queueing is idempotent through the job store's claim: a copy of a job that another
worker holds alive is dropped, one of a finished job does nothing, so a duplicate
message costs one claim query and nothing runs twice (docs/robustness.md).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import redis
from celery.signals import worker_ready, worker_shutdown
from sqlalchemy import and_, or_, select

from workers.jobs.celery_app import QUEUE, RUN_JOB_TASK
from workers.jobs.rows import JobRow, JobStatus, utcnow
from workers.jobs.settings import Settings, get_settings
from workers.jobs.store import JobStore

log = logging.getLogger(__name__)

#: kombu's Redis transport: unacknowledged messages, and when each was delivered
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"
#: kombu names the queue of priority p > 0 ``<queue>\x06\x16<p>``
PRIORITY_SEP = "\x06\x16"
LOCK_KEY = "slidepipe:reconciler-lock"
#: Tasks whose message carries a job id first: the job, and a part of a split job (a
#: job whose parts wait for a free worker is not lost: workers/jobs/split.py)
JOB_MESSAGES = (RUN_JOB_TASK, "slidepipe.run_part")
PAGE = 1000
MAX_JOBS_PER_PASS = 5000


@dataclass
class BrokerView:
    waiting: set[str] = field(default_factory=set)  #: job ids with a message in a queue
    delivered: dict[str, float] = field(default_factory=dict)  #: job id -> last delivery


@dataclass
class Report:
    requeued: list[str] = field(default_factory=list)  #: queued jobs the broker lost
    resumed: list[str] = field(default_factory=list)  #: running jobs whose worker is gone
    skipped: bool = False  #: another worker's reconciler holds the lock

    def __bool__(self) -> bool:
        return bool(self.requeued or self.resumed)


def job_id_of(raw: bytes | str) -> str | None:
    """The job id a kombu message (JSON) of :data:`JOB_MESSAGES` carries, else None."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # an ``unacked`` entry: [message, exchange, key]
            message = message[0]
        headers = message.get("headers") or {}
        if headers.get("task") not in JOB_MESSAGES:
            return None
        body = message.get("body", "")
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def _lrange_all(client: redis.Redis, key: str) -> Iterable[bytes]:
    start = 0
    while True:
        page = cast(list[bytes], client.lrange(key, start, start + PAGE - 1))
        yield from page
        if len(page) < PAGE:
            return
        start += PAGE


def broker_view(client: redis.Redis, queue: str = QUEUE) -> BrokerView:
    """Which jobs the broker holds: waiting in ``queue`` (any priority), or delivered."""
    view = BrokerView()
    for key in [queue, *(f"{queue}{PRIORITY_SEP}{p}" for p in range(1, 10))]:
        for raw in _lrange_all(client, key):
            if (job_id := job_id_of(raw)) is not None:
                view.waiting.add(job_id)
    scored = cast(list[tuple[bytes, float]], client.zrange(UNACKED_INDEX, 0, -1, withscores=True))
    when = dict(scored)
    entries = cast(dict[bytes, bytes], client.hgetall(UNACKED))
    for tag, raw in entries.items():
        if (job_id := job_id_of(raw)) is not None:
            view.delivered[job_id] = max(view.delivered.get(job_id, 0.0), when.get(tag, 0.0))
    return view


def stranded_jobs(store: JobStore, older_than: datetime) -> list[tuple[str, str]]:
    """``(id, status)`` of queued jobs created before ``older_than`` and of running jobs
    whose heartbeat is older than it (or missing)."""
    with store.session() as s:
        rows = s.execute(
            select(JobRow.id, JobRow.status)
            .where(
                or_(
                    and_(JobRow.status == JobStatus.queued, JobRow.created_at < older_than),
                    and_(
                        JobRow.status == JobStatus.running,
                        or_(JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < older_than),
                    ),
                )
            )
            .order_by(JobRow.created_at)
            .limit(MAX_JOBS_PER_PASS)
        ).all()
    return [(str(job_id), str(status)) for job_id, status in rows]


def reconcile_once(
    store: JobStore,
    client: redis.Redis,
    enqueue: Callable[[str], None],
    settings: Settings,
    *,
    lock: bool = True,
    now: float | None = None,
) -> Report:
    """One pass: re-queue what the database holds and the broker lost. Idempotent."""
    report = Report()
    if lock:
        ttl_ms = max(1000, int(settings.reconcile_interval_s * 800))
        if not client.set(LOCK_KEY, f"{socket.gethostname()}:{os.getpid()}", nx=True, px=ttl_ms):
            report.skipped = True
            return report
    stale_s = settings.stale_after_s
    candidates = stranded_jobs(store, utcnow() - timedelta(seconds=stale_s))
    if not candidates:
        return report
    view = broker_view(client)
    now = now if now is not None else time.time()  # kombu stamps deliveries with time()
    for job_id, status in candidates:
        if job_id in view.waiting:
            continue  # a worker will take it when one is free
        if status == JobStatus.queued and now - view.delivered.get(job_id, 0.0) < stale_s:
            continue  # just delivered: its worker is claiming it
        enqueue(job_id)
        (report.requeued if status == JobStatus.queued else report.resumed).append(job_id)
    if report:
        log.warning(
            "reconciler: re-queued %d queued job(s) the broker had lost %s and %d running "
            "job(s) whose worker went silent %s",
            len(report.requeued), report.requeued[:10], len(report.resumed), report.resumed[:10],
        )
    return report


class Reconciler:
    """The worker's background thread: a pass at start, then every interval."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        from workers.jobs.celery_app import enqueue_job

        store = JobStore(self.settings.effective_database_url)
        client = redis.Redis.from_url(
            self.settings.broker_url, socket_connect_timeout=3, socket_timeout=10
        )
        try:
            while True:
                try:
                    reconcile_once(store, client, enqueue_job, self.settings)
                except Exception as err:  # the broker or database is down: next time
                    log.warning("reconciler pass failed: %s: %s", type(err).__name__, err)
                if self._stop.wait(self.settings.reconcile_interval_s):
                    return
        finally:
            client.close()
            store.dispose()


_running: list[Reconciler] = []


@worker_ready.connect
def _start(**_: Any) -> None:
    settings = get_settings()
    if settings.reconcile_interval_s <= 0 or not settings.broker_url.startswith(
        ("redis://", "rediss://", "unix://")
    ):
        log.info("reconciler off (SLIDEPIPE_RECONCILE_INTERVAL_S=0 or not a Redis broker)")
        return
    reconciler = Reconciler(settings)
    reconciler.start()
    _running.append(reconciler)
    log.info("reconciler started: every %g s", settings.reconcile_interval_s)


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    while _running:
        _running.pop().stop()
