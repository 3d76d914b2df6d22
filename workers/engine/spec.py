"""What one engine run needs and reports: the contract between CLI, Celery and engine.

A ``RunSpec`` is plain data (JSON-serialisable through :meth:`RunSpec.to_dict`) so that a
Celery task only parses it and calls :func:`workers.engine.run.run_engine`, the same
function ``slidepipe run`` calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from workers.engine.params import ENGINE_PARAMS, TISSUE_FIELDS, check_run_values, default

#: Fields stored as strings in :meth:`RunSpec.to_dict` and turned back into paths.
PATH_FIELDS: tuple[str, ...] = ("slide_path", "out_path",
                                *(p.name for p in ENGINE_PARAMS if p.type is Path))


@dataclass(frozen=True)
class RunSpec:
    """One slide through one model. ``None`` means "take it from the model card".

    The parameters, their defaults and limits are declared in :mod:`workers.engine.params`
    (what each one means is its help text there); a spec checks itself on construction,
    so a bad value fails before any work, whichever door it came in by.
    """

    slide_path: Path
    model: str  # a built-in model name or a path to a model card JSON
    out_path: Path  # the result .zarr directory (written atomically)
    weights: Path | None = default("weights")
    model_dir: Path | None = default("model_dir")
    target_mpp: float | None = default("target_mpp")
    slide_mpp: float | None = default("slide_mpp")
    tile_px: int | None = default("tile_px")
    overlap_px: int | None = default("overlap_px")
    batch_size: int | None = default("batch_size")
    compile: bool = default("compile")
    device: str = default("device")
    backend: str = default("backend")
    tissue_method: str = default("tissue_method")
    tissue_working_mpp: float = default("tissue_working_mpp")
    min_fragment_um2: float = default("min_fragment_um2")
    max_hole_um2: float = default("max_hole_um2")
    tissue_median_um: float = default("tissue_median_um")
    tissue_closing_um: float = default("tissue_closing_um")
    pen_filter: bool = default("pen_filter")
    pen_width_um: float = default("pen_width_um")
    min_tissue_fraction: float = default("min_tissue_fraction")
    cover_all_tissue: bool = default("cover_all_tissue")
    window: str = default("window")
    probability_dtype: str = default("probability_dtype")
    chunk_px: int = default("chunk_px")
    read_workers: int = default("read_workers")
    overwrite: bool = default("overwrite")
    tta: bool = default("tta")
    stain: str | None = default("stain")
    stain_reference: Path | None = default("stain_reference")
    stain_output: bool = default("stain_output")
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_run_values(vars(self))

    def tissue_values(self) -> dict[str, Any]:
        """The ``wsi.tissue.TissueParams`` fields this run sets."""
        return {field_name: getattr(self, name) for name, field_name in TISSUE_FIELDS.items()}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in PATH_FIELDS:
            if data[key] is not None:
                data[key] = str(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown run parameters: {', '.join(sorted(unknown))}")
        values = dict(data)
        for key in PATH_FIELDS:
            if values.get(key) is not None:
                values[key] = Path(values[key])
        return cls(**values)


@dataclass(frozen=True)
class Progress:
    """A progress report: ``stage`` is one of STAGES; ``done``/``total`` count its units."""

    stage: str
    done: int
    total: int

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


#: The stages of a run in order; ``infer`` counts tiles, the others count steps.
STAGES: tuple[str, ...] = ("open", "tissue", "plan", "infer", "pyramid", "done")

ProgressCallback = Callable[[Progress], None]
#: Polled between batches; returning True stops the run with ``RunCancelled``.
CancelCheck = Callable[[], bool]


class RunCancelled(Exception):
    """The run was asked to stop; nothing was published at ``out_path``."""


@dataclass(frozen=True)
class RunResult:
    out_path: Path
    tiles_total: int
    tiles_inferred: int
    timings_s: dict[str, float]
    classes: list[str]
    provenance: dict[str, Any]
    #: What a person should know about the run (e.g. that no tissue was found).
    warnings: list[str] = field(default_factory=list)
