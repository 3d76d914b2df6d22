"""Every bad input answers the right 4xx with a clear message and leaves nothing behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import Stack


@pytest.fixture
def clean(stack: Stack, alice: httpx.Client) -> Iterator[None]:
    """Assert that the test leaves no temp upload, slide file or job behind."""
    slides_before = stack.slide_files()
    jobs_before = alice.get("/v1/jobs").json()["total"]
    yield
    assert stack.leftovers() == []
    assert stack.slide_files() == slides_before
    assert alice.get("/v1/jobs").json()["total"] == jobs_before


@pytest.fixture(scope="module")
def good_slide(stack: Stack, svc_slides: dict) -> dict:
    with stack.client("alice") as alice:
        return stack.upload(alice, svc_slides["cmu"])


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"]
    return body["detail"]


# -- uploads ----------------------------------------------------------------------------
def test_non_slide_upload_is_415(alice: httpx.Client, svc_slides: dict, clean: None) -> None:
    r = alice.post(
        "/v1/slides", files={"file": ("notes.svs", svc_slides["not_slide"].read_bytes())}
    )
    detail = error_of(r, 415)
    assert "not a slide format" in detail and "notes.svs" in detail


def test_png_is_415(alice: httpx.Client, svc_slides: dict, clean: None) -> None:
    r = alice.post("/v1/slides", files={"file": ("boxes.png", svc_slides["png"].read_bytes())})
    assert "not a slide format" in error_of(r, 415)


@pytest.mark.parametrize("which", ["truncated", "truncated_pyramid"])
def test_truncated_svs_is_422_with_reason(
    alice: httpx.Client, svc_slides: dict, clean: None, which: str
) -> None:
    data = svc_slides[which].read_bytes()
    r = alice.post("/v1/slides", files={"file": ("cut.svs", data)})
    detail = error_of(r, 422)
    assert "cut.svs" in detail and "truncated" in detail
    # the temp file name never leaks into the message
    assert "upload-" not in detail and ".part" not in detail


def test_slide_with_corrupt_tiles_everywhere_is_422(
    alice: httpx.Client, svc_slides: dict, clean: None
) -> None:
    r = alice.post("/v1/slides", files={"file": ("bad.svs", svc_slides["unreadable"].read_bytes())})
    assert "bad.svs" in error_of(r, 422)


def test_empty_body_is_400(alice: httpx.Client, clean: None) -> None:
    r = alice.post("/v1/slides", content=b"", headers={"Content-Type": "application/octet-stream"})
    assert "empty" in error_of(r, 400)
    r = alice.post("/v1/slides", files={"file": ("empty.svs", b"")})
    assert "empty" in error_of(r, 400)
    r = alice.post("/v1/slides", data={"note": "no file here"}, files={"x": (None, "y")})
    assert "no file part" in error_of(r, 400)


def test_oversize_upload_is_413(stack: Stack, alice: httpx.Client, clean: None) -> None:
    limit = int(stack.env["SLIDEPIPE_MAX_UPLOAD_BYTES"])
    blob = b"II*\x00" + os.urandom(limit + 1)
    # declared size: refused before the body is read
    r = alice.post("/v1/slides", content=blob, headers={"Content-Type": "application/octet-stream"})
    assert "SLIDEPIPE_MAX_UPLOAD_BYTES" in error_of(r, 413)

    # no declared size (chunked): refused when the stream passes the limit
    def chunks() -> Iterator[bytes]:
        for start in range(0, len(blob), 1 << 16):
            yield blob[start : start + (1 << 16)]

    r = alice.post(
        "/v1/slides", content=chunks(), headers={"Content-Type": "application/octet-stream"}
    )
    assert "SLIDEPIPE_MAX_UPLOAD_BYTES" in error_of(r, 413)
    r = alice.post("/v1/slides", files={"file": ("big.svs", blob)})
    assert "SLIDEPIPE_MAX_UPLOAD_BYTES" in error_of(r, 413)


@pytest.mark.parametrize("name", ["../../x.svs", "/etc/x.svs", "..\\..\\x.svs", "a/b.svs", ".."])
def test_path_like_filename_is_422(
    stack: Stack, alice: httpx.Client, svc_slides: dict, clean: None, name: str
) -> None:
    data = svc_slides["cmu"].read_bytes()
    r = alice.post("/v1/slides", files={"file": (name, data)})
    assert "plain file name" in error_of(r, 422)
    r = alice.post(
        "/v1/slides",
        params={"filename": name},
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert "plain file name" in error_of(r, 422)
    for parent in (stack.data_dir, stack.data_dir.parent, stack.data_dir.parent.parent):
        assert not (parent / "x.svs").exists()


# -- submissions ------------------------------------------------------------------------
def test_unknown_model_is_422_before_queueing(
    alice: httpx.Client, good_slide: dict, clean: None
) -> None:
    r = alice.post("/v1/jobs", json={"slide_id": good_slide["id"], "model": "no-such-model"})
    detail = error_of(r, 422)
    assert "no-such-model" in detail and "identity" in detail  # names the known models
    r = alice.post("/v1/batches", json={"slide_ids": [good_slide["id"]], "model": "nope"})
    assert "nope" in error_of(r, 422)
    # a path is not a model name: clients cannot point the server at its own files
    r = alice.post("/v1/jobs", json={"slide_id": good_slide["id"], "model": "../../etc/card.json"})
    assert "name of a model card" in error_of(r, 422)


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"tile_px": -64}, "tile_px"),
        ({"tile_px": 0}, "tile_px"),
        ({"tile_px": 10**9}, "tile_px"),
        ({"overlap_px": -1}, "overlap_px"),
        ({"tile_px": 64, "overlap_px": 64}, "overlap_px"),
        ({"overlap_px": 4000}, "overlap_px"),  # >= the identity card's 256 px tile
        ({"target_mpp": -1.0}, "target_mpp"),
        ({"target_mpp": 1e9}, "target_mpp"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 1025}, "batch_size"),  # the engine's limit (workers.engine.params)
        ({"tissue_method": "magic"}, "tissue_method"),
        ({"tissue_working_mpp": 0.05}, "tissue_working_mpp"),
        ({"read_workers": 4}, "read_workers"),  # server-side, like paths
        ({"window": "hann"}, "window"),
        ({"probability_dtype": "float64"}, "probability_dtype"),
        ({"out_path": "/etc"}, "out_path"),  # server-side fields cannot be set
    ],
)
def test_bad_parameters_are_422(
    alice: httpx.Client, good_slide: dict, clean: None, parameters: dict, field: str
) -> None:
    for url, body in (
        ("/v1/jobs", {"slide_id": good_slide["id"]}),
        ("/v1/batches", {"slide_ids": [good_slide["id"]]}),
    ):
        r = alice.post(url, json={**body, "model": "identity", "parameters": parameters})
        assert field in error_of(r, 422)


def test_slide_without_mpp_needs_slide_mpp(
    stack: Stack, alice: httpx.Client, svc_slides: dict
) -> None:
    slide = stack.upload(alice, svc_slides["no_mpp"])
    assert slide["mpp"] is None
    before = alice.get("/v1/jobs").json()["total"]
    r = alice.post("/v1/jobs", json={"slide_id": slide["id"], "model": "identity"})
    assert "slide_mpp" in error_of(r, 422)
    assert alice.get("/v1/jobs").json()["total"] == before


def test_bad_batches_are_rejected(alice: httpx.Client, good_slide: dict, clean: None) -> None:
    r = alice.post("/v1/batches", json={"slide_ids": [], "model": "identity"})
    error_of(r, 422)
    r = alice.post(
        "/v1/batches", json={"slide_ids": [good_slide["id"], good_slide["id"]], "model": "identity"}
    )
    assert "twice" in error_of(r, 422)
    # one unknown slide in the batch: nothing of the batch is stored or queued
    r = alice.post(
        "/v1/batches", json={"slide_ids": [good_slide["id"], "f" * 32], "model": "identity"}
    )
    assert "not found" in error_of(r, 404)
    r = alice.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    error_of(r, 422)


# -- owners and keys --------------------------------------------------------------------
def test_another_owners_ids_are_404(
    stack: Stack, alice: httpx.Client, bob: httpx.Client, good_slide: dict
) -> None:
    r = alice.post(
        "/v1/jobs",
        json={
            "slide_id": good_slide["id"],
            "model": "identity",
            "parameters": {"target_mpp": 4.0, "tile_px": 64, "overlap_px": 8},
        },
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert stack.wait_job(alice, job_id)["status"] == "succeeded"
    slide_id = good_slide["id"]
    for method, url in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("GET", f"/v1/jobs/{job_id}/heatmap.png"),
        ("GET", f"/v1/jobs/{job_id}/result.zarr.zip"),
        ("GET", f"/v1/jobs/{job_id}/result.zarr/.zattrs"),
        ("GET", f"/v1/slides/{slide_id}"),
        ("GET", f"/v1/slides/{slide_id}/thumbnail.png"),
        ("DELETE", f"/v1/slides/{slide_id}"),
    ]:
        r = bob.request(method, url)
        assert "not found" in error_of(r, 404), url
    r = bob.post("/v1/jobs", json={"slide_id": slide_id, "model": "identity"})
    assert "not found" in error_of(r, 404)
    assert bob.get("/v1/jobs").json()["total"] == 0
    assert slide_id not in {s["id"] for s in bob.get("/v1/slides").json()["items"]}
    # the owner still sees everything
    assert alice.get(f"/v1/jobs/{job_id}/result.zarr/.zattrs").status_code == 200


def test_no_or_wrong_key_is_401(stack: Stack, anonymous: httpx.Client, svc_slides: dict) -> None:
    for method, url in [
        ("GET", "/v1/slides"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/models"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/abc"),
    ]:
        r = anonymous.request(method, url)
        assert "API key" in error_of(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
    r = anonymous.post("/v1/slides", files={"file": ("s.svs", svc_slides["cmu"].read_bytes())})
    error_of(r, 401)
    r = anonymous.get("/v1/slides", headers={"Authorization": "Bearer wrong"})
    assert "invalid API key" in error_of(r, 401)
    r = anonymous.get("/v1/slides", headers={"Authorization": "Basic YTpi"})
    error_of(r, 401)
    assert stack.leftovers() == []
    # probes stay open
    assert anonymous.get("/healthz").status_code == 200


def test_delete_slide_removes_files(stack: Stack, alice: httpx.Client, svc_slides: dict) -> None:
    slide = stack.upload(alice, svc_slides["pyramid"], name="to-delete.svs")
    job_id = stack.finished_job(alice, slide["id"])
    assert (stack.data_dir / "results" / f"{job_id}.zarr").is_dir()
    assert alice.delete(f"/v1/slides/{slide['id']}").status_code == 204
    assert alice.get(f"/v1/slides/{slide['id']}").status_code == 404
    assert alice.get(f"/v1/jobs/{job_id}").status_code == 404
    assert not (stack.data_dir / "results" / f"{job_id}.zarr").exists()
    assert not any(Path(name).stem == slide["id"] for name in stack.slide_files())
