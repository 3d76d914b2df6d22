"""Overlay tiles for the browser viewer, rendered from a result's OME-Zarr pyramid.

The overlay is a deep-zoom pyramid of the result's own grid (``width`` x ``height``
result pixels): level ``max_level`` is the result's level 0, each level below half the
one above, tiles of :data:`TILE_PX` pixels without overlap (an OpenSeadragon custom tile
source). A tile is read from the zarr level nearest to its scale (never a finer one than
needed) and coloured either

- by class: the argmax class map in the card's colours, only the classes asked for;
- by probability: one class's probability in viridis.

Pixels never computed (class map 0) are transparent in both. Tiles are RGBA PNGs.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import zarr

from wsi.errors import InvalidParameter
from wsi.heatmap import as_uint8
from wsi.ome_zarr import array_at, json_attrs
from wsi.open_cache import OpenCache
from wsi.result_info import CLASSES_LABEL, ResultInfo, read_result_info

TILE_PX = 256
#: The viridis colour map as an RGB lookup table (the heatmaps' and the legend's).
VIRIDIS: npt.NDArray[np.uint8] = cv2.cvtColor(
    cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None, :], cv2.COLORMAP_VIRIDIS),
    cv2.COLOR_BGR2RGB,
)[0]
MODES = ("classes", "probability")
CACHED_RESULTS = 16


@dataclass(frozen=True)
class OverlayPyramid:
    """The overlay's deep-zoom geometry."""

    width: int
    height: int
    levels: int  # zarr pyramid levels
    tile_px: int = TILE_PX

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height))))

    def level_size(self, level: int) -> tuple[int, int]:
        factor = 2 ** (self.max_level - level)
        return math.ceil(self.width / factor), math.ceil(self.height / factor)


def _open_result(path: Path) -> tuple[zarr.Group, ResultInfo, OverlayPyramid]:
    """A result's root group, metadata and overlay pyramid."""
    root, info = read_result_info(path)
    if f"{CLASSES_LABEL}/0" not in root:
        raise InvalidParameter("this result has no class map to show")
    levels = len(json_attrs(root)["multiscales"][0]["datasets"])
    return root, info, OverlayPyramid(info.width, info.height, levels)


RESULTS: OpenCache[tuple[zarr.Group, ResultInfo, OverlayPyramid]] = OpenCache(
    _open_result, CACHED_RESULTS)


def overlay_info(path: Path) -> tuple[ResultInfo, OverlayPyramid]:
    _, info, pyramid = RESULTS.get(path)
    return info, pyramid


def _window(pyramid: OverlayPyramid, level: int, col: int, row: int
            ) -> tuple[int, int, int, int, int, int]:
    """(zarr level, y0, x0, y1, x1 on that level, remaining downsample) of a tile."""
    if not 0 <= level <= pyramid.max_level:
        raise InvalidParameter(f"no overlay level {level} (0-{pyramid.max_level})")
    width, height = pyramid.level_size(level)
    t = pyramid.tile_px
    if not (0 <= col < math.ceil(width / t) and 0 <= row < math.ceil(height / t)):
        raise InvalidParameter(f"no overlay tile {col}_{row} at level {level}")
    steps = pyramid.max_level - level  # the tile's downsample is 2 ** steps
    zarr_level = min(steps, pyramid.levels - 1)
    rest = 2 ** (steps - zarr_level)
    x0, y0 = col * t * rest, row * t * rest
    x1 = min((col + 1) * t, width) * rest
    y1 = min((row + 1) * t, height) * rest
    return zarr_level, y0, x0, y1, x1, rest


def _shrink(block: npt.NDArray[np.uint8], size: tuple[int, int], rest: int, nearest: bool
            ) -> npt.NDArray[np.uint8]:
    """``block`` downsampled ``rest`` times to ``size`` (width, height), zero-padded where
    the zarr level ends: nearest for labels, area mean otherwise."""
    padded = np.zeros((size[1] * rest, size[0] * rest), np.uint8)
    h, w = min(block.shape[0], padded.shape[0]), min(block.shape[1], padded.shape[1])
    padded[:h, :w] = block[:h, :w]
    if nearest:
        return np.ascontiguousarray(padded[::rest, ::rest])
    return np.asarray(cv2.resize(padded, size, interpolation=cv2.INTER_AREA), np.uint8)


def render_overlay_tile(path: Path, level: int, col: int, row: int, *, mode: str = "classes",
                        classes: Collection[int] | None = None, probability_of: int = 1
                        ) -> npt.NDArray[np.uint8]:
    """One overlay tile as RGBA (h, w, 4). ``classes``: the label values to show (default
    all); ``probability_of``: the class value whose probability ``mode="probability"``
    shows."""
    if mode not in MODES:
        raise InvalidParameter(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    root, info, pyramid = RESULTS.get(path)
    zarr_level, y0, x0, y1, x1, rest = _window(pyramid, level, col, row)
    width, height = pyramid.level_size(level)
    t = pyramid.tile_px
    size = (min(t, width - col * t), min(t, height - row * t))
    labels = np.asarray(array_at(root, f"{CLASSES_LABEL}/{zarr_level}")[y0:y1, x0:x1])
    labels = _shrink(labels, size, rest, nearest=True)
    rgba = np.zeros((size[1], size[0], 4), np.uint8)
    if mode == "classes":
        lut = np.zeros((256, 4), np.uint8)
        for cls in info.classes:
            if classes is None or cls.value in classes:
                lut[cls.value] = (*cls.rgb, 255)
        return np.ascontiguousarray(lut[labels])
    if not any(c.value == probability_of for c in info.classes):
        raise InvalidParameter(f"no class {probability_of} in this result")
    probability = as_uint8(np.asarray(
        array_at(root, str(zarr_level))[probability_of - 1, y0:y1, x0:x1]))
    probability = _shrink(probability, size, rest, nearest=False)
    rgba[..., :3] = VIRIDIS[probability]
    rgba[..., 3] = np.where(labels > 0, 255, 0).astype(np.uint8)
    return rgba


def encode_rgba_png(rgba: npt.NDArray[np.uint8]) -> bytes:
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA),
                              [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def viridis_stops(n: int = 11) -> list[str]:
    """``n`` evenly spaced viridis colours as CSS hex, for the viewer's legend."""
    return [rgb_hex(tuple(int(v) for v in VIRIDIS[round(i * 255 / (n - 1))]))
            for i in range(n)]


def rgb_hex(rgb: tuple[int, ...]) -> str:
    r, g, b = rgb[:3]
    return f"#{r:02x}{g:02x}{b:02x}"
