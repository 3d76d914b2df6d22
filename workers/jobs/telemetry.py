"""What workers publish for ``GET /metrics``: counters, job histograms and heartbeats in Redis.

The API and the workers are separate processes, often on separate hosts, so nothing is
kept in a process's memory for Prometheus to scrape: workers write into the broker's
Redis (``SLIDEPIPE_BROKER_URL``; its database number keeps deployments and tests sharing
one server apart, as it does for the queues), and the API's collector
(:mod:`service.metrics`) reads it at scrape time. Every key lives under :data:`PREFIX`.

- counters (tiles processed, store bytes read and written) are added in memory and
  written with one ``HINCRBY`` pipeline at most every :data:`FLUSH_INTERVAL_S` and at the
  end of each job, so a range read of a slide costs no round trip;
- a finished job adds its duration, and a succeeded one its stage durations, to
  histograms kept as bucket counts in a hash (cumulated when read);
- each worker's main process writes ``<prefix>:worker:<node name>`` every few seconds
  with a TTL (:mod:`workers.jobs.worker_beats`).

A Redis that does not answer costs a few counts held back for the next flush, never a
job: every write here logs and carries on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from celery.signals import celeryd_init
from sqlalchemy import func, select

from workers.engine.spec import Progress, ProgressCallback
from workers.jobs.rows import TERMINAL, JobRow, as_utc
from workers.jobs.settings import get_settings
from workers.jobs.store import JobStore

log = logging.getLogger(__name__)

PREFIX = "slidepipe:telemetry"
COUNTERS_KEY = f"{PREFIX}:counters"
LAST_JOB_KEY = f"{PREFIX}:last_job"
HISTOGRAM_KEY = f"{PREFIX}:histogram:"  # + series name
#: Counter names in :data:`COUNTERS_KEY` (each field is ``<name>\t<labels as JSON>``).
TILES, STORE_READ, STORE_WRITTEN = "tiles_processed", "store_read_bytes", "store_written_bytes"
FLUSH_INTERVAL_S = 1.0
#: Upper bounds (seconds) of the histogram buckets: a job takes seconds (a biopsy) to
#: hours (a resection on a CPU); a stage from milliseconds (open) to an hour (infer).
JOB_SECONDS_BUCKETS: tuple[float, ...] = (
    1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400,
)
STAGE_SECONDS_BUCKETS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600,
)
JOB_DURATION, STAGE_DURATION = "job_duration_seconds", "job_stage_duration_seconds"
_SEP = "\t"


def _labels_field(name: str, labels: Mapping[str, str]) -> str:
    return f"{name}{_SEP}{json.dumps(dict(labels), sort_keys=True)}"


def redis_url_ok(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


# -- the node this process belongs to --------------------------------------------------
_node: str | None = None


@celeryd_init.connect
def _remember_node(sender: str | None = None, **_: Any) -> None:
    """The Celery node name (``gpu0@host``), set before the pool forks, so every pool
    process labels its counts with its worker's name."""
    global _node
    if sender:
        _node = str(sender)


def node_name() -> str:
    """This process's label: its Celery worker's node name, else the host name."""
    return _node or socket.gethostname()


# -- buffered counters -------------------------------------------------------------------
class ByteTotals(Protocol):
    """What keeps running totals of bytes moved (:class:`workers.storage.objects.Store`)."""

    @property
    def bytes_read(self) -> int: ...

    @property
    def bytes_written(self) -> int: ...


