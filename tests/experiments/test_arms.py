"""The experiment's arms on ``fit``'s extension point (``experiments.arms``): how the
label-only patches meet BatchNorm (``--label-bn``), and the presence reading of L_cls,
by hand."""

from __future__ import annotations

import math
from copy import deepcopy

import numpy as np
import pytest
import torch
from torch import nn

from experiments.arms import forward_for, label_loss_for, presence_loss
from models.architectures import build_module
from models.card import ClassSpec, ModelCard
from models.catalogue import BUILTIN_CARDS
from models.joint import JointSegClassNet
from models.patches import PatchDataset, limit_masks, patch_label_from_mask
from models.seg_training import FitConfig, fit
from models.stain import PSEUDO_CLASSES, PSEUDO_COLORS, stain_pseudo_labels

STAIN_CLASSES = [ClassSpec(name=n, color=c) for n, c in zip(PSEUDO_CLASSES, PSEUDO_COLORS)]


def joint_card() -> ModelCard:
    return BUILTIN_CARDS["joint"].model_copy(update={"classes": STAIN_CLASSES, "tile_px": 64,
                                                     "target_mpp": 1.0})


def test_label_only_patches_and_batchnorm() -> None:
    """``label_bn``: in one shared pass the label-only patches change what the masked
    patches' outputs are (BatchNorm batch statistics); the two-pass modes keep the
    masked patches' pass as if alone; ``masked-running`` and ``frozen`` leave the running
    statistics as the masked pass made them, and ``frozen`` normalises the label-only
    patches with them."""
    torch.manual_seed(0)
    net = JointSegClassNet(3).train()
    x = torch.randn(6, 3, 64, 64)
    x[2:] = x[2:] * 3 + 1  # label-only patches with other statistics
    alone = deepcopy(net)
    seg_alone = alone(x[:2])["probabilities"]
    shared = deepcopy(net)
    seg, cls = forward_for("shared")(shared, x, 2)
    assert seg.shape == (6, 3, 64, 64) and cls is not None and cls.shape == (6, 3)
    assert not torch.allclose(seg[:2], seg_alone, atol=1e-4)
    for mode in ("separate", "masked-running", "frozen"):
        net_mode = deepcopy(net)
        seg, cls = forward_for(mode)(net_mode, x, 2)
        assert seg.shape == (6, 3, 64, 64) and cls is not None and cls.shape == (6, 3)
        assert torch.allclose(seg[:2], seg_alone, atol=1e-5), mode
        bn, bn_alone = net_mode.encoder[1], alone.encoder[1]
        same_stats = torch.allclose(bn.running_mean, bn_alone.running_mean)
        assert same_stats == (mode != "separate"), mode
        assert all(m.training for m in net_mode.modules())  # train mode is restored
        assert all(m.track_running_stats for m in net_mode.modules()
                   if isinstance(m, nn.BatchNorm2d))
        if mode == "masked-running":  # the label-only patches by their own batch statistics
            assert torch.allclose(seg[2:], deepcopy(net)(x[2:])["probabilities"], atol=1e-5)
    frozen = deepcopy(net)
    seg, _ = forward_for("frozen")(frozen, x, 2)
    assert torch.allclose(seg[2:], deepcopy(alone).eval()(x[2:])["probabilities"], atol=1e-5)
    # no masked patch in the batch: one pass, whatever the mode
    assert torch.allclose(forward_for("frozen")(deepcopy(net), x, 0)[0],
                          deepcopy(net)(x)["probabilities"], atol=1e-5)
    with pytest.raises(ValueError, match="label_bn must be one of masked-running, shared, "
                       "separate, frozen, got 'mixed'"):
        forward_for("mixed")


