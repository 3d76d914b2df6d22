"""Structural checks of TIFF files that tifffile itself only warns about.

A truncated pyramid still opens in tifffile (and so tiffslide): it logs that a directory
lies past the end of the file and serves the pages before it, or hands out tile offsets
beyond the end. A slide like that must be refused when it is opened, not fail halfway
through a job, so the directory chain is followed from the raw header and every page's
tile/strip data must lie inside the file.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import IO

import numpy as np

from wsi.errors import SlideUnreadable

TIFF_MAGICS: tuple[bytes, ...] = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in TIFF_MAGICS


def tiff_ifd_offsets(path: Path, size: int) -> list[int]:
    """Walk the TIFF directory chain; raise SlideUnreadable where it leaves the file.

    tifffile only warns about a directory past the end of a truncated file and reads
    the pages before it, so the chain is followed here, from the raw header.
    """
    with open(path, "rb") as fh:
        return ifd_offsets_of(fh, size, path.name)


def ifd_offsets_of(fh: IO[bytes], size: int, name: str) -> list[int]:
    """:func:`tiff_ifd_offsets` over an open handle (a local file or a remote one)."""
    fh.seek(0)
    header = fh.read(16)
    order = "<" if header[:2] == b"II" else ">"
    big = struct.unpack(order + "H", header[2:4])[0] == 43
    count_fmt, entry_size, offset_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
    offset = struct.unpack(order + offset_fmt, header[8:16] if big else header[4:8])[0]
    offsets: list[int] = []
    while offset and len(offsets) < 100_000:
        count_size, offset_size = struct.calcsize(count_fmt), struct.calcsize(offset_fmt)
        if offset in offsets:
            raise SlideUnreadable(
                f"{name!r}: TIFF directory {len(offsets)} loops back to byte {offset}"
            )
        if offset + count_size > size:
            raise SlideUnreadable(
                f"{name!r} is truncated: TIFF directory {len(offsets)} starts at byte "
                f"{offset} but the file has {size} bytes"
            )
        fh.seek(offset)
        (n,) = struct.unpack(order + count_fmt, fh.read(count_size))
        end = offset + count_size + n * entry_size + offset_size
        if end > size:
            raise SlideUnreadable(
                f"{name!r} is truncated: TIFF directory {len(offsets)} ends at byte "
                f"{end} but the file has {size} bytes"
            )
        offsets.append(offset)
        fh.seek(offset + count_size + n * entry_size)
        (offset,) = struct.unpack(order + offset_fmt, fh.read(offset_size))
    return offsets


def check_tiff_extent(path: Path) -> None:
    """The directory chain and every page's tile/strip data must lie inside the file."""
    with open(path, "rb") as fh:
        check_tiff_extent_of(fh, path.stat().st_size, path.name)


def check_tiff_extent_of(fh: IO[bytes], size: int, name: str) -> None:
    """:func:`check_tiff_extent` over an open handle (a local file or a remote one)."""
    import tifffile

    try:
        ifd_offsets_of(fh, size, name)
        fh.seek(0)
        with tifffile.TiffFile(fh, name=name) as tif:
            for index, page in enumerate(tif.pages):
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.size == 0:
                    continue
                end = int((offsets + counts).max())
                if end > size:
                    raise SlideUnreadable(
                        f"{name!r} is truncated: image data of TIFF page {index} runs to byte "
                        f"{end} but the file has {size} bytes"
                    )
    except SlideUnreadable:
        raise
    except Exception as err:  # tifffile raises many types on broken files
        raise SlideUnreadable(f"{name!r}: the TIFF structure is broken: {err}") from err
