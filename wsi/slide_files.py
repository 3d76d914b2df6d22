"""Which file to open for a slide given as a file or as a folder.

Most formats are one file. A DICOM whole-slide image is a folder of ``.dcm`` files (one
per level, plus label, overview and thumbnail images); openslide 4 opens the whole
series given any one of them. For a folder the file of the largest level is handed
over: a VOLUME image (DICOM ImageType) with the most pixels (TotalPixelMatrixColumns x
Rows), read from the file's first bytes without a DICOM library; the largest file
when no header says. An MRXS slide is an ``.mrxs`` file beside a
data folder of the same name; given the folder that holds both, the ``.mrxs`` is opened.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wsi.errors import SlideUnreadable

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
#: Single-file formats a folder may hold instead (one of them, alone).
SINGLE_FILE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide", ".qptiff", ".btf", ".vms"}
)


def is_dicom(path: Path) -> bool:
    """A DICOM file: 128 bytes of preamble, then ``DICM``."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


#: DICOM tags (group, element) as their little-endian bytes: ImageType, the total pixel
#: matrix's columns and rows, and pixel data (the header ends there).
_IMAGE_TYPE = b"\x08\x00\x08\x00"
_COLUMNS = b"\x48\x00\x06\x00"
_ROWS = b"\x48\x00\x07\x00"
_PIXEL_DATA = b"\xe0\x7f\x10\x00"
_HEADER_BYTES = 1 << 18


def _element(head: bytes, tag: bytes) -> bytes | None:
    """The value of the first ``tag`` element in ``head`` (explicit or implicit VR,
    little endian: what WSI files use)."""
    at = head.find(tag)
    if at < 0:
        return None
    vr = head[at + 4 : at + 6]
    if vr.isalpha() and vr.isupper():  # explicit VR, short length (CS, UL)
        (length,) = struct.unpack_from("<H", head, at + 6)
        return head[at + 8 : at + 8 + length]
    (length,) = struct.unpack_from("<I", head, at + 4)
    return head[at + 8 : at + 8 + length] if length < 1024 else None


def dicom_level_key(path: Path) -> tuple[bool, int, int]:
    """Sort key of a DICOM file: (a VOLUME image, its pixels, its bytes)."""
    with path.open("rb") as fh:
        head = fh.read(_HEADER_BYTES)
    end = head.find(_PIXEL_DATA)
    head = head if end < 0 else head[:end]
    image_type = _element(head, _IMAGE_TYPE) or b""
    pixels = 0
    columns, rows = _element(head, _COLUMNS), _element(head, _ROWS)
    if columns is not None and rows is not None and len(columns) == len(rows) == 4:
        pixels = struct.unpack("<I", columns)[0] * struct.unpack("<I", rows)[0]
    return b"VOLUME" in image_type, pixels, path.stat().st_size


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder``, the largest level first."""
    found = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
             and (p.suffix.lower() in DICOM_SUFFIXES or is_dicom(p))]
    return sorted(found, key=lambda p: (dicom_level_key(p), p.name), reverse=True)


def slide_in_folder(folder: Path) -> Path:
    """The file to open for the slide that ``folder`` holds (see the module docstring)."""
    mrxs = sorted(folder.glob("*.mrxs"))
    if len(mrxs) == 1:
        return mrxs[0]
    if len(mrxs) > 1:
        raise SlideUnreadable(f"folder {folder.name!r} holds {len(mrxs)} .mrxs slides; "
                              "give the one to open")
    dicom = dicom_files(folder)
    if dicom:
        return dicom[0]
    singles = [p for p in folder.iterdir()
               if p.is_file() and p.suffix.lower() in SINGLE_FILE_SUFFIXES]
    if len(singles) == 1:
        return singles[0]
    raise SlideUnreadable(
        f"no slide in folder {folder.name!r}: expected the DICOM files of one slide (.dcm), "
        f"an .mrxs file beside its data folder, or one slide file"
        + (f" (found {len(singles)} slide files)" if singles else "")
    )


def resolve_slide_path(path: Path) -> Path:
    """``path`` itself for a file; the file to open for a folder."""
    if path.is_file():
        return path
    if path.is_dir():
        return slide_in_folder(path)
    raise SlideUnreadable(f"no slide file or folder at {str(path)!r}")
