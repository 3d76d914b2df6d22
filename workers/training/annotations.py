"""Annotations of training patches: class names, label-mask images, and QuPath GeoJSON
polygons rasterised exactly onto a patch grid (``workers.training.data`` reads them).

A label mask image holds one channel of class indices (255 = unannotated), or RGB in
the classes' colours (other colours = unannotated). A GeoJSON is what QuPath exports: a
FeatureCollection or a list of Features, class from ``properties.classification.name``
(else ``properties.name``), level-0 pixel coordinates, interior rings as holes; a pixel
takes a polygon's class when its centre lies inside it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np

from models.card import ClassSpec
from models.metrics import IGNORE
from models.patches import TrainingDataInvalid

log = logging.getLogger(__name__)


def _hex_rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def class_index(value: str, classes: Sequence[ClassSpec]) -> int:
    """A class given by name (case-insensitive) or index."""
    names = [c.name.lower() for c in classes]
    v = value.strip()
    if v.lower() in names:
        return names.index(v.lower())
    if v.isdigit() and int(v) < len(classes):
        return int(v)
    raise TrainingDataInvalid(f"unknown class {value!r}; classes: {', '.join(c.name for c in classes)}")


def read_mask_image(path: Path, classes: Sequence[ClassSpec]) -> np.ndarray:
    """A label image as class indices: one channel as is, RGB by the classes' colours."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise TrainingDataInvalid(f"cannot read mask {str(path)!r}")
    if image.ndim == 2:
        return image.astype(np.uint8)
    rgb = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)
    out = np.full(rgb.shape[:2], IGNORE, np.uint8)
    for index, spec in enumerate(classes):
        out[(rgb == np.array(_hex_rgb(spec.color), np.uint8)).all(axis=-1)] = index
    return out


@dataclass(frozen=True)
class Polygon:
    """One annotated polygon in level-0 pixels: exterior ring and holes."""

    class_index: int
    exterior: np.ndarray  # (n, 2) float x, y
    holes: tuple[np.ndarray, ...] = ()

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        x, y = self.exterior[:, 0], self.exterior[:, 1]
        return float(x.min()), float(y.min()), float(x.max()), float(y.max())


def _feature_class(feature: dict[str, Any]) -> str | None:
    props = feature.get("properties") or {}
    classification = props.get("classification")
    if isinstance(classification, dict) and classification.get("name"):
        return str(classification["name"])
    if isinstance(classification, str):
        return classification
    for key in ("name", "class", "label"):
        if props.get(key):
            return str(props[key])
    return None


def read_geojson(path: Path, classes: Sequence[ClassSpec]) -> list[Polygon]:
    """Polygons of a QuPath GeoJSON export (FeatureCollection, Feature list or Feature)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TrainingDataInvalid(f"cannot read annotations {str(path)!r}: {err}") from err
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, dict):
        features = [data]
    else:
        features = data
    polygons: list[Polygon] = []
    skipped = 0
    for feature in features:
        geometry = (feature or {}).get("geometry") or {}
        kind, coords = geometry.get("type"), geometry.get("coordinates")
        parts: list[Any]
        if kind == "Polygon":
            parts = [coords]
        elif kind == "MultiPolygon":
            parts = cast(list[Any], coords)
        else:
            skipped += 1
            continue
        name = _feature_class(feature)
        if name is None:
            raise TrainingDataInvalid(f"{str(path)!r}: a polygon has no class "
                                      "(properties.classification.name)")
        index = class_index(name, classes)
        for rings in parts:
            if not rings:
                continue
            polygons.append(Polygon(index, np.asarray(rings[0], np.float64)[:, :2],
                                    tuple(np.asarray(r, np.float64)[:, :2] for r in rings[1:])))
    if skipped:
        log.info("%s: skipped %d non-polygon features", path, skipped)
    return polygons


def fill_ring(out: np.ndarray, ring: np.ndarray, value: int) -> None:
    """Set the pixels of ``out`` whose centres lie inside ``ring`` (even-odd rule).

    ``ring`` is (n, 2) x, y in pixel units of ``out`` (pixel (i, j) covers [j, j+1) x
    [i, i+1), centre at j + 0.5, i + 0.5). Exact: a pixel whose centre is outside is never
    touched, unlike ``cv2.fillPoly``, which also paints the pixels its edges cross.
    """
    h, w = out.shape
    x1, y1 = ring[:, 0], ring[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    sloped = y1 != y2
    x1, y1, x2, y2 = x1[sloped], y1[sloped], x2[sloped], y2[sloped]
    if not x1.size:
        return
    r0 = max(0, int(np.floor(min(y1.min(), y2.min()) - 0.5)))
    r1 = min(h, int(np.ceil(max(y1.max(), y2.max()) + 0.5)))
    if r1 <= r0:
        return
    yc = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5
    lo, hi = np.minimum(y1, y2), np.maximum(y1, y2)
    active = (lo <= yc) & (yc < hi)  # (rows, edges): half-open, so vertices count once
    xc = np.where(active, x1 + (yc - y1) * (x2 - x1) / (y2 - y1),
                  np.inf)
    xc.sort(axis=1)
    for row, crossings in zip(range(r0, r1), xc):
        crossings = crossings[np.isfinite(crossings)]
        for a, b in zip(crossings[0::2], crossings[1::2]):
            j0 = max(0, int(np.ceil(a - 0.5)))
            j1 = min(w, int(np.ceil(b - 0.5)))
            if j1 > j0:
                out[row, j0:j1] = value


def rasterize(polygons: Sequence[Polygon], box: tuple[float, float, float, float],
              size: tuple[int, int], fill: int = IGNORE) -> np.ndarray:
    """Polygons painted in order onto a ``size`` (h, w) grid covering the level-0 ``box``
    (x0, y0, x1, y1); a pixel takes a polygon's class when its centre is inside it, and
    holes go back to ``fill``."""
    h, w = size
    x0, y0, x1, y1 = box
    sx, sy = w / (x1 - x0), h / (y1 - y0)
    out = np.full((h, w), fill, np.uint8)

    def grid(points: np.ndarray) -> np.ndarray:
        return np.stack([(points[:, 0] - x0) * sx, (points[:, 1] - y0) * sy], 1)

    for poly in polygons:
        px0, py0, px1, py1 = poly.bbox
        if px1 < x0 or py1 < y0 or px0 > x1 or py0 > y1:
            continue
        fill_ring(out, grid(poly.exterior), poly.class_index)
        for hole in poly.holes:
            fill_ring(out, grid(hole), fill)
    return out
