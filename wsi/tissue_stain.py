"""The ``stain`` tissue method: stained pixels kept, glass, pen ink, dust and bubbles not.

Built for recall: a thin strand or a small fragment of stained tissue is tissue; a pen
stroke, a dust speck or an air bubble's rim is not, whatever its size.

Per working-view pixel (:func:`stain_code`, one byte):

* **chroma** ``max(R, G, B) - min(R, G, B)``: how much colour the pixel has. Glass is
  grey-white (chroma 0-10 even under JPEG noise), every stain absorbs some colours more
  than others. Unlike HSV saturation it does not blow up in dark pixels, so black ink
  and dust (dark and grey) do not look stained.
* **grey** (darker than glass, little chroma: black marker, dust, bubble rims, debris):
  never stain.
* **pen hue** (blue 180-245°, green 70-180°, chroma of at least 40): the inks of lab
  markers, as HistoQC tells them apart. Haematoxylin can be as blue as blue ink, and
  surgical margin dye is green on real tissue, so a pen-hued *pixel* is not rejected; a
  pen-hued *region* is: what survives an opening ``pen_width_um`` wide (a marker
  stroke is hundreds of micrometres wide, nuclei and margin dye are not).

Then two thresholds on chroma (hysteresis): ``high`` from Otsu's method (kept between
a floor and a cap, so a blank slide stays empty and pale tissue is not lost to dark
tissue), ``low`` at half of it. Pixels of at least ``low`` chroma are median-filtered,
closed and their holes filled; a connected piece of them is tissue when it holds
pixels above ``high`` (its stain is real, not glass noise), is not mostly next to grey
pixels or pen regions (the colour fringes JPEG and anti-aliasing leave around dark
specks and along strokes), and measures at least ``min_fragment_um2``. Pen regions
are cut out of the result last.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import numpy.typing as npt

from wsi.tissue_morphology import (
    bits,
    close,
    cmp,
    components,
    count_under,
    disc,
    fill_holes,
    odd,
    select,
    u8,
)

if TYPE_CHECKING:
    from wsi.tissue import TissueParams

U8 = npt.NDArray[np.uint8]

#: Codes of :func:`stain_code`: 0-125 chroma, GREY_CODE a grey pixel, + PEN_BIT pen hue.
CHROMA_MAX = 125
GREY_CODE = 126
PEN_BIT = 128

#: A grey pixel: less chroma than this and darker than GREY_MAX_VALUE (glass is ~240).
GREY_CHROMA = 20
GREY_MAX_VALUE = 200
#: OpenCV hue (degrees / 2) of marker inks, [from, to], and the least chroma of ink.
PEN_HUE = (35, 122)  # green 70-180°, blue 180-245°
PEN_MIN_CHROMA = 40

#: Otsu's threshold on chroma is kept within [HIGH_FLOOR, HIGH_CAP]; ``low`` is half of
#: it, at least LOW_FLOOR. Glass under JPEG noise stays below 10 at 4 µm/px.
HIGH_FLOOR = 20
HIGH_CAP = 40
LOW_FLOOR = 12
#: A piece is an artefact's fringe when at least this share of it touches grey or pen.
FRINGE_SHARE = 0.5


def stain_code(rgb: U8) -> U8:
    """One byte per pixel of an RGB image: chroma (0-125), or GREY_CODE, plus PEN_BIT.

    About 6 ns a pixel: it runs on every pixel of the working view, inside the reader's
    band threads."""
    r, g, b = (u8(c) for c in cv2.split(np.ascontiguousarray(rgb)))
    mx = u8(cv2.max(cv2.max(r, g), b))
    chroma = u8(cv2.subtract(mx, cv2.min(cv2.min(r, g), b)))
    grey = u8(cv2.bitwise_and(cmp(chroma, GREY_CHROMA, cv2.CMP_LT),
                              cmp(mx, GREY_MAX_VALUE, cv2.CMP_LT)))
    # a grey pixel's chroma is below GREY_CODE, so the max sets exactly those to it
    code = u8(cv2.max(np.minimum(chroma, np.uint8(CHROMA_MAX)), bits(grey, GREY_CODE)))
    inked = cmp(chroma, PEN_MIN_CHROMA, cv2.CMP_GE)
    if cv2.countNonZero(inked):  # glass-only bands need no hue
        hsv = u8(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))
        in_hue = u8(cv2.inRange(hsv, (PEN_HUE[0], 0, 0), (PEN_HUE[1], 255, 255)))
        code = u8(cv2.bitwise_or(code, bits(u8(cv2.bitwise_and(in_hue, inked)), PEN_BIT)))
    return code


def otsu_level(hist: npt.NDArray[np.float64]) -> int:
    """Otsu's threshold of a histogram: the first bin of the upper class."""
    total = float(hist.sum())
    if total == 0:
        return len(hist)
    weight0 = np.cumsum(hist)
    weight1 = total - weight0
    cum = np.cumsum(hist * np.arange(len(hist), dtype=np.float64))
    mean0 = cum / np.maximum(weight0, 1)
    mean1 = (cum[-1] - cum) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return int(np.argmax(between[:-1])) + 1


