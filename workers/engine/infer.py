"""The engine's inner loop: read -> model -> blend -> store, overlapped.

Reads run ahead in threads (:class:`~wsi.tile_loader.TileBatchLoader`), the model runs
on the calling thread, blending runs in one thread behind a bounded queue (whole batches
at a time, in plan order, so a part of a plan blends to bit-identical chunks), and
finished chunks are stored on a small pool of threads behind another bounded queue, so
that a slow stage never holds the others' memory unbounded. Where the model runs on a
GPU, weighting, accumulation and the uint8 conversion run there too
(:mod:`workers.engine.device_blend`). ``run_engine`` calls ``infer`` once per slide; a
split run calls it once per part with the part's tiles.

Every run measures where its time went (:class:`InferStages`): returned, and logged
with the record attribute ``infer_stages`` for the benchmark.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.predictor import Predictor
from models.stain_transfer import StainedPredictor
from workers.engine.chunk_writer import BackgroundSink, TimedSink
from workers.engine.geometry import strip_px
from workers.engine.result_layout import ResultLayout
from workers.engine.spec import CancelCheck, Progress, ProgressCallback, RunCancelled, RunSpec
from wsi.blending import StreamingMerger, weight_window
from wsi.tile_loader import TileBatch, TileBatchLoader
from wsi.tiling import TilePlan

log = logging.getLogger(__name__)

ACCUMULATE = ("auto", "numpy", "torch")

_DONE = object()  # every batch was handed over: finalise the merger
_ABORT = object()  # the producer stopped early: do not finalise


@dataclass
class InferStages:
    """Seconds per stage of one ``infer`` call. Main thread: ``read_wait_s`` (waiting
    for decoded tiles), ``model_s``, ``handoff_wait_s`` (blending was behind). Blending
    threads, summed over them: ``blend_s`` (weighting and accumulating), ``blend_idle_s``
    (waiting for the model), ``store_wait_s`` (a store pool was behind). Storing,
    summed over the threads that store: ``store_busy_s``. ``blend_cpu_s`` and
    ``store_cpu_s``: CPU seconds of blending and storing (on a loaded machine, wall
    seconds include waiting for a core). ``drain_s``: from the last batch's hand-over
    to the last chunk on disk. ``wall_s``: the whole call."""

    tiles: int = 0
    batches: int = 0
    accumulate: str = "numpy"
    store_threads: int = 1
    read_wait_s: float = 0.0
    model_s: float = 0.0
    handoff_wait_s: float = 0.0
    blend_s: float = 0.0
    blend_idle_s: float = 0.0
    store_wait_s: float = 0.0
    store_busy_s: float = 0.0
    blend_cpu_s: float = 0.0
    store_cpu_s: float = 0.0
    drain_s: float = 0.0
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def choose_accumulation(predictor: Predictor | StainedPredictor, accumulate: str) -> str:
    """``numpy`` or ``torch``: ``auto`` blends on the device only where the model runs on
    one that is not the CPU (there, host copies and CPU blending would idle it)."""
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {', '.join(ACCUMULATE)}, got {accumulate!r}")
    if accumulate == "auto":
        device = getattr(predictor, "device", None)
        return "torch" if getattr(device, "type", "cpu") != "cpu" else "numpy"
    return accumulate


def _timed(batches: Iterator[TileBatch], stages: InferStages) -> Iterator[TileBatch]:
    """``batches``, adding the time spent waiting for each one to ``read_wait_s``."""
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        stages.read_wait_s += time.perf_counter() - start
        if batch is None:
            return
        yield batch


def infer(
    spec: RunSpec,
    plan: TilePlan,
    predictor: Predictor | StainedPredictor,
    layout: ResultLayout,
    batch_size: int,
    report: ProgressCallback,
    should_stop: CancelCheck,
    *,
    accumulate: str | None = None,
    store_workers: int | None = None,
) -> InferStages:
    """Read -> model -> blend -> store, overlapped: reads run ahead in threads; finished
    chunks are blended and stored on ``store_workers`` threads (default: ``read_workers``,
    at most the cores) behind bounded queues.

    On the CPU (``numpy``), each of those threads blends the chunks of every n-th chunk
    column and stores them itself: blending scales with the cores, and every chunk still
    sums its tiles in plan order on one thread. On a device (``torch``), one thread
    queues the blending on the device and a pool stores the finished chunks.

    ``accumulate``: ``auto`` (on the model's device when it is a GPU), ``numpy``, or
    ``torch`` (on the model's device, whichever it is: how tests and the benchmark run
    the GPU path on torch's CPU device); when not given, ``spec.extra["accumulate"]``,
    else ``auto``. Both paths store the same pixels. ``spec.extra["blend_threads"]``
    sets the number of CPU blending threads (default: as many as store threads; 1 is
    one blending thread beside a pool of store threads), for comparisons."""
    wall_start = time.perf_counter()
    mode = choose_accumulation(predictor, accumulate or spec.extra.get("accumulate", "auto"))
    device = getattr(predictor, "device", None)
    g = plan.geometry
    boxes = [plan.output_box(t) for t in plan.tiles]
    window = weight_window(g.output_tile_px, g.output_tile_px, kind=spec.window)
    threads = store_workers or max(1, min(spec.read_workers, os.cpu_count() or 1))
    n_lanes = 1 if mode == "torch" else int(spec.extra.get("blend_threads") or threads)
    stages = InferStages(accumulate=f"torch:{device}" if mode == "torch" else "numpy",
                         store_threads=threads)
    # a chunk on a strip's right edge waits a whole strip for its neighbours: park it
    # on disk rather than in memory once its next tile is more than ~2 strip rows away
    spill = tempfile.TemporaryDirectory(prefix=".slidepipe-spill-", dir=spec.out_path.parent)
    strip_cols = max(1, strip_px(spec.chunk_px, g) // g.stride_px)
    n_cy, n_cx = (-(-n // spec.chunk_px) for n in plan.output_shape)
    lanes = [_Lane(index) for index in range(n_lanes)]
    for output in layout.dense:
        dense = layout.sinks[output.name]
        for lane in lanes:
            spill_dir = Path(spill.name) / f"{output.name}-{lane.index}"
            spill_dir.mkdir()
            store: BackgroundSink | TimedSink
            if mode == "torch":
                from workers.engine.device_blend import DeviceDenseSink, TorchMerger

                store = BackgroundSink(DeviceDenseSink(dense), workers=threads,
                                       max_pending=threads + 2)
            else:
                store = TimedSink(dense) if n_lanes > 1 else BackgroundSink(dense)
            mine = np.zeros((n_cy, n_cx), dtype=bool)
            mine[:, lane.index :: n_lanes] = True
            common: dict[str, Any] = dict(
                channels=dense.image.chunks[0], shape=plan.output_shape,
                chunk_px=spec.chunk_px, boxes=boxes, window=window, sink=store,
                spill_dir=spill_dir, horizon=2 * strip_cols + 2, chunks=mine)
            lane.stores.append(store)
            # the store divides on its way to the stored type, in one pass it makes anyway
            lane.mergers[output.name] = (
                TorchMerger(device=device, **common) if device is not None and mode == "torch"
                else StreamingMerger(normalize=False, **common))
    run_model = _model_call(predictor, mode)
    failure: list[BaseException] = []

    def blend_worker(lane: _Lane) -> None:
        item = None
        cpu_start = time.thread_time()
        try:
            while True:
                start = time.perf_counter()
                item = lane.queue.get()
                lane.idle_s += time.perf_counter() - start
                if item is _DONE or item is _ABORT:
                    break
                tiles, outputs = item
                start = time.perf_counter()
                blocked = sum(store.blocked_s for store in lane.stores)
                wheres = [plan.output_box(tile)[:2] for tile in tiles]
                for name, merger in lane.mergers.items():
                    merger.aggregate_batch(outputs[name], wheres)
                if lane.index == 0:
                    for name in layout.tile_grids:
                        vectors = _host(outputs[name])
                        for i, tile in enumerate(tiles):
                            layout.add_tile_vector(name, tile, vectors[i])
                blocked = sum(store.blocked_s for store in lane.stores) - blocked
                lane.blend_s += time.perf_counter() - start - blocked
            if item is _DONE:
                for merger in lane.mergers.values():
                    merger.finalize()
                for store in lane.stores:
                    store.close()  # every chunk on disk; re-raises a storing error
        except BaseException as err:  # handed to the main thread below
            failure.append(err)
            while item is not _DONE and item is not _ABORT:  # drain: never block the producer
                item = lane.queue.get()
        finally:
            lane.cpu_s = time.thread_time() - cpu_start

    for lane in lanes:
        lane.thread = threading.Thread(target=blend_worker, args=(lane,),
                                       name=f"blend-{lane.index}", daemon=True)
        lane.thread.start()
    total, done = len(plan.tiles), 0
    report(Progress("infer", 0, total))
    loader = TileBatchLoader(
        spec.slide_path, plan.tiles, tile_px=g.tile_px, target_mpp=plan.target_mpp,
        batch_size=batch_size, backend=spec.backend, slide_mpp=spec.slide_mpp,
        workers=spec.read_workers,
    )
    ending = _ABORT
    drain_start = 0.0
    try:
        with closing(iter(loader)) as batches:
            for batch in _timed(batches, stages):
                if should_stop():
                    raise RunCancelled(f"cancelled after {done} of {total} tiles")
                if failure:
                    break
                start = time.perf_counter()
                outputs = run_model(batch.pixels)
                handed = time.perf_counter()
                for lane in lanes:
                    lane.queue.put((batch.tiles, outputs))
                stages.model_s += handed - start
                stages.handoff_wait_s += time.perf_counter() - handed
                done += len(batch.tiles)
                stages.batches += 1
                report(Progress("infer", done, total))
            else:
                ending = _DONE
    finally:
        drain_start = time.perf_counter()
        for lane in lanes:
            lane.queue.put(ending)
        for lane in lanes:
            assert lane.thread is not None
            lane.thread.join()
            for store in lane.stores:
                with suppress(Exception):  # already reported, or the run is failing anyway
                    store.close()
        spill.cleanup()
    if failure:
        raise failure[0]
    end = time.perf_counter()
    stores = [store for lane in lanes for store in lane.stores]
    stages.tiles = done
    stages.blend_s = sum(lane.blend_s for lane in lanes)
    stages.blend_idle_s = sum(lane.idle_s for lane in lanes)
    stages.store_busy_s = sum(store.busy_s for store in stores)
    stages.store_cpu_s = sum(store.cpu_s for store in stores)
    stages.store_wait_s = sum(store.wait_s for store in stores)
    # a lane's CPU includes the chunks it stored itself
    stages.blend_cpu_s = sum(lane.cpu_s for lane in lanes) - (
        stages.store_cpu_s if n_lanes > 1 else 0.0)
    stages.drain_s, stages.wall_s = end - drain_start, end - wall_start
    for output in layout.dense:
        mergers = [lane.mergers[output.name] for lane in lanes]
        log.info("%s: %d chunks written, at most %d open at once, %d parked on disk (%.1f MB)",
                 output.name, sum(m.chunks_written for m in mergers),
                 sum(m.peak_open_chunks for m in mergers),
                 sum(m.chunks_spilled for m in mergers),
                 sum(m.bytes_spilled for m in mergers) / 1e6)
    log.info("infer stages: %s", stages.as_dict(), extra={"infer_stages": stages.as_dict()})
    return stages


class _Lane:
    """One blending thread: its mergers (one per dense output, over its share of the
    chunks), their stores, its queue of batches (two at most) and its counters."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.mergers: dict[str, StreamingMerger] = {}
        self.stores: list[BackgroundSink | TimedSink] = []
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.thread: threading.Thread | None = None
        self.blend_s = self.idle_s = self.cpu_s = 0.0


def _model_call(predictor: Predictor | StainedPredictor, mode: str) -> Any:
    """The model as the blender wants its outputs: host arrays, or device tensors."""
    if mode == "numpy":
        return predictor
    from torch import device as torch_device

    from workers.engine.device_blend import as_device_outputs

    on_device = getattr(predictor, "on_device", None)
    if on_device is not None:
        return on_device
    device = torch_device(getattr(predictor, "device", "cpu"))
    return lambda pixels: as_device_outputs(predictor(pixels), device)


def _host(values: Any) -> np.ndarray:
    """Per-tile output vectors as a host array (small: (n, C))."""
    if isinstance(values, np.ndarray):
        return values
    return values.detach().cpu().numpy()
