"""The slide engine: one slide through one model into one OME-Zarr result.

``run_engine`` is the plain function behind ``slidepipe run`` and the Celery task:
open the slide, find tissue, plan tiles, read them in background threads, run the model,
blend the outputs chunk by chunk into the result, build the pyramids and record
provenance. It is the three phases of :mod:`workers.engine.parts` with one part, in
one process, so a slide split across workers runs the very same code. The result is
written under a temporary name beside ``out_path`` and renamed into place only when
complete, so a failed or cancelled run leaves nothing that looks like a result.
"""

from __future__ import annotations

import logging

from workers.engine.parts import THUMBNAIL_PX, TISSUE_RGBA, Prepared, finish, prepare, run_part
from workers.engine.spec import CancelCheck, ProgressCallback, RunResult, RunSpec
from workers.engine.staging import discard
from workers.engine.tissue_label import write_tissue_label
from wsi.ome_zarr import ChunkStored

log = logging.getLogger(__name__)

__all__ = ["THUMBNAIL_PX", "TISSUE_RGBA", "run_engine", "run_prepared", "write_tissue_label"]


def run_engine(
    spec: RunSpec,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    chunk_stored: ChunkStored | None = None,
) -> RunResult:
    """Run ``spec`` to completion and publish the result at ``spec.out_path``.

    ``spec``'s values were checked against :mod:`workers.engine.params` when it was built;
    the model card's tile geometry is checked here, before any work. ``chunk_stored``:
    told of each level-0 chunk of the dense outputs as it is written (:func:`run_part`)."""
    prepared = prepare(spec, parts=1, progress=progress, keep_model=True)
    return run_prepared(prepared, progress=progress, cancel=cancel, chunk_stored=chunk_stored)


def run_prepared(
    prepared: Prepared,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    chunk_stored: ChunkStored | None = None,
) -> RunResult:
    """Run a prepared run of one part here, with the model ``prepare`` kept, and publish
    it; a failure leaves nothing staged behind."""
    try:
        run_part(prepared.staged, 0, predictor=prepared.predictor, progress=progress,
                 cancel=cancel, chunk_stored=chunk_stored)
        return finish(prepared.staged, progress=progress)
    except BaseException:
        discard(prepared.staged)
        raise
