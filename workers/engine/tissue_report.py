"""What a run says about its tissue: the warning when nothing was analysed.

A plan without a tile "succeeds" with an empty result; that must never be silent. The
warning names the slide, the tissue method and what it found, goes to the log, into the
result's provenance (``.zattrs["slidepipe"]["warnings"]``), to ``slidepipe run``'s
output and into the job's ``result_info.warnings``.
"""

from __future__ import annotations

from wsi.tiling import TilePlan
from wsi.tissue import TissueMask, TissueParams


def plan_warnings(slide_name: str, params: TissueParams, mask: TissueMask, plan: TilePlan,
                  min_tissue_fraction: float) -> list[str]:
    """The run's warnings (none when some tile is analysed)."""
    if plan.tiles:
        return []
    where = (f"tissue method {params.method!r} at {mask.mpp:.3g} µm/px found "
             f"{mask.describe()}")
    if mask.area_um2 == 0:
        hint = ("nothing was analysed; if the slide holds tissue, try --tissue-method none "
                "or a lower --min-fragment-um2")
        if params.method != "none" and params.pen_filter and (
                mask.findings.get("pen_um2") or mask.findings.get("grey_um2")):
            hint += " or --no-pen-filter"
        return [f"no tissue on {slide_name!r}: {where}; {hint}"]
    return [f"no tile analysed on {slide_name!r}: {where}, but no tile reaches "
            f"min_tissue_fraction={min_tissue_fraction:g}; lower it or allow "
            "--cover-all-tissue"]
