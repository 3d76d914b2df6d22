"""The experiment's training arms that the product does not train with, built on
``models.seg_training.fit``'s extension point (its ``forward`` and ``label_loss``).

How the label-only patches of a batch meet BatchNorm (``--label-bn``, :func:`forward_for`):

``masked-running``  the product's way (``models.seg_passes.masked_running_forward``):
                    two passes, the label-only one normalised by its own batch
                    statistics; only the masked pass updates the running statistics
                    used at inference.
``shared``          one pass over the whole batch, so the label-only patches shift the
                    statistics that normalise the masked ones (as the authors' code).
``separate``        two passes, each group normalised by its own batch statistics, both
                    updating the running ones.
``frozen``          two passes, the label-only one with BatchNorm in eval mode
                    (normalised by the running statistics, which it leaves as the
                    masked patches made them).

What L_cls compares a patch label with (:func:`label_loss_for`): ``softmax`` (the
paper's and the product's) the classifier's logits, cross-entropy over the classes;
``presence`` each class's presence in the segmentation map itself
(:func:`presence_loss`), read as BACH labels are meant.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal, get_args

import torch
from torch import nn

from models.seg_passes import (
    Forward,
    LabelLoss,
    masked_running_forward,
    softmax_label_loss,
    split_outputs,
    two_pass_forward,
)

LabelBN = Literal["masked-running", "shared", "separate", "frozen"]
LABEL_BN: tuple[str, ...] = get_args(LabelBN)


@contextmanager
def eval_batchnorm(module: nn.Module) -> Iterator[None]:
    """The training BatchNorm layers of ``module`` in eval mode until the block ends:
    normalising by their running statistics, which they leave untouched."""
    layers = [m for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
              and m.track_running_stats]
    for layer in layers:
        layer.eval()
    try:
        yield
    finally:
        for layer in layers:
            layer.train()


def shared_forward(module: nn.Module, x: torch.Tensor,
                   split: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pass over the whole batch, masked and label-only patches together."""
    return split_outputs(module(x))


def separate_forward(module: nn.Module, x: torch.Tensor,
                     split: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Two passes, both plain training passes."""
    return two_pass_forward(module, x, split, lambda _module: nullcontext())


def frozen_forward(module: nn.Module, x: torch.Tensor,
                   split: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Two passes, the label-only one with BatchNorm in eval mode."""
    return two_pass_forward(module, x, split, eval_batchnorm)


FORWARDS: dict[str, Forward] = {"masked-running": masked_running_forward,
                                "shared": shared_forward, "separate": separate_forward,
                                "frozen": frozen_forward}


def forward_for(label_bn: str) -> Forward:
    """The ``fit(forward=...)`` of a ``--label-bn`` mode (module docstring)."""
    if label_bn not in FORWARDS:
        raise ValueError(f"label_bn must be one of {', '.join(LABEL_BN)}, got {label_bn!r}")
    return FORWARDS[label_bn]


def presence_loss(seg_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of class presence against "most severe class present" labels.

    A class's presence in a patch is its highest pixel probability in the segmentation
    map (classes ordered by severity). A label ``c`` says class ``c`` is present and every
    class above ``c`` absent; it says nothing of the milder classes, which a patch of a
    severe class usually contains too (softmax cross-entropy over per-class maxima would
    push them down). Mean over the (patch, class) pairs the labels constrain.
    """
    log_present = seg_logits.log_softmax(1).amax(dim=(2, 3))  # (N, C)
    log_absent = torch.log1p(-log_present.exp().clamp(max=1 - 1e-6))
    classes = torch.arange(seg_logits.shape[1], device=seg_logits.device)[None]
    is_label = classes == labels[:, None]
    known = (classes >= labels[:, None]).float()
    nll = torch.where(is_label, -log_present, -log_absent)
    return (nll * known).sum() / known.sum()


def presence_label_loss(seg_logits: torch.Tensor, cls_logits: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
    """:func:`presence_loss` as a ``fit(label_loss=...)``: the class logits go unused."""
    return presence_loss(seg_logits, labels)


LABEL_LOSSES: dict[str, LabelLoss] = {"softmax": softmax_label_loss,
                                      "presence": presence_label_loss}


def label_loss_for(cls_loss: str) -> LabelLoss:
    """The ``fit(label_loss=...)`` of an L_cls reading (module docstring)."""
    if cls_loss not in LABEL_LOSSES:
        raise ValueError(f"cls_loss must be softmax or presence, got {cls_loss!r}")
    return LABEL_LOSSES[cls_loss]


def fit_hooks(label_bn: str, cls_loss: str) -> dict[str, Any]:
    """``fit``'s keyword arguments for an arm."""
    return {"forward": forward_for(label_bn), "label_loss": label_loss_for(cls_loss)}
