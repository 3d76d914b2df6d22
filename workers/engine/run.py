"""The slide engine: one slide through one model into one OME-Zarr result.

``run_engine`` is the plain function behind ``slidepipe run`` and the Celery task:
open the slide, find tissue, plan tiles, read them in background threads, run the model,
blend the outputs chunk by chunk into the result, build the pyramids and record
provenance. The result is written under a temporary name beside ``out_path`` and
renamed into place only when complete, so a failed or cancelled run leaves nothing
that looks like a result.
"""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path

import numpy as np

from models.catalogue import resolve_card, sha256_file
from models.loading import load_model
from models.predictor import Predictor, auto_batch_size
from models.stain_transfer import StainedPredictor
from workers.engine.chunk_writer import BackgroundSink
from workers.engine.geometry import run_geometry, strip_px
from workers.engine.heap import reuse_freed_blocks, trim_heap
from workers.engine.provenance import jsonable, package_versions, utc_now
from workers.engine.result_layout import ResultLayout
from workers.engine.spec import (
    CancelCheck,
    Progress,
    ProgressCallback,
    RunCancelled,
    RunResult,
    RunSpec,
)
from workers.engine.stain_steps import build_stain_step, describe_steps
from workers.engine.tissue_report import plan_warnings
from wsi.blending import StreamingMerger, weight_window
from wsi.errors import OutputExists
from wsi.ome_zarr import ChunkFiles, LabelSpec, ResultWriter
from wsi.reader import Slide
from wsi.tile_loader import TileBatchLoader
from wsi.tiling import TilePlan, plan_tiles
from wsi.tissue import TissueMask, TissueParams, tissue_mask

log = logging.getLogger(__name__)

THUMBNAIL_PX = 1024
TISSUE_RGBA = (0, 200, 0, 110)


