"""Worker heartbeats for ``GET /metrics``: which workers are alive, on what, taking what.

Each worker's main process runs a thread (started on ``worker_ready``) that writes
``<prefix>:worker:<node name>`` into the broker's Redis every few seconds with a TTL of
three beats: the value says when, on which device and from which queues. A worker that
died stops being listed when the TTL runs out; a clean stop deletes its key at once.
These are not the job claims' heartbeats (:mod:`workers.jobs.claims`): those prove a
*job* is alive, in the database; these say a *worker* is, whether or not it has work.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from workers.jobs.settings import get_settings
from workers.jobs.telemetry import PREFIX, flush, redis_url_ok

log = logging.getLogger(__name__)

WORKER_KEY = f"{PREFIX}:worker:"  # + node name
#: The names of workers that beat: the reader looks up their keys, never SCANs the
#: keyspace (which holds every task result); names whose key expired are dropped there.
WORKERS_KEY = f"{PREFIX}:workers"


@dataclass
class Heartbeat:
    """The worker main process's thread: ``<prefix>:worker:<node>`` every ``interval_s``.

    The value says when, on which device and from which queues; the key expires after
    three intervals, so a worker that died is no longer listed a little later. A clean
    stop deletes it at once.
    """

    url: str
    node: str
    device: str
    queues: tuple[str, ...]
    interval_s: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def key(self) -> str:
        return WORKER_KEY + self.node

    def beat(self, client: redis.Redis) -> None:
        value = json.dumps({"ts": time.time(), "device": self.device,
                            "queues": list(self.queues), "pid": os.getpid()})
        pipe = client.pipeline(transaction=False)
        pipe.set(self.key, value, px=max(1000, int(self.interval_s * 3000)))
        pipe.sadd(WORKERS_KEY, self.node)
        pipe.execute()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="telemetry-heartbeat",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2)
            client.delete(self.key)
            client.srem(WORKERS_KEY, self.node)
            client.close()
        except redis.RedisError:
            pass  # it expires on its own

    def _loop(self) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)
        try:
            while True:
                try:
                    self.beat(client)
                except Exception as err:  # Redis away: the next beat tries again
                    log.warning("telemetry: heartbeat of %s not written: %s", self.node, err)
                if self._stop.wait(self.interval_s):
                    return
        finally:
            client.close()


_heartbeats: list[Heartbeat] = []


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    settings = get_settings()
    if sender is None or not redis_url_ok(settings.broker_url):
        return
    queues = tuple(sorted(sender.app.amqp.queues.consume_from or ()))
    heartbeat = Heartbeat(url=settings.broker_url, node=str(sender.hostname),
                          device=settings.worker_device, queues=queues,
                          interval_s=min(settings.heartbeat_s, 5.0))
    heartbeat.start()
    _heartbeats.append(heartbeat)
    log.info("telemetry: heartbeat of %s every %g s", heartbeat.node, heartbeat.interval_s)


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    while _heartbeats:
        _heartbeats.pop().stop()
    flush()


def read_heartbeats(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """``{node: {"ts", "device", "queues", "pid"}}`` of every worker whose key is alive."""
    nodes = sorted(n.decode() for n in client.smembers(WORKERS_KEY))  # type: ignore[union-attr]
    if not nodes:
        return {}
    values = client.mget([WORKER_KEY + n for n in nodes])
    gone = [n for n, v in zip(nodes, values, strict=True) if v is None]
    if gone:  # died without a clean stop: their TTL ran out
        client.srem(WORKERS_KEY, *gone)
    return {n: json.loads(v) for n, v in zip(nodes, values, strict=True)
            if v is not None}
