"""Reading training data from disk into a :class:`models.patches.PatchDataset`.

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
``models.patches.patch_label_from_mask``) unless a CSV gives it. Masks and polygons
are read by ``workers.training.annotations``; labels from several annotators by
``workers.training.crowd_data``, on the same patch grid (:func:`tissue_patch_boxes`).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.card import ClassSpec
from models.metrics import IGNORE
from models.patches import PatchDataset, TrainingDataInvalid, patch_label_from_mask
from workers.training.annotations import class_index, rasterize, read_geojson, read_mask_image
from wsi.images import IMAGE_SUFFIXES, read_rgb_image
from wsi.reader import Slide
from wsi.tiling import tissue_fractions
from wsi.tissue import TissueParams, tissue_mask

log = logging.getLogger(__name__)

GROUP_COLUMNS = ("group", "patient", "slide")

LabelRule = Sequence[float] | None  # per-class minimum fractions, or None for majority


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


#: ``(level-0 box (x0, y0, x1, y1), slide size (w0, h0)) -> the patch's mask``
MaskReader = Callable[[tuple[float, float, float, float], tuple[int, int]], np.ndarray]


def annotation_reader(annotations: Path, classes: Sequence[ClassSpec], *, patch_px: int,
                      fill: int = IGNORE) -> MaskReader:
    """The masks of patches from a GeoJSON or a label-mask image (read once, here)."""
    if annotations.suffix.lower() in IMAGE_SUFFIXES:
        label_image = read_mask_image(annotations, classes)

        def crop(box0: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
            m = _crop_label_image(label_image, box0, size, patch_px)
            if fill != IGNORE:
                m[m == IGNORE] = fill
            return m

        return crop
    polygons = read_geojson(annotations, classes)
    return lambda box0, _size: rasterize(polygons, box0, (patch_px, patch_px), fill)


def tissue_patch_boxes(slide: Slide, *, mpp: float, patch_px: int, stride_px: int,
                       min_tissue: float, tissue: TissueParams | None = None,
                       ) -> tuple[float, npt.NDArray[np.int64], float]:
    """(grid µm/px, boxes (n, 4) x, y, w, h at it of the patches on a ``stride_px`` grid
    with at least ``min_tissue`` tissue, level-0 pixels per grid pixel)."""
    grid_mpp = slide.grid_mpp(mpp)
    width, height = slide.scaled_dimensions(grid_mpp)
    mask = tissue_mask(slide, tissue or TissueParams())
    xs = np.arange(0, max(width - patch_px, 0) + 1, stride_px)
    ys = np.arange(0, max(height - patch_px, 0) + 1, stride_px)
    boxes = np.array([(x, y, patch_px, patch_px) for y in ys for x in xs], np.int64)
    if len(boxes):
        boxes = boxes[tissue_fractions(mask, boxes, grid_mpp, width, height) >= min_tissue]
    return grid_mpp, boxes.reshape(-1, 4), grid_mpp / slide.mpp


def level0_box(box: npt.NDArray[np.int64],
               to_level0: float) -> tuple[float, float, float, float]:
    x, y, w, h = (int(v) for v in box)
    return x * to_level0, y * to_level0, (x + w) * to_level0, (y + h) * to_level0


def annotated_patches(
    slide_path: Path, read_mask: MaskReader, *, mpp: float, patch_px: int,
    stride_px: int | None, min_tissue: float, tissue: TissueParams | None,
) -> tuple[float, list[npt.NDArray[np.uint8]], list[npt.NDArray[np.uint8]],
           list[npt.NDArray[np.int64]]]:
    """The grid's mpp, and the patches on the slide's tissue grid whose mask labels at
    least one pixel: their pixels, masks and boxes (grid pixels)."""
    images, masks, kept = [], [], []
    with Slide(slide_path) as slide:
        grid_mpp, boxes, to_level0 = tissue_patch_boxes(
            slide, mpp=mpp, patch_px=patch_px, stride_px=stride_px or patch_px,
            min_tissue=min_tissue, tissue=tissue)
        for box in boxes:
            m = read_mask(level0_box(box, to_level0), slide.dimensions)
            if (m == IGNORE).all():
                continue
            images.append(slide.read_scaled(grid_mpp, int(box[0]), int(box[1]), patch_px,
                                            patch_px))
            masks.append(m)
            kept.append(box)
    return grid_mpp, images, masks, kept


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
    fill = IGNORE if unannotated is None else class_index(unannotated, classes)
    read_mask = annotation_reader(source.annotations, classes, patch_px=patch_px, fill=fill)
    grid_mpp, images, masks, kept = annotated_patches(
        source.slide, read_mask, mpp=mpp, patch_px=patch_px, stride_px=stride_px,
        min_tissue=min_tissue, tissue=tissue)
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


def _crop_label_image(label_image: npt.NDArray[np.uint8],
                      box0: tuple[float, float, float, float], slide_size: tuple[int, int],
                      patch_px: int) -> npt.NDArray[np.uint8]:
    mh, mw = label_image.shape
    sx, sy = mw / slide_size[0], mh / slide_size[1]
    # nearest sampling of the label image at the patch's pixel centres
    step = (box0[2] - box0[0]) / patch_px
    centres = box0[0] + (np.arange(patch_px) + 0.5) * step
    cols = np.clip((centres * sx).astype(np.int64), 0, mw - 1)
    rows = np.clip(((box0[1] + (np.arange(patch_px) + 0.5) * step) * sy).astype(np.int64),
                   0, mh - 1)
    crop: npt.NDArray[np.uint8] = label_image[rows][:, cols].copy()
    return crop


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
