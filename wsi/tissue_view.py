"""The ``stain`` code of a slide's working view, decoded only where there is something.

At 4 µm/px a 20x slide (0.5 µm/px, levels 1/4/16) has no stored level to read: the view
comes from the 2 µm/px level, 16 times the pixels of the 8 µm/px one, and decoding it
whole would take seconds. Slides are mostly glass, so a stored level at least twice as
coarse is read first (cheap), and the view is decoded at full quality only in the
blocks where that level shows any colour, grey or ink (plus a coarse pixel around it);
the rest is glass and stays code 0. A faint 15 µm strand still marks its coarse pixels
(their chroma is diluted, not gone: COARSE_CHROMA is below the method's floors).
Without such a level (a single-level slide), the view is read whole.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import numpy.typing as npt

from wsi.reader import Slide
from wsi.tissue_morphology import bits, cmp, u8
from wsi.tissue_stain import PEN_BIT, stain_code

U8 = npt.NDArray[np.uint8]

#: Side of a block of the working view, in working pixels (512 µm at 4 µm/px).
BLOCK_PX = 128
#: A coarse pixel with at least this chroma (grey and ink codes are above it) marks the
#: blocks it touches for decoding. Glass reads 0-5 at 8-16 µm/px.
COARSE_CHROMA = 6
#: The coarse level is 2-16 times coarser than the view.
COARSE_RANGE = (2.0, 16.0)


def coarse_level(slide: Slide, mpp: float) -> int | None:
    """The finest stored level 2-16 times coarser than ``mpp``, if any."""
    found = [lvl for lvl in range(slide.level_count)
             if COARSE_RANGE[0] * mpp * 0.99 <= slide.level_mpp(lvl) <= COARSE_RANGE[1] * mpp]
    return min(found, key=slide.level_mpp) if found else None


def _block_edges(blocks: int, block_px: int, view_px: int, coarse_px: int
                 ) -> npt.NDArray[np.int64]:
    """Where each block starts, in coarse pixels (rounded down)."""
    starts = np.arange(blocks, dtype=np.int64) * block_px * coarse_px // view_px
    return np.minimum(starts, coarse_px - 1)


def marked_blocks(coarse: U8, width: int, height: int) -> npt.NDArray[np.bool_]:
    """Blocks (rows, cols) of the view that hold a marked coarse pixel or touch one.

    The marks are grown by a coarse pixel first, so a block whose edge cuts a coarse
    pixel is marked with it; then each block's span of coarse rows and columns is
    reduced with a maximum (``np.maximum.reduceat``: one pass, no per-pixel Python)."""
    marked = cmp(bits(coarse, PEN_BIT - 1), COARSE_CHROMA, cv2.CMP_GE)
    marked = u8(cv2.dilate(marked, np.ones((3, 3), np.uint8)))
    ch, cw = coarse.shape
    rows, cols = math.ceil(height / BLOCK_PX), math.ceil(width / BLOCK_PX)
    by_col = np.maximum.reduceat(marked, _block_edges(cols, BLOCK_PX, width, cw), axis=1)
    by_block = np.maximum.reduceat(by_col, _block_edges(rows, BLOCK_PX, height, ch), axis=0)
    out: npt.NDArray[np.bool_] = by_block > 0
    return out


def stain_view(slide: Slide, level: int, width: int, height: int, mpp: float
               ) -> tuple[U8, float]:
    """The :func:`~wsi.tissue_stain.stain_code` of the view (``level`` resized to
    ``width`` x ``height``, ``mpp`` µm/px) and the share of it that was decoded."""
    coarse = coarse_level(slide, mpp)
    if coarse is None or width * height <= 4 * BLOCK_PX * BLOCK_PX:
        return slide.read_level_resized(level, width, height, channel=stain_code), 1.0
    cw, ch = slide.level_dimensions[coarse]
    blocks = marked_blocks(slide.read_level_resized(coarse, cw, ch, channel=stain_code),
                           width, height)
    code = np.zeros((height, width), dtype=np.uint8)

    def decode(block: tuple[int, int]) -> None:
        y, x = block[0] * BLOCK_PX, block[1] * BLOCK_PX
        h, w = min(BLOCK_PX, height - y), min(BLOCK_PX, width - x)
        code[y : y + h, x : x + w] = stain_code(slide.read_scaled(mpp, x, y, w, h))

    todo = [(int(r), int(c)) for r, c in zip(*np.nonzero(blocks))]
    if slide.concurrent_reads and len(todo) > 1:
        with ThreadPoolExecutor(2, thread_name_prefix="tissue-block") as pool:
            for _ in pool.map(decode, todo):  # re-raises a block's error
                pass
    else:
        for block in todo:
            decode(block)
    return code, len(todo) / max(1, blocks.size)
