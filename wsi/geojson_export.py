"""A result as QuPath GeoJSON: one annotation per connected region per class, streamed.

Each class of the argmax class map (``labels/classes``; 0, not computed, is never a
region) and the tissue mask (class ``Tissue``) becomes annotations: one Feature per
8-connected region, a Polygon (or a MultiPolygon where parts touch only at corners),
holes as interior rings, every ring closed, every geometry valid (QuPath 0.6 refuses
self-intersections), coordinates in level-0 slide pixels with the origin at the top
left. Properties follow QuPath's GeoJSON: ``objectType: "annotation"``,
``classification: {name, color: [r, g, b]}``, ``measurements`` (area in µm², mean
probability of the class over the region). A ``joint`` result adds its per-tile class
scores as ``tile`` objects.

Regions are traced band by band from the zarr chunks (:mod:`wsi.regions`) and written
as soon as they are complete, so memory holds one band and the regions still open, not
the slide. Outlines are simplified (Douglas-Peucker, topology kept) with a tolerance in
µm, by default half a result pixel.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
import zarr

from wsi.errors import InvalidParameter
from wsi.ome_zarr import array_at, full_scale, group_at, json_attrs
from wsi.regions import Region, repair, trace_regions
from wsi.result_info import CLASSES_LABEL, TISSUE_LABEL, ResultInfo, read_result_info

log = logging.getLogger(__name__)

TISSUE_CLASS = "Tissue"
AREA_KEY = "Area µm^2"
MEAN_KEY = "Mean probability"
#: Coordinates are written to this many decimals of a level-0 pixel.
DECIMALS = 2
#: Regions finished (simplified, scaled, checked, encoded) at once.
BATCH = 2048
POLYGON, MULTIPOLYGON = 3, 6  # shapely's geometry type ids


def _polygonal(geometry: shapely.Geometry) -> shapely.Geometry | None:
    """Only the areal parts (``make_valid`` may leave lines or points), a one-part
    MultiPolygon as a Polygon; None when nothing areal is left."""
    parts = shapely.get_parts(shapely.get_parts(geometry))  # collection > multi > single
    polygons = [p for p in parts if isinstance(p, shapely.Polygon) and not p.is_empty]
    if not polygons:
        return None
    return polygons[0] if len(polygons) == 1 else shapely.MultiPolygon(polygons)


def finish_geometries(geometries: npt.NDArray[np.object_], *, scale: float,
                      tolerance_px: float, size: tuple[int, int]) -> list[shapely.Geometry | None]:
    """Simplify (result pixels), scale to level-0 pixels, round and clip to the slide,
    all at once; each valid and polygonal, or None where the region vanished."""
    if tolerance_px > 0:
        geometries = shapely.simplify(geometries, tolerance_px, preserve_topology=True)
    bounds = np.array(size, dtype=np.float64)

    def to_level0(coords: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.clip(np.round(coords * scale, DECIMALS), 0.0, bounds)

    geometries = repair(shapely.transform(geometries, to_level0))
    kinds = shapely.get_type_id(geometries)
    parts = shapely.get_num_geometries(geometries)
    plain = (kinds == POLYGON) | ((kinds == MULTIPOLYGON) & (parts > 1))
    return [g if ok else _polygonal(g) for g, ok in zip(geometries, plain, strict=True)]


def feature_text(geometry_json: str, object_type: str, classification: str,
                 measurements: dict[str, float]) -> str:
    """One QuPath GeoJSON Feature as JSON text (``classification``: its JSON)."""
    values = ",".join(f"{json.dumps(k, ensure_ascii=False)}:"
                      f"{(repr(round(v, 6)) if math.isfinite(v) else 'null')}"
                      for k, v in measurements.items())
    return (f'{{"type":"Feature","geometry":{geometry_json},"properties":{{"objectType":'
            f'"{object_type}","classification":{classification},"isLocked":false,'
            f'"measurements":{{{values}}}}}}}')


def classification_json(name: str, rgb: Sequence[int]) -> str:
    return json.dumps({"name": name, "color": [int(c) for c in rgb]}, ensure_ascii=False)


def feature(geometry: shapely.Geometry, object_type: str, name: str,
            rgb: Sequence[int], measurements: dict[str, float]) -> str:
    """One QuPath GeoJSON Feature as JSON text."""
    return feature_text(str(shapely.to_geojson(geometry)), object_type,
                        classification_json(name, rgb), measurements)


class _Band:
    """Reads rows of a (y, x) or (c, y, x) level-0 array as numpy."""

    def __init__(self, array: Any, channel: int | None = None) -> None:
        self.array, self.channel = array, channel

    def __call__(self, y0: int, y1: int) -> npt.NDArray[Any]:
        if self.channel is None:
            return np.asarray(self.array[y0:y1, :])
        return np.asarray(self.array[self.channel, y0:y1, :])


def _batches(regions: Iterator[Region], size: int) -> Iterator[list[Region]]:
    batch: list[Region] = []
    for region in regions:
        batch.append(region)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _region_features(regions: Iterator[Region], info: ResultInfo, names: dict[int, str],
                     colours: dict[int, tuple[int, int, int]], tolerance_px: float,
                     min_area_um2: float, with_mean: bool) -> Iterator[str]:
    pixel_um2 = info.output_mpp ** 2
    classifications = {v: classification_json(names[v], colours[v]) for v in names}
    for batch in _batches(regions, BATCH):
        kept = [r for r in batch if r.pixels * pixel_um2 >= min_area_um2]
        if not kept:
            continue
        geometries = finish_geometries(np.asarray([r.geometry for r in kept], dtype=object),
                                       scale=info.scale, tolerance_px=tolerance_px,
                                       size=info.level0_size)
        present = [g is not None for g in geometries]
        texts = iter(shapely.to_geojson(np.asarray(
            [g for g in geometries if g is not None], dtype=object)).tolist())
        for region, ok in zip(kept, present, strict=True):
            if not ok:
                continue
            measurements = {AREA_KEY: region.pixels * pixel_um2}
            if with_mean:
                measurements[MEAN_KEY] = region.weight_sum / max(1, region.pixels)
            yield feature_text(next(texts), "annotation", classifications[region.value],
                               measurements)


def _tile_features(root: zarr.Group, info: ResultInfo) -> Iterator[str]:
    """A joint result's per-tile class scores as QuPath tiles: each the square of one
    tile stride around the tile's kept centre, classified by its highest score."""
    if "tile_scores/0" not in root or info.slide_mpp is None:
        return
    group = group_at(root, "tile_scores")
    transforms = json_attrs(group)["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    stride_um = float(transforms[0]["scale"][-1])
    offset_um = float(transforms[1]["translation"][-1]) if len(transforms) > 1 else 0.0
    scores = np.asarray(array_at(group, "0"))
    width, height = info.level0_size
    half = stride_um / 2 / info.slide_mpp
    for row, col in zip(*np.nonzero(np.isfinite(scores).all(axis=0)), strict=True):
        cx = (offset_um + col * stride_um) / info.slide_mpp
        cy = (offset_um + row * stride_um) / info.slide_mpp
        box = shapely.box(max(0.0, cx - half), max(0.0, cy - half),
                          min(float(width), cx + half), min(float(height), cy + half))
        values = scores[:, row, col].astype(float)
        best = info.classes[int(values.argmax())]
        measurements = {f"Score {c.name}": float(v) for c, v in zip(info.classes, values,
                                                                       strict=True)}
        yield feature(box, "tile", best.name, best.rgb, measurements)


def iter_geojson(result: Path, *, classes: Sequence[str] | None = None, tissue: bool = True,
                 simplify_um: float | None = None, min_area_um2: float = 0.0,
                 tiles: bool = True) -> Iterator[str]:
    """The QuPath GeoJSON FeatureCollection of ``result``, as pieces of text.

    ``classes``: the classes to export (default all); ``tissue``: the tissue outline as
    class ``Tissue``; ``simplify_um``: outline tolerance (default half a result pixel,
    0 keeps every pixel corner); ``min_area_um2``: drop smaller regions; ``tiles``: a
    joint result's tile scores."""
    root, info = read_result_info(result)
    if CLASSES_LABEL + "/0" not in root:
        raise InvalidParameter("this result has no class map (labels/classes): nothing to export")
    tolerance_um = info.output_mpp / 2 if simplify_um is None else simplify_um
    if tolerance_um < 0 or not math.isfinite(tolerance_um):
        raise InvalidParameter(f"simplify_um must be >= 0, got {simplify_um}")
    tolerance_px = tolerance_um / info.output_mpp
    wanted = list(info.classes) if classes is None else [info.class_named(n) for n in classes]
    yield '{"type":"FeatureCollection","features":[\n'
    first = True

    def emit(text: str) -> str:
        nonlocal first
        out = text if first else ",\n" + text
        first = False
        return out

    labels = array_at(root, CLASSES_LABEL + "/0")
    probabilities = array_at(root, "0")
    rows = int(labels.chunks[0])
    if wanted:
        regions = trace_regions(
            _Band(labels), height=info.height, width=info.width,
            values=[c.value for c in wanted], rows=rows,
            weights=lambda value, y0, y1: _Band(probabilities, value - 1)(y0, y1),
            weight_scale=1.0 / full_scale(probabilities.dtype),
        )
        names = {c.value: c.name for c in wanted}
        colours = {c.value: c.rgb for c in wanted}
        for text in _region_features(regions, info, names, colours, tolerance_px,
                                     min_area_um2, with_mean=True):
            yield emit(text)
    if tissue and TISSUE_LABEL + "/0" in root:
        mask = array_at(root, TISSUE_LABEL + "/0")
        regions = trace_regions(_Band(mask), height=info.height, width=info.width,
                                values=[1], rows=int(mask.chunks[0]))
        for text in _region_features(regions, info, {1: TISSUE_CLASS}, {1: info.tissue_rgb},
                                     tolerance_px, min_area_um2, with_mean=False):
            yield emit(text)
    if tiles:
        for text in _tile_features(root, info):
            yield emit(text)
    yield "\n]}\n"


def export_geojson(result: Path, out: Path, **options: Any) -> int:
    """Write :func:`iter_geojson` to ``out`` (through a temporary name); returns the
    number of features."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    count = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for text in iter_geojson(result, **options):
            count += text.startswith(('{"type":"Feature"', ',\n{"type":"Feature"'))
            fh.write(text)
    tmp.replace(out)
    log.info("wrote %s: %d features", out, count)
    return count
