"""How a training batch goes through the network and what its outputs are compared to.

The product's forward pass (:func:`masked_running_forward`: the label-only patches in a
BatchNorm pass of their own that leaves the running statistics to the masked patches),
its label loss (the paper's softmax cross-entropy) and the soft Dice term; ``fit`` takes
other ``Forward``/``LabelLoss`` callables, which is how the experiments build their arms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from models.metrics import IGNORE

#: ``(module, x, k) -> (segmentation logits (N, C, H, W), class logits (N, C) or None)``
#: of a batch ``x`` whose first ``k`` patches have masks and the rest are label-only.
Forward = Callable[[nn.Module, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]]
#: ``(segmentation logits, class logits, labels) -> L_cls`` of the labelled patches of a
#: batch (class indices ``labels``, (N,) int64).
LabelLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def split_outputs(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A module's output as (segmentation logits, class logits or None)."""
    if isinstance(out, dict):
        return out["probabilities"], out.get("tile_scores")
    return out, None


@contextmanager
def batch_statistics_only(module: nn.Module) -> Iterator[None]:
    """The training BatchNorm layers of ``module`` normalise by the batch's statistics
    without updating their running ones, until the block ends."""
    layers = [m for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
              and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def two_pass_forward(module: nn.Module, x: torch.Tensor, split: int,
                     label_pass: Callable[[nn.Module], AbstractContextManager[Any]],
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module(x)`` of a batch whose first ``split`` patches have masks, in two passes
    (masked, then label-only inside ``label_pass(module)``) whose outputs are
    concatenated; one pass when the batch holds only one of the two."""
    if not 0 < split < len(x):
        return split_outputs(module(x))
    seg_a, cls_a = split_outputs(module(x[:split]))
    with label_pass(module):
        seg_b, cls_b = split_outputs(module(x[split:]))
    cls = None if cls_a is None or cls_b is None else torch.cat([cls_a, cls_b])
    return torch.cat([seg_a, seg_b]), cls


def masked_running_forward(module: nn.Module, x: torch.Tensor,
                           split: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The product's :data:`Forward`: the label-only patches in a pass of their own,
    normalised by their batch statistics, which only the masked pass adds to the
    running statistics used at inference (:func:`batch_statistics_only`)."""
    return two_pass_forward(module, x, split, batch_statistics_only)


def softmax_label_loss(seg_logits: torch.Tensor, cls_logits: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
    """The paper's L_cls (the product's :data:`LabelLoss`): cross-entropy of the
    classification head's logits over the classes."""
    return nn.functional.cross_entropy(cls_logits, labels)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over classes present in the batch (ignored pixels excluded)."""
    probs = logits.softmax(1)
    valid = (target != IGNORE).unsqueeze(1).float()
    onehot = nn.functional.one_hot(target.clamp(max=logits.shape[1] - 1), logits.shape[1])
    onehot = onehot.permute(0, 3, 1, 2).float() * valid
    probs = probs * valid
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    dice = (2 * inter + 1) / (denom + 1)
    return 1 - dice[present].mean() if present.any() else logits.sum() * 0
