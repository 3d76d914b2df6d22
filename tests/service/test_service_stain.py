"""A stain chain through the service: a real slide uploaded over HTTP, a job that runs a
CycleGAN (then identity) and one that runs Macenko with another uploaded slide as the
reference, on a real Celery worker; provenance records every step."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import zarr

from models.architectures import build_module
from models.catalogue import cyclegan_card
from models.loading import save_weights

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.slow


def test_stain_chains_through_the_service(
    stack_factory, svc_slides: dict, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    torch.manual_seed(0)
    card = cyclegan_card("stainer", target_mpp=0.5, depth=2, base_filters=8, tile_px=256,
                         kept_px=192, stride_px=128, weights="weights.safetensors")
    save_weights(build_module(card), models / "stainer" / "weights.safetensors")
    card.save(models / "stainer")

    stack: Stack = stack_factory(SLIDEPIPE_MODEL_DIR=str(models))
    stack.start_worker("w1")
    stack.start_api()
    with stack.client("alice") as alice, stack.client("bob") as bob:
        slide = stack.upload(alice, svc_slides["cmu"])  # the real Aperio H&E region
        reference = stack.upload(alice, svc_slides["pyramid"])
        assert "stainer" in {m["name"] for m in alice.get("/v1/models").json()}
        base = {"target_mpp": 2.0, "tile_px": 128, "overlap_px": 32}

        # refused before anything is queued
        for params, words in (
            ({"stain": "unet"}, "cyclegan"),
            ({"stain": "../models/stainer"}, "name"),
            ({"stain_output": True}, "stain step"),
            ({"stain": "stainer", "stain_reference_slide": reference["id"]}, "Macenko"),
        ):
            r = alice.post("/v1/jobs", json={"slide_id": slide["id"], "model": "identity",
                                             "parameters": {**base, **params}})
            assert r.status_code == 422 and words in r.text, (params, r.text)
        r = bob.post("/v1/jobs", json={"slide_id": slide["id"], "model": "identity",
                                       "parameters": {**base, "stain": "macenko"}})
        assert r.status_code == 404  # bob does not see alice's slide
        r = alice.post("/v1/jobs", json={
            "slide_id": slide["id"], "model": "identity",
            "parameters": {**base, "stain": "macenko", "stain_reference_slide": "nope"}})
        assert r.status_code == 404

        jobs = {}
        for name, params in (
            ("cyclegan", {"stain": "stainer", "stain_output": True}),
            ("macenko", {"stain": "macenko", "stain_reference_slide": reference["id"]}),
        ):
            r = alice.post("/v1/jobs", json={"slide_id": slide["id"], "model": "identity",
                                             "parameters": {**base, **params}})
            assert r.status_code == 202, r.text
            jobs[name] = r.json()["job_id"]
        for name, job_id in jobs.items():
            job = stack.wait_job(alice, job_id)
            assert job["status"] == "succeeded", (name, job, stack.log_tail())

    result = zarr.open_group(str(stack.data_dir / "results" / f"{jobs['cyclegan']}.zarr"), mode="r")
    steps = result.attrs["slidepipe"]["steps"]
    assert [(s["kind"], s.get("method")) for s in steps] == [("stain", "cyclegan"), ("model", None)]
    assert steps[0]["model_card"]["name"] == "stainer"
    assert result["0"].shape == result["stained/0"].shape == (3, 740, 554)
    np.testing.assert_allclose(np.asarray(result["0"]), np.asarray(result["stained/0"]), atol=1)

    result = zarr.open_group(str(stack.data_dir / "results" / f"{jobs['macenko']}.zarr"), mode="r")
    steps = result.attrs["slidepipe"]["steps"]
    assert steps[0]["method"] == "macenko" and steps[0]["reference"].endswith(".svs")
    assert "stained" not in result  # the intermediate slide only when asked for
    assert result.attrs["slidepipe"]["parameters"]["stain"] == "macenko"