@dataclass(frozen=True)
class StainFindings:
    """What the method saw, for logs, warnings and provenance (areas in µm²)."""

    high: int
    low: int
    pen_um2: float
    grey_um2: float
    rejected_fragments: int

    def as_dict(self) -> dict[str, Any]:
        return {"chroma_high": self.high, "chroma_low": self.low, "pen_um2": self.pen_um2,
                "grey_um2": self.grey_um2, "rejected_fragments": self.rejected_fragments}


def pen_regions(pen: U8, mpp: float, pen_width_um: float) -> U8 | None:
    """Pen-hued regions holding a square ``pen_width_um`` wide (an opening), grown by a
    pixel (0/255), or None when there are none: the usual case, where the erosion
    leaves nothing of the scattered nuclei. (A square, not a disc: OpenCV erodes by a
    rectangle in two 1-D passes, several times faster on a 40-megapixel view.)"""
    k = odd(pen_width_um / mpp)
    square = np.ones((k, k), np.uint8)
    core = np.asarray(cv2.erode(pen, square), dtype=np.uint8) if k > 1 else pen
    if not cv2.countNonZero(core):
        return None
    opened = cv2.dilate(core, square) if k > 1 else core
    return np.asarray(cv2.dilate(opened, disc(3)), dtype=np.uint8)


def _pieces(m: U8, value: U8, high: int, artefact: U8 | None, mpp: float,
            params: TissueParams) -> tuple[U8, int, int]:
    """Close ``m`` (0/255, changed), fill its holes and keep the pieces whose stain is
    real, that are no artefact's fringe and big enough; also how many pieces were kept
    and how many fringes went."""
    close(m, mpp, params.closing_um)
    fill_holes(m, mpp, params.max_hole_um2)
    n, labels = components(m, 8)
    areas = count_under(labels, n)
    keep = count_under(labels, n, cmp(value, high, cv2.CMP_GE)) > 0
    keep &= areas * (mpp * mpp) >= params.min_fragment_um2
    rejected = 0
    if artefact is not None and cv2.countNonZero(artefact):
        # fringes: what JPEG and anti-aliasing leave around dark specks and along strokes
        touching = count_under(labels, n, u8(cv2.dilate(artefact, disc(3))))
        fringe = touching >= FRINGE_SHARE * np.maximum(areas, 1)
        rejected = int((keep & fringe)[1:].sum())
        keep &= ~fringe
    keep[0] = False
    return (m if keep[1:].all() else select(labels, keep)), int(keep.sum()), rejected


