"""Reading training data from disk into a :class:`models.seg_training.PatchDataset`.

Three sources, freely combined:

Tile folders
    ``DIR/images/**/<name>.(png|jpg|jpeg|tif|tiff)``, all the model's tile size, and
    optionally ``DIR/masks/**/<name>.png`` (same relative path and stem): one channel of
    class indices (255 = unannotated), or RGB in the classes' colours (other colours =
    unannotated). A patch's group (patient/slide, for the split) is its first subfolder
    under ``images/`` (``images/patient7/t1.png`` -> ``patient7``), else the CSV's.
A CSV of patch labels
    columns ``image`` (path under ``images/``, or the stem) and ``label`` (class name or
    index), optional ``group`` (or ``patient`` / ``slide``). Listed tiles without a
    mask train the classification only (``joint``).
Slides with annotations
    a slide plus a GeoJSON of polygons as QuPath exports them (a FeatureCollection or a
    list of Features; class from ``properties.classification.name``, else
    ``properties.name``; level-0 pixel coordinates; interior rings are holes), or a
    label mask image of the whole slide (class indices, any resolution with the slide's
    aspect ratio). Patches of ``patch_px`` at ``mpp`` are cut on a ``stride_px`` grid
    where the tissue mask covers at least ``min_tissue`` (75% by default, as in Ciga &
    Martel); unannotated pixels are ``IGNORE`` unless ``unannotated`` names a class.
    Each slide is its own group unless a manifest names its patient.

A patch's class label is derived from its mask where it has one (see
``models.seg_training.patch_label_from_mask``) unless a CSV gives it.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.card import ClassSpec
from models.metrics import IGNORE
from models.seg_training import PatchDataset, TrainingDataInvalid, patch_label_from_mask
from wsi.images import IMAGE_SUFFIXES, read_rgb_image
from wsi.reader import Slide
from wsi.tiling import tissue_fractions
from wsi.tissue import TissueParams, tissue_mask

log = logging.getLogger(__name__)

GROUP_COLUMNS = ("group", "patient", "slide")

LabelRule = Sequence[float] | None  # per-class minimum fractions, or None for majority


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


# -- tile folders and label CSVs ----------------------------------------------------------
def read_label_csv(path: Path, classes: Sequence[ClassSpec]) -> dict[str, tuple[int, str | None]]:
    """``{image key: (class index, group or None)}``; keys are paths under ``images/``
    without suffix (and, when unique, bare stems)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "image" not in rows[0] or "label" not in rows[0]:
        raise TrainingDataInvalid(f"{str(path)!r} needs the columns image and label")
    out: dict[str, tuple[int, str | None]] = {}
    for row in rows:
        group = next((row[c] for c in GROUP_COLUMNS if row.get(c)), None)
        key = str(Path(row["image"]).with_suffix(""))
        out[key] = (class_index(row["label"], classes), group)
    return out


