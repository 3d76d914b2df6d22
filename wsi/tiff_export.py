"""A result's RGB image (a stain transfer) as a pyramidal TIFF that slide readers open.

The RGB image of a result (the root image of a ``cyclegan`` run, or the ``stained``
group a chain stored on request) is streamed chunk by chunk from the zarr into
:func:`wsi.pyramid_tiff.write_pyramidal_tiff`: an Aperio-style SVS (default) or a generic
tiled TIFF with the image's microns per pixel (the source slide's, when the model ran at
the slide's own resolution), so that openslide, tiffslide, QuPath and this pipeline
open it as a slide. Pixels no tile computed (glass outside the tissue mask) are white.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import zarr

from wsi.errors import InvalidParameter
from wsi.ome_zarr import ChunkFiles, array_at, group_at, json_attrs
from wsi.pyramid_tiff import PyramidInfo, write_pyramidal_tiff

#: The image group a chain stores its stained tiles in.
STAINED_GROUP = "stained"
WHITE = 255


def rgb_image_group(root: zarr.Group) -> str:
    """The group of a result's RGB image: ``stained`` if stored, else the root image of
    a model whose first output is RGB."""
    if STAINED_GROUP in root:
        return STAINED_GROUP
    card = dict(json_attrs(root).get("slidepipe", {})).get("model_card", {})
    outputs = card.get("outputs") or []
    if outputs and outputs[0].get("channels") == "rgb":
        return ""
    raise InvalidParameter(
        "this result holds no RGB image: run a cyclegan model, or a stain step with "
        "stain_output (CLI: --stain-output)"
    )


class ZarrRGBSource:
    """Level-0 pixels of a (3, h, w) uint8 zarr array as (h, w, 3), read whole chunk
    files (thread-safe); uncomputed pixels (all channels 0) become white."""

    renders_levels = False

    def __init__(self, files: ChunkFiles) -> None:
        if len(files.shape) != 3 or files.shape[0] != 3:
            raise InvalidParameter(f"expected a (3, h, w) RGB image, got shape {files.shape}")
        self.files = files
        self.height, self.width = files.shape[1:]
        self.chunk_h, self.chunk_w = files.chunks[1:]

    def __call__(self, level: int, y: int, x: int, h: int, w: int) -> npt.NDArray[np.uint8]:
        if level != 0:
            raise ValueError("ZarrRGBSource renders level 0 only")
        out = np.empty((3, h, w), dtype=np.uint8)
        for cy in range(y // self.chunk_h, math.ceil((y + h) / self.chunk_h)):
            for cx in range(x // self.chunk_w, math.ceil((x + w) / self.chunk_w)):
                chunk = self.files.read((0, cy, cx))
                y0, x0 = cy * self.chunk_h, cx * self.chunk_w
                ys, ye = max(y, y0), min(y + h, y0 + self.chunk_h)
                xs, xe = max(x, x0), min(x + w, x0 + self.chunk_w)
                out[:, ys - y : ye - y, xs - x : xe - x] = chunk[:, ys - y0 : ye - y0, xs - x0 : xe - x0]
        rgb = np.ascontiguousarray(out.transpose(1, 2, 0))
        rgb[~rgb.any(axis=-1)] = WHITE
        return rgb


def export_rgb_tiff(
    result: Path,
    out: Path,
    *,
    group: str | None = None,
    flavor: str = "svs",
    compression: str = "jpeg",
    quality: int = 90,
    tile_px: int = 256,
    smallest_px: int = 512,
) -> PyramidInfo:
    """Write the RGB image of ``result`` (a slidepipe .zarr) as a pyramidal TIFF.

    Levels are downsampled by powers of 4 until the smallest fits ``smallest_px``; the
    mpp is the image's own (from its NGFF scale). Returns what was written.
    """
    root = zarr.open_group(str(result), mode="r")
    group = rgb_image_group(root) if group is None else group
    node = group_at(root, group)
    array = array_at(node, "0")
    scale = json_attrs(node)["multiscales"][0]["datasets"][0]["coordinateTransformations"][0][
        "scale"
    ]
    mpp = float(scale[-1])
    _, height, width = array.shape
    downsamples = [1]
    while max(width, height) / downsamples[-1] > smallest_px * 4:
        downsamples.append(downsamples[-1] * 4)
    source = ZarrRGBSource(ChunkFiles(array, Path(result)))
    return write_pyramidal_tiff(
        out, width=width, height=height, mpp=mpp, tile_source=source,
        downsamples=tuple(downsamples), tile_px=tile_px, compression=compression,
        quality=quality, flavor=flavor, scanscope_id=None,  # a real slide's export
    )
