"""Hostile input over HTTP against the real API: every answer is a 4xx with a JSON reason,
nothing is left behind, and a decompression bomb is refused within 2 s (issue #19)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile import (
    UNICODE_FILENAMES,
    bomb_tiff,
    content_disposition_rfc5987,
    giant_tile_tiff,
    multipart_body,
)

if TYPE_CHECKING:
    from conftest import Stack

BOUNDARY = "hostileboundary42"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def reason(r: httpx.Response, *statuses: int) -> str:
    """The JSON reason of an error answer whose status is one of ``statuses``."""
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"], body
    assert isinstance(body["error"], str) and body["error"], body
    return body["detail"]


@pytest.fixture(scope="module")
def slide(stack: Stack, svc_slides: dict) -> dict:
    with stack.client("alice") as alice:
        return stack.upload(alice, svc_slides["cmu"])


@pytest.fixture
def nothing_left(stack: Stack) -> Iterator[None]:
    before = stack.slide_files()
    yield
    assert stack.leftovers() == []
    assert stack.slide_files() == before


# -- decompression bombs ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("side", "tile_px", "expect"),
    [
        (150_000, 4096, "pixels per byte"),  # the 56 KB bomb of the issue: 318 s of CPU before
        (1_000_000, 4096, "SLIDEPIPE_MAX_SLIDE_PIXELS"),  # 10.9 GiB per thumbnail band before
        (100_000, None, "blocks of"),  # one 100k x 100k tile
    ],
)
def test_decompression_bomb_is_refused_fast(
    stack: Stack,
    alice: httpx.Client,
    tmp_path: Path,
    nothing_left: None,
    side: int,
    tile_px: int | None,
    expect: str,
) -> None:
    path = tmp_path / "bomb.tif"
    if tile_px is None:
        giant_tile_tiff(path, side)
    else:
        bomb_tiff(path, side, side, tile_px=tile_px)
    assert path.stat().st_size < 600_000
    started = time.monotonic()
    r = alice.post("/v1/slides", files={"file": ("bomb.tif", path.read_bytes())})
    elapsed = time.monotonic() - started
    detail = reason(r, 413)
    assert expect in detail and "bomb.tif" in detail and str(side) in detail
    assert r.json()["error"] == "DeclaresTooMuch"
    assert elapsed < 2.0, elapsed


# -- numbers JSON cannot carry -----------------------------------------------------------
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_422_with_reason(
    alice: httpx.Client, slide: dict, number: str
) -> None:
    before = alice.get("/v1/jobs").json()["total"]
    body = (
        f'{{"slide_id": "{slide["id"]}", "model": "identity", '
        f'"parameters": {{"target_mpp": {number}}}}}'
    )
    r = alice.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    detail = reason(r, 422)
    assert "target_mpp" in detail and "finite" in detail
    assert r.json()["errors"][0]["input"] in ("nan", "inf", "-inf")  # echoed as valid JSON
    assert alice.get("/v1/jobs").json()["total"] == before


# -- filenames ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", UNICODE_FILENAMES)
@pytest.mark.parametrize("form", ["raw-utf8", "rfc5987"])
def test_any_unicode_filename_is_kept_or_refused_with_reason(
    stack: Stack, alice: httpx.Client, svc_slides: dict, name: str, form: str
) -> None:
    data = svc_slides["pyramid"].read_bytes() + name.encode()[:64]  # unique content
    disposition = (
        content_disposition_rfc5987(name)
        if form == "rfc5987"
        else f'form-data; name="file"; filename="{name}"'
    )
    r = alice.post(
        "/v1/slides",
        content=multipart_body(disposition, data, BOUNDARY),
        headers={"Content-Type": MULTIPART},
    )
    if len(name) > 255:
        assert "255 characters" in reason(r, 422)
        return
    assert r.status_code in (200, 201), r.text
    assert r.json()["filename"] == name
    assert alice.delete(f"/v1/slides/{r.json()['id']}").status_code == 204
    assert stack.leftovers() == []


def test_overlong_result_path_is_404(
    stack: Stack, alice: httpx.Client, slide: dict
) -> None:
    job_id = stack.finished_job(alice, slide["id"])
    for path in ("a" * 5000, "/".join(["b" * 300] * 3), "0/" + "c" * 4000):
        assert "no file" in reason(alice.get(f"/v1/jobs/{job_id}/result.zarr/{path}"), 404)
    assert alice.get(f"/v1/jobs/{job_id}/result.zarr/.zattrs").status_code == 200


# -- bounds on work and on bodies -----------------------------------------------------------
@pytest.mark.parametrize(
    ("parameters", "expect"),
    [
        ({"target_mpp": 256.0}, "outside what slide"),  # a 48 GiB tile read before
        ({"target_mpp": 0.001}, "outside what slide"),  # 32.7 M tiles before
        ({"target_mpp": 0.125, "tile_px": 16, "overlap_px": 8}, "SLIDEPIPE_MAX_TILES_PER_JOB"),
        ({"tissue_working_mpp": 0.1, "target_mpp": 2.0}, None),  # small slide: allowed
    ],
)
def test_work_is_bounded_before_queueing(
    alice: httpx.Client, slide: dict, parameters: dict, expect: str | None
) -> None:
    before = alice.get("/v1/jobs").json()["total"]
    body = {"slide_id": slide["id"], "model": "identity", "parameters": parameters}
    r = alice.post("/v1/jobs", json=body)
    if expect is None:
        assert r.status_code == 202, r.text
        alice.post(f"/v1/jobs/{r.json()['job_id']}/cancel")
        return
    detail = reason(r, 422)
    assert expect in detail and slide["id"] in detail
    if "outside" in detail:
        assert "0.1247" in detail  # level 0 (0.499 µm/px) / 4: the range is named
    assert alice.get("/v1/jobs").json()["total"] == before


def test_json_bodies_are_bounded(alice: httpx.Client, slide: dict) -> None:
    big = json.dumps({"slide_ids": [slide["id"]] * 60_000, "model": "identity"}).encode()
    assert len(big) > 1024**2
    r = alice.post("/v1/batches", content=big, headers={"Content-Type": "application/json"})
    assert "SLIDEPIPE_MAX_BODY_BYTES" in reason(r, 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 1 << 16):
            yield big[start : start + (1 << 16)]

    started = time.monotonic()
    r = alice.post("/v1/batches", content=chunks(), headers={"Content-Type": "application/json"})
    assert "SLIDEPIPE_MAX_BODY_BYTES" in reason(r, 413)
    assert time.monotonic() - started < 5
    # a small chunked body still works
    small = json.dumps({"slide_id": slide["id"], "model": "nope"}).encode()
    r = alice.post("/v1/jobs", content=iter([small]), headers={"Content-Type": "application/json"})
    assert "nope" in reason(r, 422)


# -- a fuzz of the multipart upload path ------------------------------------------------
_names = st.text(st.characters(exclude_categories=("Cs",)), min_size=0, max_size=40)
_tails = st.sampled_from([b"", b"\r\n", b"--", f"\r\n--{BOUNDARY}--\r\n".encode()])


@st.composite
def multipart_requests(draw: st.DrawFn) -> tuple[bytes, str]:
    """A multipart body with a hostile disposition, content and ending, and its type."""
    name = draw(_names)
    disposition = draw(
        st.sampled_from(
            [
                f'form-data; name="file"; filename="{name}"',
                content_disposition_rfc5987(name) if name else 'form-data; name="file"',
                f"form-data; name=\"file\"; filename*=UTF-8''{name}",
                f"form-data; name=\"file\"; filename*=klingon''{name}",
                f'form-data; filename="{name}"; name="file"; filename="{name[::-1]}"',
                "form-data",
                name,
            ]
        )
    )
    content = draw(
        st.one_of(
            st.binary(max_size=64),
            st.binary(max_size=64).map(lambda b: b"II*\x00" + b),
            st.sampled_from([b"MM\x00*\x00\x00\x00\x08", b"\x89HDF\r\n\x1a\n"]),
        )
    )
    body = multipart_body(disposition, content, BOUNDARY)
    cut = draw(st.integers(min_value=0, max_value=len(body)))
    body = draw(st.sampled_from([body, body[:cut] + draw(_tails)]))
    boundary = draw(st.sampled_from([BOUNDARY, BOUNDARY, "", "x" * 200, "\u00e9"]))
    return body, f"multipart/form-data; boundary={boundary}" if boundary else "multipart/form-data"


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=multipart_requests())
def test_fuzzed_multipart_uploads_answer_4xx_with_reason(
    stack: Stack, alice: httpx.Client, request: tuple[bytes, str]
) -> None:
    body, content_type = request
    headers = {"Content-Type": content_type.encode("utf-8")}  # raw bytes, any Unicode
    r = alice.post("/v1/slides", content=body, headers=headers)
    reason(r, 400, 413, 415, 422)
    assert stack.leftovers() == []
