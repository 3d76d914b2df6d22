"""Hostile inputs shared by the robustness tests and ``bench/load.py``.

Decompression bombs are written by hand (a classic little-endian TIFF, one directory):
every tile offset points at the same deflate-compressed tile of zeros, so a file of a
few dozen kilobytes declares tens of billions of pixels. Nothing here needs a server.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

# TIFF tag ids and field types used below
_SHORT, _LONG = 3, 4


def _ifd_entry(tag: int, kind: int, count: int, value: int) -> bytes:
    return struct.pack("<HHII", tag, kind, count, value)


def bomb_tiff(path: Path, width: int, height: int, *, tile_px: int = 4096) -> Path:
    """A tiled RGB TIFF declaring ``width`` x ``height`` px with one stored tile.

    With the default 4096 px tiles a 150,000 px square is about 60 KB on disk.
    """
    tile = zlib.compress(bytes(tile_px * tile_px * 3), 9)
    n_tiles = math.ceil(width / tile_px) * math.ceil(height / tile_px)
    header = b"II*\x00" + struct.pack("<I", 8)
    n_entries = 11
    ifd_size = 2 + 12 * n_entries + 4
    bits_at = 8 + ifd_size  # three SHORTs (8, 8, 8), padded to 8 bytes
    offsets_at = bits_at + 8
    counts_at = offsets_at + 4 * n_tiles
    tile_at = counts_at + 4 * n_tiles
    entries = [
        _ifd_entry(256, _LONG, 1, width),
        _ifd_entry(257, _LONG, 1, height),
        _ifd_entry(258, _SHORT, 3, bits_at),
        _ifd_entry(259, _SHORT, 1, 8),  # deflate
        _ifd_entry(262, _SHORT, 1, 2),  # RGB
        _ifd_entry(277, _SHORT, 1, 3),
        _ifd_entry(284, _SHORT, 1, 1),
        _ifd_entry(322, _LONG, 1, tile_px),
        _ifd_entry(323, _LONG, 1, tile_px),
        _ifd_entry(324, _LONG, n_tiles, offsets_at),
        _ifd_entry(325, _LONG, n_tiles, counts_at),
    ]
    assert len(entries) == n_entries
    ifd = struct.pack("<H", n_entries) + b"".join(entries) + struct.pack("<I", 0)
    body = (
        header
        + ifd
        + struct.pack("<HHHH", 8, 8, 8, 0)
        + struct.pack(f"<{n_tiles}I", *([tile_at] * n_tiles))
        + struct.pack(f"<{n_tiles}I", *([len(tile)] * n_tiles))
        + tile
    )
    path.write_bytes(body)
    return path


def giant_tile_tiff(path: Path, side: int = 100_000) -> Path:
    """A TIFF whose single tile declares ``side`` x ``side`` px (30 GB decoded)."""
    return bomb_tiff(path, side, side, tile_px=side) if side <= 4096 else _giant(path, side)


def _giant(path: Path, side: int) -> Path:
    tile = zlib.compress(bytes(4096), 9)  # far too short for the tile it claims to be
    header = b"II*\x00" + struct.pack("<I", 8)
    n_entries = 11
    bits_at = 8 + 2 + 12 * n_entries + 4
    tile_at = bits_at + 8
    entries = [
        _ifd_entry(256, _LONG, 1, side),
        _ifd_entry(257, _LONG, 1, side),
        _ifd_entry(258, _SHORT, 3, bits_at),
        _ifd_entry(259, _SHORT, 1, 8),
        _ifd_entry(262, _SHORT, 1, 2),
        _ifd_entry(277, _SHORT, 1, 3),
        _ifd_entry(284, _SHORT, 1, 1),
        _ifd_entry(322, _LONG, 1, side),
        _ifd_entry(323, _LONG, 1, side),
        _ifd_entry(324, _LONG, 1, tile_at),
        _ifd_entry(325, _LONG, 1, len(tile)),
    ]
    ifd = struct.pack("<H", n_entries) + b"".join(entries) + struct.pack("<I", 0)
    path.write_bytes(header + ifd + struct.pack("<HHHH", 8, 8, 8, 0) + tile)
    return path


#: Filenames a multipart upload may carry: every one must be answered without a 500.
UNICODE_FILENAMES = (
    "😐.svs",
    "スライド標本.svs",
    "切片样本.svs",
    "Ünïcödé — “quoted”.svs",
    "a\u200bzero-width.svs",
    "x" * 300 + ".svs",
)


def content_disposition_rfc5987(name: str, field: str = "file") -> str:
    """``form-data`` with ``filename*=UTF-8''...`` (RFC 5987/6266) and an ASCII fallback."""
    from urllib.parse import quote

    fallback = name.encode("ascii", "replace").decode().replace('"', "_")
    return f'form-data; name="{field}"; filename="{fallback}"; filename*=UTF-8\'\'{quote(name)}'


def multipart_body(disposition: str, data: bytes, boundary: str = "hostileboundary42") -> bytes:
    """A one-part multipart/form-data body with a raw (UTF-8) Content-Disposition."""
    return (
        f"--{boundary}\r\nContent-Disposition: ".encode()
        + disposition.encode("utf-8")
        + b"\r\nContent-Type: application/octet-stream\r\n\r\n"
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
