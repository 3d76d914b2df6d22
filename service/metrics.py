"""``GET /metrics``: the service's state in the Prometheus text format, read at scrape time.

The API holds none of the numbers: jobs live in the database, queues in the broker, and
what workers count (tiles, store bytes, job and stage durations, heartbeats) in the
broker's Redis (:mod:`workers.jobs.telemetry`). A custom collector reads all three on
each scrape, so one API (or several behind a balancer) reports the whole deployment,
whichever hosts its workers run on. The series are listed in docs/operations.md.

No API key, like the probes: the numbers are aggregates without owners, slide names or
file names, and Prometheus scrapes from inside the deployment's network; keep the port
off the internet (or behind the proxy's own auth), as for ``/readyz``.

A source that does not answer is reported, not raised: ``slidepipe_metrics_source_up``
is 0 for it and its series are left out, so a scrape never fails with a 500.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import cast

import anyio
import redis
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from workers.jobs import telemetry, worker_beats
from workers.jobs.celery_app import QUEUES
from workers.jobs.reconcile import PRIORITY_SEP, UNACKED
from workers.jobs.rows import JobStatus
from workers.jobs.store import JobStore

log = logging.getLogger(__name__)

#: The text format every Prometheus version reads (0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
router = APIRouter(tags=["health"])


def queue_depths(client: redis.Redis) -> dict[str, int]:
    """Messages waiting in each queue (kombu keeps priorities in sibling lists)."""
    pipe = client.pipeline(transaction=False)
    for queue in QUEUES:
        for key in (queue, *(f"{queue}{PRIORITY_SEP}{p}" for p in range(1, 10))):
            pipe.llen(key)
    lengths = cast(list[int], pipe.execute())
    per_queue = len(lengths) // len(QUEUES)
    return {q: sum(lengths[i * per_queue:(i + 1) * per_queue]) for i, q in enumerate(QUEUES)}


class SlidepipeCollector(Collector):
    """Reads the database and Redis on each :meth:`collect` (one scrape)."""

    def __init__(self, store: JobStore, client: redis.Redis) -> None:
        self.store, self.client = store, client

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "slidepipe_metrics_source_up",
            "1 when the source answered this scrape (database, redis), else 0",
            labels=["source"],
        )
        for source, read in (("database", self._database), ("redis", self._redis)):
            started = time.perf_counter()
            try:
                families = list(read())
            except Exception as err:  # a source down: say so, report the rest
                log.warning("/metrics: %s unreadable: %s: %s", source, type(err).__name__, err)
                up.add_metric([source], 0)
                continue
            log.debug("/metrics: %s read in %.3f s", source, time.perf_counter() - started)
            up.add_metric([source], 1)
            yield from families
        yield up

    def _database(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "slidepipe_jobs", "jobs in the database by state and model", labels=["state", "model"]
        )
        counts = telemetry.job_counts(self.store)
        models = sorted({model for _, model in counts})
        for model in models:  # every state of every model, 0 included, for alerts
            for state in JobStatus:
                jobs.add_metric([str(state), model], counts.get((str(state), model), 0))
        yield jobs

    def _redis(self) -> Iterator[Metric]:
        client = self.client
        depth = GaugeMetricFamily(
            "slidepipe_queue_messages", "messages waiting in a queue", labels=["queue"]
        )
        for queue, n in queue_depths(client).items():
            depth.add_metric([queue], n)
        yield depth
        yield GaugeMetricFamily(
            "slidepipe_queue_unacked_messages",
            "messages delivered to a worker and not yet acknowledged (running or prefetched)",
            value=int(client.hlen(UNACKED)),
        )
        yield from self._counters(client)
        for name, bounds, doc, labels in (
            (telemetry.JOB_DURATION, telemetry.JOB_SECONDS_BUCKETS,
             "a finished job's wall time, from its claim to its end", ["model", "state"]),
            (telemetry.STAGE_DURATION, telemetry.STAGE_SECONDS_BUCKETS,
             "a succeeded job's time in each engine stage", ["stage"]),
        ):
            family = HistogramMetricFamily(f"slidepipe_{name}", doc, labels=labels)
            for h in telemetry.read_histogram(client, name, bounds):
                family.add_metric([h.labels.get(label, "") for label in labels],
                                  h.buckets, h.sum_value)
            yield family
        last = telemetry.read_last_job(client)
        last_rate = GaugeMetricFamily(
            "slidepipe_last_job_tiles_per_second",
            "tiles inferred per second of the infer stage, of the last job that succeeded",
            labels=["model"],
        )
        if last:
            last_rate.add_metric([last.get("model", "")], float(last["tiles_per_second"]))
        yield last_rate
        yield from self._workers(client)

    def _counters(self, client: redis.Redis) -> Iterator[Metric]:
        values = telemetry.read_counters(client)
        for name, doc, labels in (
            (telemetry.TILES, "tiles run through a model (rate() gives tiles/s)",
             ["model", "node"]),
            (telemetry.STORE_READ, "bytes read from the slide and result store", ["node"]),
            (telemetry.STORE_WRITTEN, "bytes written to the slide and result store", ["node"]),
        ):
            family = CounterMetricFamily(f"slidepipe_{name}", doc, labels=labels)
            for found, value in values.get(name, []):
                family.add_metric([found.get(label, "") for label in labels], value)
            yield family

    def _workers(self, client: redis.Redis) -> Iterator[Metric]:
        beats = worker_beats.read_heartbeats(client)
        stamp = GaugeMetricFamily(
            "slidepipe_worker_heartbeat_timestamp_seconds",
            "when a live worker last said it is alive (Unix time); gone after 3 missed beats",
            labels=["worker", "device", "queues"],
        )
        alive = GaugeMetricFamily(
            "slidepipe_workers", "live workers consuming a queue", labels=["queue"]
        )
        per_queue = dict.fromkeys(QUEUES, 0)
        for node, beat in sorted(beats.items()):
            queues = [str(q) for q in beat.get("queues", [])]
            stamp.add_metric([node, str(beat.get("device", "")), ",".join(queues)],
                             float(beat.get("ts", 0.0)))
            for queue in queues:
                per_queue[queue] = per_queue.get(queue, 0) + 1
        for queue, n in per_queue.items():
            alive.add_metric([queue], n)
        yield stamp
        yield alive


def render(store: JobStore, client: redis.Redis) -> bytes:
    """One scrape's text: this process's pending counts first, then every source."""
    telemetry.flush()  # what the API itself counted (uploads' store bytes) is included
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SlidepipeCollector(store, client))
    return generate_latest(registry)


def _client(request: Request) -> redis.Redis:
    """The app's Redis connection for scrapes (made on first use, closed with the app)."""
    client = getattr(request.app.state, "metrics_redis", None)
    if client is None:
        url = request.app.state.settings.broker_url
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        request.app.state.metrics_redis = client
    return cast(redis.Redis, client)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    """Jobs, queues, throughput, durations, workers and store bytes, for Prometheus
    (no API key, like the probes: aggregates only; see docs/operations.md)."""
    body = await anyio.to_thread.run_sync(render, request.app.state.store, _client(request))
    return Response(content=body, media_type=CONTENT_TYPE)
