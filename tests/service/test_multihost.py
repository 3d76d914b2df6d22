"""Workers on many hosts: no shared folder, only the broker, the database and the store.

Real parts throughout: an S3 server (moto's server mode, a subprocess on loopback), a
private redis-server, PostgreSQL with a database of its own, the API (uvicorn) and TWO
Celery worker processes, each with its own private data and scratch folder (one reads
TIFF slides by byte ranges, the other through its read-through cache; a slide uploaded
as a zip is a folder in the store, which both read through their cache). A batch spreads over
both workers, and every result's objects equal, chunk for chunk and in their metadata
(provenance aside), those of a single-host ``file://`` run of the same jobs. Then one
larger job is split (workers/jobs/split_staging.py): prepared by the worker that claims
it, its staged result goes through the store, each host runs one part from its own copy,
one merges and publishes; the result equals a single-host whole run's the same way.
"""

from __future__ import annotations

import io
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.s3server import S3Server, s3_server  # noqa: F401 - fixture
from tests.service.conftest import make_stack, next_redis_url
from tests.workers.jobs.conftest import pg_admin, pg_url  # noqa: F401 - fixtures
from tests.workers.storage.test_store import _slide_row
from tests.workers.storage.trees import differences, tree
from workers.jobs.rows import JobStatus
from workers.jobs.settings import Settings
from workers.jobs.store import JobStore
from workers.jobs.tasks import execute_job
from workers.storage.objects import Store
from workers.storage.publish import marker_key

pytestmark = pytest.mark.slow

PARAMS = {"target_mpp": 4.0, "tile_px": 64, "overlap_px": 8}
#: the split job: cmu at 2 um/px, ~100 tiles (the batch's jobs stay below the threshold)
SPLIT_PARAMS = {"target_mpp": 2.0, "tile_px": 64, "overlap_px": 16, "chunk_px": 64,
                "batch_size": 8}
SPLIT_ENV = {"SLIDEPIPE_SPLIT_MIN_TILES": "80", "SLIDEPIPE_SPLIT_PARTS": "2"}


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _reference_run(tmp: Path, slides: dict[str, bytes], params: dict[str, Any]) -> dict[str, Path]:
    """The same jobs on one host with a file:// store (execute_job, what a worker runs)."""
    settings = Settings(data_dir=tmp / "single-host", heartbeat_s=1.0)
    db = JobStore(f"sqlite:///{tmp / 'single-host.db'}")
    results: dict[str, Path] = {}
    try:
        for name, body in slides.items():
            rel = f"slides/{name}.svs"
            target = settings.data_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
            slide = _slide_row(target, rel)
            db.add_slide(slide)
            _, (job,) = db.create_jobs("alice", [slide.id], "identity", params, batch=False)
            assert execute_job(job.id, store=db, settings=settings)["outcome"] == "succeeded"
            row = db.get_job(None, job.id)
            assert row is not None and row.result_rel_path
            results[name] = settings.data_dir / row.result_rel_path
    finally:
        db.dispose()
    return results


def _split_job_across_hosts(tmp: Path, api: Any, alice: Any, hosts: list[Any], store: Store,
                            database_url: str, slide_id: str, body: bytes) -> None:
    """One job split in two parts, one per host, through the store; its result equals a
    single-host whole run's, and no staging object or scratch file is left."""
    r = alice.post("/v1/jobs", json={"slide_id": slide_id, "model": "identity",
                                     "parameters": SPLIT_PARAMS})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    job = api.wait_job(alice, job_id, timeout_s=90)
    assert job["status"] == "succeeded", f"{job}\n" + "\n".join(h.log_tail() for h in hosts)
    parts = job["result_info"]["parts"]
    assert sorted(p["worker"].split("@")[0] for p in parts) == ["a", "b"], parts
    assert job["tiles_done"] == job["tiles_total"] == sum(p["tiles_run"] for p in parts)

    db = JobStore(database_url)
    try:
        row = db.get_job(None, job_id)
    finally:
        db.dispose()
    assert row is not None and row.result_rel_path
    key = row.result_rel_path
    # only the published attempt and its marker: the staging key (.split-<token>) is
    # deleted right after the row is written
    wanted = sorted(name.rsplit("/", 1)[-1] for name in (key, marker_key(key)))
    deadline = time.monotonic() + 10
    while (found := store.list_dir(f"results/{job_id}")) != wanted \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert found == wanted
    for host in hosts:
        for folder in ("scratch/results", "scratch/split"):
            root = host.data_dir / folder
            left = _files(root) if root.is_dir() else []
            assert left == [], f"{host.data_dir}/{folder} holds {left}"

    (tmp / "split-reference").mkdir()
    reference = _reference_run(tmp / "split-reference", {"cmu": body},
                               dict(row.params or {}))["cmu"]
    names = [k[len(key) + 1:] for k in store.list_files(key)]
    got = tree(names, lambda n: store.get_bytes(f"{key}/{n}"))
    want = tree(_files(reference), lambda n: (reference / n).read_bytes())
    assert differences(got, want) == []
    assert sum(n.count("/") >= 2 for n in names) > 20, "chunk files were compared"
    assert b'"split"' in store.get_bytes(f"{key}/.zattrs"), "a split run, not a whole one"


