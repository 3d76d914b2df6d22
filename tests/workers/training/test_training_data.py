"""Training data from disk: tile folders with masks and label CSVs, and real-tissue slides
with QuPath GeoJSON polygons or label masks, rasterised exactly onto the patch grid."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.card import ClassSpec
from models.metrics import IGNORE
from models.patches import TrainingDataInvalid
from workers.training.annotations import read_geojson
from workers.training.data import SlideSource, load_slide_patches, load_tile_folder
from workers.training.segmentation import TrainSpec, load_training_data, make_card, parse_classes
from wsi.array_slide import write_slide_from_array

CLASSES = [ClassSpec(name="background", color="000000"), ClassSpec(name="stroma", color="FF00FF"),
           ClassSpec(name="tumour", color="00FF00")]


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    assert cv2.imwrite(str(path), image)


def test_tile_folder_with_masks_and_label_csv(tmp_path: Path, cmu_rgb: np.ndarray) -> None:
    tiles = tmp_path / "tiles"
    rng = np.random.default_rng(0)
    for i in range(3):  # patient A: index masks
        _png(tiles / "images" / "A" / f"t{i}.png", cmu_rgb[64 * i:64 * i + 32, 500:532])
        mask = np.full((32, 32), 1, np.uint8)
        mask[: 10 * i] = 2  # tumour on 0%, 31%, 62% of the tile
        mask[0, 0] = IGNORE
        _png(tiles / "masks" / "A" / f"t{i}.png", mask)
    colour = np.zeros((32, 32, 3), np.uint8)  # patient B: an RGB mask in the class colours
    colour[:, :20] = (0, 255, 0)
    colour[:, 20:] = (255, 0, 255)
    _png(tiles / "images" / "B" / "c.png", cmu_rgb[800:832, 600:632])
    _png(tiles / "masks" / "B" / "c.png", colour)
    for i in range(2):  # label-only tiles, labelled in the CSV (one by name, one by index)
        _png(tiles / "images" / f"u{i}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    _png(tiles / "images" / "unused.png", cmu_rgb[:32, :32])  # no mask, no label: skipped
    (tmp_path / "labels.csv").write_text("image,label,patient\nu0.png,Tumour,P9\nu1,1,P9\n")

    data = load_tile_folder(tiles, CLASSES, tile_px=32, labels_csv=tmp_path / "labels.csv")
    assert data.summary() == {"patches": 6, "with_mask": 4, "with_label": 6, "label_only": 2,
                              "groups": 3}
    assert set(data.groups) == {"A", "B", "P9"}
    assert (data.boxes == -1).all()  # tiles from a folder: no place on a slide
    a = np.flatnonzero(data.groups == "A")
    assert data.labels[a].tolist() == [1, 1, 2]  # the majority class
    b = np.flatnonzero(data.groups == "B")[0]
    assert (data.masks[b][:, :20] == 2).all() and (data.masks[b][:, 20:] == 1).all()
    assert data.masks[a[0]][0, 0] == IGNORE
    p9 = np.flatnonzero(data.groups == "P9")
    assert sorted(data.labels[p9].tolist()) == [1, 2] and not data.has_mask[p9].any()
    with pytest.raises(TrainingDataInvalid, match="takes 64 px tiles"):
        load_tile_folder(tiles, CLASSES, tile_px=64)


@pytest.fixture(scope="module")
def annotated_slide(tmp_path_factory: pytest.TempPathFactory, cmu_rgb: np.ndarray) -> Path:
    """Real H&E, 1024 x 768 at 0.5 µm/px, with a QuPath-style GeoJSON beside it."""
    folder = tmp_path_factory.mktemp("annotated")
    slide = write_slide_from_array(folder / "case1.svs", cmu_rgb[800:1568, 400:1424], mpp=0.5,
                                   flavor="svs", downsamples=(1, 4), compression="deflate").path
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
            [[200, 100], [600, 100], [600, 500], [200, 500], [200, 100]],
            [[300, 300], [400, 300], [400, 400], [300, 400], [300, 300]]]},  # a hole
         "properties": {"objectType": "annotation",
                        "classification": {"name": "Tumour", "color": [0, 255, 0]}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
            [[[700, 100], [900, 100], [900, 300], [700, 300], [700, 100]]]]},
         "properties": {"classification": {"name": "Stroma"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 10]},
         "properties": {"classification": {"name": "Stroma"}}},
    ]
    (folder / "case1.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                      "features": features}))
    return slide


def _mosaic(data, n_cols: int, patch: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    rows = [np.concatenate(list(data.masks[r * n_cols:(r + 1) * n_cols]), axis=1)
            for r in range(len(data) // n_cols)]
    return np.concatenate(rows, axis=0)


def test_geojson_polygons_rasterise_exactly(annotated_slide: Path) -> None:
    polygons = read_geojson(annotated_slide.with_suffix(".geojson"), CLASSES)
    assert [p.class_index for p in polygons] == [2, 1]  # the point is skipped
    source = SlideSource(annotated_slide, annotated_slide.with_suffix(".geojson"))
    # 1 µm/px: level-0 x maps to x / 2; a grid pixel is in a polygon when its centre is
    data = load_slide_patches(source, CLASSES, mpp=1.0, patch_px=64, min_tissue=0.0,
                              unannotated="background")
    assert len(data) == 8 * 6 and data.has_mask.all()
    mosaic = _mosaic(data, 8, 64)
    expected = np.zeros((384, 512), np.uint8)
    expected[50:250, 100:300] = 2
    expected[150:200, 150:200] = 0  # the hole
    expected[50:150, 350:450] = 1
    assert np.array_equal(mosaic, expected)
    # unannotated pixels are ignored by default; patches with no annotation are dropped
    ignored = load_slide_patches(source, CLASSES, mpp=1.0, patch_px=64, min_tissue=0.0)
    assert len(ignored) < len(data) and (ignored.masks == IGNORE).any()
    assert set(np.unique(ignored.masks)) <= {1, 2, IGNORE}
    assert ignored.groups[0] == "case1"


def test_label_mask_beside_the_slide_and_tissue_threshold(annotated_slide: Path, tmp_path: Path) -> None:
    label_image = np.zeros((192, 256), np.uint8)  # a quarter of level 0 (1024 x 768)
    label_image[:, 128:] = 1
    label_image[96:, 128:] = 2
    mask_path = tmp_path / "case1.mask.png"
    _png(mask_path, label_image)
    source = SlideSource(annotated_slide, mask_path, group="patient-1")
    data = load_slide_patches(source, CLASSES, mpp=2.0, patch_px=64, min_tissue=0.0,
                              label_rule=(0, 0.5, 0.2))
    assert len(data) == 4 * 3 and set(data.groups) == {"patient-1"}
    # each patch knows its place on the 2 µm/px grid, row by row
    assert data.boxes.tolist() == [[x, y, 64, 64] for y in (0, 64, 128) for x in (0, 64, 128, 192)]
    # the 2 µm/px grid is the mask's own grid: the patches tile it exactly
    assert np.array_equal(_mosaic(data, 4, 64), label_image)
    assert data.labels.tolist() == [0, 0, 1, 1] * 1 + [0, 0, 2, 2] * 2
    strict = load_slide_patches(source, CLASSES, mpp=2.0, patch_px=64, min_tissue=0.75)
    assert 0 < len(strict) < len(data)  # only patches inside the tissue mask


def test_group_split_and_manifest(annotated_slide: Path, tmp_path: Path) -> None:
    card = make_card("joint", name="t", classes=CLASSES, target_mpp=2.0, tile_px=64)
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"slide,annotations,patient,split\n{annotated_slide},"
                        f"{annotated_slide.with_suffix('.geojson')},p1,train\n"
                        f"{annotated_slide},{annotated_slide.with_suffix('.geojson')},p2,val\n")
    spec = TrainSpec(architecture="joint", out_dir=tmp_path / "m", manifest=manifest,
                     min_tissue=0.0, unannotated="background")
    train, val = load_training_data(spec, card)
    assert set(train.groups) == {"p1"} and set(val.groups) == {"p2"} and len(train) == len(val)
    assert parse_classes(["a,b", "c:00FF00"])[2].color == "00FF00"
