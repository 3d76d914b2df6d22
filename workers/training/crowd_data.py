"""Training data labelled by several annotators (``slidepipe train ... --aggregate``).

The sources of ``workers.training.data``, one set of labels per annotator; not every
annotator needs to label every tile, slide or pixel (missing is missing, not
background):

Tile folders
    ``DIR/images/**/<name>.png`` as usual, and ``DIR/masks/<annotator>/**/<name>.png``:
    one folder of masks per annotator, each with the images' relative paths.
A CSV of patch labels with an ``annotator`` column
    ``image,label,annotator[,group]``: one row per tile and annotator. A CSV without
    that column counts as one annotator, ``csv``.
Slides
    beside ``<stem>.svs`` a folder ``<stem>.annotators/`` holding one file per
    annotator: ``<annotator>.geojson`` (QuPath) or ``<annotator>.mask.png`` (label
    mask); or a manifest whose ``annotations`` column names such a folder. Each slide is
    read once; every annotator's annotations are rasterised onto the same patches.

Every source gives a :class:`models.patches.PatchDataset` whose masks and labels are the
majority vote (``models.crowd.majority_vote``: unannotated where nobody labelled or the
most-voted classes tie), which is what ``--aggregate majority`` trains on and what
validation measures against, and a :class:`models.crowd.CrowdLabels` aligned with it,
which ``--aggregate aggnet`` trains on. An annotator's patch label is its CSV label, else
the one its own mask gives (``models.patches.patch_label_from_mask``).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.card import ClassSpec
from models.crowd import CrowdLabels, majority_vote
from models.metrics import IGNORE
from models.patches import PatchDataset, TrainingDataInvalid, patch_label_from_mask
from workers.training.annotations import class_index, read_mask_image
from workers.training.data import (
    GROUP_COLUMNS,
    LabelRule,
    SlideSource,
    annotated_patches,
    annotation_reader,
)
from wsi.images import IMAGE_SUFFIXES, read_rgb_image
from wsi.tissue import TissueParams

log = logging.getLogger(__name__)

ANNOTATOR_SUFFIXES = (".geojson", ".json", ".mask.png", ".mask.tif", ".mask.tiff")
CSV_ANNOTATOR = "csv"


def build_crowd_dataset(images: npt.NDArray[np.uint8], masks: npt.NDArray[np.uint8],
                        labels: npt.NDArray[np.int64], annotators: Sequence[str],
                        groups: Sequence[str], n_classes: int, *,
                        label_rule: LabelRule = None, boxes: npt.ArrayLike | None = None,
                        ) -> tuple[PatchDataset, CrowdLabels]:
    """Patches with every annotator's masks (N, H, W, J) and patch labels (N, J; -1 where
    none: then its mask's label, if it drew one) -> (majority-vote patches, crowd)."""
    labels = labels.copy()
    for i, j in zip(*np.nonzero(labels < 0)):
        if (masks[i, ..., j] != IGNORE).any():
            labels[i, j] = patch_label_from_mask(masks[i, ..., j], n_classes, label_rule)
    crowd = CrowdLabels(tuple(annotators), masks, labels)
    vote = majority_vote(masks, n_classes, IGNORE).astype(np.uint8)
    data = PatchDataset.build(images, vote, majority_vote(labels, n_classes, -1), list(groups),
                              has_mask=(masks != IGNORE).any(axis=(1, 2, 3)), boxes=boxes)
    return data, crowd


