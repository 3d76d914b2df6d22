"""Training from several annotators (``slidepipe train ... --aggregate``): tile folders
with a mask folder per annotator and CSV labels with an annotator column, slides with a
GeoJSON or a label mask per annotator, and the card, ``training.json`` and
``slidepipe models show`` reporting each annotator's alpha, beta and spammer score."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from models.card import ClassSpec, read_card
from models.metrics import IGNORE
from models.patches import TrainingDataInvalid
from models.stain import stain_pseudo_labels
from service.cli import main
from workers.training.crowd_data import load_crowd_slide, load_crowd_tile_folder
from workers.training.data import SlideSource
from wsi.array_slide import write_slide_from_array

CLASSES = [ClassSpec(name="background", color="000000"), ClassSpec(name="stroma", color="FF00FF"),
           ClassSpec(name="nuclei", color="00FF00")]
CLASS_ARG = "background:000000,stroma:FF00FF,nuclei:00FF00"


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    assert cv2.imwrite(str(path), image)


@pytest.fixture(scope="module")
def crowd_tiles(tmp_path_factory: pytest.TempPathFactory, cmu_rgb: np.ndarray) -> Path:
    """12 real H&E tiles of 32 px at 2 µm/px in two patients; annotators: ``ann`` (the
    stain labels, every tile), ``bob`` (the stain labels with a tenth of the pixels one
    class off, the first 8 tiles), ``spam`` (nuclei everywhere, the last 8); two more
    label-only tiles labelled in a CSV by ann and spam."""
    folder = tmp_path_factory.mktemp("crowd") / "tiles"
    small = cv2.resize(cmu_rgb[704:1088, 1280:1792], None, fx=0.25, fy=0.25,
                       interpolation=cv2.INTER_AREA)
    labels, _ = stain_pseudo_labels(small)
    rng = np.random.default_rng(0)
    n = 0
    for y in range(0, 96, 32):
        for x in range(0, 128, 32):
            patient = "p1" if y < 64 else "p2"
            rel = f"{patient}/t{n}.png"
            truth = labels[y:y + 32, x:x + 32]
            _png(folder / "images" / rel, small[y:y + 32, x:x + 32])
            _png(folder / "masks" / "ann" / rel, truth)
            if n < 8:
                off = np.where(rng.random(truth.shape) < 0.1, (truth + 1) % 3, truth)
                _png(folder / "masks" / "bob" / rel, off.astype(np.uint8))
            if n >= 4:
                _png(folder / "masks" / "spam" / rel, np.full_like(truth, 2))
            n += 1
    for i in range(2):
        _png(folder / "images" / f"u{i}.png", small[:32, 32 * i:32 * i + 32])
    (folder.parent / "labels.csv").write_text(
        "image,label,annotator,patient\nu0.png,stroma,ann,p3\nu0.png,nuclei,spam,p3\n"
        "u1.png,background,ann,p3\nu1.png,,spam,p3\n")
    return folder


def test_tile_folder_with_a_mask_folder_per_annotator_and_a_csv(crowd_tiles: Path) -> None:
    data, crowd = load_crowd_tile_folder(crowd_tiles, CLASSES, tile_px=32,
                                         labels_csv=crowd_tiles.parent / "labels.csv")
    assert crowd.annotators == ("ann", "bob", "spam") and len(data) == len(crowd) == 14
    # patch labels are the majority of the annotators' (ties: none), so fewer than 14
    ties = [i for i in range(14) if data.labels[i] < 0]
    assert data.summary() == {"patches": 14, "with_mask": 12, "with_label": 14 - len(ties),
                              "label_only": 1, "groups": 3}
    for i in ties:
        votes = crowd.labels[i][crowd.labels[i] >= 0]
        assert len(votes) and np.bincount(votes).max() * 2 <= len(votes)  # a tie indeed
    first = 0  # p1/t0: ann and bob, not spam
    ann = cv2.imread(str(crowd_tiles / "masks" / "ann" / "p1" / "t0.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(crowd.masks[first, ..., 0], ann)
    assert (crowd.masks[first, ..., 2] == IGNORE).all()
    # two votes: the vote where ann and bob agree, no majority where they do not
    agree = crowd.masks[first, ..., 0] == crowd.masks[first, ..., 1]
    assert np.array_equal(data.masks[first][agree], ann[agree])
    assert (data.masks[first][~agree] == IGNORE).all() and (~agree).any()
    # t4 has three votes: ann, bob and spam (nuclei) -> two of three decide every pixel
    t4 = 4
    assert (data.masks[t4] != IGNORE).all()
    # patch labels per annotator: from each one's mask, or the CSV (a blank: unlabelled)
    u0, u1 = 12, 13
    assert crowd.labels[u0].tolist() == [1, -1, 2] and crowd.labels[u1].tolist() == [0, -1, -1]
    assert data.labels[u0] == -1 and data.labels[u1] == 0  # a tie, a single vote
    assert not data.has_mask[u0] and (crowd.masks[u0] == IGNORE).all()
    assert crowd.labels[t4, 2] == 2  # spam's mask is all nuclei
    assert crowd.summary()["spam"] == {"patches": 9, "pixels": 8 * 32 * 32}


@pytest.fixture(scope="module")
def crowd_slide(tmp_path_factory: pytest.TempPathFactory, cmu_rgb: np.ndarray) -> Path:
    """Real H&E, 512 x 384 at 0.5 µm/px, with a GeoJSON of one annotator and a label
    mask of another in ``case.annotators/``."""
    folder = tmp_path_factory.mktemp("crowd-slide")
    slide = write_slide_from_array(folder / "case.svs", cmu_rgb[800:1184, 400:912], mpp=0.5,
                                   flavor="svs", downsamples=(1, 4), compression="deflate").path
    annotators = folder / "case.annotators"
    annotators.mkdir()
    polygon = {"type": "Feature", "properties": {"classification": {"name": "Nuclei"}},
               "geometry": {"type": "Polygon", "coordinates": [
                   [[0, 0], [256, 0], [256, 128], [0, 128], [0, 0]]]}}
    (annotators / "alice.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                          "features": [polygon]}))
    label_image = np.full((96, 128), IGNORE, np.uint8)  # a quarter of level 0
    label_image[:, 64:] = 1
    _png(annotators / "bob.mask.png", label_image)
    return slide


def test_slide_with_a_file_per_annotator(crowd_slide: Path) -> None:
    data, crowd = load_crowd_slide(SlideSource(crowd_slide), CLASSES, mpp=2.0, patch_px=32,
                                   min_tissue=0.0)
    assert crowd.annotators == ("alice", "bob")
    # 4 x 3 patches of 32 px at 2 µm/px; alice drew the top-left 64 x 32, bob the right half
    assert data.boxes.tolist() == [[x, y, 32, 32] for y in (0, 32, 64) for x in (0, 32, 64, 96)
                                   if x >= 64 or y == 0]
    by_box = {tuple(b[:2]): i for i, b in enumerate(data.boxes.tolist())}
    assert (crowd.masks[by_box[(0, 0)], ..., 0] == 2).all()
    assert (crowd.masks[by_box[(0, 0)], ..., 1] == IGNORE).all()
    assert (crowd.masks[by_box[(64, 32)], ..., 1] == 1).all()
    assert (data.masks[by_box[(64, 32)]] == 1).all() and set(data.groups) == {"case"}
    with pytest.raises(TrainingDataInvalid, match="other.annotators"):
        load_crowd_slide(SlideSource(crowd_slide.with_name("other.svs")), CLASSES, mpp=2.0,
                         patch_px=32)


def _train(*args: str) -> str:
    result = CliRunner().invoke(main, ["train", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_train_unet_with_aggnet_records_the_annotators(crowd_tiles: Path,
                                                        tmp_path: Path) -> None:
    common = ["unet", "--tiles", str(crowd_tiles), "--classes", CLASS_ARG, "--mpp", "2",
              "--tile-size", "32", "--steps", "4", "--batch-size", "4", "--val-fraction", "0.5",
              "--eval-every", "4", "--device", "cpu", "--quiet", "--encoder", "resnet18"]
    out = tmp_path / "aggnet"
    text = _train(*common, "--out", str(out), "--aggregate", "aggnet", "--em-every", "2")
    assert "models show" in text
    card = read_card(out)
    assert card.crowd is not None and card.crowd.aggregate == "aggnet"
    rows = {a.name: a for a in card.crowd.annotators}
    assert set(rows) <= {"ann", "bob", "spam"} and {a.level for a in rows.values()} == {"pixel"}
    spam = rows["spam"]
    assert spam.sensitivity["nuclei"] > 0.99 and spam.specificity["nuclei"] < 0.01
    assert max(spam.spammer_score.values()) < 0.01
    summary = json.loads((out / "training.json").read_text())
    crowd = summary["crowd"]
    assert crowd["aggregate"] == "aggnet" and crowd["em_rounds"] == 2 and crowd["em_every"] == 2
    assert crowd["validation_against"] == "majority vote"
    assert [a["name"] for a in crowd["annotators"]] == [a.name for a in card.crowd.annotators]
    assert summary["spec"]["aggregate"] == "aggnet" and summary["spec"]["em_every"] == 2

    shown = CliRunner().invoke(main, ["models", "show", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "annotators (aggnet" in shown.output and "spam" in shown.output
    assert "nuclei 1.00/0.00/S=0.00" in shown.output

    # the same with a majority vote: alpha and beta are each one's agreement with it
    majority = tmp_path / "majority"
    _train(*common, "--out", str(majority), "--aggregate", "majority")
    card = read_card(majority)
    assert card.crowd is not None and card.crowd.aggregate == "majority"
    rows = {a.name: a for a in card.crowd.annotators}
    assert set(rows) == {"ann", "bob", "spam"} and {a.level for a in rows.values()} == {"pixel"}
    assert rows["spam"].sensitivity["nuclei"] > 0.99 and rows["spam"].specificity["nuclei"] < 0.01
    assert rows["ann"].sensitivity["stroma"] > 0.9  # ann votes on every pixel: the vote's side
    assert json.loads((majority / "training.json").read_text())["crowd"]["em_rounds"] is None
    plain = CliRunner().invoke(main, ["models", "show", "unet"])
    assert plain.exit_code == 0 and "no annotators recorded" in plain.output
    # AggNet's targets are not the majority vote the Dice term would compare with
    mixed = CliRunner().invoke(main, ["train", *common, "--out", str(tmp_path / "x"),
                                      "--aggregate", "aggnet", "--dice-weight", "0.5"])
    assert mixed.exit_code == 1 and "does not combine" in mixed.output


def test_train_joint_aggregates_tile_labels_too(crowd_tiles: Path, tmp_path: Path) -> None:
    out = tmp_path / "joint"
    _train("joint", "--tiles", str(crowd_tiles), "--labels", str(crowd_tiles.parent / "labels.csv"),
           "--classes", CLASS_ARG, "--mpp", "2", "--tile-size", "32", "--steps", "2",
           "--batch-size", "4", "--lr", "1e-3", "--val-fraction", "0", "--device", "cpu",
           "--quiet", "--out", str(out), "--aggregate", "aggnet",
           "--gold-annotator", "ann", "--gold-weight", "1")
    card = read_card(out)
    # one EM round per epoch by default: 14 patches at 4 a batch, 2 steps: none yet
    assert json.loads((out / "training.json").read_text())["crowd"]["em_every"] == 4
    assert card.crowd is not None
    levels = {(a.name, a.level): a for a in card.crowd.annotators}
    assert {("ann", "tile"), ("spam", "tile"), ("ann", "pixel")} <= set(levels)
    # ann is the gold standard: right by definition, at both levels
    assert min(levels[("ann", "pixel")].sensitivity.values()) > 0.99
    assert min(levels[("ann", "tile")].specificity.values()) > 0.99
