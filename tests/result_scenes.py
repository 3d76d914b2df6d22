"""Results with known regions, written through the product's zarr writer, chunk by chunk
(a large one never exists in memory): for the exports' tests and bench/geojson.py.

A grid of square regions, ``pitch`` pixels apart and ``pitch - gap`` wide, alternately
of class 1 and 2; every third square has a square hole of class 0 (not computed) in its
middle. Probability of the square's class: 200/255, of the other 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi.ome_zarr import ChannelSpec, LabelSpec, ResultWriter, hex_to_rgba

CLASSES = (ChannelSpec("tumour", "E00000"), ChannelSpec("stroma", "F2A0C8"))
OUTPUT_MPP = 0.5
SLIDE_MPP = 0.25


def square_labels(y0: int, x0: int, h: int, w: int, pitch: int, gap: int) -> np.ndarray:
    """The label block at (y0, x0) of size (h, w)."""
    ys = np.arange(y0, y0 + h)[:, None]
    xs = np.arange(x0, x0 + w)[None, :]
    iy, ix = ys // pitch, xs // pitch
    inside = (ys % pitch < pitch - gap) & (xs % pitch < pitch - gap)
    side = pitch - gap
    centre = (np.abs(ys % pitch - side // 2) < side // 4) & (np.abs(xs % pitch - side // 2)
                                                            < side // 4)
    holed = (iy * 7 + ix) % 3 == 0
    value = 1 + (iy + ix) % 2
    return np.where(inside & ~(holed & centre), value, 0).astype(np.uint8)


def write_square_result(path: Path, *, height: int, width: int, pitch: int = 16, gap: int = 3,
                        chunk_px: int = 512) -> None:
    writer = ResultWriter(path, height=height, width=width, mpp=OUTPUT_MPP, chunk_px=chunk_px)
    image = writer.chunk_files(writer.create_image("", "probabilities", CLASSES))
    labels = writer.chunk_files(writer.create_label(LabelSpec(
        "classes", {i + 1: (c.name, hex_to_rgba(c.color)) for i, c in enumerate(CLASSES)})))
    for cy in range(-(-height // chunk_px)):
        for cx in range(-(-width // chunk_px)):
            y0, x0 = cy * chunk_px, cx * chunk_px
            h, w = min(chunk_px, height - y0), min(chunk_px, width - x0)
            block = square_labels(y0, x0, h, w, pitch, gap)
            labels.write((cy, cx), block)
            probs = np.stack([np.where(block == v, 200, 0) for v in (1, 2)]).astype(np.uint8)
            image.write((0, cy, cx), probs)
    writer.set_attrs("slidepipe", {
        "model_card": {"name": "squares"},
        "finished": "2026-01-01T00:00:00+00:00",
        "slide": {"name": "squares.svs", "mpp": SLIDE_MPP,
                  "dimensions": [round(width * OUTPUT_MPP / SLIDE_MPP),
                                 round(height * OUTPUT_MPP / SLIDE_MPP)]},
    })
