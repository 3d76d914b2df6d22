"""``slidepipe train {joint,unet}``, ``models init/list`` and ``slidepipe run`` with the
trained models (and ``--tta``) on the real slide; results read back with ome-zarr-py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from models.stain import stain_pseudo_labels
from service.cli import main
from wsi.array_slide import write_slide_from_array

SLIDEPIPE = [sys.executable, "-m", "service.cli"]
CLASSES = "background:000000,stroma:F2A0C8,nuclei:3030C0"


@pytest.fixture(scope="module")
def annotated_slides(tmp_path_factory: pytest.TempPathFactory, cmu_rgb: np.ndarray) -> list[Path]:
    """Two slides of real H&E (two 'patients') with stain pseudo-label masks beside them."""
    folder = tmp_path_factory.mktemp("train-slides")
    slides = []
    for name, crop in (("p1", cmu_rgb[600:1400, 300:1300]), ("p2", cmu_rgb[1500:2300, 300:1300])):
        path = write_slide_from_array(folder / f"{name}.svs", np.ascontiguousarray(crop),
                                      mpp=0.499, flavor="svs", downsamples=(1, 4),
                                      compression="deflate").path
        labels, _ = stain_pseudo_labels(crop)
        cv2.imwrite(str(folder / f"{name}.mask.png"), labels)
        slides.append(path)
    return slides


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _open_result(out: Path) -> dict[str, object]:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    nodes = list(Reader(parse_url(str(out)))())
    root = nodes[0]
    assert any(isinstance(s, Multiscales) for s in root.specs)
    labels = {n.metadata.get("name") for n in nodes if any(isinstance(s, Label) for s in n.specs)}
    assert labels == {"classes", "tissue"}
    found: dict[str, object] = {"root": root}
    for group in ("tile_scores", "variance"):
        if (out / group).is_dir():
            node = list(Reader(parse_url(str(out / group)))())[0]
            assert any(isinstance(s, Multiscales) for s in node.specs)
            found[group] = node
    return found


def test_train_joint_resume_then_run_with_tta(annotated_slides: list[Path], cmu_svs: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "joint-stain"
    common = ["train", "joint", *[a for s in annotated_slides for a in ("--slides", str(s))],
              "--out", str(out), "--classes", CLASSES, "--mpp", "2", "--tile-size", "64",
              "--stride", "32", "--mask-fraction", "0.25", "--label-rule", "0,0.5,0.15",
              "--val-fraction", "0.5", "--batch-size", "4", "--lr", "1e-3", "--classifier", "max",
              "--eval-every", "2", "--checkpoint-every", "2", "--device", "cpu", "--quiet"]
    text = _invoke(*common, "--steps", "2")
    assert "wrote" in text and "validation: seg_mean_dice" in text
    assert {p.name for p in out.iterdir()} >= {"card.json", "weights.safetensors",
                                               "checkpoint.pt", "metrics.jsonl", "training.json"}
    again = CliRunner().invoke(main, [*common, "--steps", "2"])
    assert again.exit_code == 1 and "holds a checkpoint" in again.output
    _invoke(*common, "--steps", "4", "--resume")
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["kind"] == "val"] == [2, 4]
    assert {"loss", "loss_seg", "loss_cls", "lr"} <= set(rows[0])
    assert {"val_seg_mean_dice", "val_seg_dice_nuclei", "val_seg_mean_iou", "val_cls_accuracy",
            "val_cls_macro_f1"} <= set(rows[-1])
    summary = json.loads((out / "training.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    fit = summary["spec"]["fit"]
    assert (fit["batch_size"], fit["lr"], fit["masked_per_batch"], fit["cls_weight"]) == (
        4, 1e-3, None, 1.0)
    # one way to train the joint model (label-only patches in a BatchNorm pass of their
    # own, the paper's softmax L_cls; tests/models/test_joint.py): no experiment switches
    assert not {"label_bn", "cls_loss"} & set(fit)
    gone = CliRunner().invoke(main, [*common, "--steps", "2", "--label-bn", "shared"])
    assert gone.exit_code == 2 and "No such option '--label-bn'" in gone.output
    train, val = summary["data"]["train"], summary["data"]["val"]
    assert train["groups"] == 1 and val["groups"] == 1  # split by patient (slide)
    assert 0 < train["with_mask"] < train["patches"] == train["with_label"]
    # patches on a 32 px stride overlap: the masks' share of the tissue is recorded too
    assert 0 < train["masked_area_share"] < 1
    assert summary["final_val"]["val_seg_mean_dice"] >= 0
    card = json.loads((out / "card.json").read_text())
    assert card["architecture"] == "joint" and card["weights"] == "weights.safetensors"
    assert [o["name"] for o in card["outputs"]] == ["probabilities", "tile_scores"]
    assert card["params"] == {"classifier": "max"}  # the service's run builds the same net

    # the trained model on the real slide, as a user runs it, with test-time augmentation
    result = tmp_path / "joint.zarr"
    done = subprocess.run(
        [*SLIDEPIPE, "run", str(cmu_svs), "--model", str(out / "card.json"), "--out", str(result),
         "--target-mpp", "4", "--tta", "--device", "cpu", "--batch-size", "16", "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = _open_result(result)
    root = found["root"]
    assert root.data[0].shape[0] == 3 and root.metadata["channel_names"] == [
        "background", "stroma", "nuclei"]
    scores = np.asarray(found["tile_scores"].data[0])
    assert scores.ndim == 3 and scores.shape[0] == 3
    computed = np.isfinite(scores[0])
    assert computed.any() and np.allclose(scores[:, computed].sum(0), 1, atol=1e-4)
    variance = np.asarray(found["variance"].data[0])
    assert variance.shape == root.data[0].shape and variance.dtype == np.uint8
    assert variance.max() > 0  # the passes disagree somewhere
    provenance = json.loads((result / ".zattrs").read_text())["slidepipe"]
    assert provenance["parameters"]["tta"] is True


def test_train_unet_from_tiles_and_run(annotated_slides: list[Path], cmu_svs: Path,
                                       cmu_rgb: np.ndarray, tmp_path: Path) -> None:
    tiles = tmp_path / "tiles"
    (tiles / "images").mkdir(parents=True)
    (tiles / "masks").mkdir()
    small = cv2.resize(cmu_rgb[600:2200, 300:1500], None, fx=0.25, fy=0.25,
                       interpolation=cv2.INTER_AREA)
    labels, _ = stain_pseudo_labels(small)
    n = 0
    for y in range(0, small.shape[0] - 64, 64):
        for x in range(0, small.shape[1] - 64, 64):
            group = "a" if y < small.shape[0] // 2 else "b"
            (tiles / "images" / group).mkdir(exist_ok=True)
            (tiles / "masks" / group).mkdir(exist_ok=True)
            cv2.imwrite(str(tiles / "images" / group / f"{n}.png"),
                        cv2.cvtColor(small[y:y + 64, x:x + 64], cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(tiles / "masks" / group / f"{n}.png"), labels[y:y + 64, x:x + 64])
            n += 1
    out = tmp_path / "unet-stain"
    text = _invoke("train", "unet", "--tiles", str(tiles), "--out", str(out), "--classes", CLASSES,
                   "--mpp", "2", "--tile-size", "64", "--steps", "3", "--batch-size", "4",
                   "--eval-every", "3", "--dice-weight", "0.5", "--device", "cpu", "--quiet")
    assert "wrote" in text and "seg_mean_dice" in text and "cls_accuracy" not in text
    card = json.loads((out / "card.json").read_text())
    assert card["architecture"] == "unet" and card["tile_px"] == 64 and card["target_mpp"] == 2
    result = tmp_path / "unet.zarr"
    done = subprocess.run(
        [*SLIDEPIPE, "run", str(cmu_svs), "--model", str(out / "card.json"), "--out", str(result),
         "--target-mpp", "4", "--device", "cpu", "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = _open_result(result)
    assert "tile_scores" not in found and "variance" not in found
    assert np.asarray(found["root"].data[0]).max() > 0


def test_models_init_and_list(tmp_path: Path) -> None:
    text = _invoke("models", "init", "joint", "--out", str(tmp_path / "fresh-joint"),
                   "--classes", "normal,tumour", "--seed", "3")
    assert "2,930,548 params" in text  # the 4-class default has 2,930,712
    card = json.loads((tmp_path / "fresh-joint" / "card.json").read_text())
    assert card["name"] == "fresh-joint" and [c["name"] for c in card["classes"]] == ["normal", "tumour"]
    assert (tmp_path / "fresh-joint" / "weights.safetensors").is_file()
    text = _invoke("models", "init", "joint", "--out", str(tmp_path / "max-joint"),
                   "--classes", "normal,tumour", "--classifier", "max")
    assert "2,930,498 params" in text  # no classification head: 16 + 16 + 18 fewer
    card = json.loads((tmp_path / "max-joint" / "card.json").read_text())
    assert card["params"]["classifier"] == "max"
    wrong = CliRunner().invoke(main, ["models", "init", "unet", "--out", str(tmp_path / "x"),
                                      "--classifier", "max"])
    assert wrong.exit_code == 1 and "--classifier applies to joint only" in wrong.output
    assert not (tmp_path / "x" / "card.json").exists()
    _invoke("models", "init", "unet", "--out", str(tmp_path / "fresh-unet"), "--tile-size", "256")
    again = CliRunner().invoke(main, ["models", "init", "unet", "--out", str(tmp_path / "fresh-unet")])
    assert again.exit_code == 1 and "already exists" in again.output
    listing = _invoke("models", "list", "--model-dir", str(tmp_path))
    lines = {line.split()[0]: line for line in listing.splitlines()}
    assert "2,930,712 params" in lines["joint"] and "classes: normal, benign, in situ, invasive" in lines["joint"]
    assert "2,930,548 params" in lines["fresh-joint"]
    assert lines["fresh-unet"].split()[1] == "unet"
