"""A slide from an in-memory RGB array: mirrored or tiled to any size, written as a pyramid.

What the tests, benches and experiments build their slides from (real tissue extended to
a chosen geometry), through the product's writer :func:`wsi.pyramid_tiff.write_pyramidal_tiff`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Unpack

import numpy as np
import numpy.typing as npt

from wsi.errors import InvalidParameter
from wsi.pyramid_tiff import PyramidInfo, WriterOptions, write_pyramidal_tiff


# -- sources ----------------------------------------------------------------------------
def _source_runs(start: int, count: int, size: int, mode: str) -> list[tuple[int, slice]]:
    """Split output indices ``start..start+count`` into runs copied with one slice each.

    Returns (output offset, source slice) pairs; mirrored runs have a negative step.
    """
    runs: list[tuple[int, slice]] = []
    pos, end = start, start + count
    period = size if mode == "tile" else 2 * size
    while pos < end:
        phase = pos % period
        if phase < size:  # forward copy of the image
            n = min(size - phase, end - pos)
            runs.append((pos - start, slice(phase, phase + n)))
        else:  # mirrored copy: phase size..2*size-1 maps to size-1..0
            src = period - 1 - phase
            n = min(src + 1, end - pos)
            stop = src - n
            runs.append((pos - start, slice(src, stop if stop >= 0 else None, -1)))
        pos += n
    return runs


class ArraySource:
    """Level-0 pixels of an in-memory RGB image extended to any size.

    ``mode="mirror"`` reflects the image at its borders (no seams in the tissue),
    ``"tile"`` repeats it. Lower levels are left to the writer's area averaging.
    """

    renders_levels = False

    def __init__(self, rgb: npt.NDArray[np.uint8], *, mode: str = "mirror") -> None:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InvalidParameter(
                f"expected an (h, w, 3) uint8 image, got {rgb.shape} {rgb.dtype}"
            )
        if mode not in ("mirror", "tile"):
            raise InvalidParameter(f"mode must be 'mirror' or 'tile', got {mode!r}")
        self.rgb = np.ascontiguousarray(rgb)
        self.mode = mode

    def __call__(self, level: int, y: int, x: int, h: int, w: int) -> npt.NDArray[np.uint8]:
        if level != 0:
            raise ValueError("ArraySource renders level 0 only")
        ih, iw = self.rgb.shape[:2]
        out = np.empty((h, w, 3), dtype=np.uint8)
        col_runs = _source_runs(x, w, iw, self.mode)
        for oy, sy in _source_runs(y, h, ih, self.mode):
            rows = self.rgb[sy]
            for ox, sx in col_runs:
                block = rows[:, sx]
                out[oy : oy + block.shape[0], ox : ox + block.shape[1]] = block
        return out


def write_slide_from_array(
    path: str | Path,
    rgb: npt.NDArray[np.uint8],
    *,
    mpp: float | None,
    width: int | None = None,
    height: int | None = None,
    mode: str = "mirror",
    **kwargs: Unpack[WriterOptions],
) -> PyramidInfo:
    """A pyramidal slide from an RGB array, mirrored/tiled to ``width`` x ``height``.

    Extra keyword arguments go to :func:`write_pyramidal_tiff`.
    """
    h, w = rgb.shape[:2]
    return write_pyramidal_tiff(
        path,
        width=width or w,
        height=height or h,
        mpp=mpp,
        tile_source=ArraySource(rgb, mode=mode),
        **kwargs,
    )


