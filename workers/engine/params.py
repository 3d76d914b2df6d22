"""The engine's run parameters, declared once: name, type, unit, default, limits, help.

Three front doors set them: ``slidepipe run`` (click options), the REST API (``JobParams``)
and Python callers (``RunSpec``). Each used to state its own limits, and they drifted
(a batch size of 300 passed the engine and failed the API; ``tissue_method=none`` worked on
the command line only). Now the click options (``service.cli_engine``) and ``JobParams``
(``workers.jobs.params``) are generated from :data:`PARAMS`, and ``RunSpec`` takes its
defaults from it and checks itself with :func:`check_run_values`;
``tests/workers/engine/test_params.py`` fails when any of them disagrees.

This module imports neither torch nor the slide stack (cv2, openslide), so the API process
and ``slidepipe --help`` read it for free. The slide library keeps its own guards
(``wsi.tiling.MAX_TILE_PX``, ``wsi.tissue.TISSUE_METHODS``, ``wsi.blending.WINDOWS``); the
test asserts that the declaration matches them.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi.errors import InvalidParameter

#: The largest tile side; equal to ``wsi.tiling.MAX_TILE_PX`` (asserted by the test).
MAX_TILE_PX = 8192


@dataclass(frozen=True)
class Param:
    """One run parameter. A ``None`` default means "decide at run time" (mostly: take the
    model card's value), and then ``None`` is an allowed value too."""

    name: str  #: carries its unit where it has one: ``tile_px``, ``target_mpp``
    type: type  #: int, float, str, bool or Path
    default: Any
    help: str
    unit: str = ""  #: "µm/px", "µm", "µm²", "px", "fraction", "tiles", "threads"; "" if none
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    pattern: str | None = None  #: a full match for free-text values (the device)
    min_length: int | None = None
    #: The API's length bound on free text: there a stain step is a model *name*, while the
    #: engine and the CLI also take a path to a card.
    api_max_length: int | None = None
    #: The REST API may set it. Paths, the device, threads, compilation and overwriting are
    #: the server's business (and a client must never name a server file).
    api: bool = True
    #: A ``RunSpec`` field (hence also a ``slidepipe run`` option). False for API-only
    #: parameters, which the job layer maps onto an engine field (see ``maps_to``).
    engine: bool = True
    maps_to: str | None = None
    aliases: tuple[str, ...] = ()  #: older CLI spellings, still accepted
    envvar: str | None = None  #: the CLI option also reads this environment variable
    must_exist: bool = False  #: a path the CLI checks is an existing file

    @property
    def optional(self) -> bool:
        return self.default is None

    @property
    def flag(self) -> str:
        """The canonical command-line spelling: ``tile_px`` -> ``--tile-px``."""
        return "--" + self.name.replace("_", "-")

    @property
    def bounded(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))

    def range_text(self) -> str:
        """The allowed interval, e.g. ``(0, 256]``; one-sided bounds read ``>= 0``."""
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None:
            return (f"{'[' if self.ge is not None else '('}{low:g}, "
                    f"{high:g}{']' if self.le is not None else ')'}")
        if low is not None:
            return f"{'>=' if self.ge is not None else '>'} {low:g}"
        if high is not None:
            return f"{'<=' if self.le is not None else '<'} {high:g}"
        return ""

    def range_with_unit(self) -> str:
        """``[16, 8192] px``, ``(0, 256] µm/px``, ``[0, 1] (a fraction)``."""
        if not self.unit:
            return self.range_text()
        if self.unit == "fraction":
            return f"{self.range_text()} (a fraction)"
        return f"{self.range_text()} {self.unit}"

    def describe(self) -> str:
        """Help text with range, unit and choices: the API's field description."""
        text = self.help
        if self.bounded:
            text += f" Range: {self.range_with_unit()}."
        if self.choices:
            text += f" One of: {', '.join(self.choices)}."
        return text


_CARD = "default: the model card's"

