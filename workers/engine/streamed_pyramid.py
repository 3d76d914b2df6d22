"""A one-part run's dense pyramids, made while its level 0 is stored.

Only a run of one part streams: there every chunk of level 0 is written by this
process, so each parent chunk sees all its children. Parts of a split run store only
the chunks they own, so their pyramids are built from level 0 by the run's last step,
as before (:meth:`wsi.ome_zarr.ResultWriter.build_pyramids`); so is every pyramid of a
run whose chunk side is odd, and the tissue label's, which ``finish`` writes.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

import numpy as np
import numpy.typing as npt
import zarr

from wsi.ome_zarr import ChunkFiles, array_at, pyramid_shapes
from wsi.pyramid_stream import LevelReducer, stream_levels

log = logging.getLogger(__name__)


class StreamedPyramids:
    """Reducers over the levels of every level-0 array it is given (``attach``), and
    the group paths whose pyramids they completed (``completed``)."""

    def __init__(self, staged: Path, expected: npt.NDArray[np.bool_], chunk_px: int) -> None:
        self.staged, self.expected = staged, expected
        self.enabled = chunk_px % 2 == 0
        self._root = zarr.open_group(str(staged), mode="r")
        self._reducers: dict[str, list[LevelReducer]] = {}

    def attach(self, level0: ChunkFiles, *, mean: bool) -> None:
        """Make the coarser levels of ``level0``'s group as its chunks are written."""
        if not self.enabled:
            return
        group = str(PurePosixPath(level0.folder.relative_to(self.staged).as_posix()).parent)
        group = "" if group == "." else group
        height, width = level0.shape[-2:]
        n_levels = len(pyramid_shapes(height, width, level0.chunks[-1]))
        levels = [level0] + [
            ChunkFiles(array_at(self._root, f"{group}/{level}" if group else str(level)),
                       self.staged)
            for level in range(1, n_levels)]
        self._reducers[group] = stream_levels(levels, self.expected, mean=mean)

    def completed(self) -> list[str]:
        """Group paths whose every level is written; a group left incomplete (a run that
        stopped early) is left to ``build_pyramids``."""
        done = []
        for group, reducers in self._reducers.items():
            if all(r.complete for r in reducers):
                done.append(group)
            else:
                log.warning("pyramid of %r not streamed to the end; built from level 0 instead",
                            group or "/")
        parked = sum(r.parents_parked for rs in self._reducers.values() for r in rs)
        if parked:
            log.info("streamed pyramids: %d parent chunks parked on disk and resumed", parked)
        return done
