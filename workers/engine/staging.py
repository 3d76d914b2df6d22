"""A run's staged result and its record: what ``prepare`` leaves for the other phases.

The result is made under a temporary sibling name (``.<name>.partial-<id>``) and moved
into place only when complete, so a failed or cancelled run leaves nothing that looks
like a result. The *record* (``<staged>.record/``) holds what every part and the final
step read back instead of recomputing: the run's parameters and decisions
(``state.json``), the tile plan (``tiles.npz``) and the tissue mask (``tissue.npy``),
as plain JSON and numpy files (no pickles: another process, perhaps another host,
reads them).
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.engine.part_table import PartRange
from workers.engine.spec import RunSpec
from wsi.errors import OutputExists
from wsi.tiling import Tile, TileGeometry, TilePlan

#: The record of a prepared run: a folder beside its staged result, removed on publishing.
RECORD_SUFFIX = ".record"
_TILE_FIELDS = ("index", "row", "col", "x", "y", "x0", "y0")


def new_staged_path(out_path: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling of ``out_path`` (``.<name>.partial-<id>``, which the
    jobs layer recognises as an interrupted run's leftover)."""
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise OutputExists(f"{str(out_path)!r} already exists; pass overwrite to replace it")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return out_path.with_name(f".{out_path.name}.partial-{uuid.uuid4().hex[:8]}")


def publish(staged: Path, out_path: Path) -> None:
    """Move the complete ``staged`` result into place, replacing an older one."""
    out_path = Path(out_path)
    if out_path.exists():
        old = out_path.with_name(f".{out_path.name}.old-{uuid.uuid4().hex[:8]}")
        out_path.rename(old)
        staged.rename(out_path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(out_path)


def discard(staged: Path) -> None:
    """Remove a staged result and its record."""
    shutil.rmtree(staged, ignore_errors=True)
    shutil.rmtree(record_dir(staged), ignore_errors=True)


def record_dir(staged: Path) -> Path:
    """Beside the staged result (not in it: zarr would warn of an unknown folder), under
    a name that the jobs layer's leftover sweep matches too."""
    staged = Path(staged)
    return staged.with_name(staged.name + RECORD_SUFFIX)


def save_plan(folder: Path, plan: TilePlan) -> None:
    tiles = plan.tiles
    arrays = {name: np.fromiter((getattr(t, name) for t in tiles), np.int64, len(tiles))
              for name in _TILE_FIELDS}
    arrays["tissue_fraction"] = np.fromiter((t.tissue_fraction for t in tiles), np.float64,
                                            len(tiles))
    save_arrays(folder / "tiles.npz", arrays)


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez(path, **arrays)  # type: ignore[arg-type]  # (numpy's stub: allow_pickle)


def load_plan(folder: Path, meta: dict[str, Any]) -> TilePlan:
    with np.load(folder / "tiles.npz") as data:
        columns = [data[name].tolist() for name in _TILE_FIELDS]
        fractions = data["tissue_fraction"].tolist()
    tiles = [Tile(index, row, col, x, y, x0, y0, fraction)
             for index, row, col, x, y, x0, y0, fraction in zip(*columns, fractions)]
    return TilePlan(target_mpp=meta["target_mpp"], width=meta["width"], height=meta["height"],
                    geometry=TileGeometry(**meta["geometry"]), n_rows=meta["n_rows"],
                    n_cols=meta["n_cols"], tiles=tiles)


@dataclass(frozen=True)
class RunState:
    """What the phases after ``prepare`` read back."""

    staged: Path
    meta: dict[str, Any]
    spec: RunSpec
    plan: TilePlan
    parts: list[PartRange]

    @property
    def batch_size(self) -> int:
        return int(self.meta["batch_size"])


def read_state(staged: Path) -> RunState:
    folder = record_dir(staged)
    meta = json.loads((folder / "state.json").read_text())
    return RunState(
        staged=Path(staged), meta=meta, spec=RunSpec.from_dict(meta["spec"]),
        plan=load_plan(folder, meta["plan"]),
        parts=[PartRange.from_dict(i, p) for i, p in enumerate(meta["parts"])],
    )


def plain_json(value: object) -> Any:
    """numpy scalars (a tissue finding, say) as JSON numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def relocate(staged: Path, *, slide_path: Path, out_path: Path,
             model_dir: Path | None) -> None:
    """Point a record copied from another host at this host's paths: its copy of the
    slide (a slide in a folder keeps its place inside it), the output beside which the
    result is published, and the model folder. Used when a split run's parts meet in an
    object store instead of a shared folder (workers/jobs/split_staging.py)."""
    path = record_dir(staged) / "state.json"
    meta = json.loads(path.read_text())
    spec = meta["spec"]
    old_slide, old_file = Path(spec["slide_path"]), Path(meta["slide_file"])
    try:
        inner = old_file.relative_to(old_slide)
    except ValueError:  # the file opened is not inside the slide's path: the path itself
        inner = Path()
    meta["slide_file"] = str(Path(slide_path) / inner) if inner.parts else str(slide_path)
    spec["slide_path"] = str(slide_path)
    spec["out_path"] = str(out_path)
    spec["model_dir"] = str(model_dir) if model_dir is not None else None
    path.write_text(json.dumps(meta, default=plain_json))
