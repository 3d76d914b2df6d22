"""Stain transfer end to end on real tissue: a quick CycleGAN that learns, no seams with
the paper's blending, the chain (stain step, then a model) through the CLI, and the
pyramidal TIFF export that slide readers open."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from experiments.stain_transfer import write_parts
from models.architectures import build_module
from models.card import read_card
from models.catalogue import cyclegan_card
from models.cyclegan_training import CycleGANConfig
from models.loading import save_weights
from models.stain_metrics import histogram_wasserstein, seam_energy_ratio, ssim, tissue_pixels
from workers.engine.run import run_engine
from workers.engine.spec import RunSpec
from workers.training.stain import CardGeometry, train_stain_cyclegan
from workers.training.stain_data import collect_domain
from wsi.reader import Slide

log = logging.getLogger(__name__)
SLIDEPIPE = [sys.executable, "-m", "service.cli"]
MPP, PATCH = 2.0, 32
#: The quick run: 12 epochs of 10 steps, identity loss decaying over 8 of them. Moving
#: the stain takes this small GAN ~1000+ steps (experiments.stain_transfer: 1500
#: steps, 4-6 minutes on one CPU thread); in seconds it learns to map and reconstruct.
QUICK_EPOCHS, QUICK_IDENTITY_EPOCHS = 12, 8


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One torch thread: on a busy 2-core machine two spinning threads are far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory, cmu_rgb: np.ndarray) -> dict[str, Path]:
    """The real region split by rows: A-train, B-train (other stain vectors), A-test and
    B-test (the held-out rows in both stains), as SVS slides at 0.499 µm/px."""
    return write_parts(cmu_rgb, tmp_path_factory.mktemp("stain-slides"), 0.499)


@pytest.fixture(scope="module")
def held_out(parts: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    with Slide(parts["A-test"]) as a, Slide(parts["B-test"]) as b:
        w, h = a.scaled_dimensions(MPP)
        return a.read_scaled(MPP, 0, 0, w, h), b.read_scaled(MPP, 0, 0, w, h)


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory: pytest.TempPathFactory, parts: dict[str, Path],
                single_thread: None) -> dict[str, Path]:
    """A CycleGAN trained for seconds: 32 px patches at 2 µm/px, depth 2, 16 filters."""
    kw = {"patch_px": PATCH, "target_mpp": MPP, "min_tissue_fraction": 0.05}
    a = collect_domain("A", [parts["A-train"]], **kw)
    b = collect_domain("B", [parts["B-train"]], **kw)
    config = CycleGANConfig(depth=2, base_filters=16, disc_filters=16, patch_px=PATCH,
                            batch_size=4, epochs=QUICK_EPOCHS, steps_per_epoch=10, lr=5e-4,
                            identity_decay_epochs=QUICK_IDENTITY_EPOCHS)
    out = tmp_path_factory.mktemp("quick-cyclegan")
    _, cards = train_stain_cyclegan(a, b, out, config, name="quick", target_mpp=MPP,
                                    geometry=CardGeometry(4 * PATCH, 2 * PATCH, PATCH))
    # the same generator on abutting tiles of the kept size (no overlap, no crop)
    plain = read_card(cards["a2b"]).model_copy(update={
        "name": "quick-a2b-plain", "tile_px": 2 * PATCH, "overlap_px": 0, "output_crop_px": 0,
        "weights": "../quick-a2b/weights.safetensors"})
    return {**cards, "plain": plain.save(out / "quick-a2b-plain"), "dir": out}



def _rgb(result: Path, group: str = "") -> np.ndarray:
    root = zarr.open_group(str(result), mode="r")
    return np.moveaxis(np.asarray((root[group] if group else root)["0"]), 0, -1)


def test_quick_cyclegan_learns_and_keeps_the_structure(
    quick_model: dict[str, Path], parts: dict[str, Path],
    held_out: tuple[np.ndarray, np.ndarray], tmp_path: Path,
) -> None:
    """The quick version of the experiment: trained in seconds on real tissue, both
    directions exported, every epoch logged; the cycle loss falls, the identity weight
    decays to 0 on schedule, and the A->B transform of held-out rows through the engine
    keeps the structure (the colour distance is logged; the experiment script measures
    its 3x fall with a longer run)."""
    a_test, b_test = held_out
    result = run_engine(RunSpec(slide_path=parts["A-test"], model=str(quick_model["a2b"]),
                                out_path=tmp_path / "a2b.zarr", device="cpu", chunk_px=256))
    out = _rgb(result.out_path)
    assert out.shape == a_test.shape
    computed = out.any(axis=-1)
    tissue = tissue_pixels(a_test) & computed
    before = histogram_wasserstein(a_test, b_test, mask_a=tissue, mask_b=tissue)
    after = histogram_wasserstein(out, b_test, mask_a=tissue, mask_b=tissue)
    structure = ssim(out, a_test, mask=computed)
    log.info("quick cyclegan: colour distance %.2f -> %.2f (x%.2f), SSIM %.3f",
             before, after, before / after, structure)
    assert np.isfinite(after) and structure >= 0.6, (after, structure)
    metrics = [json.loads(line) for line in (quick_model["dir"] / "metrics.jsonl").open()]
    assert [m["epoch"] for m in metrics] == list(range(1, QUICK_EPOCHS + 1))
    assert {"a2b_wasserstein", "a2b_ssim", "b2a_wasserstein", "b2a_ssim", "loss_d"} <= set(metrics[-1])
    assert metrics[-1]["cycle"] < 0.8 * metrics[0]["cycle"], [m["cycle"] for m in metrics]
    weights = [m["identity_weight"] for m in metrics]
    assert weights[0] > weights[4] > 0 and weights[QUICK_IDENTITY_EPOCHS:] == [0.0] * 4
    provenance = result.provenance
    assert [s["kind"] for s in provenance["steps"]] == ["model"]
    assert provenance["model_card"]["params"]["direction"] == "a2b"



def test_blending_hides_instance_norm_seams(
    quick_model: dict[str, Path], parts: dict[str, Path],
    held_out: tuple[np.ndarray, np.ndarray], tmp_path: Path,
) -> None:
    """Gradient energy across tile borders vs the interior: ~1 with the paper's large
    tiles, kept centres and centre-peaked blending; clearly more without overlap."""
    a_test, _ = held_out
    h, w = a_test.shape[:2]
    common = {"slide_path": parts["A-test"], "model": str(quick_model["a2b"]), "device": "cpu",
              "chunk_px": 256}
    blended = _rgb(run_engine(RunSpec(out_path=tmp_path / "b.zarr", **common)).out_path)
    plain = _rgb(run_engine(RunSpec(out_path=tmp_path / "p.zarr", window="constant",
                                    **{**common, "model": str(quick_model["plain"])})).out_path)
    tissue = tissue_pixels(a_test)

    def ratio(image: np.ndarray, stride: int) -> float:
        ys, xs = np.arange(0, h, stride), np.arange(0, w, stride)
        return seam_energy_ratio(image, ys, xs, mask=image.any(axis=-1) & tissue)

    with_blending, without = ratio(blended, PATCH), ratio(plain, 2 * PATCH)
    log.info("seam energy ratio: blended %.3f, no overlap + constant window %.3f",
             with_blending, without)
    assert 0.8 < with_blending < 1.25, with_blending
    assert without > 1.5 * with_blending, (with_blending, without)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """The console script as a user runs it (a real subprocess)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*SLIDEPIPE, *args], capture_output=True, text=True, timeout=300,
                          env=env)


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def _cli(*args: str) -> Ran:
    """The same command in this process (click's runner): no interpreter start-up."""
    from click.testing import CliRunner

    from service.cli import main

    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


