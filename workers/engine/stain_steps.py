"""Building a job's stain step (``RunSpec.stain``) from slides and model cards.

``stain`` is ``"macenko"`` or the name/path of a ``cyclegan`` model card. Macenko needs
stains for both ends: the reference (``stain_reference``: an image file or a slide; the
built-in H&E reference when none is given) and the source, fitted once per slide from
tiles spread over its tissue, so that every tile of the slide gets the same transform.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.catalogue import resolve_card
from models.macenko import MacenkoNormalizer, StainEstimationError, StainReference
from models.stain_transfer import CycleGANStep, MacenkoStep, StainStep
from workers.engine.stain_choice import MACENKO, check_stain, stain_kind
from wsi.errors import InvalidParameter
from wsi.images import IMAGE_SUFFIXES, read_rgb_image
from wsi.reader import Slide
from wsi.tiling import TileGeometry, TilePlan, plan_tiles
from wsi.tissue import TissueMask, TissueParams, tissue_mask

log = logging.getLogger(__name__)

#: Tissue sampled to fit a slide's stains: up to this many tiles of this size.
SAMPLE_TILES, SAMPLE_PX = 12, 512


def sample_tissue(slide: Slide, mpp: float, mask: TissueMask | None = None, *,
                  n_tiles: int = SAMPLE_TILES, tile_px: int = SAMPLE_PX) -> np.ndarray:
    """Up to ``n_tiles`` of the slide's most tissue-rich tiles at ``mpp``, spread over the
    slide, as one RGB strip (Macenko only looks at its stained pixels)."""
    mpp = slide.grid_mpp(mpp)
    width, height = slide.scaled_dimensions(mpp)
    tile_px = max(16, min(tile_px, width, height))
    mask = mask if mask is not None else tissue_mask(slide, TissueParams())
    plan = plan_tiles(width=width, height=height, target_mpp=mpp, slide_mpp=slide.mpp,
                      geometry=TileGeometry(tile_px=tile_px), mask=mask, min_tissue_fraction=0.0)
    richest = sorted(plan.tiles, key=lambda t: -t.tissue_fraction)[: n_tiles * 4]
    tiles = sorted(richest, key=lambda t: t.index)
    if not tiles:
        raise InvalidParameter(f"no tissue found on {slide.path.name!r} to fit stains to")
    picks = [tiles[i] for i in np.linspace(0, len(tiles) - 1, min(n_tiles, len(tiles))).astype(int)]
    return np.concatenate([slide.read_scaled(mpp, t.x, t.y, tile_px, tile_px) for t in picks])


def read_reference(path: Path, mpp: float) -> np.ndarray:
    """The pixels of a Macenko reference: an image file whole, a slide's tissue sampled."""
    path = Path(path)
    if not path.is_file():
        raise InvalidParameter(f"stain reference {str(path)!r} is not a file")
    if path.suffix.lower() in IMAGE_SUFFIXES and path.suffix.lower() not in (".tif", ".tiff"):
        return read_rgb_image(path)
    try:
        with Slide(path) as slide:
            return sample_tissue(slide, mpp)
    except InvalidParameter:
        raise
    except Exception:
        if path.suffix.lower() in (".tif", ".tiff"):  # a plain TIFF image, not a slide
            return read_rgb_image(path)
        raise


def build_stain_step(
    stain: str,
    *,
    slide: Slide,
    plan: TilePlan,
    model_dir: Path | None,
    device: str,
    reference: Path | None = None,
    mask: TissueMask | None = None,
) -> StainStep:
    """The step ``stain`` names, fitted to ``slide`` (its tissue: ``mask``) where it
    needs fitting."""
    if stain_kind(stain) == MACENKO:
        try:
            if reference is None:
                ref, ref_name = StainReference.default(), "built-in H&E (Macenko et al.)"
            else:
                ref = StainReference.from_image(read_reference(reference, plan.target_mpp))
                ref_name = str(reference)
            normalizer = MacenkoNormalizer(ref).fit(sample_tissue(slide, plan.target_mpp, mask))
        except StainEstimationError as err:
            raise InvalidParameter(f"Macenko normalisation: {err}") from err
        return MacenkoStep(normalizer, ref_name)
    if reference is not None:
        raise InvalidParameter("stain_reference applies to Macenko only; a cyclegan model "
                               "carries its target stain in its weights")
    check_stain(stain, model_dir)
    card = resolve_card(stain, model_dir)
    if abs(card.target_mpp - plan.target_mpp) > 0.25 * card.target_mpp:
        log.warning("stain model %s was trained at %g µm/px but runs on the model's tiles at "
                    "%g µm/px", card.name, card.target_mpp, plan.target_mpp)
    return CycleGANStep(card, device=device)


def describe_steps(stain: StainStep | None, card: Any, weights_sha256: str | None) -> list[dict]:
    """Provenance: every step of the chain, in order."""
    steps = [stain.describe()] if stain is not None else []
    steps.append({"kind": "model", "name": card.name, "architecture": card.architecture,
                  "weights_sha256": weights_sha256})
    return steps
