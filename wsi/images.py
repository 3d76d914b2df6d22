"""Plain image files (PNG, JPEG, TIFF tiles), as opposed to slides: read as RGB arrays.

Training tiles, mask images and stain references come as single images; one reader
for all of them, so every caller gets the same colour order and the same error.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from wsi.errors import SlideUnreadable

#: File suffixes read as plain images (a .tif may also be a slide: callers decide).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageUnreadable(SlideUnreadable):
    """An image file is missing, not an image, or corrupt."""


def read_rgb_image(path: Path) -> npt.NDArray[np.uint8]:
    """The image at ``path`` as (h, w, 3) uint8 RGB (alpha dropped, grey expanded)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageUnreadable(f"cannot read image {str(path)!r}")
    return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def image_files(folder: Path) -> list[Path]:
    """Every image file below ``folder``, sorted (recursively)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
