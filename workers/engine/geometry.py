"""A run's tile geometry and strip width: torch-free, so the jobs layer checks a job's
tile size and overlap before queueing it, with the same code the engine runs."""

from __future__ import annotations

import math

from models.card import ModelCard
from wsi.tiling import TileGeometry

#: Tiles are processed in vertical strips this many output chunks wide, so that the
#: blending state is a few chunk rows of one strip, not of the whole slide width.
STRIP_CHUNKS = 8


def run_geometry(card: ModelCard, tile_px: int | None, overlap_px: int | None) -> TileGeometry:
    """The validated tile geometry of a run: the job's tile size and overlap where
    given, the card's otherwise; crop and output stride always the card's."""
    geometry = TileGeometry(
        tile_px=tile_px if tile_px is not None else card.tile_px,
        overlap_px=overlap_px if overlap_px is not None else card.overlap_px,
        output_crop_px=card.output_crop_px,
        output_stride=card.output_stride,
    )
    geometry.validate()
    return geometry


def strip_px(chunk_px: int, geometry: TileGeometry) -> int:
    """Strip width on the target grid: about STRIP_CHUNKS output chunks, at least one
    stride, and where the tile stride allows it a whole number of tile strides that
    ends on a chunk edge.

    Why the edge: a chunk that tiles of two strips touch waits a whole strip for the
    second, parked on disk. When the next strip's first tiles start on a chunk edge,
    only the previous strip's overhang (the tile overlap) lies in that chunk, and only
    that slab is parked."""
    chunk_target = chunk_px * geometry.output_stride
    nominal = max(geometry.stride_px, STRIP_CHUNKS * chunk_target)
    period = math.lcm(geometry.stride_px, chunk_target)  # strides that end on a chunk edge
    if period > 2 * nominal:
        return nominal
    return max(1, round(nominal / period)) * period
