"""Blending on the model's torch device: accumulators as device tensors, finished chunks
converted to the stored type there, and only those (uint8) chunks copied to the host.

Why: on a GPU that runs a U-Net at hundreds of tiles per second, copying every float32
output to the host and weighting, accumulating, normalising and casting it on a few CPU
cores caps the job and leaves the GPU idle. Here the model's outputs stay on the device;
a (C, 512, 512) chunk crosses to the host as uint8, a quarter of its float bytes, once.

The same code runs on torch's CPU device, which is how CI checks that it stores exactly
the pixels of the numpy path (``wsi.blending`` + ``DenseSink``): the same fused float32
multiply-add in the same tile order, ``scale / weight`` as a true division, then
round-half-to-even and saturation as OpenCV's conversion does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from workers.engine.result_layout import DenseSink
from wsi.blending import ChunkSink, StreamingMerger


class TorchMerger(StreamingMerger):
    """:class:`~wsi.blending.StreamingMerger` whose chunk buffers are float32 tensors on
    ``device``; ``aggregate_batch`` takes (n, C, h, w) tensors there. The sink gets the
    weighted sums and weight sums as device tensors (``normalize`` is always off: the
    device sink divides on its way to the stored type)."""

    def __init__(self, *, device: torch.device, channels: int, shape: tuple[int, int],
                 chunk_px: int, boxes: Sequence[tuple[int, int, int, int]],
                 window: npt.NDArray[np.floating[Any]], sink: ChunkSink,
                 spill_dir: Path | None = None, horizon: int = 0,
                 chunks: npt.NDArray[np.bool_] | None = None) -> None:
        super().__init__(channels=channels, shape=shape, chunk_px=chunk_px, boxes=boxes,
                         window=window, sink=sink, spill_dir=spill_dir, horizon=horizon,
                         normalize=False, chunks=chunks)
        self.device = torch.device(device)
        self._device_window = torch.from_numpy(np.ascontiguousarray(self.window)).to(self.device)

    @property
    def _window(self) -> Any:
        return self._device_window

    def _as_float32(self, tiles: Any) -> Any:
        if not isinstance(tiles, torch.Tensor):
            tiles = torch.from_numpy(np.ascontiguousarray(tiles))
        return tiles.to(self.device, dtype=torch.float32)

    def _accumulate(self, sums: Any, weights: Any, tile: Any, window: Any) -> None:
        """``sums += tile * window`` as one fused multiply-add (``addcmul_``: a single
        rounding, as OpenCV's ``accumulateProduct`` on the numpy path), all channels in
        one operation."""
        sums.addcmul_(tile, window)
        weights.add_(window)

    def _zeros(self, shape: tuple[int, ...]) -> Any:
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def _to_host(self, part: Any) -> npt.NDArray[np.float32]:
        return part.cpu().numpy()

    def _load_into(self, target: Any, data: npt.NDArray[np.float32]) -> None:
        target.copy_(torch.from_numpy(data))


class DeviceDenseSink:
    """Stores chunks like :class:`~workers.engine.result_layout.DenseSink`, from device
    tensors: the class map (argmax, first index on ties, 0 where nothing was computed)
    and the uint8 image are made on the device; only they cross to the host. Other
    stored types (uint16, float32 probabilities) are rare: their chunks are copied to the
    host as float32 and stored by the numpy sink."""

    def __init__(self, dense: DenseSink) -> None:
        self.dense = dense

    def __call__(self, cy: int, cx: int, sums: torch.Tensor, weights: torch.Tensor) -> None:
        dense = self.dense
        if not dense.owns(cy, cx):
            return
        # a sink that changes how chunks are stored (or which) by overriding __call__
        # gets host arrays and stores them its way: slower, never wrong
        if dense.image.dtype != np.uint8 or type(dense).__call__ is not DenseSink.__call__:
            dense(cy, cx, sums.cpu().numpy(), weights.cpu().numpy())
            return
        covered = weights > 0
        labels = None
        if dense.classes is not None:
            if len(sums) > 255:
                raise ValueError(f"at most 255 classes fit a uint8 class map, got {len(sums)}")
            labels = (sums.argmax(dim=0) + 1).to(torch.uint8)
            labels *= covered
        # sums * (scale / weights), 0 where no tile covered the pixel: float32 throughout,
        # a true division (torch's ``scalar / tensor`` is a reciprocal times the scalar)
        scale = torch.tensor(dense.scale, dtype=torch.float32, device=weights.device)
        inverse = torch.where(covered, torch.div(scale, weights), torch.zeros_like(weights))
        image = (sums * inverse).round_().clamp_(0, 255).to(torch.uint8)
        if labels is not None:
            dense.classes.write((cy, cx), labels.cpu().numpy())  # type: ignore[union-attr]
        dense.image.write((0, cy, cx), image.cpu().numpy())


def as_device_outputs(outputs: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """A predictor's outputs as float32 tensors on ``device`` (no copy when they are)."""
    moved = {}
    for name, value in outputs.items():
        if not isinstance(value, torch.Tensor):
            value = torch.from_numpy(np.ascontiguousarray(value))
        moved[name] = value.to(device, dtype=torch.float32, non_blocking=True)
    return moved
