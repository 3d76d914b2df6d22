"""Heatmaps rendered from a result's pyramid: one class's probability over the thumbnail.

Reads the smallest pyramid level that is still at least the requested size, so a heatmap
of a 100k-pixel slide touches a few chunks, not the whole result. Honest about what was
not analysed: only pixels the model computed (class map > 0) are coloured, the analysed
area is outlined, and a title strip names slide, model, class and date (and says so when
the run analysed nothing).
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
from wsi.result_info import CLASSES_LABEL, ResultInfo, read_result_info

if TYPE_CHECKING:
    from zarr.types import AnyArray

MAX_HEATMAP_PX = 8192
LEGEND_PX = 28
TITLE_PX = 30
#: Pixels not analysed, when there is no slide picture to show instead.
NOT_ANALYSED_GREY = 200
OUTLINE_RGB = (20, 20, 20)
WARNING_RGB = (200, 0, 0)


def result_classes(root: zarr.Group) -> list[str]:
    """Class (channel) names of a result's probability image."""
    return [ch["label"] for ch in json_attrs(root)["omero"]["channels"]]


def _pick_level(root: zarr.Group, max_px: int) -> tuple[str, AnyArray]:
    """The smallest level whose longer side still reaches ``max_px`` (its name, array)."""
    n_levels = len(json_attrs(root)["multiscales"][0]["datasets"])
    chosen = "0", array_at(root, "0")
    for level in range(n_levels):
        array = array_at(root, str(level))
        if max(array.shape[-2:]) >= max_px:
            chosen = str(level), array
    return chosen


def render_heatmap(
    zarr_path: Path, *, class_name: str | None = None, max_px: int = 1024, overlay: bool = True
) -> npt.NDArray[np.uint8]:
    """An RGB uint8 heatmap of ``class_name`` (default: the last class): a title strip
    (slide, model, class, date; and the result's warnings, e.g. that nothing was
    analysed), the map, and a legend bar.

    Only analysed pixels (class map > 0) are coloured; ``overlay`` blends the viridis
    colour over the slide thumbnail stored in the result, with opacity growing with the
    probability, and leaves the slide untouched where nothing was computed. The analysed
    area is outlined. Without ``overlay`` (or a thumbnail), pixels not analysed are grey.
    """
    if not 64 <= max_px <= MAX_HEATMAP_PX:
        raise InvalidParameter(f"max_px must be in [64, {MAX_HEATMAP_PX}], got {max_px}")
    root = zarr.open_group(str(zarr_path), mode="r")
    classes = result_classes(root)
    name = class_name if class_name is not None else classes[-1]
    if name not in classes:
        raise KeyError(f"no class {name!r} in this result; classes are {', '.join(classes)}")
    level_name, level = _pick_level(root, max_px)
    probability = as_uint8(np.asarray(level[classes.index(name)]))
    h, w = probability.shape
    # title strip, map and legend bar fit max_px x max_px, touching it on the longer side
    room = max_px - LEGEND_PX - TITLE_PX
    scale = min(max_px / w, room / h)
    size = (min(max_px, max(1, round(w * scale))), min(room, max(1, round(h * scale))))
    probability = np.asarray(
        cv2.resize(probability, size, interpolation=cv2.INTER_AREA), dtype=np.uint8
    )
    computed = _computed_share(root, level_name, (h, w), size)
    colour = cv2.cvtColor(cv2.applyColorMap(probability, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
    alpha = computed.copy()
    if overlay and "thumbnail" in root:
        thumb = np.moveaxis(np.asarray(root["thumbnail/0"]), 0, -1)
        base = np.asarray(cv2.resize(thumb, size, interpolation=cv2.INTER_AREA), np.uint8)
        alpha *= 0.25 + 0.6 * probability.astype(np.float32) / 255
    else:
        base = np.full((size[1], size[0], 3), NOT_ANALYSED_GREY, np.uint8)
    a = alpha[..., None]
    picture = (a * colour + (1 - a) * base).round().astype(np.uint8)
    _outline(picture, computed)
    info = read_result_info(Path(zarr_path))[1]
    return np.vstack([title_strip(size[0], info, name), picture, legend_bar(size[0], name)])


def _computed_share(root: zarr.Group, level_name: str, shape: tuple[int, int],
                    size: tuple[int, int]) -> npt.NDArray[np.float32]:
    """The share of each heatmap pixel that was analysed (class map > 0), 0..1; all of
    it for results without a class map."""
    path = f"{CLASSES_LABEL}/{level_name}"
    if path not in root:
        return np.ones((size[1], size[0]), np.float32)
    labels = np.asarray(array_at(root, path))[: shape[0], : shape[1]]
    share = (labels > 0).astype(np.float32)
    return np.asarray(cv2.resize(share, size, interpolation=cv2.INTER_AREA), np.float32)


def _outline(picture: npt.NDArray[np.uint8], computed: npt.NDArray[np.float32]) -> None:
    """Draw the analysed area's outline (dark, one pixel) onto ``picture`` in place."""
    mask = (computed >= 0.5).astype(np.uint8)
    if not mask.any() or mask.all():
        return
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(picture, contours, -1, OUTLINE_RGB, 1, cv2.LINE_8)


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only."""
    return text.replace("µ", "u").encode("ascii", "replace").decode("ascii")


def title_strip(width: int, info: ResultInfo, class_name: str) -> npt.NDArray[np.uint8]:
    """Two lines: slide, model, class and date; then the result's warnings (red), or
    what the picture shows."""
    strip = np.full((TITLE_PX, width, 3), 255, dtype=np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.35
    date = info.finished[:10]
    line = f"{info.slide_name} | model {info.model_name} | class {class_name} | {date}"
    cv2.putText(strip, _ascii(line), (2, 11), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    if info.warnings:
        note, colour = "WARNING: " + "; ".join(info.warnings), WARNING_RGB
    else:
        note, colour = "outlined: analysed area; outside it the slide is not analysed", (
            90, 90, 90)
    cv2.putText(strip, _ascii(note), (2, 25), font, scale, colour, 1, cv2.LINE_AA)
    return strip


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
