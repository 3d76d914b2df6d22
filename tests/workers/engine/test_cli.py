"""The ``slidepipe`` console script, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import zarr

from tests.data import BuiltSlide

SLIDEPIPE = [sys.executable, "-m", "service.cli"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SLIDEPIPE, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_run_then_heatmap(engine_slides: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "result.zarr"
    done = _run("run", str(engine_slides["svs"]), "--model", "identity", "--out", str(out),
                "--target-mpp", "1.0", "--tile-size", "128", "--overlap", "32", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "classes: red, green, blue" in done.stdout
    assert zarr.open_group(str(out), mode="r")["0"].shape == (3, 650, 750)
    png = tmp_path / "red.png"
    done = _run("heatmap", str(out), "--class", "red", "--out", str(png), "--max-size", "300")
    assert done.returncode == 0, done.stderr
    image = cv2.imread(str(png))
    assert max(image.shape[:2]) == 300  # map + legend fit the requested size
    done = _run("heatmap", str(out), "--class", "tumour", "--out", str(png))
    assert done.returncode == 1 and "no class 'tumour'" in done.stderr


def test_errors_are_one_line_messages(tmp_path: Path) -> None:
    not_a_slide = tmp_path / "notes.txt"
    not_a_slide.write_text("not a slide")
    done = _run("run", str(not_a_slide), "--model", "identity", "--out", str(tmp_path / "r.zarr"))
    assert done.returncode == 1
    assert "SlideUnreadable" in done.stderr and "Traceback" not in done.stderr
    done = _run("run", str(not_a_slide), "--model", "no-such-model", "--out", str(tmp_path / "r.zarr"))
    assert done.returncode == 1 and "unknown model 'no-such-model'" in done.stderr
    # limits come from workers.engine.params: click refuses a value out of range (usage
    # error, status 2); RunSpec refuses what click cannot check, in one line
    done = _run("run", str(not_a_slide), "--model", "identity", "--out", str(tmp_path / "r.zarr"),
                "--batch-size", "1025")
    assert done.returncode == 2 and "--batch-size" in done.stderr and "1<=x<=1024" in done.stderr
    done = _run("run", str(not_a_slide), "--model", "identity", "--out", str(tmp_path / "r.zarr"),
                "--device", "gpu0")
    assert done.returncode == 1 and "InvalidParameter: device must match" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_models_list() -> None:
    done = _run("models", "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("identity") and " 0 params" in lines[0]
    assert lines[1].startswith("unet") and "14,328,354 params" in lines[1]


def test_demo_end_to_end(tmp_path: Path, cmu_svs: Path) -> None:
    """The README's first command, with a short training run: real slide in, a trained
    model card, a zarr and a heatmap out."""
    env_cache = tmp_path / "cache"
    env_cache.mkdir()
    shutil.copy(cmu_svs, env_cache / "cmu_small_region.svs")
    done = subprocess.run([*SLIDEPIPE, "demo", "--out", str(tmp_path / "demo"), "--steps", "4"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SLIDEPIPE_CACHE": str(env_cache)})
    assert done.returncode == 0, done.stderr[-3000:]
    training = json.loads((tmp_path / "demo" / "demo-model" / "training.json").read_text())
    assert training["steps"] == 4 and set(training["val_dice"]) == {"background", "stroma", "nuclei"}
    root = zarr.open_group(str(tmp_path / "demo" / "cmu_small_region.zarr"), mode="r")
    assert [c["label"] for c in root.attrs["omero"]["channels"]] == ["background", "stroma", "nuclei"]
    probabilities = np.asarray(root["1"])
    assert probabilities.shape[0] == 3 and probabilities.any()
    heatmap = cv2.imread(str(tmp_path / "demo" / "cmu_small_region-nuclei.png"))
    assert heatmap is not None and max(heatmap.shape[:2]) == 1024


def test_a_slide_without_tissue_says_so(blank_svs: BuiltSlide, tmp_path: Path) -> None:
    """Glass only: the run succeeds, analyses nothing and says so on stderr, naming the
    slide, the tissue method and what it found; the result's provenance carries it."""
    out = tmp_path / "blank.zarr"
    done = _run("run", str(blank_svs.path), "--model", "identity", "--out", str(out),
                "--target-mpp", "4", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "(0 tiles" in done.stdout
    warning = next(line for line in done.stderr.splitlines() if line.startswith("warning: "))
    assert "no tissue on 'blank.svs'" in warning and "tissue method 'stain'" in warning
    assert "0 mm² of tissue in 0 fragments" in warning
    provenance = zarr.open_group(str(out), mode="r").attrs["slidepipe"]
    assert provenance["warnings"] == [warning.removeprefix("warning: ")]
    assert provenance["tiles"]["total"] == 0 and provenance["tissue"]["area_um2"] == 0


def test_a_slide_with_tissue_has_no_warning(engine_slides: dict[str, Path], tmp_path: Path
                                            ) -> None:
    out = tmp_path / "r.zarr"
    done = _run("run", str(engine_slides["small"]), "--model", "identity", "--out", str(out),
                "--target-mpp", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "warning:" not in done.stderr
    provenance = zarr.open_group(str(out), mode="r").attrs["slidepipe"]
    assert provenance["warnings"] == [] and provenance["tiles"]["total"] > 0
    assert provenance["parameters"]["tissue_method"] == "stain"
    assert provenance["tissue"]["findings"]["fragments"] >= 1


def test_dicom_by_folder_and_by_file(dicom_dir: Path, tmp_path: Path) -> None:
    """openslide's DICOM WSI, given as its folder or as its volume file: the same result
    (with --tissue-method none: its 16 x 16 px hold no 200 µm² of tissue)."""
    results = []
    for i, given in enumerate([dicom_dir, dicom_dir / "boxes_0.dcm"]):
        out = tmp_path / f"dicom{i}.zarr"
        done = _run("run", str(given), "--model", "identity", "--out", str(out),
                    "--tissue-method", "none", "--quiet")
        assert done.returncode == 0, done.stderr
        assert "(1 tiles" in done.stdout and "warning:" not in done.stderr
        root = zarr.open_group(str(out), mode="r")
        assert root.attrs["slidepipe"]["slide"]["vendor"] == "dicom"
        results.append(np.asarray(root["0"]))
    assert results[0].shape == (3, 16, 16) and results[0].any()
    np.testing.assert_array_equal(results[0], results[1])
    done = _run("run", str(dicom_dir), "--model", "identity", "--out", str(tmp_path / "d.zarr"),
                "--quiet")
    assert done.returncode == 0 and "warning: no tissue on 'boxes_0.dcm'" in done.stderr
    done = _run("run", str(tmp_path / "data" / "dicom"), "--model", "identity", "--out",
                str(tmp_path / "x.zarr"))
    assert done.returncode == 1 and "no slide file or folder at" in done.stderr


def test_tissue_command_draws_the_mask(cmu_svs: Path, blank_svs: BuiltSlide, tmp_path: Path
                                       ) -> None:
    png = tmp_path / "mask.png"
    done = _run("tissue", str(cmu_svs), "--out", str(png), "--max-size", "600")
    assert done.returncode == 0, done.stderr
    assert "cmu_small_region.svs: stain at 4 µm/px" in done.stdout
    assert "in 3 fragments" in done.stdout
    picture = cv2.imread(str(png))
    assert picture is not None and picture.shape[0] == 600 + 22  # portrait, caption below
    green = (picture[..., 1] > 150) & (picture[..., 0] < 60) & (picture[..., 2] < 60)
    assert green.sum() > 500  # the outline is drawn
    done = _run("tissue", str(blank_svs.path), "--out", str(tmp_path / "blank.png"))
    assert done.returncode == 0 and "warning: no tissue on 'blank.svs'" in done.stderr
    old = _run("tissue", str(cmu_svs), "--out", str(png), "--tissue-method", "hsv-otsu",
               "--tissue-working-mpp", "8", "--min-fragment-um2", "20000")
    assert old.returncode == 0, old.stderr
    assert "hsv-otsu at 8.03 µm/px" in old.stdout and "of tissue in 1 fragment\n" in old.stdout