# -- tile folders and CSVs ---------------------------------------------------------------
def read_crowd_label_csv(path: Path, classes: Sequence[ClassSpec],
                         ) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """``({image key: {annotator: class}}, {image key: group})``; keys as
    ``workers.training.data.read_label_csv`` makes them (paths under ``images/``
    without suffix)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "image" not in rows[0] or "label" not in rows[0]:
        raise TrainingDataInvalid(f"{str(path)!r} needs the columns image and label "
                                  "(and annotator)")
    labels: dict[str, dict[str, int]] = {}
    groups: dict[str, str] = {}
    for row in rows:
        key = str(Path(row["image"]).with_suffix(""))
        annotator = (row.get("annotator") or "").strip() or CSV_ANNOTATOR
        if not row["label"].strip():
            continue  # a blank label: this annotator did not label the tile
        labels.setdefault(key, {})[annotator] = class_index(row["label"], classes)
        group = next((row[c] for c in GROUP_COLUMNS if row.get(c)), None)
        if group:
            groups[key] = group
    return labels, groups


def load_crowd_tile_folder(folder: Path, classes: Sequence[ClassSpec], *, tile_px: int,
                           labels_csv: Path | None = None, label_rule: LabelRule = None,
                           ) -> tuple[PatchDataset, CrowdLabels]:
    """The tiles of ``folder`` with every annotator's masks and labels (module docstring)."""
    folder = Path(folder)
    images_dir, masks_dir = folder / "images", folder / "masks"
    if not images_dir.is_dir():
        raise TrainingDataInvalid(f"{str(folder)!r} has no images/ folder")
    csv_labels, csv_groups = (read_crowd_label_csv(labels_csv, classes) if labels_csv
                              else ({}, {}))
    mask_annotators = sorted(p.name for p in masks_dir.iterdir() if p.is_dir()) \
        if masks_dir.is_dir() else []
    annotators = sorted(set(mask_annotators) | {a for v in csv_labels.values() for a in v})
    if not annotators:
        raise TrainingDataInvalid(f"{str(folder)!r}: no annotator (masks/<annotator>/ "
                                  "folders or a CSV with an annotator column)")
    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    stems: dict[str, int] = {}
    for p in files:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    images, masks, labels, groups = [], [], [], []
    for path in files:
        rel = path.relative_to(images_dir)
        key = str(rel.with_suffix(""))
        if key not in csv_labels and stems[path.stem] == 1 and path.stem in csv_labels:
            key = path.stem
        tile_labels = csv_labels.get(key, {})
        mask_paths = {a: masks_dir / a / rel.with_suffix(".png") for a in mask_annotators}
        mask_paths = {a: p for a, p in mask_paths.items() if p.is_file()}
        if not mask_paths and not tile_labels:
            continue  # nobody labelled it
        image = read_rgb_image(path)
        if image.shape[:2] != (tile_px, tile_px):
            raise TrainingDataInvalid(
                f"tile {str(rel)!r} is {image.shape[1]}x{image.shape[0]} px but the model "
                f"takes {tile_px} px tiles (set the tile size to match)")
        stack = np.full((tile_px, tile_px, len(annotators)), IGNORE, np.uint8)
        for a, mask_path in mask_paths.items():
            mask = read_mask_image(mask_path, classes)
            if mask.shape != image.shape[:2]:
                raise TrainingDataInvalid(f"mask {str(mask_path)!r} does not match its tile")
            stack[..., annotators.index(a)] = mask
        images.append(image)
        masks.append(stack)
        labels.append([tile_labels.get(a, -1) for a in annotators])
        groups.append(csv_groups.get(key) or (rel.parts[0] if len(rel.parts) > 1 else path.stem))
    if not images:
        raise TrainingDataInvalid(f"no tile of {str(folder)!r} has a mask or a label")
    return build_crowd_dataset(np.stack(images), np.stack(masks), np.array(labels, np.int64),
                               annotators, groups, len(classes), label_rule=label_rule)


# -- slides ------------------------------------------------------------------------------
def annotators_folder(slide: Path) -> Path:
    """Where a slide's annotators' files lie: ``<stem>.annotators/`` beside it."""
    return slide.with_name(slide.stem + ".annotators")