@pytest.fixture(scope="module")
def few_masks(cmu_rgb: np.ndarray) -> PatchDataset:
    """The first 16 patches of 64 px of real H&E (1 µm/px) with stain pseudo-labels (as
    ``tests/models/test_joint.py`` cuts them), masks on 4."""
    import cv2

    rgb = cv2.resize(cmu_rgb, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    labels, _ = stain_pseudo_labels(rgb)
    images, masks = [], []
    for y in range(0, rgb.shape[0] - 64, 64):
        for x in range(0, rgb.shape[1] - 64, 64):
            if (labels[y:y + 64, x:x + 64] > 0).mean() > 0.75 and len(images) < 16:
                images.append(rgb[y:y + 64, x:x + 64])
                masks.append(labels[y:y + 64, x:x + 64])
    assert len(images) == 16
    masks_arr = np.stack(masks)
    data = PatchDataset.build(np.stack(images), masks_arr,
                              [patch_label_from_mask(m, 3, (0.0, 0.5, 0.15)) for m in masks_arr])
    return limit_masks(data, 0.25, seed=0)


def test_label_only_patches_reach_training_only_through_the_chosen_route(
        few_masks: PatchDataset) -> None:
    """Without L_cls, the label-only patches can only act through BatchNorm: in one shared
    pass they change the trained weights, in ``masked-running`` (the product's, and the
    experiment's default) neither the weights nor the running statistics see them."""
    data = few_masks
    other = data.subset(np.arange(len(data)))
    label_only = ~other.has_mask
    other.images[label_only] = 255 - other.images[label_only]  # different label-only patches
    card = joint_card()

    def train(patches: PatchDataset, label_bn: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = build_module(card)
        fit(module, card, patches, FitConfig(steps=3, batch_size=4, masked_per_batch=2,
                                             lr=1e-3, cls_weight=0.0),
            forward=forward_for(label_bn))
        return module.state_dict()

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(train(data, "masked-running"), train(other, "masked-running"))
    assert not same(train(data, "shared"), train(other, "shared"))


def test_presence_loss_reads_labels_as_the_most_severe_class_present() -> None:
    """A label ``c``: class ``c`` present (its best pixel's probability), the classes
    above it absent, the milder ones free. By hand on a 3-class, 2-pixel map."""
    # pixel 0: mostly class 0; pixel 1: class 1 and 2 split
    probs = torch.tensor([[[0.8, 0.1]], [[0.1, 0.5]], [[0.1, 0.4]]]).log()[None]  # (1, 3, 1, 2)
    logits = probs.clone().requires_grad_(True)
    loss = presence_loss(logits, torch.tensor([1]))
    # class 1 present (best pixel 0.5), class 2 absent (best pixel 0.4); class 0 unconstrained
    assert loss.item() == pytest.approx((-math.log(0.5) - math.log(1 - 0.4)) / 2, rel=1e-5)
    loss.backward()
    assert logits.grad[0, :, 0, 0].abs().max() == 0  # pixel 0 is no class's best above 0
    assert logits.grad[0, 1, 0, 1] < 0 and logits.grad[0, 2, 0, 1] > 0  # raise 1, lower 2
    # the mildest label constrains every class; the most severe only its own
    assert presence_loss(probs, torch.tensor([0])).item() == pytest.approx(
        (-math.log(0.8) - math.log(0.5) - math.log(0.6)) / 3, rel=1e-5)
    assert presence_loss(probs, torch.tensor([2])).item() == pytest.approx(-math.log(0.4), rel=1e-5)
    # as fit's label_loss: the class logits go unused
    as_hook = label_loss_for("presence")(probs, torch.zeros(1, 3), torch.tensor([1]))
    assert as_hook.item() == pytest.approx(loss.item())
    softmax = label_loss_for("softmax")(probs, torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([1]))
    assert softmax.item() == pytest.approx(-math.log(math.e**2 / (2 + math.e**2)), rel=1e-5)
    with pytest.raises(ValueError, match="cls_loss must be softmax or presence, got 'bce'"):
        label_loss_for("bce")
