"""End to end over HTTP: upload real slides, run a batch on a real Celery worker, follow
progress as server-sent events, download the heatmap and read the result zarr over HTTP."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
import zarr

if TYPE_CHECKING:
    from conftest import Stack


pytestmark = pytest.mark.slow

#: Full resolution, one tile per batch: a few seconds of visible progress per slide.
# small tiles, one per batch: enough progress steps for the events to catch several
#: Tens of thousands of one-tile batches of 16 px, every 8 px: a job whose inference stage
#: lasts seconds (progress is seen moving, a cancel lands mid-run) on any machine. Tiles of
#: 32 px, fewer and cheaper per pixel, ran out before a cancel once the reads got faster.
PARAMS = {"target_mpp": 0.5, "tile_px": 16, "overlap_px": 8, "batch_size": 1,
          "min_tissue_fraction": 0.0}


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def read_events(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    events: list[tuple[str, dict]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name or "message", json.loads(line[6:])))
    return events


def test_batch_end_to_end(
    stack: Stack, alice: httpx.Client, svc_slides: dict, tmp_path: Path
) -> None:
    assert alice.get("/healthz").json() == {"status": "ok"}
    ready = alice.get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "broker": "ok"}

    # upload: multipart for one, raw body for the other; the same content twice dedupes
    first = stack.upload(alice, svc_slides["cmu"])
    with open(svc_slides["pyramid"], "rb") as fh:
        r = alice.post(
            "/v1/slides",
            params={"filename": "pyramid.svs"},
            content=fh,
            headers={"Content-Type": "application/octet-stream"},
        )
    assert r.status_code == 201, r.text
    second = r.json()
    again = alice.post("/v1/slides", files={"file": ("copy.svs", svc_slides["cmu"].read_bytes())})
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    assert first["width"] == 2220 and first["height"] == 2967
    assert first["mpp"] == pytest.approx(0.499) and first["vendor"] == "aperio"
    assert second["level_count"] == 3
    listed = alice.get("/v1/slides").json()
    assert {s["id"] for s in listed["items"]} >= {first["id"], second["id"]}
    thumb = alice.get(f"/v1/slides/{first['id']}/thumbnail.png", params={"max_size": 128})
    assert thumb.status_code == 200 and max(png_size(thumb.content)) == 128

    schema = alice.get("/openapi.json").json()
    assert {"/v1/slides", "/v1/jobs", "/v1/batches", "/v1/jobs/{job_id}/events"} <= set(
        schema["paths"]
    )
    models = alice.get("/v1/models").json()
    assert "identity" in {m["name"] for m in models}

    # submit a batch of both slides
    r = alice.post(
        "/v1/batches",
        json={"slide_ids": [first["id"], second["id"]], "model": "identity", "parameters": PARAMS},
    )
    assert r.status_code == 202, r.text
    batch = r.json()
    assert len(batch["job_ids"]) == 2
    job_a, job_b = batch["job_ids"]

    # follow the second job (queued behind the first) by server-sent events
    events = read_events(alice, job_b)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "end" and kinds.count("end") == 1
    final = events[-1][1]
    assert final["status"] == "succeeded", final
    statuses = [e["status"] for _, e in events]
    stages = [e["stage"] for _, e in events if e["stage"]]
    percents = [e["percent"] for _, e in events]
    assert "running" in statuses
    assert len(set(stages)) >= 2 and stages[-1] == "done", stages  # the stage changes
    assert percents == sorted(percents), percents  # never goes back
    assert len({p for p in percents if 0 < p < 100}) >= 2, percents  # it moved in between
    infer = [e for _, e in events if e["stage"] == "infer"]
    assert len({e["tiles_done"] for e in infer}) >= 2, infer  # tiles counted as they go
    assert all(e["tiles_total"] > 0 for e in infer)

    job = stack.wait_job(alice, job_a)
    assert job["status"] == "succeeded", job
    assert job["percent"] == 100.0 and job["stage"] == "done"
    assert job["tiles_done"] == job["tiles_total"] > 0
    assert job["started_at"] and job["finished_at"] and job["error"] is None

    # filters and pagination
    page = alice.get("/v1/jobs", params={"batch_id": batch["batch_id"], "limit": 1}).json()
    assert page["total"] == 2 and len(page["items"]) == 1
    ok = alice.get("/v1/jobs", params={"batch_id": batch["batch_id"], "status": "succeeded"}).json()
    assert ok["total"] == 2
    by_slide = alice.get("/v1/jobs", params={"slide_id": second["id"]}).json()
    assert [j["id"] for j in by_slide["items"]] == [job_b]
    summary = alice.get(f"/v1/batches/{batch['batch_id']}").json()
    assert summary["counts"]["succeeded"] == 2 and summary["percent"] == 100.0

    # heatmap of a requested size
    r = alice.get(
        f"/v1/jobs/{job_a}/heatmap.png",
        params={"class": "red", "max_size": 300, "overlay": "false"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert max(png_size(r.content)) == 300
    from PIL import Image

    Image.open(io.BytesIO(r.content)).verify()

    # the result zarr over HTTP, as a zarr client sees it (fsspec HTTP store)
    url = f"{stack.base_url}/v1/jobs/{job_a}/result.zarr"
    group = zarr.open_group(
        url,
        mode="r",
        storage_options={"headers": {"Authorization": f"Bearer {stack.keys['alice']}"}},
    )
    multiscales = group.attrs["multiscales"]
    assert multiscales[0]["datasets"][0]["path"] == "0"
    level0 = group["0"]
    assert level0.shape[0] == 3 and level0.dtype == np.uint8
    remote = level0[:]
    assert remote.max() > 0
    labels = zarr.open_group(
        f"{url}/labels/classes",
        mode="r",
        storage_options={"headers": {"Authorization": f"Bearer {stack.keys['alice']}"}},
    )
    assert "image-label" in labels.attrs

    # ... and the same bytes in the streamed ZIP
    with alice.stream("GET", f"/v1/jobs/{job_a}/result.zarr.zip") as r:
        assert r.status_code == 200
        blob = b"".join(r.iter_bytes())
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        assert zf.testzip() is None
        assert ".zattrs" in zf.namelist()
        (tmp_path / "result.zip").write_bytes(blob)
        zipped = zarr.open_group(zarr.storage.ZipStore(tmp_path / "result.zip", mode="r"), mode="r")
        np.testing.assert_array_equal(zipped["0"][:], remote)

    # traversal out of the result answers 404, never a file
    for bad in ("%2e%2e/%2e%2e/slidepipe.db", "..%2f..%2fslidepipe.db", "0/../../../slidepipe.db"):
        r = alice.get(f"/v1/jobs/{job_a}/result.zarr/{bad}")
        assert r.status_code == 404, (bad, r.status_code)
    assert alice.get(f"/v1/jobs/{job_a}/result.zarr/nope/.zarray").status_code == 404


SLOW = PARAMS


def test_cancel_queued_job(stack: Stack, alice: httpx.Client, svc_slides: dict) -> None:
    """A queued job is cancelled at once and never starts; the worker skips its message."""
    slide = stack.upload(alice, svc_slides["cmu"])
    body = {"slide_id": slide["id"], "model": "identity", "parameters": {**SLOW, "target_mpp": 4.0}}
    ahead = alice.post("/v1/jobs", json=body).json()["job_id"]
    queued = alice.post("/v1/jobs", json=body).json()["job_id"]
    r = alice.post(f"/v1/jobs/{queued}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"
    assert stack.wait_job(alice, ahead)["status"] == "succeeded"
    job = alice.get(f"/v1/jobs/{queued}").json()
    assert job["status"] == "cancelled" and job["started_at"] is None
    assert not (stack.data_dir / "results" / f"{queued}.zarr").exists()
    # cancelling a finished job changes nothing
    assert alice.post(f"/v1/jobs/{ahead}/cancel").json()["status"] == "succeeded"


def test_cancel_running_job(stack: Stack, alice: httpx.Client, svc_slides: dict) -> None:
    """A running job stops between batches, publishes nothing, and ends ``cancelled``."""
    slide = stack.upload(alice, svc_slides["cmu"])
    running = alice.post(
        "/v1/jobs", json={"slide_id": slide["id"], "model": "identity", "parameters": SLOW}
    ).json()["job_id"]
    job = stack.wait_job(alice, running, until={"running"})
    while job["tiles_done"] == 0 and job["status"] == "running":
        job = alice.get(f"/v1/jobs/{running}").json()
    assert alice.post(f"/v1/jobs/{running}/cancel").json()["cancel_requested"] is True
    job = stack.wait_job(alice, running, timeout_s=60)
    assert job["status"] == "cancelled", job
    assert job["tiles_done"] < job["tiles_total"]
    assert not (stack.data_dir / "results" / f"{running}.zarr").exists()
    assert not list((stack.data_dir / "results").glob(f".{running}.zarr.partial-*"))
    r = alice.get(f"/v1/jobs/{running}/heatmap.png")
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]
