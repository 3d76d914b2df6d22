"""Where each model output goes in the result, and how blended chunks are stored.

Dense outputs become multiscale uint8 images (the first one at the root, the others in
groups named after them; class probabilities optionally uint16 or float32, for finer
steps than 1/255); when the root is class probabilities, an argmax class map is stored
as labels beside it. Per-tile outputs are stored on the tile grid as a small
float32 image whose pixels are tiles.
"""

from __future__ import annotations

import cv2
import numpy as np

from models.card import ModelCard, OutputSpec
from wsi.blending import inverse_weights
from wsi.ome_zarr import (
    ChannelSpec,
    ChunkFiles,
    LabelSpec,
    ResultWriter,
    full_scale,
    hex_to_rgba,
)
from wsi.tiling import Tile, TilePlan

RGB_CHANNELS = [ChannelSpec("red", "FF0000"), ChannelSpec("green", "00FF00"),
                ChannelSpec("blue", "0000FF")]


def channel_specs(card: ModelCard, output: OutputSpec) -> list[ChannelSpec]:
    if output.channels == "rgb":
        return RGB_CHANNELS
    return [ChannelSpec(c.name, c.color) for c in card.classes]


#: Types a dense output may be stored as: numpy type and OpenCV depth.
STORE_TYPES: dict[str, tuple[type[np.number], int]] = {
    "uint8": (np.uint8, cv2.CV_8U), "uint16": (np.uint16, cv2.CV_16U),
    "float32": (np.float32, cv2.CV_32F)}
_CV_DEPTHS = {np.dtype(t): depth for t, depth in STORE_TYPES.values()}


class DenseSink:
    """Stores chunks of one dense output as value / max_value x the type's full scale
    (255 for uint8, 65535 for uint16, 1 for float32), and, for class probabilities at
    the root, the argmax class map (0 = not computed).

    It takes the merger's weighted sums and weight sums (``StreamingMerger(normalize=
    False)``) and divides on the way to the stored type; the argmax needs no division at
    all, as every pixel's weight sum is positive."""

    def __init__(self, image: ChunkFiles, max_value: float, classes: ChunkFiles | None) -> None:
        self.image, self.classes = image, classes
        self.scale = full_scale(image.dtype) / max_value

    def owns(self, cy: int, cx: int) -> bool:
        """Whether this sink stores chunk (cy, cx): all of them here; a part of a split
        run stores only its own (override this, not ``__call__``, so that the device
        sink of ``workers.engine.device_blend`` drops the same chunks)."""
        return True

    def __call__(self, cy: int, cx: int, sums: np.ndarray, weights: np.ndarray) -> None:
        if not self.owns(cy, cx):
            return
        if self.classes is not None:
            labels = class_map(sums, first=1)
            if not weights.all():  # only chunks at the tissue's edge have uncovered pixels
                labels *= weights > 0
            self.classes.write((cy, cx), labels)
        self.image.write((0, cy, cx), weighted_to_stored(sums, weights, self.scale,
                                                         self.image.dtype))


def class_map(scores: np.ndarray, first: int = 0) -> np.ndarray:
    """``scores.argmax(axis=0) + first`` as uint8 (first index on ties), for (C, h, w)
    scores; ``first=1`` numbers classes from 1 as the label image does, in the same pass.

    Why not argmax: along the first axis of a C-contiguous block numpy walks with a
    stride of h*w and takes ~15x longer. A running maximum over the C planes instead,
    with OpenCV's compare (a 0/255 mask where a class beats the best so far, strictly,
    so ties keep the lower class), masked copy and max: half the time of the same loop
    in numpy, on the store thread, which is the engine's busiest."""
    if len(scores) > 255 or not 0 <= first <= 1:
        raise ValueError(f"at most 255 classes, numbered from 0 or 1, fit a uint8 class map "
                         f"(label 0 = none); got {len(scores)} from {first}")
    best = scores[0]
    index = np.full(scores.shape[1:], first, np.uint8)
    value = np.empty_like(index)
    for c in range(1, len(scores)):
        higher = cv2.compare(scores[c], best, cv2.CMP_GT)
        value.fill(c + first)
        cv2.copyTo(value, higher, index)
        if c + 1 < len(scores):
            best = cv2.max(best, scores[c])
    return index


def weighted_to_stored(sums: np.ndarray, weights: np.ndarray, scale: float,
                       dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """``sums / weights * scale`` as ``dtype`` for (C, h, w) weighted sums and (h, w)
    weight sums, 0 where the weight is 0: one multiply per channel by ``scale / weights``,
    for integer types rounded (half to even) and saturated by OpenCV in the same pass,
    three times as fast as numpy's divide, rint and clip."""
    dtype = np.dtype(dtype)
    depth = _CV_DEPTHS.get(dtype)
    if depth is None:
        raise ValueError(f"store as one of {', '.join(STORE_TYPES)}, got {dtype}")
    inverse = inverse_weights(weights, scale)
    out = np.empty(sums.shape, dtype)
    for channel in range(len(sums)):
        cv2.multiply(sums[channel], inverse, dst=out[channel], dtype=depth)
    return out


class ResultLayout:
    """Creates the arrays for ``card``'s outputs and hands out one sink per dense output."""

    def __init__(self, writer: ResultWriter, card: ModelCard, plan: TilePlan,
                 extra_dense: list[OutputSpec] | None = None,
                 probability_dtype: str = "uint8") -> None:
        if probability_dtype not in STORE_TYPES:
            raise ValueError(f"probability_dtype must be one of {', '.join(STORE_TYPES)}, "
                             f"got {probability_dtype!r}")
        self.writer, self.card, self.plan = writer, card, plan
        self.dense = [o for o in card.outputs if o.kind == "dense"] + list(extra_dense or [])
        self.per_tile = [o for o in card.outputs if o.kind == "per_tile"]
        self.sinks: dict[str, DenseSink] = {}
        for index, output in enumerate(self.dense):
            group = "" if index == 0 else output.name
            # class maps may take the finer type; RGB outputs are 8-bit images
            dtype = probability_dtype if output.channels == "classes" else "uint8"
            image = writer.create_image(group, output.name, channel_specs(card, output),
                                        dtype=dtype)
            classes = None
            if index == 0 and output.channels == "classes":
                classes = writer.chunk_files(writer.create_label(LabelSpec(
                    "classes",
                    {i + 1: (c.name, hex_to_rgba(c.color)) for i, c in enumerate(card.classes)},
                )))
            self.sinks[output.name] = DenseSink(writer.chunk_files(image), output.max_value, classes)
        self.tile_grids = {
            o.name: np.full((len(card.classes), plan.n_rows, plan.n_cols), np.nan, np.float32)
            for o in self.per_tile
        }

    def add_tile_vector(self, name: str, tile: Tile, values: np.ndarray) -> None:
        self.tile_grids[name][:, tile.row, tile.col] = values

    def write_tile_grids(self) -> None:
        """Per-tile outputs as (C, rows, cols) images: one pixel per tile, placed at the
        tiles' kept centres (scale = tile stride, translation = half the kept size)."""
        g = self.plan.geometry
        mpp = self.plan.target_mpp
        for name, grid in self.tile_grids.items():
            self.writer.write_tile_grid(
                name, grid, [ChannelSpec(c.name, c.color) for c in self.card.classes],
                scale_um=g.stride_px * mpp, offset_um=(g.kept_px / 2 - 0.5) * mpp,
            )
