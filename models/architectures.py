"""Building the ``nn.Module`` a card describes (weights are loaded separately)."""

from __future__ import annotations

import torch
from torch import nn

from models.card import ModelCard
from models.errors import ModelCardInvalid


class IdentityModel(nn.Module):
    """Returns its (normalised) input: measures the engine's own cost and exactness.

    It honours a card's output geometry, so that geometry can be tested exactly: it
    drops ``crop_px`` pixels per side and averages ``stride`` x ``stride`` blocks.
    """

    def __init__(self, crop_px: int = 0, stride: int = 1) -> None:
        super().__init__()
        self.crop_px, self.stride = crop_px, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop_px:
            c = self.crop_px
            x = x[..., c:-c, c:-c]
        if self.stride > 1:
            x = nn.functional.avg_pool2d(x, self.stride)
        return x


def build_unet(card: ModelCard) -> nn.Module:
    from models._torchvision_compat import import_smp

    smp = import_smp()
    params = {"encoder_name": "resnet18", **card.params}
    unknown = set(params) - {"encoder_name", "encoder_depth", "decoder_channels",
                             "decoder_attention_type"}
    if unknown:
        raise ModelCardInvalid(f"unet card {card.name!r} has unknown params {sorted(unknown)}")
    if "decoder_channels" in params:
        params["decoder_channels"] = tuple(params["decoder_channels"])
    try:
        unet: nn.Module = smp.Unet(
            **params,
            encoder_weights=None,  # never downloaded: weights come from the card's file
            in_channels=3,
            classes=len(card.classes),
        )
        return unet
    except (KeyError, ValueError, TypeError) as err:
        raise ModelCardInvalid(f"cannot build unet from card {card.name!r}: {err}") from err


def build_joint(card: ModelCard) -> nn.Module:
    from models.joint import CLASSIFIERS, JointSegClassNet

    allowed = {"seg_channels", "cls_channels", "upsample", "classifier"}
    unknown = set(card.params) - allowed
    if unknown:
        raise ModelCardInvalid(f"joint card {card.name!r} has unknown params {sorted(unknown)}")
    if card.params.get("upsample", "bilinear") not in ("bilinear", "nearest"):
        raise ModelCardInvalid(f"joint card {card.name!r}: upsample must be bilinear or nearest")
    if card.params.get("classifier", "head") not in CLASSIFIERS:
        raise ModelCardInvalid(f"joint card {card.name!r}: classifier must be one of "
                               f"{', '.join(CLASSIFIERS)}, got {card.params['classifier']!r}")
    names = [o.name for o in card.outputs]
    if names[0] != "probabilities" or not set(names) <= {"probabilities", "tile_scores"}:
        raise ModelCardInvalid(
            f"joint card {card.name!r} outputs probabilities (dense, first) and optionally "
            f"tile_scores (per_tile); its card declares {names}"
        )
    return JointSegClassNet(len(card.classes), **card.params)


def build_module(card: ModelCard) -> nn.Module:
    """The untrained module for ``card.architecture``."""
    if card.architecture == "identity":
        return IdentityModel(card.output_crop_px, card.output_stride)
    if card.architecture == "unet":
        return build_unet(card)
    if card.architecture == "joint":
        return build_joint(card)
    if card.architecture == "cyclegan":
        from models.cyclegan import build_cyclegan

        return build_cyclegan(card)
    raise ModelCardInvalid(
        f"architecture {card.architecture!r} of card {card.name!r} is not available in this build"
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
