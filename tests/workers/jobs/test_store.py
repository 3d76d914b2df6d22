"""The job store on SQLite and on PostgreSQL (a database of its own, dropped afterwards)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.jobs.claims import ClaimOutcome
from workers.jobs.rows import JobStatus, SlideRow, new_id
from workers.jobs.store import JobStore


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    s = JobStore(url)
    try:
        yield s
    finally:
        s.dispose()


def slide_row(owner: str, sha: str = "a" * 64) -> SlideRow:
    slide_id = new_id()
    return SlideRow(
        id=slide_id,
        owner=owner,
        sha256=sha,
        filename="s.svs",
        size_bytes=5 * 2**30,
        rel_path=f"slides/{slide_id}.svs",
        width=100_000,
        height=80_000,
        level_count=3,
        level_dimensions=[[100_000, 80_000], [25_000, 20_000], [6250, 5000]],
        level_downsamples=[1.0, 4.0, 16.0],
        mpp=0.25,
        vendor="aperio",
        backend="openslide",
    )


def test_slides_dedupe_per_owner_and_isolate_owners(store: JobStore) -> None:
    first, created = store.add_slide(slide_row("alice"))
    assert created
    again, created = store.add_slide(slide_row("alice"))  # same sha256, same owner
    assert not created and again.id == first.id
    other, created = store.add_slide(slide_row("bob"))  # same content, other owner
    assert created and other.id != first.id
    assert store.get_slide("bob", first.id) is None
    assert store.get_slide("alice", first.id).size_bytes == 5 * 2**30  # big ints survive
    rows, total = store.list_slides("alice", limit=10, offset=0)
    assert total == 1 and rows[0].level_dimensions[2] == [6250, 5000]


def test_jobs_filter_and_paginate(store: JobStore) -> None:
    s1, _ = store.add_slide(slide_row("alice", "1" * 64))
    s2, _ = store.add_slide(slide_row("alice", "2" * 64))
    batch, jobs = store.create_jobs(
        "alice", [s1.id, s2.id], "identity", {"tile_px": 64}, batch=True
    )
    assert batch is not None and [j.batch_id for j in jobs] == [batch.id] * 2
    _, single = store.create_jobs("alice", [s1.id], "identity", {}, batch=False)
    assert single[0].batch_id is None
    page, total = store.list_jobs("alice", limit=2, offset=0)
    assert total == 3 and len(page) == 2
    rest, _ = store.list_jobs("alice", limit=2, offset=2)
    assert {j.id for j in page} | {j.id for j in rest} == {j.id for j in [*jobs, *single]}
    assert store.list_jobs("alice", batch_id=batch.id)[1] == 2
    assert store.list_jobs("alice", slide_id=s1.id)[1] == 2
    assert store.list_jobs("alice", status="queued")[1] == 3
    assert store.list_jobs("alice", status="running")[1] == 0
    assert store.list_jobs("bob")[1] == 0
    assert store.get_job("bob", single[0].id) is None
    found = store.get_batch("alice", batch.id)
    assert found is not None and len(found[1]) == 2
    assert store.get_batch("bob", batch.id) is None


def test_claim_progress_finish(store: JobStore) -> None:
    slide, _ = store.add_slide(slide_row("alice"))
    _, (job,) = store.create_jobs("alice", [slide.id], "identity", {}, batch=False)
    claim = store.claim(job.id, "tok1", "w1", stale_after_s=30)
    assert claim.outcome == ClaimOutcome.claimed and claim.job.status == "running"
    assert claim.job.attempts == 1 and claim.job.started_at is not None
    # a second delivery while the first claimant beats: busy
    assert store.claim(job.id, "tok2", "w2", stale_after_s=30).outcome == ClaimOutcome.busy
    assert store.update_progress(
        job.id, "tok1", stage="infer", done=5, total=10, percent=50.0, tiles_done=5, tiles_total=10
    )
    assert not store.update_progress(job.id, "tok2", stage="infer", done=9, total=10, percent=90.0)
    row = store.get_job("alice", job.id)
    assert (row.stage, row.tiles_done, row.tiles_total, row.percent) == ("infer", 5, 10, 50.0)
    assert store.heartbeat(job.id, "tok1") == (True, False)
    assert store.heartbeat(job.id, "tok2") == (False, False)
    assert store.finish(
        job.id,
        "tok1",
        JobStatus.succeeded,
        result_rel_path="results/x.zarr",
        result_info={"tiles_total": 10},
    )
    row = store.get_job("alice", job.id)
    assert row.status == "succeeded" and row.percent == 100.0 and row.finished_at is not None
    # terminal: later deliveries do nothing, a late writer changes nothing
    assert store.claim(job.id, "tok3", "w3", stale_after_s=0).outcome == ClaimOutcome.terminal
    assert not store.finish(job.id, "tok1", JobStatus.failed, error="late")
    assert store.claim(new_id(), "tok", "w", stale_after_s=1).outcome == ClaimOutcome.missing


def test_stale_claim_is_taken_over(store: JobStore) -> None:
    slide, _ = store.add_slide(slide_row("alice"))
    _, (job,) = store.create_jobs("alice", [slide.id], "identity", {}, batch=False)
    assert store.claim(job.id, "dead", "w1", stale_after_s=0.5).outcome == ClaimOutcome.claimed
    time.sleep(0.8)  # the first worker stops beating (killed)
    taken = store.claim(job.id, "alive", "w2", stale_after_s=0.5)
    assert taken.outcome == ClaimOutcome.claimed and taken.job.attempts == 2
    assert store.heartbeat(job.id, "dead") == (False, False)  # the old token lost the job
    assert not store.finish(job.id, "dead", JobStatus.succeeded)


def test_only_one_of_many_racing_claims_wins(store: JobStore) -> None:
    slide, _ = store.add_slide(slide_row("alice"))
    _, (job,) = store.create_jobs("alice", [slide.id], "identity", {}, batch=False)
    outcomes: list[ClaimOutcome] = []
    lock = threading.Lock()

    def claim(i: int) -> None:
        outcome = store.claim(job.id, f"tok{i}", f"w{i}", stale_after_s=30).outcome
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count(ClaimOutcome.claimed) == 1
    assert outcomes.count(ClaimOutcome.busy) == 7


def test_cancel_queued_and_running(store: JobStore) -> None:
    slide, _ = store.add_slide(slide_row("alice"))
    _, (queued, running) = store.create_jobs(
        "alice", [slide.id, slide.id], "identity", {}, batch=True
    )
    assert store.request_cancel("bob", queued.id) is None  # not bob's
    assert store.request_cancel("alice", queued.id).status == "cancelled"
    assert store.claim(queued.id, "t", "w", stale_after_s=30).outcome == ClaimOutcome.terminal
    store.claim(running.id, "t", "w", stale_after_s=30)
    row = store.request_cancel("alice", running.id)
    assert row.status == "running" and row.cancel_requested
    assert store.cancel_requested(running.id)
    assert store.heartbeat(running.id, "t") == (True, True)
    assert store.finish(running.id, "t", JobStatus.cancelled, error="cancelled on request")
    assert store.get_job("alice", running.id).status == "cancelled"


def test_unqueued_jobs_fail_and_slide_delete_cascades(store: JobStore) -> None:
    slide, _ = store.add_slide(slide_row("alice"))
    _, jobs = store.create_jobs("alice", [slide.id], "identity", {}, batch=True)
    store.fail_unqueued([jobs[0].id], "could not be queued: broker unreachable")
    row = store.get_job("alice", jobs[0].id)
    assert row.status == "failed" and "broker" in row.error
    assert store.delete_slide("bob", slide.id) is None
    deleted = store.delete_slide("alice", slide.id)
    assert [j.id for j in deleted] == [jobs[0].id]
    assert store.get_job("alice", jobs[0].id) is None
    assert store.get_slide("alice", slide.id) is None


def test_schema_creation_is_idempotent(store: JobStore) -> None:
    again = JobStore(store.url)  # a second process starting on the same database
    again.ping()
    again.dispose()
    store.ping()