def annotator_files(folder: Path) -> dict[str, Path]:
    """``{annotator: file}`` of a folder of ``<annotator>.geojson`` / ``.mask.png`` ..."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        suffix = next((s for s in ANNOTATOR_SUFFIXES if path.name.lower().endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        name = path.name[:-len(suffix)]
        if name in found:
            raise TrainingDataInvalid(f"{str(folder)!r}: two files for annotator {name!r}")
        found[name] = path
    if not found:
        raise TrainingDataInvalid(f"{str(folder)!r} holds no <annotator>.geojson or "
                                  "<annotator>.mask.png")
    return found


def load_crowd_slide(
    source: SlideSource, classes: Sequence[ClassSpec], *, mpp: float, patch_px: int,
    stride_px: int | None = None, min_tissue: float = 0.75, label_rule: LabelRule = None,
    unannotated: str | None = None, tissue: TissueParams | None = None,
) -> tuple[PatchDataset, CrowdLabels]:
    """One slide's patches with every annotator's masks: ``source.annotations`` is the
    annotators' folder (default: ``<stem>.annotators/`` beside the slide). A patch is
    kept where at least one annotator labelled a pixel of it. ``unannotated`` names the
    class of the pixels an annotator left unlabelled (default: not labelled)."""
    folder = source.annotations if source.annotations is not None and \
        source.annotations.is_dir() else annotators_folder(source.slide)
    if not folder.is_dir():
        raise TrainingDataInvalid(f"no annotators for {str(source.slide)!r}: expected the "
                                  f"folder {folder.name}/ beside it")
    files = annotator_files(folder)
    annotators = sorted(files)
    fill = IGNORE if unannotated is None else class_index(unannotated, classes)
    readers = [annotation_reader(files[a], classes, patch_px=patch_px, fill=fill)
               for a in annotators]

    def read_all(box0: tuple[float, float, float, float],
                 dims: tuple[int, int]) -> npt.NDArray[np.uint8]:
        return np.stack([read(box0, dims) for read in readers], axis=-1)

    _, images, masks, kept = annotated_patches(
        source.slide, read_all, mpp=mpp, patch_px=patch_px, stride_px=stride_px,
        min_tissue=min_tissue, tissue=tissue)
    n = len(images)
    log.info("%s: %d patches labelled by %d annotators", source.slide.name, n, len(annotators))
    empty = (0, patch_px, patch_px)
    return build_crowd_dataset(
        np.stack(images) if n else np.zeros((*empty, 3), np.uint8),
        np.stack(masks) if n else np.zeros((*empty, len(annotators)), np.uint8),
        np.full((n, len(annotators)), -1, np.int64), annotators,
        [source.group or source.slide.stem] * n, len(classes), label_rule=label_rule,
        boxes=np.stack(kept) if n else np.zeros((0, 4), np.int64))


def load_crowd_sources(
    classes: Sequence[ClassSpec], *, tiles: Sequence[Path] = (), labels_csv: Path | None = None,
    slides: Sequence[SlideSource] = (), tile_px: int, mpp: float,
    stride_px: int | None = None, min_tissue: float = 0.75, label_rule: LabelRule = None,
    unannotated: str | None = None,
) -> tuple[PatchDataset, CrowdLabels, npt.NDArray[np.object_]]:
    """Every source's patches and annotators, and each patch's manifest split (``""``
    where none): the crowd counterpart of ``segmentation.load_training_data``'s reading."""
    parts: list[tuple[PatchDataset, CrowdLabels]] = []
    splits: list[npt.NDArray[np.object_]] = []
    for i, folder in enumerate(tiles):
        parts.append(load_crowd_tile_folder(folder, classes, tile_px=tile_px,
                                            labels_csv=labels_csv if i == 0 else None,
                                            label_rule=label_rule))
        splits.append(np.full(len(parts[-1][0]), "", object))
    for source in slides:
        parts.append(load_crowd_slide(source, classes, mpp=mpp, patch_px=tile_px,
                                      stride_px=stride_px, min_tissue=min_tissue,
                                      label_rule=label_rule, unannotated=unannotated))
        splits.append(np.full(len(parts[-1][0]), source.split or "", object))
    if not parts:
        raise TrainingDataInvalid("no training data: pass --tiles, --slides or --manifest")
    data = PatchDataset.concat([d for d, _ in parts])
    crowd = CrowdLabels.concat([c for _, c in parts])
    if not len(data):
        raise TrainingDataInvalid("the training data hold no patch an annotator labelled")
    return data, crowd, np.concatenate(splits)
