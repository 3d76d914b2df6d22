"""A slide report from a result: tissue and analysed area, per-class area, share and
probability, and a joint model's slide-level class scores.

Computed from the zarr chunks with dask arrays, one chunk per task on a few threads, so
memory holds a few chunks whatever the slide's size. Areas come from pixel counts at the
result's resolution (``output_mpp``), in mm².
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from wsi.ome_zarr import array_at, full_scale
from wsi.result_info import CLASSES_LABEL, TISSUE_LABEL, read_result_info

log = logging.getLogger(__name__)

#: How the joint model's per-tile scores become slide-level scores.
TILE_AGGREGATION = "mean of the per-tile class scores over the analysed tiles"
SUMMARY_THREADS = 2


def summarize(result: Path) -> dict[str, Any]:
    """The report of one result as a JSON-ready dict."""
    root, info = read_result_info(result)
    um2_per_px = info.output_mpp ** 2
    mm2 = um2_per_px / 1e6
    lazy: dict[str, Any] = {}
    has_classes = f"{CLASSES_LABEL}/0" in root
    has_tissue = f"{TISSUE_LABEL}/0" in root
    tissue = (da.from_zarr(array_at(root, f"{TISSUE_LABEL}/0")) > 0  # type: ignore[no-untyped-call]
              if has_tissue else None)
    if tissue is not None:
        lazy["tissue"] = tissue.sum()
    if has_classes:
        labels = da.from_zarr(array_at(root, f"{CLASSES_LABEL}/0"))  # type: ignore[no-untyped-call]
        analysed = labels > 0
        lazy["analysed"] = analysed.sum()
        probabilities = da.from_zarr(array_at(root, "0"))  # type: ignore[no-untyped-call]
        top = full_scale(probabilities.dtype)
        for cls in info.classes:
            is_class = labels == cls.value
            lazy[f"area:{cls.value}"] = is_class.sum()
            if tissue is not None:
                lazy[f"in_tissue:{cls.value}"] = (is_class & tissue).sum()
            channel = probabilities[cls.value - 1].astype(np.float64)
            lazy[f"p_sum:{cls.value}"] = da.where(analysed, channel, 0.0).sum() / top
    with dask.config.set(scheduler="threads", num_workers=SUMMARY_THREADS):
        (counts,) = dask.compute(lazy)  # type: ignore[no-untyped-call]
    tissue_px = int(counts.get("tissue", 0))
    analysed_px = int(counts.get("analysed", 0))
    classes = []
    for cls in info.classes if has_classes else ():  # an RGB result (a stain transfer) has none
        area_px = int(counts.get(f"area:{cls.value}", 0))
        in_tissue = int(counts.get(f"in_tissue:{cls.value}", 0))
        p_sum = float(counts.get(f"p_sum:{cls.value}", 0.0))
        classes.append({
            "name": cls.name,
            "area_mm2": round(area_px * mm2, 6),
            "share_of_tissue": round(in_tissue / tissue_px, 6) if tissue_px else None,
            "share_of_analysed": round(area_px / analysed_px, 6) if analysed_px else None,
            "mean_probability": round(p_sum / analysed_px, 6) if analysed_px else None,
        })
    report: dict[str, Any] = {
        "slide": info.slide_name,
        "model": info.model_name,
        "finished": info.finished or None,
        "output_mpp": info.output_mpp,
        "tissue_area_mm2": round(tissue_px * mm2, 6) if has_tissue else None,
        "analysed_area_mm2": round(analysed_px * mm2, 6) if has_classes else None,
        "classes": classes,
        "warnings": list(info.warnings),
    }
    if "tile_scores/0" in root:
        report["slide_scores"] = _tile_score_summary(np.asarray(array_at(root, "tile_scores/0")),
                                                     [c.name for c in info.classes])
    return report


def _tile_score_summary(scores: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Slide-level class scores from the (C, rows, cols) per-tile scores (NaN: no tile)."""
    analysed = np.isfinite(scores).all(axis=0)
    n = int(analysed.sum())
    per_tile = scores[:, analysed]
    mean = per_tile.mean(axis=1) if n else np.full(len(names), np.nan)
    votes = np.bincount(per_tile.argmax(axis=0), minlength=len(names)) if n else np.zeros(
        len(names), int)
    return {
        "aggregation": TILE_AGGREGATION,
        "tiles": n,
        "scores": {name: (round(float(v), 6) if n else None) for name, v in zip(names, mean,
                                                                                  strict=True)},
        "predicted_class": names[int(np.argmax(mean))] if n else None,
        "tiles_per_class": {name: int(v) for name, v in zip(names, votes, strict=True)},
    }


def csv_columns(reports: Iterable[dict[str, Any]]) -> list[str]:
    """Columns of a batch CSV: fixed ones, then per class area, share and probability."""
    names: list[str] = []
    scores: list[str] = []
    for report in reports:
        for cls in report.get("classes", []):
            if cls["name"] not in names:
                names.append(cls["name"])
        for name in report.get("slide_scores", {}).get("scores", {}):
            if name not in scores:
                scores.append(name)
    columns = ["job_id", "slide_id", "slide", "status", "model", "tissue_area_mm2",
               "analysed_area_mm2"]
    for name in names:
        columns += [f"{name}_area_mm2", f"{name}_share_of_tissue", f"{name}_mean_probability"]
    columns += [f"{name}_slide_score" for name in scores]
    return columns + ["warnings", "error"]


def csv_row(report: dict[str, Any]) -> dict[str, Any]:
    row = {k: report.get(k) for k in ("job_id", "slide_id", "slide", "status", "model",
                                      "tissue_area_mm2", "analysed_area_mm2", "error")}
    for cls in report.get("classes", []):
        row[f"{cls['name']}_area_mm2"] = cls["area_mm2"]
        row[f"{cls['name']}_share_of_tissue"] = cls["share_of_tissue"]
        row[f"{cls['name']}_mean_probability"] = cls["mean_probability"]
    for name, value in report.get("slide_scores", {}).get("scores", {}).items():
        row[f"{name}_slide_score"] = value
    row["warnings"] = "; ".join(report.get("warnings", []))
    return row


def reports_csv(reports: Sequence[dict[str, Any]]) -> str:
    """One CSV row per report (missing values empty)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=csv_columns(reports), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for report in reports:
        writer.writerow({k: ("" if v is None else v) for k, v in csv_row(report).items()})
    return out.getvalue()
