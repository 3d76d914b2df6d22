"""The reconciler against a real redis-server and a real job store (SQLite).

Messages are published by a real Celery app, as the API does; a delivery to a worker is
made the way kombu's Redis transport makes it (the message moves from the queue list to
the ``unacked`` hash, stamped in ``unacked_index``), so the reconciler reads exactly what a
running system leaves in Redis.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from tests.service.conftest import private_redis
from workers.jobs.celery_app import QUEUE, create_celery_app
from workers.jobs.claims import ClaimOutcome
from workers.jobs.reconcile import (
    LOCK_KEY,
    UNACKED,
    UNACKED_INDEX,
    broker_view,
    job_id_of,
    reconcile_once,
)
from workers.jobs.rows import JobRow, JobStatus, SlideRow, new_id, utcnow
from workers.jobs.settings import Settings
from workers.jobs.store import JobStore

STALE_S = 3.0  # heartbeat 1 s x 3


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with private_redis(tmp_path_factory.mktemp("redis")) as url:
        yield f"{url}/0"


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> Iterator[tuple[JobStore, redis.Redis, Settings, list]]:
    settings = Settings(
        broker_url=redis_url, data_dir=tmp_path, heartbeat_s=1.0, reconcile_interval_s=5
    )
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    celery = create_celery_app(settings)
    sent: list[str] = []

    def enqueue(job_id: str) -> None:  # what the API and the reconciler call
        celery.send_task("slidepipe.run_job", args=[job_id], queue=QUEUE,
                         task_id=f"{job_id}-{new_id()[:8]}", ignore_result=True)
        sent.append(job_id)

    try:
        yield store, client, settings, [enqueue, sent]
    finally:
        store.dispose()
        client.close()


def make_jobs(store: JobStore, n: int, *, age_s: float = 60.0) -> list[str]:
    slide = SlideRow(
        id=new_id(), owner="alice", sha256=new_id() * 2, filename="s.svs", size_bytes=1,
        rel_path="slides/x.svs", width=100, height=100, level_count=1,
        level_dimensions=[[100, 100]], level_downsamples=[1.0], mpp=0.5, vendor="aperio",
        backend="tiffslide",
    )
    store.add_slide(slide)
    _, jobs = store.create_jobs("alice", [slide.id] * n, "identity", {}, batch=True)
    with store.session() as s:
        s.execute(
            update(JobRow)
            .where(JobRow.id.in_([j.id for j in jobs]))
            .values(created_at=utcnow() - timedelta(seconds=age_s))
        )
    return [j.id for j in jobs]


def deliver(client: redis.Redis, age_s: float = 0.0) -> str:
    """Move one message from the queue to ``unacked``, as a worker's fetch does."""
    raw = client.rpop(QUEUE)
    assert raw is not None
    tag = new_id()
    client.hset(UNACKED, tag, json.dumps([json.loads(raw), "", QUEUE]))
    client.zadd(UNACKED_INDEX, {tag: time.time() - age_s})
    job_id = job_id_of(raw)
    assert job_id is not None
    return job_id


def test_queued_jobs_the_broker_lost_are_requeued_once(env: tuple) -> None:
    store, client, settings, (enqueue, sent) = env
    lost = make_jobs(store, 3)
    young = make_jobs(store, 1, age_s=0.0)  # the API may be queueing it right now
    report = reconcile_once(store, client, enqueue, settings, lock=False)
    assert sorted(report.requeued) == sorted(lost) and report.resumed == []
    assert broker_view(client).waiting == set(lost)
    # idempotent: a second pass finds them waiting in the queue
    assert not reconcile_once(store, client, enqueue, settings, lock=False)
    assert sorted(sent) == sorted(lost) and young[0] not in sent


def test_delivered_but_never_claimed_is_requeued_after_stale(env: tuple) -> None:
    store, client, settings, (enqueue, sent) = env
    fresh, orphan = make_jobs(store, 2)
    for job_id in (fresh, orphan):
        enqueue(job_id)
    sent.clear()
    delivered = {deliver(client, age_s=0.0), deliver(client, age_s=STALE_S + 5)}
    assert delivered == {fresh, orphan}
    # which message got which age depends on the queue order: find the old one
    view = broker_view(client)
    old = min(view.delivered, key=view.delivered.__getitem__)
    report = reconcile_once(store, client, enqueue, settings, lock=False)
    assert report.requeued == [old] and sent == [old]


def test_running_job_with_stopped_heartbeat_is_resumed_and_claimed_once(env: tuple) -> None:
    store, client, settings, (enqueue, sent) = env
    alive, dead = make_jobs(store, 2)
    for job_id, token in ((alive, "t-alive"), (dead, "t-dead")):
        assert store.claim(job_id, token, "w", STALE_S).outcome == ClaimOutcome.claimed
    with store.session() as s:
        s.execute(
            update(JobRow)
            .where(JobRow.id == dead)
            .values(heartbeat_at=utcnow() - timedelta(seconds=STALE_S + 1))
        )
    report = reconcile_once(store, client, enqueue, settings, lock=False)
    assert report.resumed == [dead] and report.requeued == [] and sent == [dead]
    assert not reconcile_once(store, client, enqueue, settings, lock=False)  # waiting now
    # the re-queued copy takes the job over; the old run's writes are refused from now on
    assert store.claim(dead, "t-new", "w2", STALE_S).outcome == ClaimOutcome.claimed
    assert store.claim(dead, "t-dup", "w3", STALE_S).outcome == ClaimOutcome.busy
    assert store.heartbeat(dead, "t-dead") == (False, False)
    assert store.finish(dead, "t-new", JobStatus.succeeded)
    assert store.claim(dead, "t-late", "w4", STALE_S).outcome == ClaimOutcome.terminal


def test_one_pass_at_a_time_across_workers(env: tuple) -> None:
    store, client, settings, (enqueue, sent) = env
    make_jobs(store, 1)
    first = reconcile_once(store, client, enqueue, settings)
    second = reconcile_once(store, client, enqueue, settings)
    assert len(first.requeued) == 1 and second.skipped and not second
    assert client.pttl(LOCK_KEY) > 0 and len(sent) == 1


def test_foreign_and_broken_messages_are_ignored() -> None:
    assert job_id_of(b"not json") is None
    assert job_id_of(json.dumps({"headers": {"task": "other.task"}, "body": ""})) is None
    body = json.dumps([["abc"], {}, {}])
    message = {"headers": {"task": "slidepipe.run_job"}, "body": body, "properties": {}}
    assert job_id_of(json.dumps(message)) == "abc"