def test_a_batch_spreads_over_two_hosts_and_matches_a_single_host_run(
    tmp_path: Path,
    redis_base_url: str,
    s3_server: S3Server,  # noqa: F811
    pg_url: str,  # noqa: F811
    svc_slides: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/slidepipe"
    shared = {**s3_server.env(), "SLIDEPIPE_STORAGE_URL": url, "SLIDEPIPE_DATABASE_URL": pg_url}
    redis_url = next_redis_url(redis_base_url)
    api = make_stack(tmp_path / "api-host", redis_url, **shared)
    hosts = [
        make_stack(tmp_path / "host-a", redis_url, **shared, **SPLIT_ENV),
        make_stack(tmp_path / "host-b", redis_url, **shared, **SPLIT_ENV,
                   SLIDEPIPE_REMOTE_SLIDE_READS="cache"),
    ]
    slides = {
        "pyramid": svc_slides["pyramid"].read_bytes(),
        "cmu": svc_slides["cmu"].read_bytes(),
        "cmu_zip": svc_slides["cmu"].read_bytes(),  # uploaded as a zip: a folder in S3
    }
    try:
        with ThreadPoolExecutor(3) as pool:  # three hosts booting at once
            started = [pool.submit(host.start_worker, name)
                       for name, host in zip(("a", "b"), hosts, strict=True)]
            started.append(pool.submit(api.start_api))
            for future in started:
                future.result()
        with api.client() as alice:
            ids = {}
            for name, body in slides.items():
                filename = f"{name}.svs"
                if name.endswith("_zip"):  # an archive: unpacked by the API, put as a folder
                    packed = io.BytesIO()
                    with zipfile.ZipFile(packed, "w") as zf:
                        zf.writestr("scan/slide.svs", body)
                    body, filename = packed.getvalue(), f"{name}.zip"
                r = alice.post("/v1/slides", params={"filename": filename}, content=body,
                               headers={"Content-Type": "application/octet-stream"})
                assert r.status_code == 201, r.text
                ids[name] = r.json()["id"]
            r = alice.post("/v1/batches", json={"slide_ids": list(ids.values()),
                                                "model": "identity", "parameters": PARAMS})
            assert r.status_code == 202, r.text
            job_ids = dict(zip(ids, r.json()["job_ids"], strict=True))
            for job_id in job_ids.values():
                assert api.wait_job(alice, job_id, timeout_s=90)["status"] == "succeeded"

            monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
            for key, value in s3_server.env().items():
                monkeypatch.setenv(key, value)
            store = Store(url)
            db = JobStore(pg_url)
            try:
                rows = {name: db.get_job(None, job_id) for name, job_id in job_ids.items()}
            finally:
                db.dispose()
            workers = {row.worker.split("@")[0] for row in rows.values() if row and row.worker}
            assert workers == {"a", "b"}, f"the batch did not spread: {workers}"
            assert all(row is not None and "parts" not in (row.result_info or {})
                       for row in rows.values())

            # no process wrote slides or results into its own folder: all went to S3
            for host in (api, *hosts):
                for folder in ("slides", "results", "scratch/results"):
                    root = host.data_dir / folder
                    left = _files(root) if root.is_dir() else []
                    assert left == [], f"{host.data_dir}/{folder} holds {left}"
            assert len(store.list_files("slides")) == 3
            assert store.list_files(f"slides/{ids['cmu_zip']}") == [
                f"slides/{ids['cmu_zip']}/scan/slide.svs"]
            # host b read its slides through its read-through cache; host a read its TIFF
            # files by ranges (only the zip's folder, if it got that job, is in its cache)
            cached = hosts[1].data_dir / "cache" / "objects" / "slides"
            assert cached.is_dir() and any(cached.iterdir())
            cached_a = hosts[0].data_dir / "cache" / "objects" / "slides"
            on_a = sorted(p.name for p in cached_a.iterdir()) if cached_a.is_dir() else []
            assert set(on_a) <= {ids["cmu_zip"]}, on_a

            # results equal a single-host file:// run, chunk for chunk
            params = dict(rows["pyramid"].params or {})  # what the API stored for the jobs
            reference = _reference_run(tmp_path, slides, params)
            for name, row in rows.items():
                assert row.status == JobStatus.succeeded and row.result_rel_path
                key = row.result_rel_path
                assert store.exists(marker_key(key))
                names = [k[len(key) + 1:] for k in store.list_files(key)]
                got = tree(names, lambda n, key=key: store.get_bytes(f"{key}/{n}"))
                want_root = reference[name]
                want = tree(_files(want_root), lambda n, root=want_root: (root / n).read_bytes())
                assert differences(got, want) == [], name

            # the API serves results from the store: a zarr file, the zip, the heatmap
            job_id, key = job_ids["pyramid"], rows["pyramid"].result_rel_path
            r = alice.get(f"/v1/jobs/{job_id}/result.zarr/.zattrs")
            assert r.status_code == 200 and r.content == store.get_bytes(f"{key}/.zattrs")
            r = alice.get(f"/v1/jobs/{job_id}/result.zarr.zip")
            assert r.status_code == 200
            with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
                assert sorted(zf.namelist()) == sorted(
                    k[len(key) + 1:] for k in store.list_files(key))
            r = alice.get(f"/v1/jobs/{job_id}/heatmap.png", params={"max_size": 128})
            assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
            r = alice.get(f"/v1/slides/{ids['pyramid']}/slide.dzi")
            assert r.status_code == 200 and b"<Image" in r.content

            _split_job_across_hosts(tmp_path, api, alice, hosts, store, pg_url, ids["cmu"],
                                    slides["cmu"])

            # deleting a slide deletes its objects and its jobs' results
            api_copy = api.data_dir / "cache" / "objects" / key
            assert api_copy.is_dir()  # the API served the result from its cached copy
            assert alice.delete(f"/v1/slides/{ids['pyramid']}").status_code == 204
            assert store.list_files(f"results/{job_id}") == []
            assert len(store.list_files("slides")) == 2
            assert not api_copy.exists()  # and dropped the copy with the objects
            assert alice.get(f"/v1/jobs/{job_id}/result.zarr/.zattrs").status_code == 404
    finally:
        for host in hosts:
            host.close()
        api.close()
