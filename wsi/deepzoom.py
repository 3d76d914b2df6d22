"""Deep-zoom (DZI) tiles of a slide, as openslide's ``DeepZoomGenerator`` makes them.

Opening a slide costs milliseconds, a tile far less, so generators are kept open in a
small LRU cache shared by the server's threads (openslide reads are thread-safe). Slides
openslide does not open (e.g. stripped TIFFs) are read through tiffslide, whose slide
object has the same interface.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from openslide import OpenSlide, OpenSlideError
from openslide.deepzoom import DeepZoomGenerator

from wsi.errors import InvalidParameter, SlideUnreadable
from wsi.open_cache import OpenCache

log = logging.getLogger(__name__)

#: The slide's DZI: 254 px tiles with a one-pixel overlap (256 px images, as openslide's
#: own deep-zoom server serves them), JPEG.
TILE_PX = 254
OVERLAP = 1
JPEG_QUALITY = 80
CACHED_SLIDES = 8


def _open_slide(path: Path) -> Any:
    try:
        return OpenSlide(str(path))
    except (OpenSlideError, OSError):
        pass
    try:
        import tiffslide

        return tiffslide.TiffSlide(str(path))
    except Exception as err:  # tiffslide raises assorted errors on unreadable files
        raise SlideUnreadable(f"cannot open {path.name} for deep zoom: {err}") from err


def _generator(path: Path) -> DeepZoomGenerator:
    return DeepZoomGenerator(_open_slide(path), tile_size=TILE_PX, overlap=OVERLAP,
                             limit_bounds=False)


GENERATORS: OpenCache[DeepZoomGenerator] = OpenCache(_generator, CACHED_SLIDES)


def dzi_xml(path: Path) -> str:
    """The slide's DZI descriptor (XML)."""
    return str(GENERATORS.get(path).get_dzi("jpeg"))


def dzi_levels(path: Path) -> tuple[int, tuple[int, int]]:
    """(number of DZI levels, level-0 (width, height))."""
    generator = GENERATORS.get(path)
    return int(generator.level_count), tuple(generator.level_dimensions[-1])  # type: ignore[return-value]


def dzi_tile(path: Path, level: int, col: int, row: int) -> bytes:
    """One JPEG tile; InvalidParameter for a level or address outside the pyramid."""
    generator = GENERATORS.get(path)
    if not 0 <= level < generator.level_count:
        raise InvalidParameter(f"no deep-zoom level {level} (0-{generator.level_count - 1})")
    cols, rows = generator.level_tiles[level]
    if not (0 <= col < cols and 0 <= row < rows):
        raise InvalidParameter(f"no tile {col}_{row} at level {level} ({cols} x {rows} tiles)")
    tile = generator.get_tile(level, (col, row))
    buffer = io.BytesIO()
    tile.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
