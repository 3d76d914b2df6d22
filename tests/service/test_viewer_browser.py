"""The pathologist's outputs through the real service (uvicorn over HTTP, a Celery
worker): GeoJSON, the slide report and a batch's CSV, signed viewer links, and the viewer
page driven in real headless Chromium (Debian's ``chromium`` with Playwright)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
import zarr
from PIL import Image
from shapely.geometry import shape

from service.viewer_links import sign
from workers.jobs.settings import Settings

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
PARAMS = {"target_mpp": 2.0}


@pytest.fixture(scope="module")
def finished(stack: Stack, svc_slides: dict) -> dict:
    """A batch of two real H&E slides through ``identity`` at 2 µm/px, finished."""
    with stack.client("alice") as alice:
        slides = [stack.upload(alice, svc_slides[k]) for k in ("pyramid", "cmu")]
        r = alice.post("/v1/batches", json={"slide_ids": [s["id"] for s in slides],
                                            "model": "identity", "parameters": PARAMS})
        assert r.status_code == 202, r.text
        batch = r.json()
        for job_id in batch["job_ids"]:
            job = stack.wait_job(alice, job_id, timeout_s=180)
            assert job["status"] == "succeeded", job
    return {"batch": batch["batch_id"], "job": batch["job_ids"][0], "slide": slides[0]}


def test_geojson_summary_and_batch_csv_over_http(stack: Stack, finished: dict) -> None:
    with stack.client("alice") as alice:
        r = alice.get(f"/v1/jobs/{finished['job']}/result.geojson")
        assert r.status_code == 200 and r.headers["content-type"] == "application/geo+json"
        features = r.json()["features"]
        assert features and all(shape(f["geometry"]).is_valid for f in features)
        width, height = finished["slide"]["width"], finished["slide"]["height"]
        bounds = np.array([shape(f["geometry"]).bounds for f in features])
        assert bounds[:, :2].min() >= 0 and bounds[:, 2].max() <= width
        assert bounds[:, 3].max() <= height
        report = alice.get(f"/v1/jobs/{finished['job']}/summary").json()
        assert report["job_id"] == finished["job"] and report["tissue_area_mm2"] > 0
        assert [c["name"] for c in report["classes"]] == ["red", "green", "blue"]
        assert 0 < report["analysed_area_mm2"] <= width * height * 0.499**2 / 1e6 * 1.01
        r = alice.get(f"/v1/batches/{finished['batch']}/summary.csv")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert len(rows) == 2 and {row["status"] for row in rows} == {"succeeded"}
        assert float(rows[0]["tissue_area_mm2"]) == pytest.approx(report["tissue_area_mm2"])
    with stack.client("bob") as bob:  # another owner's job and batch do not exist for bob
        assert bob.get(f"/v1/jobs/{finished['job']}/result.geojson").status_code == 404
        assert bob.get(f"/v1/batches/{finished['batch']}/summary.csv").status_code == 404
        assert bob.post(f"/v1/jobs/{finished['job']}/viewer-link").status_code == 404


def test_viewer_links_are_signed_and_expire(stack: Stack, finished: dict) -> None:
    with stack.client("alice") as alice:
        link = alice.post(f"/v1/jobs/{finished['job']}/viewer-link").json()
        assert link["url"].startswith("/v1/view/")
        assert stack.keys["alice"] not in link["url"]
        page = alice.get(f"/v1/jobs/{finished['job']}/viewer")
        assert page.status_code == 200 and '<base href="/v1/view/' in page.text
        assert stack.keys["alice"] not in page.text
        dzi = alice.get(f"/v1/slides/{finished['slide']['id']}/slide.dzi")
        assert dzi.status_code == 200 and 'TileSize="254"' in dzi.text
    anonymous = httpx.Client(base_url=stack.base_url, timeout=30)
    assert anonymous.get(link["url"]).status_code == 200  # no key needed with the link
    assert anonymous.get(link["url"] + "info.json").json()["classes"][0]["name"] == "red"
    forged = link["url"].replace("/v1/view/", "/v1/view/x")
    assert anonymous.get(forged).status_code == 403
    settings = Settings(api_keys=stack.env["SLIDEPIPE_API_KEYS"])
    old, _ = sign(settings, finished["job"], "alice", ttl_s=60, now=1_000_000.0)
    r = anonymous.get(f"/v1/view/{old}/slide.dzi")
    assert r.status_code == 403 and "expired" in r.json()["detail"]
    stolen, _ = sign(Settings(api_keys="alice=another-key"), finished["job"], "alice")
    assert anonymous.get(f"/v1/view/{stolen}/info.json").status_code == 403
    assert anonymous.get(f"/v1/jobs/{finished['job']}/viewer").status_code == 401


def _browser(playwright):  # noqa: ANN001, ANN202 - playwright's types
    if not Path(CHROMIUM).is_file() or shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is not installed: run scripts/setup.sh "
                    "(apt-get install -y chromium)", pytrace=False)
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def _picture(page) -> np.ndarray:  # noqa: ANN001
    return np.asarray(Image.open(io.BytesIO(page.locator("#osd").screenshot())).convert("RGB"),
                      dtype=np.int16)


def test_viewer_in_headless_chromium(stack: Stack, finished: dict) -> None:
    from playwright.sync_api import sync_playwright

    with stack.client("alice") as alice:
        url = stack.base_url + alice.post(f"/v1/jobs/{finished['job']}/viewer-link").json()["url"]
    problems: list[str] = []
    requested: list[str] = []
    with sync_playwright() as playwright:
        browser = _browser(playwright)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requested.append(r.url))
            page.goto(url)
            page.wait_for_function("window.slidepipeViewer && slidepipeViewer.ready && "
                                   "slidepipeViewer.loaded.slide > 0 && "
                                   "slidepipeViewer.loaded.overlay > 0", timeout=30_000)
            page.wait_for_timeout(1000)
            failed = page.evaluate("JSON.stringify(slidepipeViewer.failed)")
            assert json.loads(failed) == [], failed
            assert "red" in page.inner_text("#classes")

            # the overlay shows: fully opaque against fully transparent differs where it lies
            page.fill("#opacity", "100")
            page.dispatch_event("#opacity", "input")
            page.wait_for_timeout(800)
            with_overlay = _picture(page)
            page.fill("#opacity", "0")
            page.dispatch_event("#opacity", "input")
            page.wait_for_timeout(800)
            slide_only = _picture(page)
            changed = np.abs(with_overlay - slide_only).sum(axis=2) > 30
            assert changed.mean() > 0.05, changed.mean()
            page.fill("#opacity", "100")
            page.dispatch_event("#opacity", "input")

            # toggling a class changes the picture
            version = page.evaluate("slidepipeViewer.overlayVersion")
            page.locator('#classes input[data-value="1"]').uncheck()
            page.wait_for_function(f"slidepipeViewer.overlayVersion > {version}")
            page.wait_for_timeout(1500)
            without_red = _picture(page)
            assert (np.abs(without_red - with_overlay).sum(axis=2) > 30).mean() > 0.02

            # the probability colour map and its legend
            page.check('input[name="mode"][value="probability"]')
            assert page.is_visible("#ramp")
            page.wait_for_timeout(1000)

            # zoom to full resolution: the slide's deepest deep-zoom level is loaded
            levels = int(page.evaluate("slidepipeViewer.viewer.world.getItemAt(0).source.maxLevel"))
            page.evaluate("slidepipeViewer.zoomToFullResolution(600, 500)")
            page.wait_for_function(f"slidepipeViewer.maxLevel.slide >= {levels}", timeout=30_000)
            page.wait_for_timeout(500)
            assert json.loads(page.evaluate("JSON.stringify(slidepipeViewer.failed)")) == []
        finally:
            browser.close()
    assert problems == [], problems
    assert any("/slide_files/" in u for u in requested)
    assert any("/overlay/" in u and "mode=probability" in u for u in requested)
    assert not any(stack.keys["alice"] in u for u in requested)  # no key in any URL


def test_slidepipe_view_serves_a_local_result(svc_slides: dict, tmp_path: Path) -> None:
    """``slidepipe view`` (real uvicorn, loopback): the page, its info and both tile kinds."""
    import socket
    import subprocess
    import sys
    import time

    from workers.engine.run import run_engine
    from workers.engine.spec import RunSpec

    result = tmp_path / "local.zarr"
    run_engine(RunSpec(slide_path=svc_slides["pyramid"], model="identity", out_path=result,
                       target_mpp=4.0, device="cpu"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "view", str(result),
                               "--slide", str(svc_slides["pyramid"]), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1/view/local/"
    try:
        with httpx.Client(timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    page = client.get(base)
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline and server.poll() is None
                    time.sleep(0.2)
            assert page.status_code == 200 and "openseadragon.min.js" in page.text
            info = client.get(base + "info.json").json()
            top = info["overlay"]["max_level"]
            tile = client.get(base + f"overlay/{top}/0_0.png", params={"mode": "probability",
                                                                      "class": 1})
            assert tile.status_code == 200 and tile.content[:4] == b"\x89PNG"
            rgba = np.asarray(Image.open(io.BytesIO(tile.content)))
            labels = np.asarray(zarr.open_group(str(result), mode="r")["labels/classes/0"])
            h, w = rgba.shape[:2]
            assert rgba.shape[2] == 4 and (h, w) == tuple(min(256, n) for n in labels.shape)
            # never-computed pixels are transparent, the others opaque
            np.testing.assert_array_equal(rgba[..., 3] == 0, labels[:h, :w] == 0)
            jpeg = client.get(base + "slide_files/0/0_0.jpeg")
            assert jpeg.status_code == 200 and jpeg.content[:2] == b"\xff\xd8"
            assert client.get(base + f"overlay/{top + 1}/0_0.png").status_code == 404
            assert client.get(f"http://127.0.0.1:{port}/v1/view/other/info.json").status_code == 404
            assert client.get(f"http://127.0.0.1:{port}/viewer-assets/openseadragon/"
                              "openseadragon.min.js").status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=15)