def load_tile_folder(folder: Path, classes: Sequence[ClassSpec], *, tile_px: int,
                     labels_csv: Path | None = None, label_rule: LabelRule = None,
                     ) -> PatchDataset:
    """The tiles of ``folder`` (see the module docstring) with their masks and labels."""
    folder = Path(folder)
    images_dir, masks_dir = folder / "images", folder / "masks"
    if not images_dir.is_dir():
        raise TrainingDataInvalid(f"{str(folder)!r} has no images/ folder")
    labels = read_label_csv(labels_csv, classes) if labels_csv is not None else {}
    stems: dict[str, list[str]] = {}
    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for p in files:
        stems.setdefault(p.stem, []).append(str(p.relative_to(images_dir).with_suffix("")))
    images, masks, has_mask, patch_labels, groups = [], [], [], [], []
    used_labels: set[str] = set()
    for path in files:
        rel = path.relative_to(images_dir)
        key = str(rel.with_suffix(""))
        label_key = key if key in labels else (path.stem if len(stems[path.stem]) == 1 else None)
        label, group = labels.get(label_key, (-1, None)) if label_key else (-1, None)
        if label_key in labels:
            used_labels.add(label_key)
        mask_path = masks_dir / rel.with_suffix(".png")
        if not mask_path.is_file() and label < 0:
            continue  # neither mask nor label: nothing to learn from
        image = read_rgb_image(path)
        if image.shape[:2] != (tile_px, tile_px):
            raise TrainingDataInvalid(
                f"tile {str(rel)!r} is {image.shape[1]}x{image.shape[0]} px but the model "
                f"takes {tile_px} px tiles (set the tile size to match)")
        if mask_path.is_file():
            mask = read_mask_image(mask_path, classes)
            if mask.shape != image.shape[:2]:
                raise TrainingDataInvalid(f"mask {str(mask_path)!r} does not match its tile")
            masks.append(mask)
            has_mask.append(True)
            if label < 0:
                label = patch_label_from_mask(mask, len(classes), label_rule)
        else:
            masks.append(np.full(image.shape[:2], IGNORE, np.uint8))
            has_mask.append(False)
        images.append(image)
        patch_labels.append(label)
        groups.append(group or (rel.parts[0] if len(rel.parts) > 1 else path.stem))
    missing = set(labels) - used_labels - set(stems)
    if missing:
        log.warning("%d tiles of %s are not in %s (e.g. %s)", len(missing), labels_csv,
                    images_dir, sorted(missing)[:3])
    if not images:
        raise TrainingDataInvalid(f"no tile of {str(folder)!r} has a mask or a label")
    return PatchDataset.build(np.stack(images), np.stack(masks), patch_labels, groups,
                              has_mask=np.array(has_mask))


# -- slides with annotations -------------------------------------------------------------
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
        if kind == "Polygon":
            parts = [coords]
        elif kind == "MultiPolygon":
            parts = coords
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


@dataclass(frozen=True)
class SlideSource:
    """A slide and its annotations (GeoJSON or label mask), group and split."""

    slide: Path
    annotations: Path | None = None
    group: str | None = None
    split: str | None = None  # "train" | "val" | None (decided by the group split)


