"""Routing by device kind and ``GET /metrics``, against real processes.

One stack (uvicorn, two ``slidepipe worker`` processes, a private Redis database, SQLite)
runs the whole story: a worker started with ``--queues cpu`` leaves a model job waiting
(and /metrics shows it waiting on ``gpu``), a worker with the default queues takes it, and
the scrape afterwards reports what the test did. The telemetry's Redis layout is checked
on its own against the same real Redis.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import redis
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from service.cli import main as cli_main
from tests.service.conftest import next_redis_url
from workers.jobs import telemetry, worker_beats
from workers.jobs.celery_app import CPU_QUEUE, GPU_QUEUE, create_celery_app, default_queues
from workers.jobs.rows import JobRow
from workers.jobs.settings import Settings
from workers.storage.objects import Store

if TYPE_CHECKING:
    from conftest import Stack

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: httpx.Client) -> Samples:
    """``{(sample name, sorted labels): value}`` of one /metrics scrape over HTTP."""
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        assert family.name.startswith("slidepipe_"), family.name
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


# -- routing, in-process ---------------------------------------------------------------
def test_tasks_are_routed_to_queues_by_name() -> None:
    app = create_celery_app(Settings(broker_url="redis://127.0.0.1:1/0"))
    route = app.amqp.router.route
    assert route({}, "slidepipe.run_job")["queue"].name == GPU_QUEUE
    assert route({}, "slidepipe.run_part")["queue"].name == GPU_QUEUE
    assert route({}, "slidepipe.finish_split")["queue"].name == CPU_QUEUE
    assert default_queues("cuda:3") == (GPU_QUEUE,)
    assert default_queues("cpu") == default_queues("auto") == (GPU_QUEUE, CPU_QUEUE)


def test_worker_rejects_unknown_queues() -> None:
    # refused before anything starts (no --device: the command would set it process-wide)
    result = CliRunner().invoke(cli_main, ["worker", "--queues", "cpu,gpuu"])
    assert result.exit_code == 2
    assert "--queues" in result.output and "gpuu" in result.output


# -- the telemetry's Redis layout --------------------------------------------------------
def test_telemetry_round_trips_through_redis(redis_base_url: str, tmp_path: Path) -> None:
    url = next_redis_url(redis_base_url)
    client = redis.Redis.from_url(url)
    client.flushdb()
    counters = telemetry.Counters(url, flush_interval_s=3600)
    counters.add(telemetry.TILES, 5, {"model": "m", "node": "n"})
    counters.add(telemetry.TILES, 7, {"model": "m", "node": "n"})
    assert telemetry.read_counters(client) == {}  # buffered: no round trip per add
    counters.flush()
    assert telemetry.read_counters(client) == {telemetry.TILES: [({"model": "m", "node": "n"}, 12)]}

    started = datetime(2026, 1, 1, 12, 0, 0)
    for seconds, status in ((3.0, "succeeded"), (40.0, "succeeded"), (1e6, "failed")):
        job = JobRow(model="m", status=status, started_at=started,
                     finished_at=started + timedelta(seconds=seconds),
                     result_info={"tiles_inferred": 10, "timings_s": {"infer": 2.0}})
        telemetry.record_job(client, job)
    (ok, failed) = sorted(
        telemetry.read_histogram(client, telemetry.JOB_DURATION, telemetry.JOB_SECONDS_BUCKETS),
        key=lambda h: h.labels["state"], reverse=True,
    )
    assert ok.labels == {"model": "m", "state": "succeeded"} and ok.sum_value == 43.0
    cumulative = dict(ok.buckets)
    assert cumulative["2.5"] == 0 and cumulative["5.0"] == 1 and cumulative["60.0"] == 2
    assert cumulative["+Inf"] == 2
    assert dict(failed.buckets)["14400.0"] == 0 and dict(failed.buckets)["+Inf"] == 1
    assert telemetry.read_last_job(client)["tiles_per_second"] == "5.0"
    # a store's byte totals are watched: all it moved, then only its growth
    store = Store(tmp_path.as_uri())
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    store.put_file(tmp_path / "a.bin", "slides/a.bin")
    counters.watch(store)
    counters.watch(store)  # once is enough
    counters.flush()
    store.put_file(tmp_path / "a.bin", "slides/b.bin")
    counters.flush()
    written = telemetry.read_counters(client)[telemetry.STORE_WRITTEN]
    assert written == [({"node": telemetry.node_name()}, 2000)]
    assert telemetry.STORE_READ not in telemetry.read_counters(client)  # nothing read
    # a Redis that does not answer: the counts wait for the next flush
    dead = telemetry.Counters("redis://127.0.0.1:1/0", flush_interval_s=3600)
    dead.add(telemetry.TILES, 3, {"model": "m", "node": "n"})
    dead.flush()
    dead.url, dead._client, dead._retry_at = url, None, 0.0
    dead.flush()
    assert telemetry.read_counters(client)[telemetry.TILES][0][1] == 15
    # worker heartbeats: listed while the key lives, dropped once it expired
    beat = worker_beats.Heartbeat(url=url, node="gpu1@h", device="cuda:1", queues=("gpu",),
                                  interval_s=0.2)
    beat.beat(client)
    assert worker_beats.read_heartbeats(client)["gpu1@h"]["queues"] == ["gpu"]
    time.sleep(1.2)  # the TTL: three beats, at least 1 s
    assert worker_beats.read_heartbeats(client) == {}
    assert client.smembers(worker_beats.WORKERS_KEY) == set()
    beat.beat(client)
    beat.stop()  # a clean stop unlists at once
    assert worker_beats.read_heartbeats(client) == {}
    client.close()


# -- the whole story over HTTP -----------------------------------------------------------
@pytest.mark.slow
def test_cpu_only_worker_leaves_model_jobs_and_metrics_report_the_run(
    stack_factory: Callable[..., Stack], svc_slides: dict
) -> None:
    stack = stack_factory()
    # its own Redis database; emptied in case SLIDEPIPE_TEST_REDIS_URL names a used server
    with redis.Redis.from_url(stack.env["SLIDEPIPE_BROKER_URL"]) as fresh:
        fresh.flushdb()
    host = socket.gethostname()
    stack.start_worker("cpuonly", "--queues", "cpu")
    stack.start_api()
    with stack.client() as c, stack.client(None) as anonymous:
        slide = stack.upload(c, svc_slides["cmu"])
        r = c.post("/v1/jobs", json={"slide_id": slide["id"], "model": "identity",
                                     "parameters": {"target_mpp": 4.0, "tile_px": 64,
                                                    "overlap_px": 8}})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]

        # /metrics needs no key; the cpu-only worker is alive and consumes cpu only
        before = wait_for(
            lambda: (m := scrape(anonymous)) and series(
                m, "slidepipe_worker_heartbeat_timestamp_seconds") and m,
            "the cpu-only worker's heartbeat",
        )
        assert series(before, "slidepipe_worker_heartbeat_timestamp_seconds") == {
            (("device", "cpu"), ("queues", "cpu"), ("worker", f"cpuonly@{host}")):
                pytest.approx(time.time(), abs=30)
        }
        time.sleep(2.0)  # ample time for a worker on `gpu` to have taken it
        before = scrape(anonymous)
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        assert value(before, "slidepipe_queue_messages", queue="gpu") == 1
        assert value(before, "slidepipe_queue_messages", queue="cpu") == 0
        assert value(before, "slidepipe_workers", queue="gpu") == 0
        assert value(before, "slidepipe_workers", queue="cpu") == 1
        assert value(before, "slidepipe_jobs", state="queued", model="identity") == 1

        stack.start_worker("both")  # --device cpu, default queues: gpu and cpu
        job = stack.wait_job(c, job_id)
        assert job["status"] == "succeeded", job
        tiles = job["result_info"]["tiles_inferred"]
        assert tiles == job["tiles_done"] > 0

        # the task records the job just after it returns: wait for that, then read
        after = wait_for(
            lambda: (m := scrape(anonymous)) and value(
                m, "slidepipe_job_duration_seconds_count", model="identity", state="succeeded"
            ) == 1 and m,
            "the finished job in /metrics",
        )
    assert f"claimed by both@{host}" in (stack.logs / "worker-both.log").read_text()
    assert job_id not in (stack.logs / "worker-cpuonly.log").read_text()

    assert value(after, "slidepipe_jobs", state="succeeded", model="identity") == 1
    for state in ("queued", "running", "failed", "cancelled"):
        assert value(after, "slidepipe_jobs", state=state, model="identity") == 0
    assert value(after, "slidepipe_tiles_processed_total", model="identity",
                 node=f"both@{host}") == tiles
    assert value(after, "slidepipe_queue_messages", queue="gpu") == 0
    assert value(after, "slidepipe_queue_messages", queue="cpu") == 0
    assert value(after, "slidepipe_workers", queue="gpu") == 1
    assert value(after, "slidepipe_workers", queue="cpu") == 2
    beats = series(after, "slidepipe_worker_heartbeat_timestamp_seconds")
    assert beats[(("device", "cpu"), ("queues", "cpu,gpu"), ("worker", f"both@{host}"))] == (
        pytest.approx(time.time(), abs=30))
    assert value(after, "slidepipe_job_duration_seconds_sum", model="identity",
                 state="succeeded") > 0
    stage_counts = {dict(labels)["stage"]: v for labels, v in series(
        after, "slidepipe_job_stage_duration_seconds_count").items()}
    assert set(job["result_info"]["timings_s"]) == set(stage_counts)
    assert stage_counts["infer"] == 1
    assert value(after, "slidepipe_job_stage_duration_seconds_sum", stage="infer") > 0
    assert value(after, "slidepipe_last_job_tiles_per_second", model="identity") == (
        pytest.approx(tiles / job["result_info"]["timings_s"]["infer"], rel=1e-6))
    assert value(after, "slidepipe_metrics_source_up", source="database") == 1
    assert value(after, "slidepipe_metrics_source_up", source="redis") == 1
    assert "slidepipe_queue_unacked_messages" in {name for name, _ in after}
    # the API streamed the upload into the (file://) store; the worker read the slide in
    # place, which is no store transfer
    assert value(after, "slidepipe_store_written_bytes_total", node=host) == slide["size_bytes"]
