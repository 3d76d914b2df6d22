"""Checks of an untrusted slide whose cost is bounded by the file, not by what it declares.

A 56 KB tiled TIFF can declare 150,000 x 150,000 pixels (every tile offset pointing at
one well-compressed tile); decoding "a thumbnail" of it means decoding all of them. So
an upload is checked in three steps, each cheaper than the next is dangerous:

1. :func:`check_tiff_header` reads only TIFF directories (never pixels): the declared
   level-0 size, the number of pages, the size of one decoded tile or strip, and the
   declared pixels per byte of file. It runs before any reader opens the file, because
   opening probes one tile per level and a single declared tile may be 10^10 pixels.
2. :func:`check_declared` applies the same size limits to what a reader reports after
   opening (formats other than TIFF, and TIFFs as the reader sees them).
3. :func:`check_decodes` decodes a bounded number of pixels within a time budget: the
   whole thumbnail when the level it comes from is small, else a fixed sample of tiles.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from wsi.errors import SlideError, SlideUnreadable
from wsi.reader import Slide
from wsi.tiff_integrity import is_tiff, tiff_ifd_offsets

#: A TIFF with more directories than this is not a slide (SVS: levels plus label, macro).
MAX_TIFF_PAGES = 1024
#: The most bytes one decoded tile or strip may take (a declared 100k x 100k single tile
#: would be 30 GB before the first pixel is seen).
MAX_BLOCK_BYTES = 256 * 1024**2
#: A level this small (pixels) is decoded whole for the thumbnail check; a larger one is
#: sampled (a slide without a pyramid has only its full-resolution level).
FULL_DECODE_PIXELS = 32 * 1024**2
#: Regions decoded when sampling (a 3 x 3 grid on the coarsest level, one on level 0).
SAMPLE_GRID = 3
SAMPLE_PX = 256
THUMBNAIL_CHECK_PX = 256


class SlideTooLarge(SlideError, ValueError):
    """The slide declares more than the server accepts (pixels, levels, tiles), or its
    check ran out of time: refused before its pixels are decoded."""


@dataclass(frozen=True)
class SlideLimits:
    """What an uploaded slide may declare, and how long checking it may take."""

    max_pixels: float = 4e10  #: level-0 width x height
    max_levels: int = 32
    #: Declared level-0 pixels per byte of file. A scanner's JPEG slide has about 5-50;
    #: an all-white deflate pyramid about 150; a decompression bomb 10^5 and more.
    max_pixels_per_byte: float = 5000.0
    check_s: float = 10.0  #: the time budget of :func:`check_decodes`


def _name(path: Path, label: str | None) -> str:
    return label or path.name


def _check_size(
    width: int, height: int, levels: int, file_bytes: int, limits: SlideLimits, name: str
) -> None:
    pixels = width * height
    if width < 1 or height < 1:
        raise SlideUnreadable(f"{name!r} declares an empty image ({width} x {height} px)")
    if pixels > limits.max_pixels:
        raise SlideTooLarge(
            f"{name!r} declares {width} x {height} = {pixels:.3g} pixels at level 0; this "
            f"server accepts at most {limits.max_pixels:.3g} (SLIDEPIPE_MAX_SLIDE_PIXELS)"
        )
    if levels > limits.max_levels:
        raise SlideTooLarge(
            f"{name!r} declares {levels} levels; at most {limits.max_levels} are accepted "
            "(SLIDEPIPE_MAX_SLIDE_LEVELS)"
        )
    ratio = pixels / max(file_bytes, 1)
    if ratio > limits.max_pixels_per_byte:
        raise SlideTooLarge(
            f"{name!r} declares {width} x {height} pixels in {file_bytes} bytes "
            f"({ratio:.3g} pixels per byte; at most {limits.max_pixels_per_byte:g}, "
            "SLIDEPIPE_MAX_PIXELS_PER_BYTE): a decompression bomb, not a scan"
        )


def check_tiff_header(path: Path, limits: SlideLimits, label: str | None = None) -> None:
    """For a TIFF: the declared geometry of every page, from its directories only.

    Not a TIFF: nothing to do here (:func:`check_declared` runs after opening).
    Raises :class:`SlideTooLarge`, or :class:`SlideUnreadable` for a broken structure.
    """
    if not is_tiff(path):
        return
    import tifffile

    name = _name(path, label)
    size = path.stat().st_size
    largest = (0, 0)
    try:
        tiff_ifd_offsets(path, size)  # a directory past the end: "truncated", said first
        with tifffile.TiffFile(path) as tif:
            for index in range(MAX_TIFF_PAGES + 1):
                try:
                    frame = tif.pages[index]
                except IndexError:  # the end of the directory chain
                    break
                page = frame if isinstance(frame, tifffile.TiffPage) else frame.aspage()
                if index == MAX_TIFF_PAGES:
                    raise SlideTooLarge(f"{name!r} has more than {MAX_TIFF_PAGES} TIFF pages")
                width, height = int(page.imagewidth), int(page.imagelength)
                depth = max(1, int(getattr(page, "imagedepth", 1) or 1))
                if width * height > largest[0] * largest[1]:
                    largest = (width, height)
                if page.is_tiled:
                    block_w, block_h = int(page.tilewidth), int(page.tilelength)
                    block_d = max(1, int(getattr(page, "tiledepth", 1) or 1))
                else:
                    block_w, block_h = width, min(int(page.rowsperstrip or height), height)
                    block_d = depth
                block = block_w * block_h * block_d
                samples = max(1, int(page.samplesperpixel))
                bits = max(8, int(page.bitspersample))
                block_bytes = block * samples * math.ceil(bits / 8)
                if block_bytes > MAX_BLOCK_BYTES:
                    raise SlideTooLarge(
                        f"{name!r}: TIFF page {index} stores its pixels in blocks of "
                        f"{block_w} x {block_h} px, {block_bytes} bytes decoded each (at most "
                        f"{MAX_BLOCK_BYTES})"
                    )
    except SlideError:
        raise
    except Exception as err:  # tifffile raises many types on broken files
        raise SlideUnreadable(f"{name!r}: the TIFF structure is broken: {err}") from err
    if largest == (0, 0):
        raise SlideUnreadable(f"{name!r} is a TIFF without any image")
    _check_size(*largest, 1, size, limits, name)


#: openslide vendors whose pixels lie in files beside the one opened (an MRXS index and
#: its data folder, a DICOM series, a Hamamatsu VMS): their bytes are the folder's.
MULTI_FILE_VENDORS = frozenset({"mirax", "dicom", "hamamatsu"})
MAX_COUNTED_FILES = 100_000


def slide_bytes(slide: Slide) -> int:
    """The bytes a slide's pixels come from: its file, or its folder's files."""
    if slide.vendor not in MULTI_FILE_VENDORS:
        return slide.path.stat().st_size
    total = 0
    for count, member in enumerate(slide.path.parent.rglob("*")):
        if count >= MAX_COUNTED_FILES:
            break
        if member.is_file() and not member.is_symlink():
            total += member.stat().st_size
    return total


def check_declared(
    slide: Slide, limits: SlideLimits, label: str | None = None, file_bytes: int | None = None
) -> None:
    """What the opened reader reports: level-0 size, level count, pixels per byte of
    ``file_bytes`` (default: :func:`slide_bytes`)."""
    width, height = slide.dimensions
    size = file_bytes if file_bytes is not None else slide_bytes(slide)
    _check_size(width, height, slide.level_count, size, limits, _name(slide.path, label))


def _thumbnail_level(slide: Slide, max_px: int) -> int:
    """The level :meth:`Slide.thumbnail` reads for ``max_px``."""
    factor = max(slide.dimensions) / max_px
    return max(
        (lvl for lvl, ds in enumerate(slide.level_downsamples) if ds <= max(factor, 1.0)),
        key=lambda lvl: slide.level_downsamples[lvl],
    )


def _sample_regions(slide: Slide) -> list[tuple[int, int, int, int, int]]:
    """(level, x, y, w, h) of the sampled regions: a grid on the coarsest level, the
    centre of level 0."""
    coarsest = slide.level_count - 1
    regions = []
    for level, grid in ((coarsest, SAMPLE_GRID), (0, 1)):
        lw, lh = slide.level_dimensions[level]
        w, h = min(SAMPLE_PX, lw), min(SAMPLE_PX, lh)
        for gy in range(grid):
            for gx in range(grid):
                x = (lw - w) * (2 * gx + 1) // (2 * grid)
                y = (lh - h) * (2 * gy + 1) // (2 * grid)
                regions.append((level, x, y, w, h))
    return list(dict.fromkeys(regions))


def check_decodes(slide: Slide, limits: SlideLimits, label: str | None = None) -> str:
    """Decode real pixels, boundedly: the thumbnail when its level is at most
    :data:`FULL_DECODE_PIXELS`, else a fixed sample of regions. Returns which was done.

    Raises :class:`wsi.errors.RegionUnreadable` for pixels that do not decode, and
    :class:`SlideTooLarge` when the budget ``limits.check_s`` runs out (checked between
    decodes; each decode is bounded by :data:`MAX_BLOCK_BYTES`).
    """
    started = time.monotonic()
    name = _name(slide.path, label)

    def spent() -> None:
        elapsed = time.monotonic() - started
        if elapsed > limits.check_s:
            raise SlideTooLarge(
                f"checking {name!r} took more than {limits.check_s:g} s ({elapsed:.1f} s; "
                "SLIDEPIPE_UPLOAD_CHECK_S): its pixels decode too slowly to be served"
            )

    level = _thumbnail_level(slide, THUMBNAIL_CHECK_PX)
    lw, lh = slide.level_dimensions[level]
    if lw * lh <= FULL_DECODE_PIXELS:
        slide.thumbnail(THUMBNAIL_CHECK_PX)
        spent()
        return "thumbnail"
    for region_level, x, y, w, h in _sample_regions(slide):
        slide.read_level(region_level, x, y, w, h)
        spent()
    return "sample"