def find_annotations(slide: Path) -> Path | None:
    """``<stem>.geojson``/``<stem>.json`` or ``<stem>.mask.(png|tif|tiff)`` beside a slide."""
    for suffix in (".geojson", ".json", ".mask.png", ".mask.tif", ".mask.tiff"):
        candidate = slide.with_name(slide.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def read_manifest(path: Path) -> list[SlideSource]:
    """A CSV with columns ``slide`` and optionally ``annotations``, ``group``/``patient``,
    ``split``; relative paths are relative to the CSV."""
    base = Path(path).parent
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "slide" not in rows[0]:
        raise TrainingDataInvalid(f"{str(path)!r} needs a slide column")
    out = []
    for row in rows:
        slide = base / row["slide"]
        ann = base / row["annotations"] if row.get("annotations") else find_annotations(slide)
        group = next((row[c] for c in ("group", "patient") if row.get(c)), None)
        out.append(SlideSource(slide, ann, group, (row.get("split") or None)))
    return out


def load_slide_patches(
    source: SlideSource, classes: Sequence[ClassSpec], *, mpp: float, patch_px: int,
    stride_px: int | None = None, min_tissue: float = 0.75, label_rule: LabelRule = None,
    unannotated: str | None = None, tissue: TissueParams | None = None,
    labels_only: bool = False,
) -> PatchDataset:
    """Patches of one slide with masks from its annotations (see the module docstring).

    ``labels_only``: keep only the patch labels derived from the masks (no masks).
    """
    if source.annotations is None:
        raise TrainingDataInvalid(f"no annotations for {str(source.slide)!r} (looked for "
                                  f"{source.slide.stem}.geojson / .mask.png beside it)")
    stride_px = stride_px or patch_px
    fill = IGNORE if unannotated is None else class_index(unannotated, classes)
    is_mask_image = source.annotations.suffix.lower() in IMAGE_SUFFIXES
    polygons = None if is_mask_image else read_geojson(source.annotations, classes)
    label_image = read_mask_image(source.annotations, classes) if is_mask_image else None
    images, masks, kept = [], [], []
    with Slide(source.slide) as slide:
        grid_mpp = slide.grid_mpp(mpp)
        width, height = slide.scaled_dimensions(grid_mpp)
        w0, h0 = slide.dimensions
        mask = tissue_mask(slide, tissue or TissueParams())
        xs = np.arange(0, max(width - patch_px, 0) + 1, stride_px)
        ys = np.arange(0, max(height - patch_px, 0) + 1, stride_px)
        boxes = np.array([(x, y, patch_px, patch_px) for y in ys for x in xs], np.int64)
        if not len(boxes):
            return _empty(patch_px)
        keep = tissue_fractions(mask, boxes, grid_mpp, width, height) >= min_tissue
        to_level0 = grid_mpp / slide.mpp
        for box in boxes[keep]:
            x, y = box[:2]
            box0 = (x * to_level0, y * to_level0, (x + patch_px) * to_level0,
                    (y + patch_px) * to_level0)
            if polygons is not None:
                m = rasterize(polygons, box0, (patch_px, patch_px), fill)
            else:
                assert label_image is not None
                m = _crop_label_image(label_image, box0, (w0, h0), patch_px)
                if fill != IGNORE:
                    m[m == IGNORE] = fill
            if (m == IGNORE).all():
                continue
            images.append(slide.read_scaled(grid_mpp, int(x), int(y), patch_px, patch_px))
            masks.append(m)
            kept.append(box)
    if not images:
        log.warning("%s: no annotated patch with %.0f%% tissue", source.slide, 100 * min_tissue)
        return _empty(patch_px)
    mask_arr = np.stack(masks)
    labels = [patch_label_from_mask(m, len(classes), label_rule) for m in mask_arr]
    group = source.group or source.slide.stem
    data = PatchDataset.build(np.stack(images), mask_arr, labels, [group] * len(images),
                              boxes=np.stack(kept))
    if labels_only:
        data = data.without_masks(np.arange(len(data)))
    log.info("%s: %d patches of %d px at %.3g µm/px", source.slide.name, len(data), patch_px,
             grid_mpp)
    return data


def _crop_label_image(label_image: np.ndarray, box0: tuple[float, float, float, float],
                      slide_size: tuple[int, int], patch_px: int) -> np.ndarray:
    mh, mw = label_image.shape
    sx, sy = mw / slide_size[0], mh / slide_size[1]
    # nearest sampling of the label image at the patch's pixel centres
    step = (box0[2] - box0[0]) / patch_px
    centres = box0[0] + (np.arange(patch_px) + 0.5) * step
    cols = np.clip((centres * sx).astype(np.int64), 0, mw - 1)
    rows = np.clip(((box0[1] + (np.arange(patch_px) + 0.5) * step) * sy).astype(np.int64),
                   0, mh - 1)
    return label_image[rows][:, cols].copy()


def _empty(patch_px: int) -> PatchDataset:
    return PatchDataset.build(np.zeros((0, patch_px, patch_px, 3), np.uint8),
                              np.zeros((0, patch_px, patch_px), np.uint8), [], [],
                              has_mask=np.zeros(0, bool))


def load_slides(sources: Sequence[SlideSource], classes: Sequence[ClassSpec],
                progress: Callable[[int, int], None] | None = None, **kwargs: Any,
                ) -> tuple[PatchDataset, np.ndarray]:
    """Every slide's patches, and for each patch its source's split (``""`` if none)."""
    parts, splits = [], []
    for i, source in enumerate(sources):
        part = load_slide_patches(source, classes, **kwargs)
        parts.append(part)
        splits.extend([source.split or ""] * len(part))
        if progress is not None:
            progress(i + 1, len(sources))
    return PatchDataset.concat(parts), np.array(splits, object)
