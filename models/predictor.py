"""Running a loaded model on batches of uint8 RGB tiles, on CPU or CUDA.

The engine hands over ``(n, h, w, 3)`` uint8 numpy batches and gets back one float32
array per output the card declares: ``(n, C, h', w')`` for dense outputs (class
probabilities first), ``(n, C)`` for per-tile outputs. A module may return one tensor
(taken as the first output) or a dict of tensors keyed by output name. BatchNorm is
folded into the convolutions and the model runs channels-last on either device. On CUDA
the batch goes through pinned memory with a non-blocking copy, the model runs under
autocast (bf16 where supported), and only the (smaller) output comes back; on CPU it
runs in float32. With ``tta=True`` every batch runs under the 8 flips/90° rotations, the
outputs are averaged, and the per-pixel variance of the first dense output across those
passes comes back as ``variance``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.card import ACTIVATED_OUTPUTS, ModelCard, OutputSpec
from models.errors import ModelCardInvalid
from models.loading import LoadedModel

log = logging.getLogger(__name__)

#: The extra dense output of test-time augmentation: per-class variance across passes.
VARIANCE = "variance"


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else must be a valid device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ModelCardInvalid(f"unknown device {device!r}: {err}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelCardInvalid(f"device {device!r} requested but CUDA is not available here")
    if resolved.type not in ("cpu", "cuda"):
        raise ModelCardInvalid(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return resolved


def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` with each BatchNorm folded into the convolution
    before it (torch.fx): one pass less over every activation map, the same outputs to
    float rounding (~1e-6). A module that fx cannot trace is returned unchanged."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(module.eval(), inplace=False)
    except Exception as err:  # noqa: BLE001 - tracing fails in many ways; fusing is optional
        log.info("conv-BN fusion skipped for %s: %s", type(module).__name__, err)
        return module


def _to_numpy(y: torch.Tensor) -> npt.NDArray[np.float32]:
    """A C-contiguous NCHW host array, whatever the tensor's memory format."""
    return y.contiguous().cpu().numpy()


