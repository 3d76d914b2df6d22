"""What a pathologist takes away from a real engine result: QuPath GeoJSON (checked with
shapely against the class map), the slide report, and honest heatmaps.

The results are real runs of the engine over ``rect_svs`` (8000 x 6000 px at 0.5 µm/px):
``identity`` at 4 µm/px (class = the strongest RGB channel: pink tissue and glass are
``red``, the purple block B is ``blue``, so the red region has B as a hole), and a freshly
initialised ``joint`` model at 8 µm/px for the per-tile scores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
import zarr
from shapely.geometry import shape

from tests.data import BuiltSlide
from tests.result_scenes import SLIDE_MPP, write_square_result
from workers.engine.run import run_engine
from workers.engine.spec import RunSpec
from wsi.geojson_export import AREA_KEY, MEAN_KEY, TISSUE_CLASS, export_geojson, iter_geojson
from wsi.heatmap import NOT_ANALYSED_GREY, TITLE_PX, render_heatmap
from wsi.summary import TILE_AGGREGATION, reports_csv, summarize

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def identity_result(rect_svs: BuiltSlide, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("outputs") / "identity.zarr"
    run_engine(RunSpec(slide_path=rect_svs.path, model="identity", out_path=out,
                       target_mpp=4.0, device="cpu"))
    return out


@pytest.fixture(scope="module")
def joint_result(rect_svs: BuiltSlide, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.training.segmentation import init_model

    folder = tmp_path_factory.mktemp("joint")
    card, _ = init_model("joint", folder / "joint-test", target_mpp=8.0, tile_px=64)
    out = folder / "joint.zarr"
    run_engine(RunSpec(slide_path=rect_svs.path, model=str(card), out_path=out, device="cpu"))
    return out


def _features(path: Path) -> list[dict]:
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    return collection["features"]


def test_geojson_regions_are_valid_and_match_the_class_map(identity_result: Path,
                                                           rect_svs: BuiltSlide,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "identity.geojson"
    count = export_geojson(identity_result, out)
    features = _features(out)
    assert count == len(features) > 3
    root = zarr.open_group(str(identity_result), mode="r")
    labels = np.asarray(root["labels/classes/0"])
    tissue = np.asarray(root["labels/tissue/0"])
    width0, height0 = rect_svs.info.dimensions
    um2_per_level0_px = 0.5 ** 2
    areas: dict[str, float] = {}
    for f in features:
        props = f["properties"]
        geometry = shape(f["geometry"])
        assert props["objectType"] == "annotation"
        assert geometry.is_valid, shapely.is_valid_reason(geometry)
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        if f["geometry"]["type"] == "MultiPolygon":
            assert len(f["geometry"]["coordinates"]) > 1  # one part is written as a Polygon
        polygons = ([f["geometry"]["coordinates"]] if f["geometry"]["type"] == "Polygon"
                    else f["geometry"]["coordinates"])
        for polygon in polygons:
            for ring in polygon:
                assert ring[0] == ring[-1] and len(ring) >= 4  # closed rings
        x0, y0, x1, y1 = geometry.bounds
        assert 0 <= x0 and 0 <= y0 and x1 <= width0 and y1 <= height0
        name = props["classification"]["name"]
        areas[name] = areas.get(name, 0.0) + geometry.area * um2_per_level0_px
        assert props["measurements"][AREA_KEY] > 0
        if name != TISSUE_CLASS:
            assert 0 <= props["measurements"][MEAN_KEY] <= 1
    colours = {f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"]
               for f in features}
    assert colours["red"] == [255, 0, 0] and colours["blue"] == [0, 0, 255]
    # every class's polygons cover its class-map area within 1% (4 µm/px: 16 µm² a pixel)
    for value, name in ((1, "red"), (2, "green"), (3, "blue")):
        expected = float((labels == value).sum()) * 16.0
        if expected:
            assert areas[name] == pytest.approx(expected, rel=0.01), name
    assert areas[TISSUE_CLASS] == pytest.approx(float(tissue.sum()) * 16.0, rel=0.01)
    # the purple block B (2400, 1600, 800 x 600 µm) is blue, a hole in the red region
    (red,) = [shape(f["geometry"]) for f in features
              if f["properties"]["classification"]["name"] == "red"
              and shape(f["geometry"]).area > 1e6]
    block_b = shapely.box(4800, 3200, 6400, 4400)  # level-0 px
    holes = [shapely.Polygon(r) for r in red.interiors]
    assert any(h.intersection(block_b).area > 0.95 * block_b.area for h in holes)
    assert not red.contains(block_b.centroid)


def test_geojson_of_a_joint_result_has_tile_scores(joint_result: Path) -> None:
    text = "".join(iter_geojson(joint_result))
    features = json.loads(text)["features"]
    tiles = [f for f in features if f["properties"]["objectType"] == "tile"]
    scores = np.asarray(zarr.open_group(str(joint_result), mode="r")["tile_scores/0"])
    assert len(tiles) == int(np.isfinite(scores).all(axis=0).sum()) > 0
    names = ["normal", "benign", "in situ", "invasive"]
    for f in tiles:
        measured = f["properties"]["measurements"]
        assert set(measured) == {f"Score {n}" for n in names}
        assert f["properties"]["classification"]["name"] == max(measured, key=measured.get)[6:]
        assert shape(f["geometry"]).is_valid
    # the summary names how it aggregates them, and its scores are their mean
    report = summarize(joint_result)
    slide_scores = report["slide_scores"]
    assert slide_scores["aggregation"] == TILE_AGGREGATION and slide_scores["tiles"] == len(tiles)
    mean = [np.mean([f["properties"]["measurements"][f"Score {n}"] for f in tiles]) for n in names]
    assert [slide_scores["scores"][n] for n in names] == pytest.approx(mean, abs=1e-5)


def test_a_ring_region_keeps_its_hole_and_exact_area(tmp_path: Path) -> None:
    """Synthetic squares, a third with a hole not computed (0): every hole comes back as
    an interior ring; areas are exact when nothing is simplified."""
    result = tmp_path / "squares.zarr"
    write_square_result(result, height=300, width=420, pitch=60, gap=10, chunk_px=128)
    features = _features(tmp_path / "s.geojson") if export_geojson(
        result, tmp_path / "s.geojson", simplify_um=0) else []
    labels = np.asarray(zarr.open_group(str(result), mode="r")["labels/classes/0"])
    n_squares = (300 // 60) * (420 // 60)
    assert len(features) == n_squares
    holed = [shape(f["geometry"]) for f in features if shape(f["geometry"]).interiors]
    n_holed = cv2.connectedComponents((labels == 0).astype(np.uint8))[0] - 2  # minus outside
    assert len(holed) == n_holed > 0
    scale = (0.5 / SLIDE_MPP) ** 2  # level-0 px per result px
    total = sum(shape(f["geometry"]).area for f in features)
    assert total == float((labels > 0).sum()) * scale


def test_geojson_export_memory_stays_bounded(tmp_path: Path) -> None:
    """A result of 4096 x 4096 px with 16 384 regions (50 MB of probabilities and labels
    uncompressed) is exported by a process whose peak memory grows by less than that:
    one band and the open regions at a time (bench/geojson.py measures larger ones)."""
    result = tmp_path / "big.zarr"
    write_square_result(result, height=4096, width=4096, pitch=32, gap=4)
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from wsi.geojson_export import export_geojson\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "n = export_geojson(Path(sys.argv[1]), Path(sys.argv[2]))\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(n, before // 1024, after // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(result), str(tmp_path / "big.geojson")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    n, before_mb, after_mb = (int(v) for v in done.stdout.split())
    assert n == (4096 // 32) ** 2
    assert after_mb - before_mb < 50, (before_mb, after_mb)


def test_summary_matches_the_arrays(identity_result: Path) -> None:
    report = summarize(identity_result)
    root = zarr.open_group(str(identity_result), mode="r")
    labels = np.asarray(root["labels/classes/0"])
    tissue = np.asarray(root["labels/tissue/0"]) > 0
    probabilities = np.asarray(root["0"]) / 255.0
    mm2 = 16.0 / 1e6
    assert report["tissue_area_mm2"] == pytest.approx(tissue.sum() * mm2)
    assert report["analysed_area_mm2"] == pytest.approx((labels > 0).sum() * mm2)
    # the tissue of rect_svs: blocks A, B, the frame (its hole filled) and no speck
    assert report["tissue_area_mm2"] == pytest.approx(0.96 + 0.48 + 0.36, rel=0.02)
    for value, cls in enumerate(report["classes"], start=1):
        assert cls["area_mm2"] == pytest.approx((labels == value).sum() * mm2)
        assert cls["share_of_tissue"] == pytest.approx(((labels == value) & tissue).sum()
                                                       / tissue.sum(), abs=1e-6)
        mean = probabilities[value - 1][labels > 0].mean()
        assert cls["mean_probability"] == pytest.approx(mean, abs=1e-6)
    text = reports_csv([{**report, "job_id": "j1", "status": "succeeded"},
                        {"job_id": "j2", "status": "failed", "error": "no tissue"}])
    lines = text.splitlines()
    assert len(lines) == 3 and "red_area_mm2" in lines[0] and lines[2].startswith("j2,")


def test_heatmap_leaves_what_was_not_analysed_untouched(identity_result: Path,
                                                        tmp_path: Path) -> None:
    heat = render_heatmap(identity_result, class_name="blue", max_px=500)
    root = zarr.open_group(str(identity_result), mode="r")
    picture = heat[TITLE_PX:-28]
    h, w = picture.shape[:2]
    thumb = cv2.resize(np.moveaxis(np.asarray(root["thumbnail/0"]), 0, -1), (w, h),
                       interpolation=cv2.INTER_AREA)
    labels = np.asarray(root["labels/classes/1"])
    computed = cv2.resize((labels > 0).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    outside = cv2.erode((computed == 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    inside = cv2.erode((computed == 1).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert outside.sum() > 1000 and inside.sum() > 1000
    np.testing.assert_array_equal(picture[outside], thumb[outside])  # the slide, untouched
    assert np.abs(picture[inside].astype(int) - thumb[inside]).mean() > 20  # coloured
    assert (heat[:TITLE_PX] < 128).any()  # a title is written
    bare = render_heatmap(identity_result, class_name="blue", max_px=500, overlay=False)
    assert (bare[TITLE_PX:-28][outside] == NOT_ANALYSED_GREY).all()
    # a run that analysed nothing says so in the title strip, in red
    copy = tmp_path / "warned.zarr"
    subprocess.run(["cp", "-r", str(identity_result), str(copy)], check=True)
    group = zarr.open_group(str(copy), mode="r+")
    group.attrs["slidepipe"] = {**group.attrs["slidepipe"],
                                "warnings": ["no tile was planned: no tissue found"]}
    warned = render_heatmap(copy, class_name="blue", max_px=500)
    red = (warned[:TITLE_PX, :, 0] > 150) & (warned[:TITLE_PX, :, 1] < 80)
    assert red.sum() > 50 and not ((heat[:TITLE_PX, :, 0] > 150)
                                   & (heat[:TITLE_PX, :, 1] < 80)).any()
