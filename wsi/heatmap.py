"""Heatmaps rendered from a result's pyramid: one class's probability over the thumbnail.

Reads the smallest pyramid level that is still at least the requested size, so a heatmap
of a 100k-pixel slide touches a few chunks, not the whole result.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import numpy.typing as npt
import zarr

from wsi.errors import InvalidParameter
from wsi.ome_zarr import array_at, full_scale, json_attrs

if TYPE_CHECKING:
    from zarr.types import AnyArray

MAX_HEATMAP_PX = 8192
LEGEND_PX = 28


def result_classes(root: zarr.Group) -> list[str]:
    """Class (channel) names of a result's probability image."""
    return [ch["label"] for ch in json_attrs(root)["omero"]["channels"]]


def _pick_level(root: zarr.Group, max_px: int) -> AnyArray:
    n_levels = len(json_attrs(root)["multiscales"][0]["datasets"])
    chosen = array_at(root, "0")
    for level in range(n_levels):
        array = array_at(root, str(level))
        if max(array.shape[-2:]) >= max_px:
            chosen = array
    return chosen


def render_heatmap(
    zarr_path: Path, *, class_name: str | None = None, max_px: int = 1024, overlay: bool = True
) -> npt.NDArray[np.uint8]:
    """An RGB uint8 heatmap of ``class_name`` (default: the last class) with a legend bar.

    ``overlay`` blends the viridis-coloured probability over the slide thumbnail stored
    in the result, with opacity growing with the probability.
    """
    if not 64 <= max_px <= MAX_HEATMAP_PX:
        raise InvalidParameter(f"max_px must be in [64, {MAX_HEATMAP_PX}], got {max_px}")
    root = zarr.open_group(str(zarr_path), mode="r")
    classes = result_classes(root)
    name = class_name if class_name is not None else classes[-1]
    if name not in classes:
        raise KeyError(f"no class {name!r} in this result; classes are {', '.join(classes)}")
    level = _pick_level(root, max_px)
    probability = as_uint8(np.asarray(level[classes.index(name)]))
    h, w = probability.shape
    # the map plus its legend bar fit max_px x max_px, touching it on the longer side
    scale = min(max_px / w, (max_px - LEGEND_PX) / h)
    size = (min(max_px, max(1, round(w * scale))), min(max_px - LEGEND_PX, max(1, round(h * scale))))
    probability = np.asarray(
        cv2.resize(probability, size, interpolation=cv2.INTER_AREA), dtype=np.uint8
    )
    colour = cv2.cvtColor(cv2.applyColorMap(probability, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
    if overlay and "thumbnail" in root:
        thumb = np.moveaxis(np.asarray(root["thumbnail/0"]), 0, -1)
        thumb = cv2.resize(thumb, size, interpolation=cv2.INTER_AREA)
        alpha = (0.25 + 0.6 * probability.astype(np.float32) / 255)[..., None]
        colour = (alpha * colour + (1 - alpha) * thumb).round().astype(np.uint8)
    return np.vstack([colour, legend_bar(size[0], name)])


def as_uint8(values: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """A stored probability map on the 0-255 scale the colour map takes (results store
    uint8, or uint16 / float32 when asked for finer steps)."""
    if values.dtype == np.uint8:
        return values
    scaled = cv2.convertScaleAbs(values, alpha=255.0 / full_scale(values.dtype))
    return np.asarray(scaled, dtype=np.uint8)  # convertScaleAbs always yields uint8


def legend_bar(width: int, label: str) -> npt.NDArray[np.uint8]:
    """A viridis ramp from probability 0 (left) to 1 (right), labelled."""
    ramp = np.linspace(0, 255, width).astype(np.uint8)[None, :].repeat(LEGEND_PX // 2, 0)
    bar = cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
    text = np.full((LEGEND_PX - LEGEND_PX // 2, width, 3), 255, dtype=np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.35
    cv2.putText(text, "0", (2, 11), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(text, "1", (max(2, width - 10), 11), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(text, f"P({label})", (max(14, width // 2 - 30), 11), font, scale, (0, 0, 0), 1,
                cv2.LINE_AA)
    return np.vstack([bar, text])


def encode_png(rgb: npt.NDArray[np.uint8]) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def render_heatmap_png(
    zarr_path: Path, *, class_name: str | None = None, max_px: int = 1024, overlay: bool = True
) -> bytes:
    """:func:`render_heatmap` encoded as PNG bytes."""
    return encode_png(
        render_heatmap(zarr_path, class_name=class_name, max_px=max_px, overlay=overlay)
    )