class Counters:
    """Counts added in memory, flushed to Redis in one pipeline now and then.

    Thread-safe; per process (a forked pool process starts with an empty buffer and its
    own connection). Counts a flush could not write stay pending for the next one.
    Watched byte totals (:meth:`watch`) are read at each flush and their growth since
    the last one is added, so the store needs no knowledge of this module.
    """

    def __init__(self, url: str, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.url = url
        self.flush_interval_s = flush_interval_s
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._last_flush = time.monotonic()
        self._client: redis.Redis | None = None
        self._pid = os.getpid()
        self._retry_at = 0.0
        self._watched: list[tuple[ByteTotals, list[int]]] = []  # source, [read, written] seen

    def watch(self, source: ByteTotals) -> None:
        """Add ``source``'s bytes read and written (all of them, then their growth)."""
        with self._lock:
            if all(known is not source for known, _ in self._watched):
                self._watched.append((source, [0, 0]))

    def _take_watched(self) -> None:
        """Move the watched totals' growth into the pending counts (lock held).

        A forked process inherits its parent's totals and what was seen of them, so it
        adds only what it moved itself."""
        labels = {"node": node_name()}
        for source, seen in self._watched:
            read, written = source.bytes_read, source.bytes_written
            for name, now, i in ((STORE_READ, read, 0), (STORE_WRITTEN, written, 1)):
                if now > seen[i]:
                    key = _labels_field(name, labels)
                    self._pending[key] = self._pending.get(key, 0) + now - seen[i]
                seen[i] = now

    def add(self, name: str, amount: int, labels: Mapping[str, str]) -> None:
        if amount <= 0:
            return
        key = _labels_field(name, labels)
        with self._lock:
            self._reset_after_fork()
            self._pending[key] = self._pending.get(key, 0) + int(amount)
            due = time.monotonic() - self._last_flush >= self.flush_interval_s
        if due:
            self.flush()

    def _reset_after_fork(self) -> None:
        if self._pid != os.getpid():  # a pool process: the parent's counts are not ours
            self._pid, self._pending, self._client = os.getpid(), {}, None

    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(
                self.url, socket_connect_timeout=1, socket_timeout=3
            )
        return self._client

    def flush(self) -> None:
        """Write the pending counts (a no-op when none, or while Redis is backing off)."""
        with self._lock:
            self._reset_after_fork()
            now = time.monotonic()
            self._last_flush = now
            self._take_watched()
            if not self._pending or now < self._retry_at:
                return
            pending, self._pending = self._pending, {}
            try:
                pipe = self.client().pipeline(transaction=False)
                for key, amount in pending.items():
                    pipe.hincrby(COUNTERS_KEY, key, amount)
                pipe.execute()
            except Exception as err:  # Redis down, a socket error: never the job's problem
                for key, amount in pending.items():  # kept for the next flush
                    self._pending[key] = self._pending.get(key, 0) + amount
                self._retry_at = now + 10 * self.flush_interval_s
                log.warning("telemetry: could not write counters to Redis: %s", err)


_counters: Counters | None = None
_counters_lock = threading.Lock()


def counters() -> Counters | None:
    """This process's buffer, bound to the broker's Redis and watching the process's
    object store (its byte totals); None when the broker is not Redis."""
    global _counters
    with _counters_lock:
        if _counters is None:
            settings = get_settings()
            if not redis_url_ok(settings.broker_url):
                return None
            _counters = Counters(settings.broker_url)
            try:
                from workers.jobs.objects import get_object_store

                _counters.watch(get_object_store(settings))
            except Exception as err:  # a bad SLIDEPIPE_STORAGE_URL is reported where used
                log.warning("telemetry: store bytes not counted: %s", err)
        return _counters


def add_tiles(count: int, *, model: str) -> None:
    """``count`` more tiles went through ``model`` on this node."""
    if (c := counters()) is not None:
        c.add(TILES, count, {"model": model, "node": node_name()})


def add_store_bytes(*, read: int = 0, written: int = 0) -> None:
    """Bytes this process moved to or from the slide/result store outside the process's
    :func:`workers.jobs.objects.get_object_store` (whose totals are watched already)."""
    if (c := counters()) is not None:
        labels = {"node": node_name()}
        c.add(STORE_READ, read, labels)
        c.add(STORE_WRITTEN, written, labels)


def flush() -> None:
    """Write this process's pending counts now (end of a job; the API before a scrape)."""
    if (c := counters()) is not None:
        c.flush()


def counting_tiles(progress: ProgressCallback, *, model: str) -> ProgressCallback:
    """``progress`` that also counts each newly inferred tile once (for tiles/s)."""
    seen = 0

    def report(p: Progress) -> None:
        nonlocal seen
        if p.stage == "infer":
            if p.done < seen:  # a new inference pass starts from 0
                seen = 0
            add_tiles(p.done - seen, model=model)
            seen = p.done
        progress(p)

    return report


# -- finished jobs -------------------------------------------------------------------------
def _bucket(value: float, bounds: tuple[float, ...]) -> str:
    for bound in bounds:
        if value <= bound:
            return repr(float(bound))
    return "+Inf"


def _observe(
    pipe: Any, name: str, labels: Mapping[str, str], value: float, bounds: tuple[float, ...]
) -> None:
    """One observation: its bucket's count (not cumulative), the sum and the count."""
    key = HISTOGRAM_KEY + name
    fields = json.dumps(dict(labels), sort_keys=True)
    pipe.hincrby(key, f"{fields}{_SEP}le{_SEP}{_bucket(value, bounds)}", 1)
    pipe.hincrbyfloat(key, f"{fields}{_SEP}sum", float(value))
    pipe.hincrby(key, f"{fields}{_SEP}count", 1)


def record_job(client: redis.Redis, job: JobRow) -> None:
    """Add a terminal job's duration (claim to finish), and for a succeeded one its
    stage durations and its tiles/s, to what /metrics reports."""
    if job.status not in TERMINAL or job.started_at is None or job.finished_at is None:
        return
    duration_s = max(0.0, (job.finished_at - job.started_at).total_seconds())
    info = job.result_info or {}
    timings = info.get("timings_s") or {}
    pipe = client.pipeline(transaction=False)
    _observe(pipe, JOB_DURATION, {"model": job.model, "state": str(job.status)},
             duration_s, JOB_SECONDS_BUCKETS)
    succeeded = job.status == "succeeded"
    for stage, seconds in timings.items() if succeeded else ():
        if isinstance(seconds, int | float):
            _observe(pipe, STAGE_DURATION, {"stage": str(stage)}, float(seconds),
                     STAGE_SECONDS_BUCKETS)
    tiles, infer_s = info.get("tiles_inferred"), timings.get("infer")
    if succeeded and isinstance(tiles, int) and tiles > 0 and isinstance(infer_s, int | float):
        pipe.hset(LAST_JOB_KEY, mapping={
            "tiles_per_second": float(tiles) / max(float(infer_s), 1e-9),
            "finished_at": as_utc(job.finished_at).timestamp(),  # type: ignore[union-attr]
            "model": job.model,
        })
    pipe.execute()


def job_finished(store: JobStore, job_id: str, outcome: str) -> None:
    """After a job's task returns: flush its tile counts, and record the job if this run
    ended it (``outcome`` succeeded, failed or cancelled; a dropped copy records nothing)."""
    flush()
    c = counters()
    if c is None or outcome not in TERMINAL:
        return
    try:
        job = store.get_job(None, job_id)
        if job is not None:
            record_job(c.client(), job)
    except Exception as err:  # the job is done and stored: metrics must not fail its task
        log.warning("telemetry: job %s not recorded: %s: %s", job_id, type(err).__name__, err)


# -- reading (the API's collector) -------------------------------------------------------
def job_counts(store: JobStore) -> dict[tuple[str, str], int]:
    """``{(state, model): jobs}`` over the whole job table (one grouped, indexed query)."""
    with store.session() as s:
        rows = s.execute(
            select(JobRow.status, JobRow.model, func.count()).group_by(JobRow.status, JobRow.model)
        ).all()
    return {(str(state), str(model)): int(n) for state, model, n in rows}


@dataclass
class HistogramData:
    """One labelled histogram: cumulative bucket counts, sum and count."""

    labels: dict[str, str]
    buckets: list[tuple[str, float]]  #: (upper bound, cumulative count), ending in +Inf
    sum_value: float


def read_counters(client: redis.Redis) -> dict[str, list[tuple[dict[str, str], int]]]:
    """``{counter name: [(labels, value), ...]}`` as the workers wrote them."""
    out: dict[str, list[tuple[dict[str, str], int]]] = {}
    raw: dict[bytes, bytes] = client.hgetall(COUNTERS_KEY)  # type: ignore[assignment]
    for key, value in raw.items():
        name, _, labels = key.decode().partition(_SEP)
        out.setdefault(name, []).append((json.loads(labels), int(value)))
    return out


def read_histogram(client: redis.Redis, name: str, bounds: tuple[float, ...]) -> list[HistogramData]:
    """The histogram ``name`` with its buckets cumulated over ``bounds`` (+Inf last)."""
    raw: dict[bytes, bytes] = client.hgetall(HISTOGRAM_KEY + name)  # type: ignore[assignment]
    per: dict[str, dict[str, float]] = {}
    for key, value in raw.items():
        labels, _, rest = key.decode().partition(_SEP)
        per.setdefault(labels, {})[rest] = float(value)
    out = []
    for labels, fields in sorted(per.items()):
        cumulative, buckets = 0.0, []
        for bound in (*(repr(float(b)) for b in bounds), "+Inf"):
            cumulative += fields.get(f"le{_SEP}{bound}", 0.0)
            buckets.append((bound, cumulative))
        out.append(HistogramData(json.loads(labels), buckets, fields.get("sum", 0.0)))
    return out


def read_last_job(client: redis.Redis) -> dict[str, str]:
    raw: dict[bytes, bytes] = client.hgetall(LAST_JOB_KEY)  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}