class Predictor:
    """Callable: uint8 NHWC batch -> float32 NCHW model output with the card's activation."""

    def __init__(self, loaded: LoadedModel, *, device: str = "auto", amp: bool | None = None,
                 tta: bool = False, compile: bool = False, fuse: bool = True) -> None:
        self.card: ModelCard = loaded.card
        self.tta = tta
        self.device = resolve_device(device)
        module = loaded.module.eval()
        if fuse:
            module = fuse_conv_bn(module)
        on_cuda = self.device.type == "cuda"
        # channels-last wherever there are convolutions: oneDNN's run ~2x faster on it
        # on CPU too (a ResNet-18 U-Net, 256 px tiles, 2 cores), and the uint8 NHWC
        # batch maps onto it without a transpose
        self.channels_last = on_cuda or any(isinstance(m, nn.Conv2d) for m in module.modules())
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.module: Callable[[torch.Tensor], torch.Tensor | dict[str, torch.Tensor]]
        # torch's stub of Module.to omits memory_format, which Module.to accepts
        self.module = module.to(  # type: ignore[call-overload]
            self.device, memory_format=memory_format
        )
        self.amp = on_cuda if amp is None else amp
        self.amp_dtype = (
            torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16
        )
        if compile:  # compiled lazily, on the first batch of each new shape
            self.module = torch.compile(self.module, dynamic=False)
        norm = self.card.normalization
        mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        std = torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self._mean, self._std = mean.to(self.device), std.to(self.device)
        self._cpu_offset, self._cpu_scale = mean.numpy().ravel(), (1.0 / std).numpy().ravel()

    def _normalise_cpu(self, batch: npt.NDArray[np.uint8]) -> torch.Tensor:
        """uint8 NHWC -> normalised float32 NCHW, in channels-last memory (a contiguous
        cast of the batch as it is) or contiguous (numpy's transpose+cast, ~4x faster
        than torch's)."""
        if not self.channels_last:
            x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
            if self._cpu_offset.any():  # zero for cards that only scale to [0, 1]
                x -= self._cpu_offset.reshape(1, 3, 1, 1)
            x *= self._cpu_scale.reshape(1, 3, 1, 1)
            return torch.from_numpy(x)
        n, h, w, _ = batch.shape
        x = batch.astype(np.float32)
        # per-channel constants tiled along a pixel row: numpy's broadcast over a last
        # axis of 3 runs an inner loop of length 3, ~10x slower
        rows = x.reshape(n * h, w * 3)
        if self._cpu_offset.any():
            rows -= np.tile(self._cpu_offset, w)
        rows *= np.tile(self._cpu_scale, w)
        return torch.from_numpy(x).permute(0, 3, 1, 2)

    @torch.inference_mode()
    def __call__(self, batch: npt.NDArray[np.uint8]) -> dict[str, npt.NDArray[np.float32]]:
        x = self._input(batch)
        if not self.tta:
            return {name: _to_numpy(y) for name, y in self._forward(x).items()}
        return self._forward_tta(x)

    @torch.inference_mode()
    def on_device(self, batch: npt.NDArray[np.uint8]) -> dict[str, torch.Tensor]:
        """As calling the predictor, but the outputs stay float32 tensors on its device
        (for the engine's on-device blending; with TTA they come back from the host)."""
        x = self._input(batch)
        if not self.tta:
            return self._forward(x)
        return {name: torch.from_numpy(y).to(self.device)
                for name, y in self._forward_tta(x).items()}

    def _input(self, batch: npt.NDArray[np.uint8]) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
            raise ValueError(f"expected an (n, h, w, 3) uint8 batch, got {batch.shape} {batch.dtype}")
        if self.device.type == "cuda":
            # ship uint8 (4x fewer bytes over PCIe), convert and normalise on the GPU
            x = torch.from_numpy(batch).pin_memory().to(self.device, non_blocking=True)
            x = (x.permute(0, 3, 1, 2).float() - self._mean) / self._std
            return x.contiguous(memory_format=torch.channels_last)
        return self._normalise_cpu(batch)

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One pass: every declared output, float32, activated where it is logits."""
        autocast = (
            torch.autocast(device_type="cuda", dtype=self.amp_dtype) if self.amp else nullcontext()
        )
        with autocast:
            raw = self.module(x)
        named = raw if isinstance(raw, dict) else {self.card.outputs[0].name: raw}
        outputs: dict[str, torch.Tensor] = {}
        for spec in self.card.outputs:
            if spec.name not in named:
                raise ModelCardInvalid(
                    f"model {self.card.name!r} returned {sorted(named)} but its card "
                    f"declares output {spec.name!r}"
                )
            y = named[spec.name].float()
            if spec.name in ACTIVATED_OUTPUTS:
                y = self._activate(y)
            outputs[spec.name] = y
        return outputs

    @property
    def extra_outputs(self) -> list[OutputSpec]:
        """Dense outputs the predictor adds to the card's: with TTA, ``variance``."""
        if not self.tta:
            return []
        root = self.card.outputs[0]
        return [OutputSpec(name=VARIANCE, channels=root.channels,
                           max_value=root.max_value**2 / 4)]

    def _forward_tta(self, x: torch.Tensor) -> dict[str, npt.NDArray[np.float32]]:
        """Test-time augmentation: the mean of every output over the flips and 90°
        rotations of each tile (8 passes; 4 flips only for non-square tiles), each pass
        mapped back onto the tile, and the per-pixel, per-class variance of the root
        (first dense) output across the passes as ``variance``."""
        square = x.shape[-1] == x.shape[-2]
        transforms = [(k, f) for k in (range(4) if square else (0, 2)) for f in (False, True)]
        dense = {s.name for s in self.card.outputs if s.kind == "dense"}
        root = self.card.outputs[0].name
        sums: dict[str, torch.Tensor] = {}
        mean = m2 = None  # Welford's running mean and squared deviations of the root output
        for n, (k, flip) in enumerate(transforms, start=1):
            xt = torch.rot90(x, k, dims=(-2, -1))
            if flip:
                xt = xt.flip(-1)
            for name, y in self._forward(xt).items():
                if name in dense:  # undo the transform on the output
                    if flip:
                        y = y.flip(-1)
                    y = torch.rot90(y, -k, dims=(-2, -1))
                sums[name] = sums[name] + y if name in sums else y
                if name == root:
                    if mean is None or m2 is None:
                        mean, m2 = y.clone(), torch.zeros_like(y)
                    else:
                        delta = y - mean
                        mean += delta / n
                        m2 += delta * (y - mean)
        outputs = {name: _to_numpy(total / len(transforms)) for name, total in sums.items()}
        assert m2 is not None
        outputs[VARIANCE] = _to_numpy((m2 / len(transforms)).clamp_(min=0))
        return outputs

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.card.activation == "softmax":
            return torch.softmax(y, dim=1)
        if self.card.activation == "sigmoid":
            return torch.sigmoid(y)
        return y

    def check_output_geometry(self, tile_px: int, expected_px: int) -> None:
        """Run one blank tile; fail early if an output's shape is not what the card says."""
        outputs = self(np.full((1, tile_px, tile_px, 3), 255, dtype=np.uint8))
        for spec in self.card.outputs:
            out = outputs[spec.name]
            channels = 3 if spec.channels == "rgb" else len(self.card.classes)
            if out.shape[1] != channels:
                raise ModelCardInvalid(
                    f"model {self.card.name!r} output {spec.name!r} has {out.shape[1]} "
                    f"channels but its card implies {channels}"
                )
            if spec.kind == "per_tile" and out.ndim != 2:
                raise ModelCardInvalid(
                    f"per-tile output {spec.name!r} of {self.card.name!r} has shape {out.shape}"
                )
            if spec.kind == "dense" and out.shape[2:] != (expected_px, expected_px):
                raise ModelCardInvalid(
                    f"model {self.card.name!r} maps a {tile_px}px tile to {out.shape[2:]} but "
                    f"its card (output_crop_px={self.card.output_crop_px}, output_stride="
                    f"{self.card.output_stride}) implies {expected_px}x{expected_px}"
                )


#: CPU batch size: larger batches gain little on a few cores and cost tile-band memory.
CPU_BATCH_SIZE = 8


def auto_batch_size(
    run: Callable[[npt.NDArray[np.uint8]], object], device: torch.device, tile_px: int,
    *, headroom: float = 0.6, cap: int = 256,
) -> int:
    """Tiles per call: on CUDA, as many as ``headroom`` of the free GPU memory holds,
    measured by running ``run`` (the predictor, or a stain chain around it) on two blank
    tiles and reading the allocator's peak; on CPU, :data:`CPU_BATCH_SIZE`."""
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run(np.full((2, tile_px, tile_px, 3), 255, dtype=np.uint8))
    torch.cuda.synchronize(device)
    per_tile = max((torch.cuda.max_memory_allocated(device) - before) / 2, 1.0)
    free, _total = torch.cuda.mem_get_info(device)
    size = max(1, min(cap, int(free * headroom // per_tile)))
    log.info("batch size %d: %.0f MiB per %d px tile, %.0f MiB free on %s",
             size, per_tile / 2**20, tile_px, free / 2**20, device)
    return size
