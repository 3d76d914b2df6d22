"""The stain-transforming CycleGAN of de Bel et al. (MIDL 2019): networks and card.

Generator: U-Net-like, with residual blocks. A 3x3 stem to ``base_filters`` (32)
channels, then ``depth`` (1-3) down-sampling levels, each a stride-2 3x3 convolution that
doubles the channels; ``residual_blocks`` residual blocks at the bottom; then per level
nearest-neighbour up-sampling (no transposed convolutions, so no checkerboard) and a 3x3
convolution halving the channels, added to the encoder's features of that level (a
residual skip: U-Net's shortcut without the concatenation); a 1x1 convolution to RGB and
tanh. Every convolution is followed by InstanceNorm and LeakyReLU(0.2), except the last.

Parameter counts (``count_parameters``), against de Bel et al., Table 1 (0.11 M / 0.45 M /
2.0 M): depth 1: 111,555; depth 2: 480,195; depth 3: 1,954,755. The deepest level
dominates (a down-sampling convolution, a residual block of two convolutions and an
up-sampling convolution at 32 x 2^depth channels: 3 x 9 x c² weights), which is why the
counts grow about 4x per level as the paper's do; depth 2 is 7% above the paper's
rounded figure (the paper does not give every layer, so this is our reading of it).

Discriminator: the 70 x 70 PatchGAN of pix2pix/CycleGAN: C64-C128-C256-C512 with 4x4
kernels (stride 2, 2, 2, 1; InstanceNorm from the second, LeakyReLU(0.2)) and a 4x4
convolution to one channel; each output pixel sees a 70 x 70 input patch; trained with the
least-squares (MSE) GAN loss.

For whole slides the generator runs on large tiles (2048 in, the central 1024 kept,
stride 512) and the kept centres are blended with a centre-peaked window, because
InstanceNorm's per-tile statistics otherwise leave visible seams; :func:`cyclegan_card`
sets that geometry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.card import ModelCard
from models.errors import ModelCardInvalid

#: Card params the cyclegan architecture reads (the others are descriptive).
ARCH_PARAMS = ("depth", "base_filters", "residual_blocks")
#: Descriptive card params: which way this generator maps, and the domains' names.
INFO_PARAMS = ("direction", "source_domain", "target_domain", "trained_epochs", "trained_steps")
def _conv_block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, padding_mode="reflect", bias=False),
        nn.InstanceNorm2d(c_out),
        nn.LeakyReLU(0.2, inplace=True),
    ]


class ResidualBlock(nn.Module):
    """x -> LeakyReLU(x + IN(conv(LeakyReLU(IN(conv(x))))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_block(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect", bias=False),
            nn.InstanceNorm2d(channels),
        )
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act(x + self.body(x))
        return out


class Generator(nn.Module):
    """RGB in [-1, 1] -> RGB in [-1, 1]; input sides must be multiples of 2**depth."""

    def __init__(self, depth: int = 3, base_filters: int = 32, residual_blocks: int = 1) -> None:
        super().__init__()
        if not 1 <= depth <= 6:
            raise ValueError(f"generator depth must be in [1, 6], got {depth}")
        if base_filters < 1 or residual_blocks < 0:
            raise ValueError(f"bad generator size: base_filters={base_filters}, "
                             f"residual_blocks={residual_blocks}")
        self.depth = depth
        widths = [base_filters * 2**level for level in range(depth + 1)]
        self.stem = nn.Sequential(*_conv_block(3, widths[0]))
        self.down = nn.ModuleList(
            nn.Sequential(*_conv_block(widths[i], widths[i + 1], stride=2)) for i in range(depth)
        )
        self.bottom = nn.Sequential(*(ResidualBlock(widths[-1]) for _ in range(residual_blocks)))
        self.up = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                          *_conv_block(widths[i + 1], widths[i]))
            for i in range(depth)
        )
        self.head = nn.Conv2d(widths[0], 3, 1)

    @property
    def multiple(self) -> int:
        return 1 << self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for down in self.down:
            skips.append(x)
            x = down(x)
        x = self.bottom(x)
        for level in reversed(range(self.depth)):
            x = self.up[level](x) + skips[level]
        return torch.tanh(self.head(x))


class PatchDiscriminator(nn.Module):
    """70 x 70 PatchGAN: one realness score per overlapping 70 x 70 input patch."""

    def __init__(self, base_filters: int = 64) -> None:
        super().__init__()
        f = base_filters
        layers: list[nn.Module] = [nn.Conv2d(3, f, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out, stride in ((f, 2 * f, 2), (2 * f, 4 * f, 2), (4 * f, 8 * f, 1)):
            layers += [nn.Conv2d(c_in, c_out, 4, stride, 1, bias=False),
                       nn.InstanceNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(8 * f, 1, 4, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores: torch.Tensor = self.model(x)
        return scores


def receptive_field(module: PatchDiscriminator) -> int:
    """The input extent one output pixel sees (70 for the PatchGAN above)."""
    rf, jump = 1, 1
    for layer in module.model:
        if isinstance(layer, nn.Conv2d):
            rf += (layer.kernel_size[0] - 1) * jump
            jump *= layer.stride[0]
    return rf


class StainTransformer(nn.Module):
    """The engine's view of one generator: normalised RGB tiles -> RGB in [0, 1].

    Tiles are padded (reflect) to the generator's multiple and run one at a time
    (``max_batch``), so memory stays that of one large tile whatever the engine's batch
    size; ``crop_px`` pixels are dropped on every side (the card's ``output_crop_px``).
    """

    def __init__(self, generator: Generator, crop_px: int = 0, max_batch: int = 1) -> None:
        super().__init__()
        self.generator = generator
        self.crop_px, self.max_batch = crop_px, max_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.generator.multiple
        pad_h, pad_w = -h % m, -w % m
        outputs = []
        for i in range(0, x.shape[0], self.max_batch):
            part = x[i : i + self.max_batch]
            if pad_h or pad_w:
                mode = "reflect" if pad_h < h and pad_w < w else "replicate"
                part = nn.functional.pad(part, (0, pad_w, 0, pad_h), mode=mode)
            y = self.generator(part)[..., :h, :w]
            if self.crop_px:
                c = self.crop_px
                y = y[..., c:-c, c:-c]
            outputs.append((y + 1) / 2)
        return torch.cat(outputs)


def generator_kwargs(params: dict[str, Any]) -> dict[str, int]:
    unknown = set(params) - set(ARCH_PARAMS) - set(INFO_PARAMS)
    if unknown:
        raise ModelCardInvalid(f"cyclegan card has unknown params {sorted(unknown)}")
    kwargs = {k: int(params[k]) for k in ARCH_PARAMS if k in params}
    return kwargs


def build_cyclegan(card: ModelCard) -> nn.Module:
    """The inference module of a cyclegan card: one generator (one direction)."""
    try:
        generator = Generator(**generator_kwargs(card.params))
    except (TypeError, ValueError) as err:
        raise ModelCardInvalid(f"cannot build cyclegan from card {card.name!r}: {err}") from err
    if card.output_stride != 1:
        raise ModelCardInvalid(f"cyclegan card {card.name!r} must have output_stride 1")
    return StainTransformer(generator, crop_px=card.output_crop_px)