#: Every run parameter, in the order ``slidepipe run --help`` lists them.
PARAMS: tuple[Param, ...] = (
    Param("weights", Path, None, f"Weights file, safetensors or a .pt state dict ({_CARD}).",
          api=False),
    Param("target_mpp", float, None, f"Resolution the model runs at ({_CARD}).",
          unit="µm/px", gt=0, le=256),
    Param("slide_mpp", float, None, "Level-0 resolution, for slides that lack it.",
          unit="µm/px", gt=0, lt=1000),
    Param("tile_px", int, None, f"Tile size at the target mpp ({_CARD}).",
          unit="px", ge=16, le=MAX_TILE_PX, aliases=("--tile-size",)),
    Param("overlap_px", int, None, f"Overlap between tiles, below tile_px ({_CARD}).",
          unit="px", ge=0, le=MAX_TILE_PX - 1, aliases=("--overlap",)),
    # 1024: what the engine always allowed; the automatic choice stops at 256.
    Param("batch_size", int, None,
          "Tiles per model call (default: from free GPU memory on CUDA, 8 on CPU).",
          unit="tiles", ge=1, le=1024),
    Param("compile", bool, False,
          "torch.compile the model: a slower start for a faster steady state on long runs.",
          api=False),
    Param("device", str, "auto", "auto, cpu, cuda or cuda:N.",
          pattern=r"auto|cpu|cuda(:\d+)?", api=False),
    Param("backend", str, "auto", "Slide reader.", choices=("auto", "openslide", "tiffslide")),
    Param("tissue_method", str, "stain",
          "Tissue detection: stain (chroma with two thresholds, pen ink and dust kept out), "
          "hsv-otsu (the default until 2026-12), grey-otsu; none processes every tile.",
          choices=("stain", "hsv-otsu", "grey-otsu", "none")),
    Param("tissue_working_mpp", float, 4.0, "Resolution the tissue mask is computed at.",
          unit="µm/px", ge=0.1, le=64),
    Param("min_fragment_um2", float, 200.0,
          "Smallest piece of tissue kept in the mask (dust is told apart by colour, not size).",
          unit="µm²", ge=0, le=1e8),
    Param("max_hole_um2", float, 50_000.0,
          "Glass enclosed by tissue up to this area counts as tissue.", unit="µm²", ge=0,
          le=1e9),
    Param("tissue_median_um", float, 12.0, "Median filter of the tissue mask.", unit="µm",
          ge=0, le=1000),
    Param("tissue_closing_um", float, 24.0,
          "Morphological closing of the tissue mask (joins pieces closer than this).",
          unit="µm", ge=0, le=1000),
    Param("pen_filter", bool, True,
          "stain method: keep pen ink (blue, green, black marker), dust and bubble rims out "
          "of the tissue mask."),
    Param("pen_width_um", float, 30.0,
          "stain method: a blue or green region at least this wide is ink, not tissue.",
          unit="µm", ge=1, le=5000),
    Param("min_tissue_fraction", float, 0.1,
          "Keep tiles with at least this tissue fraction (and, with cover_all_tissue, any "
          "tile holding tissue no kept tile covers).",
          unit="fraction", ge=0, le=1, aliases=("--min-tissue",)),
    Param("cover_all_tissue", bool, True,
          "Analyse every piece of tissue: keep a tile below min_tissue_fraction when it "
          "holds tissue that no other kept tile covers (a small fragment, a strand)."),
    Param("window", str, "tent", "Blending weight window.",
          choices=("tent", "gaussian", "constant")),
    Param("probability_dtype", str, "uint8",
          "Store class probabilities in steps of 1/255, 1/65535 (twice the bytes) or as "
          "float32 (four times); RGB outputs are always uint8.",
          choices=("uint8", "uint16", "float32")),
    Param("chunk_px", int, 512, "Output chunk side.", unit="px", ge=64, le=4096),
    Param("read_workers", int, 2, "Tile-decoding threads.", unit="threads", ge=1, le=64,
          api=False),
    Param("model_dir", Path, None, "Folder of named models (<name>/card.json).",
          api=False, envvar="SLIDEPIPE_MODEL_DIR"),
    Param("overwrite", bool, False, "Replace an existing result.", api=False),
    Param("tta", bool, False,
          "Test-time augmentation: average flips and 90° rotations per tile, and store the "
          "per-pixel variance as an extra map."),
    Param("stain", str, None,
          "Stain step before the model, in the same pass over the tiles: 'macenko' or a "
          "cyclegan model name (the CLI also takes a card path).",
          min_length=1, api_max_length=64),
    Param("stain_reference", Path, None,
          "Macenko's target stain: an image (a tile) or a slide (default: the built-in H&E "
          "reference).", api=False, must_exist=True),
    Param("stain_output", bool, False,
          "Also store the stained RGB in the result (image group 'stained'); needs a stain."),
    Param("stain_reference_slide", str, None,
          "Macenko only: the id of one of your slides whose stain is the target (default: "
          "the built-in H&E reference).", api_max_length=64, engine=False,
          maps_to="stain_reference"),
)

