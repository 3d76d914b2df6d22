"""A run in three phases, so that one slide can run as parts on many workers.

- :func:`prepare` opens the slide, finds tissue, plans tiles, loads the model (for its
  batch size and output geometry), creates the staged result with all its arrays, and
  records the plan, the tissue mask and the part table (:mod:`workers.engine.part_table`)
  beside the staged folder (``<staged>.record/``), as plain JSON and numpy files.
- :func:`run_part` reads that record, runs its part's batches through :func:`infer` and
  stores the level-0 chunks it owns straight into the staged result (parts own disjoint
  chunks, so their files never collide) and its tile-grid entries beside the record.
- :func:`finish` writes the tissue label, the tile grids, the pyramids, the thumbnail
  and the provenance (part timings summed), removes the record and publishes the result
  atomically at ``spec.out_path``.

``run_engine`` is these three phases with one part, in one process; a split job runs
them as Celery tasks (:mod:`workers.jobs.split`). Every part reads the same record, so
the split result is bit-identical to the one-part run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from models.card import ModelCard, OutputSpec
from models.catalogue import resolve_card, sha256_file
from models.loading import load_model
from models.predictor import Predictor, auto_batch_size
from models.stain_transfer import StainedPredictor
from workers.engine.geometry import run_geometry, strip_px
from workers.engine.heap import reuse_freed_blocks, trim_heap
from workers.engine.infer import infer
from workers.engine.part_table import PartRange, chunk_touches, owned_chunks, plan_parts
from workers.engine.provenance import jsonable, package_versions, utc_now
from workers.engine.result_layout import DenseSink, ResultLayout
from workers.engine.spec import CancelCheck, Progress, ProgressCallback, RunResult, RunSpec
from workers.engine.staging import (
    RunState,
    discard,
    new_staged_path,
    plain_json,
    publish,
    read_state,
    record_dir,
    save_arrays,
    save_plan,
)
from workers.engine.stain_steps import build_stain_step, describe_steps
from workers.engine.streamed_pyramid import StreamedPyramids
from workers.engine.tissue_label import write_tissue_label
from workers.engine.tissue_report import plan_warnings
from wsi.ome_zarr import ChunkFiles, ChunkStored, LabelSpec, ResultWriter, array_at
from wsi.reader import Slide
from wsi.remote import recorded_sha256
from wsi.tiling import plan_tiles
from wsi.tissue import TissueMask, TissueParams, tissue_mask

log = logging.getLogger(__name__)

THUMBNAIL_PX = 1024
TISSUE_RGBA = (0, 200, 0, 110)

Model = Predictor | StainedPredictor


class PartMissing(RuntimeError):
    """``finish`` found a part that has not stored its chunks."""


@dataclass(frozen=True)
class Prepared:
    """A prepared run: its staged folder, its parts, and (in-process only) the model."""

    staged: Path
    parts: list[PartRange]
    tiles_total: int
    batch_size: int
    predictor: Model | None = None

    def tiles_run(self, index: int) -> int:
        """How many tiles part ``index`` runs (its own and those it re-runs)."""
        lo, hi = self.parts[index].run_tiles(self.batch_size, self.tiles_total)
        return hi - lo


@dataclass(frozen=True)
class PartDone:
    index: int
    tiles_run: int
    infer_s: float
    #: where the part's inference time went (:class:`workers.engine.infer.InferStages`)
    stages: dict[str, Any] = field(default_factory=dict)
    #: groups whose coarser levels the part made as it stored level 0 (one-part runs)
    pyramids_made: list[str] = field(default_factory=list)


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def stage(self, name: str) -> _Stage:
        return _Stage(self.timings, name)


class _Stage:
    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        self.timings[self.name] = round(time.perf_counter() - self.start, 4)


# -- phase 1 ------------------------------------------------------------------------------
def prepare(spec: RunSpec, *, parts: int = 1, min_tiles: int = 0,
            progress: ProgressCallback | None = None, keep_model: bool = False) -> Prepared:
    """Open, find tissue, plan, create the staged result and record it (module docstring).

    ``parts`` is the most parts wanted, for a plan of at least ``min_tiles`` tiles; the
    part table may have fewer (a cut that costs more than it saves is not made), and a
    run with a stain step is not split (its stain fit would run in every part).
    ``keep_model`` hands the loaded model back for a caller that runs the parts in this
    process."""
    report = progress or (lambda _p: None)
    timer = _Timer()
    started = utc_now()
    with timer.stage("open"):
        report(Progress("open", 0, 1))
        card = resolve_card(spec.model, spec.model_dir)
        geometry = run_geometry(card, spec.tile_px, spec.overlap_px)
        slide = Slide(spec.slide_path, backend=spec.backend, slide_mpp=spec.slide_mpp)
    staged = new_staged_path(spec.out_path, spec.overwrite)
    try:
        with slide:
            slide_mpp = slide.mpp  # raises SlideMissingMpp early, before any work
            target_mpp = slide.grid_mpp(spec.target_mpp or card.target_mpp)
            with timer.stage("tissue"):
                report(Progress("tissue", 0, 1))
                params = TissueParams(**spec.tissue_values())
                mask = tissue_mask(slide, params)
            with timer.stage("plan"):
                report(Progress("plan", 0, 1))
                width, height = slide.scaled_dimensions(target_mpp)
                plan = plan_tiles(
                    width=width, height=height, target_mpp=target_mpp, slide_mpp=slide_mpp,
                    geometry=geometry, mask=mask, min_tissue_fraction=spec.min_tissue_fraction,
                    strip_px=strip_px(spec.chunk_px, geometry),
                    cover_all_tissue=spec.cover_all_tissue,
                )
                warnings = plan_warnings(slide.path.name, params, mask, plan,
                                         spec.min_tissue_fraction)
                for warning in warnings:
                    log.warning("%s", warning)
            trim_heap()  # the tissue view's bands and the grid's arrays are gone
            reuse_freed_blocks()  # from here on, batches and chunks recycle the same blocks
            with timer.stage("load_model"):
                loaded = load_model(card, weights=spec.weights)
                model = Predictor(loaded, device=spec.device, tta=spec.tta, compile=spec.compile)
                model.check_output_geometry(geometry.tile_px, geometry.output_tile_px)
            predictor: Model = model
            stain = None
            if spec.stain:  # a stain step before the model, in the same pass over the tiles
                with timer.stage("stain_fit"):
                    stain = build_stain_step(spec.stain, slide=slide, plan=plan,
                                             model_dir=spec.model_dir, device=spec.device,
                                             reference=spec.stain_reference, mask=mask)
                    predictor = StainedPredictor(stain, model, keep_stained=spec.stain_output)
                if parts > 1:
                    log.info("a run with a stain step is not split: one part")
                    parts = 1
            if len(plan.tiles) < min_tiles:
                parts = 1
            # measured on the whole chain: a stain step's network needs GPU memory too
            batch_size = spec.batch_size or auto_batch_size(predictor, predictor.device,
                                                            geometry.tile_px)
            table = plan_parts(plan, spec.chunk_px, batch_size, parts)
            out_h, out_w = plan.output_shape
            writer = ResultWriter(staged, height=out_h, width=out_w, mpp=plan.output_mpp,
                                  chunk_px=spec.chunk_px)
            layout = ResultLayout(writer, card, plan, extra_dense=predictor.extra_outputs,
                                  probability_dtype=spec.probability_dtype)
            writer.create_label(LabelSpec("tissue", {1: ("tissue", TISSUE_RGBA)}))
            folder = record_dir(staged)
            folder.mkdir()
            save_plan(folder, plan)
            np.save(folder / "tissue.npy", mask.mask)
            meta = {
                "spec": spec.to_dict(), "started": started, "batch_size": batch_size,
                "slide_file": str(slide.path),  # a DICOM folder's file that is hashed
                "timings_s": timer.timings, "warnings": warnings,
                "plan": {"target_mpp": plan.target_mpp, "width": plan.width,
                         "height": plan.height, "n_rows": plan.n_rows, "n_cols": plan.n_cols,
                         "geometry": vars(geometry)},
                "tissue": {"mpp": mask.mpp, "area_um2": mask.area_um2, "method": params.method,
                           "findings": jsonable(mask.findings)},
                "parts": [p.to_dict() for p in table],
                "dense": [{"name": output.name, "max_value": output.max_value,
                           "image": _array_path(staged, layout.sinks[output.name].image),
                           "classes": _array_path(staged, layout.sinks[output.name].classes)}
                          for output in layout.dense],
                "tile_grids": sorted(layout.tile_grids),
                "provenance": {
                    "weights_sha256": loaded.weights_sha256,
                    "steps": describe_steps(stain, card, loaded.weights_sha256),
                    "effective": {
                        "target_mpp": target_mpp, "tile_px": geometry.tile_px,
                        "overlap_px": geometry.overlap_px, "output_mpp": plan.output_mpp,
                        "device": str(predictor.device), "backend": slide.backend,
                        "batch_size": batch_size, "compile": spec.compile,
                    },
                    "slide": {"name": slide.path.name, "dimensions": list(slide.dimensions),
                              "mpp": slide_mpp, "vendor": slide.vendor,
                              "levels": slide.level_count},
                },
            }
            (folder / "state.json").write_text(json.dumps(jsonable(meta), default=plain_json))
    except BaseException:
        discard(staged)
        raise
    log.info("prepared %s: %d tiles in %d part(s) of batches of %d", spec.out_path,
             len(plan.tiles), len(table), batch_size)
    return Prepared(staged=staged, parts=table, tiles_total=len(plan.tiles),
                    batch_size=batch_size, predictor=predictor if keep_model else None)


def _array_path(staged: Path, files: ChunkFiles | None) -> str | None:
    return None if files is None else files.folder.relative_to(staged).as_posix()


# -- phase 2 ------------------------------------------------------------------------------
class _OwnedChunks(DenseSink):
    """A dense sink that stores only the chunks its part owns (the merger also finishes
    chunks whose other tiles belong to a neighbouring part: those it drops)."""

    def __init__(self, image: ChunkFiles, max_value: float, classes: ChunkFiles | None,
                 owned: np.ndarray) -> None:
        super().__init__(image, max_value, classes)
        self.owned = owned

    def owns(self, cy: int, cx: int) -> bool:
        return bool(self.owned[cy, cx])


class _PartLayout(ResultLayout):
    """A :class:`ResultLayout` over arrays that ``prepare`` created (in another process,
    maybe): the same sinks and tile grids, without creating anything. ``chunk_stored``
    is told of every level-0 chunk file of the dense outputs (image and class map)."""

    def __init__(self, state: RunState, card: ModelCard, owned: np.ndarray | None,
                 writer: ResultWriter | None = None,
                 extra_dense: list[OutputSpec] | None = None,
                 chunk_stored: ChunkStored | None = None) -> None:
        plan = state.plan
        self.card, self.plan = card, plan
        if writer is not None:
            self.writer = writer
        root = zarr.open_group(str(state.staged), mode="r")
        self.dense, self.per_tile, self.sinks = [], [], {}
        if owned is not None:
            outputs = {o.name: o for o in [*card.outputs, *(extra_dense or [])]}
            for entry in state.meta["dense"]:
                image = ChunkFiles(array_at(root, entry["image"]), state.staged)
                classes = (ChunkFiles(array_at(root, entry["classes"]), state.staged)
                           if entry["classes"] else None)
                for files in (image, classes):  # on the files: the device sink writes there
                    if files is not None:
                        files.on_stored = chunk_stored
                self.sinks[entry["name"]] = _OwnedChunks(image, entry["max_value"], classes,
                                                         owned)
                self.dense.append(outputs[entry["name"]])
        self.tile_grids = {
            name: np.full((len(card.classes), plan.n_rows, plan.n_cols), np.nan, np.float32)
            for name in state.meta["tile_grids"]
        }


def run_part(staged: Path, index: int, *, predictor: Model | None = None,
             progress: ProgressCallback | None = None,
             cancel: CancelCheck | None = None,
             chunk_stored: ChunkStored | None = None) -> PartDone:
    """Run part ``index`` of a prepared run: its batches through the model, its chunks
    into the staged result. Safe to run again after a failure (it rewrites the same
    chunk files with the same bytes). ``chunk_stored`` is called (on the store threads)
    with each level-0 chunk of the dense outputs as it is written: a worker on a remote
    store uploads them while the run goes on (``workers.jobs.objects.ResultOutput``)."""
    report = progress or (lambda _p: None)
    state = read_state(staged)
    spec, plan = state.spec, state.plan
    part = state.parts[index]
    card = resolve_card(spec.model, spec.model_dir)
    if predictor is None:
        if spec.stain:
            raise ValueError("a run with a stain step runs in one process (prepare's model)")
        model = Predictor(load_model(card, weights=spec.weights), device=spec.device,
                          tta=spec.tta, compile=spec.compile)
        predictor = model
    n_tiles = len(plan.tiles)
    run_lo, run_hi = part.run_tiles(state.batch_size, n_tiles)
    own_lo, own_hi = part.own_tiles(state.batch_size, n_tiles)
    _, last = chunk_touches(plan, spec.chunk_px)
    owned = owned_chunks(last, (own_lo, own_hi))
    layout = _PartLayout(state, card, owned, extra_dense=predictor.extra_outputs,
                         chunk_stored=chunk_stored)
    pyramids = None
    if len(state.parts) == 1:  # this process writes every chunk: its pyramids as it goes
        pyramids = StreamedPyramids(staged, owned, spec.chunk_px)
        for sink in layout.sinks.values():
            pyramids.attach(sink.image, mean=True)
            if sink.classes is not None:
                pyramids.attach(sink.classes, mean=False)
    sub_plan = replace(plan, tiles=plan.tiles[run_lo:run_hi])
    start = time.perf_counter()
    stages = infer(spec, sub_plan, predictor, layout, state.batch_size, report,
                   cancel or (lambda: False))
    infer_s = round(time.perf_counter() - start, 4)
    folder = record_dir(staged)
    if layout.tile_grids:  # only the tiles this part owns: a re-run tile of a neighbour is theirs
        keep = np.zeros((plan.n_rows, plan.n_cols), bool)
        for tile in plan.tiles[own_lo:own_hi]:
            keep[tile.row, tile.col] = True
        save_arrays(folder / f"part-{index}.npz",
                     {name: np.where(keep, grid, np.nan) for name, grid in layout.tile_grids.items()})
    done = PartDone(index=index, tiles_run=run_hi - run_lo, infer_s=infer_s,
                    stages=stages.as_dict(),
                    pyramids_made=pyramids.completed() if pyramids is not None else [])
    (folder / f"part-{index}.json").write_text(json.dumps(vars(done)))
    trim_heap()
    log.info("part %d of %s: %d tiles (%d owned) in %.1fs", index, spec.out_path,
             run_hi - run_lo, own_hi - own_lo, infer_s)
    return done


def parts_done(staged: Path) -> list[int]:
    """Indices of the parts that have stored their chunks."""
    return sorted(int(p.stem.split("-")[1]) for p in record_dir(staged).glob("part-*.json"))


# -- phase 3 ------------------------------------------------------------------------------
def finish(staged: Path, *, progress: ProgressCallback | None = None) -> RunResult:
    """Build what needs the whole level 0, write the provenance and publish."""
    report = progress or (lambda _p: None)
    state = read_state(staged)
    spec, plan, meta = state.spec, state.plan, state.meta
    folder = record_dir(staged)
    missing = sorted(set(range(len(state.parts))) - set(parts_done(staged)))
    if missing:
        raise PartMissing(f"parts {missing} of {spec.out_path} have not run")
    dones = [json.loads((folder / f"part-{i}.json").read_text()) for i in range(len(state.parts))]
    timings = dict(meta["timings_s"])
    timings["infer"] = round(sum(d["infer_s"] for d in dones), 4)
    timer = _Timer()
    card = resolve_card(spec.model, spec.model_dir)
    mask = TissueMask(mask=np.load(folder / "tissue.npy"), mpp=meta["tissue"]["mpp"],
                      findings=meta["tissue"]["findings"])
    out_h, out_w = plan.output_shape
    writer = ResultWriter.reopen(staged, height=out_h, width=out_w, mpp=plan.output_mpp,
                                 chunk_px=spec.chunk_px)
    with timer.stage("pyramid"):
        report(Progress("pyramid", 0, 1))
        layout = _PartLayout(state, card, None, writer)
        for i in range(len(state.parts)):
            if layout.tile_grids:
                with np.load(folder / f"part-{i}.npz") as data:
                    for name, grid in layout.tile_grids.items():
                        mine = data[name]
                        np.copyto(grid, mine, where=~np.isnan(mine))
        layout.write_tile_grids()
        made = dones[0].get("pyramids_made", []) if len(dones) == 1 else []
        if write_tissue_label(ChunkFiles(array_at(writer.root, "labels/tissue/0"), staged),
                              mask, plan, pyramid_from=staged):
            made = [*made, "labels/tissue"]
        writer.build_pyramids(workers=spec.read_workers, skip=made)
        with Slide(spec.slide_path, backend=spec.backend, slide_mpp=spec.slide_mpp) as slide:
            thumb = slide.thumbnail(THUMBNAIL_PX)
            slide_w = slide.dimensions[0]
        slide_mpp = meta["provenance"]["slide"]["mpp"]
        writer.write_small_image("thumbnail", "thumbnail", thumb,
                                 slide_mpp * slide_w / thumb.shape[1])
    with timer.stage("hash_slide"):
        # a slide read by byte ranges is a reference recording its file's hash
        slide_file = Path(meta["slide_file"])
        slide_sha = recorded_sha256(slide_file) or sha256_file(slide_file)
    timings.update(timer.timings)
    base = meta["provenance"]
    provenance = {
        "software": "slidepipe",
        "started": meta["started"],
        "finished": utc_now(),
        "model_card": card.model_dump(mode="json"),
        "weights_sha256": base["weights_sha256"],
        "steps": base["steps"],
        "parameters": jsonable(spec.to_dict()),
        "effective": base["effective"],
        "slide": {"name": base["slide"]["name"], "sha256": slide_sha,
                  **{k: v for k, v in base["slide"].items() if k != "name"}},
        "tissue": meta["tissue"],
        "tiles": {"total": len(plan.tiles), "grid": [plan.n_rows, plan.n_cols]},
        "warnings": meta["warnings"],
        "versions": package_versions(),
        "timings_s": timings,
        # per part: read wait, model, blend, store (wall and CPU seconds); see docs/engine.md
        "infer_stages": [d.get("stages", {}) for d in dones],
        # groups whose coarser levels were made as level 0 was stored (wsi/pyramid_stream.py)
        "pyramids_streamed": made,
    }
    if len(state.parts) > 1:
        provenance["split"] = {"parts": [{**p.to_dict(), **d} for p, d in zip(state.parts, dones)]}
    writer.set_attrs("slidepipe", provenance)
    shutil.rmtree(folder)
    publish(staged, spec.out_path)
    trim_heap()  # a worker process keeps no run's blocks between jobs
    report(Progress("done", 1, 1))
    log.info("wrote %s: %d tiles in %.1fs", spec.out_path, len(plan.tiles),
             sum(timings.values()))
    return RunResult(
        out_path=Path(spec.out_path),
        tiles_total=len(plan.tiles),
        tiles_inferred=len(plan.tiles),
        timings_s=timings,
        classes=card.class_names,
        provenance=provenance,
        warnings=meta["warnings"],
    )