@contextmanager
def _staged(out_path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_path``; move it into place only on success."""
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise OutputExists(f"{str(out_path)!r} already exists; pass overwrite to replace it")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_path.exists():
        old = out_path.with_name(f".{out_path.name}.old-{uuid.uuid4().hex[:8]}")
        out_path.rename(old)
        tmp.rename(out_path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_path)


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 4)


def _runs(index: np.ndarray) -> tuple[int, int, np.ndarray]:
    """For a non-decreasing index array: its source span [first, last + 1) and how many
    times each source element repeats (0 for one it skips)."""
    first = int(index[0])
    counts = np.bincount(index - first)
    return first, first + len(counts), counts


def write_tissue_label(tissue: ChunkFiles, mask: TissueMask, plan: TilePlan) -> None:
    """The tissue mask, nearest-resampled onto the output grid, one chunk at a time
    (a full-width band of a 100k-pixel output would be tens of megabytes).

    Each chunk repeats the few mask pixels it covers (np.repeat along both axes, as
    the sampled indices are non-decreasing) rather than gathering every output pixel,
    which cost ~1 s of a 16k slide's pyramid stage."""
    height, width = plan.output_shape
    ch, cw = tissue.chunks
    ratio = plan.output_mpp / mask.mpp
    mh, mw = mask.mask.shape
    cols = np.minimum(((np.arange(width) + 0.5) * ratio).astype(np.int64), mw - 1)
    for cy in range(-(-height // ch)):
        rows = np.arange(cy * ch, min((cy + 1) * ch, height))
        r0, r1, row_counts = _runs(np.minimum(((rows + 0.5) * ratio).astype(np.int64), mh - 1))
        if not mask.mask[r0:r1].any():
            continue
        for cx in range(-(-width // cw)):
            c0, c1, col_counts = _runs(cols[cx * cw : (cx + 1) * cw])
            covered = mask.mask[r0:r1, c0:c1]
            if covered.any():
                block = np.repeat(np.repeat(covered, row_counts, axis=0), col_counts, axis=1)
                tissue.write((cy, cx), block.view(np.uint8))


def run_engine(
    spec: RunSpec,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> RunResult:
    """Run ``spec`` to completion and publish the result at ``spec.out_path``.

    ``spec``'s values were checked against :mod:`workers.engine.params` when it was built;
    the model card's tile geometry is checked here, before any work."""
    report = progress or (lambda _p: None)
    should_stop = cancel or (lambda: False)
    timer = _Timer()
    started = utc_now()

    with timer.stage("open"):
        report(Progress("open", 0, 1))
        card = resolve_card(spec.model, spec.model_dir)
        geometry = run_geometry(card, spec.tile_px, spec.overlap_px)
        slide = Slide(spec.slide_path, backend=spec.backend, slide_mpp=spec.slide_mpp)
    with slide, _staged(spec.out_path, spec.overwrite) as tmp:
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
                strip_px=strip_px(spec.chunk_px, geometry), cover_all_tissue=spec.cover_all_tissue,
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
        predictor: Predictor | StainedPredictor = model
        stain = None
        if spec.stain:  # a stain step before the model, in the same pass over the tiles
            with timer.stage("stain_fit"):
                stain = build_stain_step(spec.stain, slide=slide, plan=plan,
                                         model_dir=spec.model_dir, device=spec.device,
                                         reference=spec.stain_reference, mask=mask)
                predictor = StainedPredictor(stain, model, keep_stained=spec.stain_output)
        # measured on the whole chain: a stain step's network needs GPU memory too
        batch_size = spec.batch_size or auto_batch_size(predictor, predictor.device,
                                                        geometry.tile_px)

        out_h, out_w = plan.output_shape
        writer = ResultWriter(tmp, height=out_h, width=out_w, mpp=plan.output_mpp,
                              chunk_px=spec.chunk_px)
        layout = ResultLayout(writer, card, plan, extra_dense=predictor.extra_outputs,
                              probability_dtype=spec.probability_dtype)
        tissue = writer.create_label(LabelSpec("tissue", {1: ("tissue", TISSUE_RGBA)}))

        with timer.stage("infer"):
            _infer(spec, plan, predictor, layout, batch_size, report, should_stop)
        with timer.stage("pyramid"):
            report(Progress("pyramid", 0, 1))
            layout.write_tile_grids()
            write_tissue_label(writer.chunk_files(tissue), mask, plan)
            writer.build_pyramids(workers=spec.read_workers)
            thumb = slide.thumbnail(THUMBNAIL_PX)
            writer.write_small_image(
                "thumbnail", "thumbnail", thumb, slide_mpp * slide.dimensions[0] / thumb.shape[1]
            )
        with timer.stage("hash_slide"):
            slide_sha = sha256_file(slide.path)
        provenance = {
            "software": "slidepipe",
            "started": started,
            "finished": utc_now(),
            "model_card": card.model_dump(mode="json"),
            "weights_sha256": loaded.weights_sha256,
            "steps": describe_steps(stain, card, loaded.weights_sha256),
            "parameters": jsonable(spec.to_dict()),
            "effective": {
                "target_mpp": target_mpp, "tile_px": geometry.tile_px,
                "overlap_px": geometry.overlap_px, "output_mpp": plan.output_mpp,
                "device": str(predictor.device), "backend": slide.backend,
                "batch_size": batch_size, "compile": spec.compile,
            },
            "slide": {
                "name": slide.path.name, "sha256": slide_sha, "dimensions": list(slide.dimensions),
                "mpp": slide_mpp, "vendor": slide.vendor, "levels": slide.level_count,
            },
            "tissue": {"mpp": mask.mpp, "area_um2": mask.area_um2, "method": params.method,
                       "findings": jsonable(mask.findings)},
            "tiles": {"total": len(plan.tiles), "grid": [plan.n_rows, plan.n_cols]},
            "warnings": warnings,
            "versions": package_versions(),
            "timings_s": timer.timings,
        }
        writer.set_attrs("slidepipe", provenance)
    trim_heap()  # a worker process keeps no run's blocks between jobs
    report(Progress("done", 1, 1))
    log.info("wrote %s: %d tiles in %.1fs", spec.out_path, len(plan.tiles),
             sum(timer.timings.values()))
    return RunResult(
        out_path=Path(spec.out_path),
        tiles_total=len(plan.tiles),
        tiles_inferred=len(plan.tiles),
        timings_s=timer.timings,
        classes=card.class_names,
        provenance=provenance,
        warnings=warnings,
    )


_DONE = object()  # every batch was handed over: finalise the merger
_ABORT = object()  # the producer stopped early: do not finalise


def _infer(
    spec: RunSpec,
    plan: TilePlan,
    predictor: Predictor | StainedPredictor,
    layout: ResultLayout,
    batch_size: int,
    report: ProgressCallback,
    should_stop: CancelCheck,
) -> None:
    """Read -> model -> blend, overlapped: reads run ahead in threads, blending and
    writing run in one background thread behind a bounded queue."""
    g = plan.geometry
    boxes = [plan.output_box(t) for t in plan.tiles]
    window = weight_window(g.output_tile_px, g.output_tile_px, kind=spec.window)
    # a chunk on a strip's right edge waits a whole strip for its neighbours: park it
    # on disk rather than in memory once its next tile is more than ~2 strip rows away
    spill = tempfile.TemporaryDirectory(prefix=".slidepipe-spill-", dir=spec.out_path.parent)
    strip_cols = max(1, strip_px(spec.chunk_px, g) // g.stride_px)
    mergers = {}
    # storing a finished chunk runs beside blending, in a thread per output
    stores = {output.name: BackgroundSink(layout.sinks[output.name]) for output in layout.dense}
    for output in layout.dense:
        spill_dir = Path(spill.name) / output.name
        spill_dir.mkdir()
        mergers[output.name] = StreamingMerger(
            channels=layout.sinks[output.name].image.chunks[0], shape=plan.output_shape,
            chunk_px=spec.chunk_px, boxes=boxes, window=window, sink=stores[output.name],
            spill_dir=spill_dir, horizon=2 * strip_cols + 2,
            normalize=False,  # the store divides on its way to the stored type, off this thread
        )
    handoff: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def blend_worker() -> None:
        item = None
        try:
            while (item := handoff.get()) not in (_DONE, _ABORT):
                tiles, outputs = item
                for i, tile in enumerate(tiles):
                    y, x, _, _ = plan.output_box(tile)
                    for name, merger in mergers.items():
                        merger.aggregate(outputs[name][i], (y, x))
                    for name in layout.tile_grids:
                        layout.add_tile_vector(name, tile, outputs[name][i])
            if item is _DONE:
                for merger in mergers.values():
                    merger.finalize()
                for store in stores.values():
                    store.close()  # every chunk on disk; re-raises a storing error
        except BaseException as err:  # handed to the main thread below
            failure.append(err)
            while item not in (_DONE, _ABORT):  # drain so the producer never blocks
                item = handoff.get()

    blender = threading.Thread(target=blend_worker, name="blend", daemon=True)
    blender.start()
    total, done = len(plan.tiles), 0
    report(Progress("infer", 0, total))
    loader = TileBatchLoader(
        spec.slide_path, plan.tiles, tile_px=g.tile_px, target_mpp=plan.target_mpp,
        batch_size=batch_size, backend=spec.backend, slide_mpp=spec.slide_mpp,
        workers=spec.read_workers,
    )
    ending = _ABORT
    try:
        with closing(iter(loader)) as batches:
            for batch in batches:
                if should_stop():
                    raise RunCancelled(f"cancelled after {done} of {total} tiles")
                if failure:
                    break
                handoff.put((batch.tiles, predictor(batch.pixels)))
                done += len(batch.tiles)
                report(Progress("infer", done, total))
            else:
                ending = _DONE
    finally:
        handoff.put(ending)
        blender.join()
        for store in stores.values():
            with suppress(Exception):  # already reported, or the run is failing anyway
                store.close()
        spill.cleanup()
    if failure:
        raise failure[0]
    for name, merger in mergers.items():
        log.info("%s: %d chunks written, at most %d open at once, %d parked on disk (%.1f MB)",
                 name, merger.chunks_written, merger.peak_open_chunks, merger.chunks_spilled,
                 merger.bytes_spilled / 1e6)
