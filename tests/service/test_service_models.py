"""The segmenters through the service: ``joint`` (with test-time augmentation) and
``unet`` cards in SLIDEPIPE_MODEL_DIR, run by name on the real slide by a real worker;
the results open in ome-zarr-py, per-tile class scores and variance map included."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from models.card import ClassSpec
from workers.training.segmentation import init_model

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.slow

CLASSES = [ClassSpec(name="background", color="000000"), ClassSpec(name="stroma", color="F2A0C8"),
           ClassSpec(name="nuclei", color="3030C0")]


def test_joint_and_unet_jobs_by_model_name(
    stack_factory: Callable[..., Stack], svc_slides: dict, tmp_path: Path
) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    model_dir = tmp_path / "models"
    init_model("joint", model_dir / "joint-stain", classes=CLASSES, target_mpp=4.0, tile_px=64)
    init_model("unet", model_dir / "unet-stain", classes=CLASSES, target_mpp=4.0, tile_px=64)
    s = stack_factory(SLIDEPIPE_MODEL_DIR=str(model_dir))
    s.start_worker("w1")
    s.start_api()
    with s.client("alice") as alice:
        names = {m["name"] for m in alice.get("/v1/models").json()}
        assert {"joint", "joint-stain", "unet-stain"} <= names
        slide = s.upload(alice, svc_slides["cmu"])
        # the service takes names only, never a path to a card
        r = alice.post("/v1/jobs", json={"slide_id": slide["id"],
                                         "model": str(model_dir / "joint-stain" / "card.json")})
        assert r.status_code == 422
        jobs = {}
        for model, params in (("joint-stain", {"tta": True, "batch_size": 16}),
                              ("unet-stain", {"batch_size": 16, "probability_dtype": "uint16"})):
            r = alice.post("/v1/jobs", json={"slide_id": slide["id"], "model": model,
                                             "parameters": params})
            assert r.status_code == 202, r.text
            jobs[model] = r.json()["job_id"]
        for model, job_id in jobs.items():
            job = s.wait_job(alice, job_id, timeout_s=300)
            assert job["status"] == "succeeded", (model, job, s.log_tail())

    for model, job_id in jobs.items():
        out = s.data_dir / "results" / f"{job_id}.zarr"
        nodes = list(Reader(parse_url(str(out)))())
        root = nodes[0]
        assert any(isinstance(spec, Multiscales) for spec in root.specs)
        assert root.metadata["channel_names"] == ["background", "stroma", "nuclei"]
        probabilities = np.asarray(root.data[0])
        assert probabilities.shape[0] == 3 and probabilities.max() > 0
        # the unet job asked for 1/65535 steps; the class map stays a uint8 label image
        assert probabilities.dtype == (np.uint16 if model == "unet-stain" else np.uint8)
        labels = {n.metadata.get("name") for n in nodes if any(isinstance(x, Label) for x in n.specs)}
        assert labels == {"classes", "tissue"}
        groups = {p.name for p in out.iterdir() if p.is_dir()}
        if model == "joint-stain":
            assert {"tile_scores", "variance"} <= groups
            scores = list(Reader(parse_url(str(out / "tile_scores")))())[0]
            grid = np.asarray(scores.data[0])
            assert grid.shape[0] == 3 and np.isfinite(grid).any()
            variance = list(Reader(parse_url(str(out / "variance")))())[0]
            assert np.asarray(variance.data[0]).shape == probabilities.shape
        else:
            assert not {"tile_scores", "variance"} & groups