def test_train_cli_writes_cards_and_resumes(parts: dict[str, Path], tmp_path: Path) -> None:
    """``slidepipe train cyclegan`` from a slide (A) and a folder of tiles (B): both
    directions' cards, a metrics log, and a resumable checkpoint."""
    import cv2

    with Slide(parts["B-train"]) as s:
        tiles = tmp_path / "b-tiles"
        tiles.mkdir()
        w, h = s.scaled_dimensions(MPP)
        image = s.read_scaled(MPP, 0, 0, w, h)
        for i, x in enumerate((0, w // 2)):
            cv2.imwrite(str(tiles / f"t{i}.png"), cv2.cvtColor(image[:, x : x + w // 2], cv2.COLOR_RGB2BGR))
    out = tmp_path / "gan"
    args = ["train", "cyclegan", "--domain-a", str(parts["A-train"]), "--domain-b", str(tiles),
            "--out", str(out), "--mpp", str(MPP), "--patch-size", str(PATCH), "--depth", "1",
            "--base-filters", "8", "--disc-filters", "8", "--steps-per-epoch", "3",
            "--batch-size", "2", "--min-tissue", "0.25", "--tile-size", "128", "--kept", "64",
            "--stride", "32", "--device", "cpu", "--name", "demo", "--quiet"]
    done = _run(*args, "--epochs", "2")
    assert done.returncode == 0, done.stderr
    assert "trained 2 epochs (6 steps)" in done.stdout
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pt", "metrics.jsonl", "training.json",
                                               "demo-a2b", "demo-b2a"}
    again = _cli(*args, "--epochs", "3")
    assert again.returncode == 1 and "--resume" in again.stderr
    resumed = _cli(*args, "--epochs", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "trained 3 epochs (9 steps)" in resumed.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    card = json.loads((out / "demo-b2a" / "card.json").read_text())
    assert card["architecture"] == "cyclegan" and card["params"]["direction"] == "b2a"
    assert card["params"]["trained_steps"] == 9
    assert (card["tile_px"], card["output_crop_px"], card["overlap_px"]) == (128, 32, 96)
    listed = _cli("models", "list", "--model-dir", str(out))
    assert "demo-a2b" in listed.stdout and "demo-b2a" in listed.stdout


@pytest.fixture(scope="module")
def random_cyclegan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder holding an untrained (seeded) small cyclegan card: the chain's
    mechanics do not depend on training."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models")
    card = cyclegan_card("stainer", target_mpp=0.5, depth=2, base_filters=8, tile_px=256,
                         kept_px=192, stride_px=128, weights="weights.safetensors")
    save_weights(build_module(card), folder / "stainer" / "weights.safetensors")
    card.save(folder / "stainer")
    return folder


def test_chain_on_a_real_slide_through_the_cli(
    cmu_svs: Path, random_cyclegan: Path, tmp_path: Path
) -> None:
    """The real Aperio slide: cyclegan then identity in one pass, the stained RGB kept on
    request and exported as a pyramidal SVS; then Macenko from a reference tile."""
    out = tmp_path / "chain.zarr"
    tiff = tmp_path / "stained.svs"
    done = _run("run", str(cmu_svs), "--model", "identity", "--stain", "stainer",
                "--model-dir", str(random_cyclegan), "--stain-output", "--target-mpp", "2",
                "--out", str(out), "--export-tiff", str(tiff), "--quiet")
    assert done.returncode == 0, done.stderr
    root = zarr.open_group(str(out), mode="r")
    assert root["0"].shape == root["stained/0"].shape == (3, 740, 554)
    steps = root.attrs["slidepipe"]["steps"]
    assert [(s["kind"], s.get("method")) for s in steps] == [("stain", "cyclegan"), ("model", None)]
    assert steps[0]["model_card"]["name"] == "stainer" and steps[0]["weights_sha256"]
    # identity returns what it is given: its root image *is* the stained tiles
    np.testing.assert_allclose(np.asarray(root["0"]), np.asarray(root["stained/0"]), atol=1)
    for backend in ("openslide", "tiffslide"):
        with Slide(tiff, backend=backend) as s:
            assert s.dimensions == (554, 740)
            assert s.mpp == pytest.approx(2.0, rel=1e-4)
    reference = tmp_path / "reference.png"
    import cv2

    with Slide(cmu_svs) as s:
        cv2.imwrite(str(reference), cv2.cvtColor(s.read_level(0, 600, 1200, 600, 600), cv2.COLOR_RGB2BGR))
    mac = _cli("run", str(cmu_svs), "--model", "identity", "--stain", "macenko",
               "--stain-reference", str(reference), "--target-mpp", "2",
               "--out", str(tmp_path / "macenko.zarr"), "--quiet")
    assert mac.returncode == 0, mac.stderr
    steps = zarr.open_group(str(tmp_path / "macenko.zarr"), mode="r").attrs["slidepipe"]["steps"]
    assert steps[0]["method"] == "macenko" and steps[0]["reference"] == str(reference)
    assert len(steps[0]["source_stains"]["stains_rgb_by_he"]) == 3
    bad = _cli("run", str(cmu_svs), "--model", "identity", "--stain", "unet",
               "--out", str(tmp_path / "bad.zarr"), "--quiet")
    assert bad.returncode == 1 and "cyclegan" in bad.stderr


def test_cyclegan_slide_exports_with_the_source_mpp(
    engine_slides: dict[str, Path], random_cyclegan: Path, tmp_path: Path
) -> None:
    """A cyclegan run at the slide's own resolution: the RGB result as an SVS with the
    source's size and mpp, opened by openslide and tiffslide."""
    slide = engine_slides["small"]  # real tissue, 700 x 520 px at 0.5 µm/px
    tiff = tmp_path / "transformed.svs"
    done = _cli("run", str(slide), "--model", "stainer", "--model-dir", str(random_cyclegan),
                "--tissue-method", "none",  # too small a slide for the default mask's sizes
                "--out", str(tmp_path / "t.zarr"), "--export-tiff", str(tiff), "--quiet")
    assert done.returncode == 0, done.stderr
    result = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    assert result["0"].shape == (3, 520, 700) and "labels" in result
    assert result.attrs["omero"]["channels"][0]["label"] == "red"
    stored = np.moveaxis(np.asarray(result["0"]), 0, -1)
    for backend in ("openslide", "tiffslide"):
        with Slide(tiff, backend=backend) as s, Slide(slide, backend=backend) as src:
            assert s.dimensions == src.dimensions
            assert s.mpp == pytest.approx(src.mpp)
            pixels = s.read_level(0, 0, 0, 700, 520)
    assert stored.any(axis=-1).all()  # every tile computed
    # JPEG Q90, YCbCr 4:2:0: the (full-resolution) luma is close to the stored pixels
    luma = [x.astype(np.float64) @ [0.299, 0.587, 0.114] for x in (pixels, stored)]
    error = np.abs(luma[0] - luma[1]).mean()
    assert error < 3, error