def stain_mask(code: U8, mpp: float, params: TissueParams) -> tuple[U8, StainFindings, int]:
    """The tissue of a :func:`stain_code` view (0/255), what was found, and the number of
    fragments kept (see the module docstring).

    One pass over the whole view (a histogram, and the box around every pixel that could
    matter: chroma of at least LOW_FLOOR, grey or ink); the rest runs in that box, with
    room for the filters around it. Slides are mostly glass."""
    px_area = mpp * mpp
    counts = cv2.calcHist([code], [0], None, [256], [0, 256]).ravel().astype(np.float64)
    hist = counts[: CHROMA_MAX + 1].copy()  # neither grey nor ink: chroma
    hist[0] += counts[GREY_CODE]  # grey counts as no stain
    high = min(max(otsu_level(hist), HIGH_FLOOR), HIGH_CAP)
    low = max(LOW_FLOOR, high // 2)
    tissue = np.zeros_like(code)
    # codes from LOW_FLOOR up: chroma that a threshold may keep, grey (126) and ink (128+)
    x, y, w, h = cv2.boundingRect(cmp(code, LOW_FLOOR, cv2.CMP_GE))
    findings = StainFindings(high=high, low=low, pen_um2=0.0,
                             grey_um2=float(counts[GREY_CODE]) * px_area, rejected_fragments=0)
    if w == 0:
        return tissue, findings, 0
    pad = max(odd(params.pen_width_um / mpp), odd(params.closing_um / mpp),
              odd(params.median_um / mpp)) + 2
    box = (slice(max(0, y - pad), y + h + pad), slice(max(0, x - pad), x + w + pad))
    kept, pen_area, n_kept, rejected = _in_box(code[box], high, low, mpp, params)
    tissue[box] = kept
    pen_um2 = 0.0 if pen_area is None else cv2.countNonZero(pen_area) * px_area
    return tissue, replace(findings, pen_um2=pen_um2, rejected_fragments=rejected), n_kept


#: Islands of candidates are found on a grid of blocks this wide (working pixels).
ISLAND_PX = 128


def islands(m: U8, mpp: float, params: TissueParams
            ) -> list[tuple[tuple[slice, slice], U8 | None]]:
    """Where to look for pieces: the box of each island of candidates (blocks holding
    one, grown by a block), with its own blocks as a 0/255 mask where another island's
    blocks reach into the box (else None).

    Islands are three empty blocks apart, so closing and hole filling cannot join them,
    and working island by island spares the labelling of the glass between them (most
    of a slide). Holes larger than a block would differ: then one box holds all."""
    h, w = m.shape
    Island = tuple[tuple[slice, slice], U8 | None]
    whole: list[Island] = [((slice(0, h), slice(0, w)), None)]
    if params.max_hole_um2 >= (ISLAND_PX * mpp) ** 2 or h * w <= 16 * ISLAND_PX**2:
        return whole
    rows = np.arange(0, h, ISLAND_PX)
    cols = np.arange(0, w, ISLAND_PX)
    grid = np.maximum.reduceat(np.maximum.reduceat(m, cols, axis=1), rows, axis=0)
    grid = u8(cv2.dilate(grid, np.ones((3, 3), np.uint8)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(grid, connectivity=8)
    out: list[Island] = []
    for i in range(1, int(n)):
        bx, by, bw, bh = (int(v) for v in stats[i, :4])
        box = (slice(by * ISLAND_PX, min(h, (by + bh) * ISLAND_PX)),
               slice(bx * ISLAND_PX, min(w, (bx + bw) * ISLAND_PX)))
        blocks = np.asarray(labels[by : by + bh, bx : bx + bw])
        own = None
        if ((blocks != 0) & (blocks != i)).any():
            mine = np.where(blocks == i, np.uint8(255), np.uint8(0))
            own = np.repeat(np.repeat(mine, ISLAND_PX, 0), ISLAND_PX, 1)
            own = np.ascontiguousarray(own[: box[0].stop - box[0].start,
                                           : box[1].stop - box[1].start])
        out.append((box, own))
    return out


def _in_box(code: U8, high: int, low: int, mpp: float, params: TissueParams
            ) -> tuple[U8, U8 | None, int, int]:
    """:func:`stain_mask` inside its box: tissue (0/255), ink regions, pieces kept, fringes
    rejected."""
    pen = cmp(code, PEN_BIT, cv2.CMP_GE)
    value = bits(code, PEN_BIT - 1)
    grey = cmp(value, GREY_CODE, cv2.CMP_EQ)
    value = u8(cv2.subtract(value, grey))  # grey -> 0
    pen_area = pen_regions(pen, mpp, params.pen_width_um) if params.pen_filter else None
    del pen
    if pen_area is not None:
        value = u8(cv2.bitwise_and(value, cv2.bitwise_not(pen_area)))
    m = cmp(value, low, cv2.CMP_GE)
    k = odd(params.median_um / mpp)
    if k > 1:
        m = u8(cv2.medianBlur(m, k))
    tissue = np.zeros_like(m)
    artefact = None
    if params.pen_filter:
        artefact = grey if pen_area is None else u8(cv2.bitwise_or(grey, pen_area))
    n_kept = rejected = 0
    for box, own in islands(m, mpp, params):
        crop = m[box] if own is None else u8(cv2.bitwise_and(m[box], own))
        kept, n, r = _pieces(crop, value[box], high,
                             None if artefact is None else artefact[box], mpp, params)
        if own is not None:
            kept = u8(cv2.bitwise_and(kept, own))
        np.bitwise_or(tissue[box], kept, out=tissue[box])
        n_kept, rejected = n_kept + n, rejected + r
    if pen_area is not None:
        cv2.bitwise_and(tissue, cv2.bitwise_not(pen_area), dst=tissue)  # no ink comes back
    return tissue, pen_area, n_kept, rejected
