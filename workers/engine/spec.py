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

PATH_FIELDS = ("slide_path", "out_path", "weights", "model_dir", "stain_reference")


@dataclass(frozen=True)
class RunSpec:
    """One slide through one model. ``None`` means "take it from the model card"."""

    slide_path: Path
    model: str  # a built-in model name or a path to a model card JSON
    out_path: Path  # the result .zarr directory (written atomically)
    weights: Path | None = None
    model_dir: Path | None = None  # where named model folders (<name>/card.json) live
    target_mpp: float | None = None
    slide_mpp: float | None = None
    tile_px: int | None = None
    overlap_px: int | None = None
    batch_size: int | None = None  # None: from free GPU memory on CUDA, 8 on CPU
    compile: bool = False  # torch.compile the model (slower start, faster steady state)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    backend: str = "auto"  # auto | openslide | tiffslide
    tissue_method: str = "hsv-otsu"  # hsv-otsu | grey-otsu
    tissue_working_mpp: float = 8.0
    min_tissue_fraction: float = 0.1
    window: str = "tent"  # tent | gaussian | constant
    #: Class-probability maps as uint8 (steps of 1/255), uint16 (1/65535, twice the
    #: bytes) or float32 (four times); RGB outputs are always uint8.
    probability_dtype: str = "uint8"
    chunk_px: int = 512
    read_workers: int = 2
    overwrite: bool = False
    tta: bool = False  # test-time augmentation (flips, 90° rotations) + a variance map
    #: A stain step run on each tile batch before the model, in the same pass: "macenko"
    #: or the name/path of a cyclegan model card.
    stain: str | None = None
    stain_reference: Path | None = None  # Macenko's reference image or slide (default: built-in H&E)
    stain_output: bool = False  # also store the stained RGB (image group "stained") in the result
    extra: dict[str, Any] = field(default_factory=dict)

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
