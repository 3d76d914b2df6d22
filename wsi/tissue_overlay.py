"""The tissue mask drawn over the slide's thumbnail: what a lab engineer checks before a
batch (``slidepipe tissue``, ``GET /v1/slides/{id}/tissue.png``).

The outline of every piece of tissue (and of the holes in it) is traced on the mask at
its own resolution and scaled onto the thumbnail, so a 200 µm² fragment is still drawn
where a resized mask would have lost it; pieces too small to see at that size get a ring
around them. A strip under the picture says the slide, the method and what was found.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from wsi.errors import InvalidParameter
from wsi.reader import Slide
from wsi.tissue import TissueMask, TissueParams, tissue_mask

U8 = npt.NDArray[np.uint8]

OUTLINE_RGB = (0, 170, 0)
RING_RGB = (230, 0, 160)
#: Pieces whose box is smaller than this on the thumbnail (px) get a ring.
SMALL_PX = 6
CAPTION_PX = 22


def draw_outline(thumb: U8, mask: TissueMask) -> U8:
    """``thumb`` (RGB, the whole slide) with the mask's outlines drawn on a copy."""
    out = np.ascontiguousarray(thumb.copy())
    mh, mw = mask.mask.shape
    sx, sy = thumb.shape[1] / mw, thumb.shape[0] / mh
    contours, _ = cv2.findContours(mask.mask.view(np.uint8), cv2.RETR_CCOMP,
                                   cv2.CHAIN_APPROX_SIMPLE)
    scaled = [np.round((c.astype(np.float64) + 0.5) * (sx, sy) - 0.5).astype(np.int32)
              for c in contours]
    thickness = max(1, round(max(thumb.shape[:2]) / 500))
    cv2.drawContours(out, scaled, -1, OUTLINE_RGB, thickness, lineType=cv2.LINE_AA)
    for c in scaled:
        x, y, w, h = cv2.boundingRect(c)
        if max(w, h) < SMALL_PX:
            cv2.circle(out, (x + w // 2, y + h // 2), SMALL_PX + 2 * thickness, RING_RGB,
                       thickness, lineType=cv2.LINE_AA)
    return out


def with_caption(image: U8, text: str) -> U8:
    """``image`` over a white strip holding ``text`` (cut to fit)."""
    h, w = image.shape[:2]
    strip = np.full((CAPTION_PX, w, 3), 255, np.uint8)
    scale = 0.4
    while text and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > w - 8:
        text = text[: max(0, len(text) - 4)] + "…" if len(text) > 4 else ""
        text = text.replace("……", "…")
    cv2.putText(strip, text.replace("µ", "u").replace("²", "2").replace("…", "..."),
                (4, CAPTION_PX - 7), cv2.FONT_HERSHEY_SIMPLEX, scale, (40, 40, 40), 1,
                cv2.LINE_AA)
    return np.ascontiguousarray(np.concatenate([image, strip], axis=0))


def tissue_picture(slide: Slide, params: TissueParams | None = None, max_px: int = 1024,
                   ) -> tuple[U8, TissueMask]:
    """The slide's thumbnail (longer side ``max_px``) with its tissue outlined and a
    caption, and the mask it shows."""
    if not 16 <= max_px <= 8192:
        raise InvalidParameter(f"picture size must be in [16, 8192] px, got {max_px}")
    params = params or TissueParams()
    mask = tissue_mask(slide, params)
    picture = draw_outline(slide.thumbnail(max_px), mask)
    caption = (f"{slide.path.name}: {params.method} at {mask.mpp:.3g} um/px, "
               f"{mask.describe()}")
    return with_caption(picture, caption), mask


def encode_png(rgb: U8) -> bytes:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError(f"PNG encoding failed for an image of shape {rgb.shape}")
    return data.tobytes()