PARAMS_BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
#: Run parameters that are ``wsi.tissue.TissueParams`` fields: run name -> field name.
TISSUE_FIELDS: dict[str, str] = {
    "tissue_method": "method", "tissue_working_mpp": "working_mpp",
    "min_fragment_um2": "min_fragment_um2", "max_hole_um2": "max_hole_um2",
    "tissue_median_um": "median_um", "tissue_closing_um": "closing_um",
    "pen_filter": "pen_filter", "pen_width_um": "pen_width_um",
}
#: The parameters a ``RunSpec`` (and ``slidepipe run``) has.
ENGINE_PARAMS: tuple[Param, ...] = tuple(p for p in PARAMS if p.engine)
#: The parameters a REST client may set (``JobParams``).
API_PARAMS: tuple[Param, ...] = tuple(p for p in PARAMS if p.api)
#: ``RunSpec`` fields that are not tunable parameters: the run's subject and object
#: (the CLI's SLIDE, --model and --out) and free-form extras.
PLUMBING_FIELDS: tuple[str, ...] = ("slide_path", "model", "out_path", "extra")


def default(name: str) -> Any:
    """The declared default of ``name`` (``RunSpec`` takes its defaults from here)."""
    return PARAMS_BY_NAME[name].default


def _type_ok(param: Param, value: Any) -> bool:
    """numpy scalars count as numbers (scripts compute sizes with numpy), bools do not
    (``batch_size=True`` is a mistake, not 1); an int is a fine float."""
    if param.type is bool:
        return isinstance(value, bool)
    if param.type is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if param.type is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if param.type is Path:
        return isinstance(value, str | os.PathLike)
    return isinstance(value, param.type)


def _in_range(param: Param, value: float) -> bool:
    # written so that NaN fails every bound
    return ((param.ge is None or value >= param.ge) and (param.gt is None or value > param.gt)
            and (param.le is None or value <= param.le) and (param.lt is None or value < param.lt))


def check_value(param: Param, value: Any) -> None:
    """Raise :class:`InvalidParameter` naming the value and what is allowed."""
    if value is None:
        if param.optional:
            return
        raise InvalidParameter(f"{param.name} must be set ({param.type.__name__})")
    if not _type_ok(param, value):
        raise InvalidParameter(
            f"{param.name} must be {param.type.__name__}, got {type(value).__name__} {value!r}")
    if param.bounded and not _in_range(param, value):
        raise InvalidParameter(f"{param.name} must be in {param.range_with_unit()}, got {value}")
    if param.choices is not None and value not in param.choices:
        raise InvalidParameter(
            f"{param.name} must be one of {', '.join(param.choices)}, got {value!r}")
    if param.pattern is not None and not re.fullmatch(param.pattern, value):
        raise InvalidParameter(f"{param.name} must match {param.pattern}, got {value!r}")
    if param.min_length is not None and len(value) < param.min_length:
        raise InvalidParameter(
            f"{param.name} must have at least {param.min_length} character(s), got {value!r}")


def check_tile_overlap(tile_px: int | None, overlap_px: int | None) -> None:
    """Tiles must overlap by less than their size (when both are given; the card's values
    are checked against the job's when the run's geometry is built)."""
    if tile_px is not None and overlap_px is not None and overlap_px >= tile_px:
        raise InvalidParameter(
            f"overlap_px ({overlap_px}) must be smaller than tile_px ({tile_px})")


def check_run_values(values: Mapping[str, Any]) -> None:
    """Check every declared engine parameter in ``values`` (a ``RunSpec``'s fields) against
    the table, then the cross-field rules. Raises :class:`InvalidParameter`."""
    for param in ENGINE_PARAMS:
        if param.name in values:
            check_value(param, values[param.name])
    check_tile_overlap(values.get("tile_px"), values.get("overlap_px"))
    if values.get("stain_output") and not values.get("stain"):
        raise InvalidParameter("stain_output stores a stain step's output: give a stain step")
