"""The joint classification-segmentation network (Ciga & Martel), its training loop,
metrics, and test-time augmentation: shapes from the paper, losses that fall, resumes
that reproduce an uninterrupted run, and metric values computed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.architectures import build_module
from models.card import ClassSpec, ModelCard, OutputSpec
from models.catalogue import BUILTIN_CARDS
from models.errors import ModelCardInvalid
from models.joint import JointSegClassNet
from models.loading import LoadedModel, load_model
from models.metrics import IGNORE, bach_score, classification_metrics, segmentation_metrics
from models.patches import (
    PatchDataset,
    TrainingDataInvalid,
    group_split,
    limit_masks,
    masked_area_share,
    patch_label_from_mask,
)
from models.predictor import Predictor
from models.seg_passes import masked_running_forward
from models.seg_training import FitConfig, evaluate, fit, to_tensor
from models.stain import PSEUDO_CLASSES, PSEUDO_COLORS, stain_pseudo_labels

STAIN_CLASSES = [ClassSpec(name=n, color=c) for n, c in zip(PSEUDO_CLASSES, PSEUDO_COLORS)]


def joint_card(**update: object) -> ModelCard:
    return BUILTIN_CARDS["joint"].model_copy(update={"classes": STAIN_CLASSES, "tile_px": 64,
                                                     "target_mpp": 1.0, **update})


def test_shapes_and_heads_are_the_papers() -> None:
    torch.manual_seed(0)
    net = JointSegClassNet(4).eval()
    x = torch.randn(2, 3, 128, 128)
    assert net.encoder(x).shape == (2, 256, 8, 8)  # ResNet-18 cut after layer3
    seg, cls = net.coarse(x)
    assert seg.shape == (2, 4, 16, 16) and cls.shape == (2, 4)  # C x 16 x 16 before upsampling
    out = net(x)
    assert out["probabilities"].shape == (2, 4, 128, 128) and out["tile_scores"].shape == (2, 4)
    # the final upsampling is nearest: every 8 x 8 block repeats one coarse value
    assert torch.equal(out["probabilities"], seg.repeat_interleave(8, 2).repeat_interleave(8, 3))
    # the classifier sees only the segmentation map
    assert torch.equal(net.cls_head(seg).flatten(1), out["tile_scores"])

    s = list(net.seg_head)
    assert [type(m) for m in s] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Upsample, nn.Conv2d]
    assert (s[0].in_channels, s[0].out_channels, s[0].kernel_size, s[0].bias) == (256, 64, (3, 3), None)
    assert s[1].num_features == 64 and s[3].scale_factor == 2
    assert (s[4].in_channels, s[4].out_channels, s[4].kernel_size) == (64, 4, (1, 1))
    c = list(net.cls_head)
    assert [type(m) for m in c] == [nn.AdaptiveAvgPool2d, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert c[0].output_size == 1
    assert (c[1].in_channels, c[1].out_channels, c[1].kernel_size, c[1].bias) == (4, 8, (1, 1), None)
    assert c[2].num_features == 8
    assert (c[4].in_channels, c[4].out_channels, c[4].kernel_size) == (8, 4, (1, 1))
    # the trunk is torchvision's ResNet-18 up to layer3 (no layer4, no fc)
    names = [type(m).__name__ for m in net.encoder]
    assert names == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Sequential", "Sequential", "Sequential"]
    assert net.encoder[6][0].conv1.out_channels == 256


def test_max_classifier_is_the_maps_per_class_maximum() -> None:
    """``classifier="max"`` (the authors' released code): no layers of its own, the
    class logits are each class's largest coarse segmentation logit, so L_cls reaches
    exactly the map positions that hold them."""
    torch.manual_seed(0)
    net = JointSegClassNet(3, classifier="max").eval()
    assert net.cls_head is None
    x = torch.randn(2, 3, 128, 128, requires_grad=True)
    seg, cls = net.coarse(x)
    assert seg.shape == (2, 3, 16, 16) and cls.shape == (2, 3)
    flat = seg.detach().flatten(2)
    assert torch.equal(cls.detach(), flat.max(2).values)
    # the gradient of one class logit reaches one map position of that class only
    grad, = torch.autograd.grad(cls[0, 1], seg)
    assert int((grad != 0).sum()) == 1 and grad[0, 1].flatten()[flat[0, 1].argmax()] == 1
    head = JointSegClassNet(3)
    assert sum(p.numel() for p in head.parameters()) - sum(
        p.numel() for p in net.parameters()) == 3 * 8 + 2 * 8 + 8 * 3 + 3  # the head's layers
    built = build_module(joint_card(params={"classifier": "max"}))
    assert isinstance(built, JointSegClassNet) and built.cls_head is None
    with pytest.raises(ModelCardInvalid, match="classifier must be one of head, max, got 'mean'"):
        build_module(joint_card(params={"classifier": "mean"}))


def test_joint_card_builds_and_predicts_both_outputs() -> None:
    loaded = load_model(BUILTIN_CARDS["joint"], allow_random_init=True)
    predictor = Predictor(loaded, device="cpu")
    predictor.check_output_geometry(128, 128)
    out = predictor(np.full((3, 128, 128, 3), 200, np.uint8))
    assert out["probabilities"].shape == (3, 4, 128, 128)
    assert np.allclose(out["probabilities"].sum(1), 1, atol=1e-5)  # softmax on both
    assert np.allclose(out["tile_scores"].sum(1), 1, atol=1e-5)
    with pytest.raises(ModelCardInvalid, match="unknown params"):
        build_module(joint_card(params={"depth": 5}))
    with pytest.raises(ModelCardInvalid, match="outputs probabilities"):
        build_module(joint_card(outputs=[OutputSpec(name="segmentation")]))


def test_metrics_by_hand() -> None:
    target = np.array([[0, 0, 1, 1], [2, 2, 2, IGNORE]])
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 1]])
    m = segmentation_metrics(pred, target, ["a", "b", "c"])
    # a: tp 1, fp 1 (pred 0 at target 2), fn 1 -> dice 2/4; b: tp 2, fp 1, fn 0 -> 4/5
    # c: tp 2, fn 1 -> 4/5; the ignored pixel counts nowhere
    assert m["dice"] == pytest.approx({"a": 0.5, "b": 0.8, "c": 0.8})
    assert m["iou"] == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 2 / 3})
    assert m["mean_dice"] == pytest.approx(0.7) and m["pixel_accuracy"] == pytest.approx(5 / 7)
    assert "bach_score" not in m
    c = classification_metrics(np.array([0, 1, 1, 2]), np.array([0, 1, 2, -1]), ["a", "b", "c"])
    assert c["n"] == 3 and c["accuracy"] == pytest.approx(2 / 3)
    assert c["f1"]["b"] == pytest.approx(2 / 3) and c["f1"]["c"] == 0.0

    # BACH: s = 1 - sum|p - g| / sum max(g, 3 - g) [p > 0 or g > 0]
    assert bach_score(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3])) == 1.0
    assert bach_score(np.array([3, 0]), np.array([0, 0])) == 0.0  # 1 - 3 / 3
    # g = [1, 2, 3, 0], p = [1, 1, 3, 0]: error 1; weights 2 + 2 + 3 (+0: both normal)
    assert bach_score(np.array([1, 1, 3, 0]), np.array([1, 2, 3, 0])) == pytest.approx(1 - 1 / 7)
    bach = segmentation_metrics(np.array([1, 1, 3, 0]), np.array([1, 2, 3, 0]),
                                ["Normal", "Benign", "In situ", "Invasive"])
    assert bach["bach_score"] == pytest.approx(1 - 1 / 7)


def test_patch_labels_split_and_mask_limits() -> None:
    mask = np.zeros((10, 10), np.uint8)
    mask[:6] = 1
    mask[:2, :5] = 2  # 10% class 2, 50% class 1, 40% class 0
    assert patch_label_from_mask(mask, 3) == 1  # majority
    assert patch_label_from_mask(mask, 3, (0, 0.5, 0.15)) == 1
    assert patch_label_from_mask(mask, 3, (0, 0.5, 0.1)) == 2  # the highest class present
    assert patch_label_from_mask(mask, 3, (0, 0.6, 0.2)) == 0
    assert patch_label_from_mask(np.full((4, 4), IGNORE, np.uint8), 3) == -1

    groups = np.array(["p1"] * 3 + ["p2"] * 4 + ["p3"] * 2 + ["p4"] * 5, object)
    train, val = group_split(groups, 0.25, seed=1)
    assert sorted(np.concatenate([train, val])) == list(range(len(groups)))
    assert not set(groups[train]) & set(groups[val]) and len(set(groups[val])) == 1

    data = PatchDataset.build(np.zeros((40, 8, 8, 3), np.uint8), np.ones((40, 8, 8), np.uint8),
                              labels=[1] * 40)
    few = limit_masks(data, 0.05, seed=0)
    assert few.has_mask.sum() == 2 and (few.masks[~few.has_mask] == IGNORE).all()
    assert (few.labels == 1).all()  # labels stay where masks go
    assert limit_masks(data, 0.05, seed=0).has_mask.tolist() == few.has_mask.tolist()


def test_masked_area_share_counts_overlapping_patches_once() -> None:
    # slide a: three 64 px patches on a 32 px stride in a row (they span 128 x 64 px);
    # slide b: one 64 px patch of its own
    boxes = np.array([(0, 0, 64, 64), (32, 0, 64, 64), (64, 0, 64, 64), (96, 96, 64, 64)])
    masks = np.ones((4, 8, 8), np.uint8)
    data = PatchDataset.build(np.zeros((4, 8, 8, 3), np.uint8), masks,
                              groups=["a", "a", "a", "b"], boxes=boxes)
    spanned = 128 * 64 + 64 * 64
    assert masked_area_share(data) == 1.0
    assert masked_area_share(data.without_masks(np.array([1, 2, 3]))) == 64 * 64 / spanned
    # the middle patch adds only the 32 px its left neighbour does not cover
    assert masked_area_share(data.without_masks(np.array([2, 3]))) == 96 * 64 / spanned
    assert masked_area_share(data.without_masks(np.array([0, 1, 2]))) == 64 * 64 / spanned
    # tiles from a folder have no place on a slide: no share to give
    assert masked_area_share(PatchDataset.build(np.zeros((2, 8, 8, 3), np.uint8))) is None
    assert data.subset([3]).boxes.tolist() == [[96, 96, 64, 64]]
    # odd sizes far out on a huge slide: counted on the boxes' edges, not per pixel
    far = PatchDataset.build(np.zeros((2, 8, 8, 3), np.uint8), np.ones((2, 8, 8), np.uint8),
                             boxes=[(10**9, 10**9, 255, 255), (10**9 + 128, 10**9, 255, 255)])
    assert masked_area_share(far.without_masks(np.array([1]))) == 255 / 383


@pytest.fixture(scope="module")
def tissue_patches(cmu_rgb: np.ndarray) -> PatchDataset:
    """64 px patches of real H&E (cmu_small_region at 1 µm/px) with stain pseudo-labels."""
    import cv2

    rgb = cv2.resize(cmu_rgb, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    labels, _ = stain_pseudo_labels(rgb)
    images, masks = [], []
    for y in range(0, rgb.shape[0] - 64, 64):
        for x in range(0, rgb.shape[1] - 64, 64):
            if (labels[y:y + 64, x:x + 64] > 0).mean() > 0.75:
                images.append(rgb[y:y + 64, x:x + 64])
                masks.append(labels[y:y + 64, x:x + 64])
    masks_arr = np.stack(masks)
    rule = (0.0, 0.5, 0.15)
    return PatchDataset.build(np.stack(images), masks_arr,
                              [patch_label_from_mask(m, 3, rule) for m in masks_arr],
                              groups=[f"g{i % 3}" for i in range(len(images))])


def _fit_joint(data: PatchDataset, steps: int, folder: Path | None = None, resume: bool = False,
               seed: int = 0) -> tuple[nn.Module, list[dict]]:
    card = joint_card()
    torch.manual_seed(seed)
    module = build_module(card)
    config = FitConfig(steps=steps, batch_size=4, lr=1e-3, seed=seed, checkpoint_every=3,
                       eval_every=3)
    result = fit(module, card, data, config, checkpoint_dir=folder, resume=resume)
    return module, result.history


def test_joint_training_lowers_both_losses(tissue_patches: PatchDataset) -> None:
    """Masks on a quarter of 16 real patches, class labels on all: both losses fall (the
    masked patches in a BatchNorm pass of their own, four at a time)."""
    data = limit_masks(tissue_patches.subset(np.arange(16)), 0.25, seed=0)
    assert data.has_mask.sum() == 4 and (data.labels >= 0).all()
    card = joint_card()
    torch.manual_seed(0)
    module = build_module(card)
    config = FitConfig(steps=12, batch_size=8, lr=1e-3, augment=False, eval_every=6,
                       masked_per_batch=4)
    evals: list[dict] = []
    result = fit(module, card, data, config, val=tissue_patches.subset(np.arange(16, 28)),
                 on_eval=lambda step, row: evals.append(row))
    seg = [h["loss_seg"] for h in result.history]
    cls = [h["loss_cls"] for h in result.history]
    assert np.mean(seg[-3:]) < 0.8 * np.mean(seg[:3]), seg
    assert np.mean(cls[-3:]) < np.mean(cls[:3]), cls
    assert [e["step"] for e in evals] == [6, 12]
    assert {"val_seg_mean_dice", "val_seg_dice_nuclei", "val_seg_mean_iou", "val_cls_accuracy",
            "val_cls_macro_f1"} <= set(evals[-1])
    assert 0 <= evals[-1]["val_seg_mean_dice"] <= 1


def test_label_only_patches_get_a_batchnorm_pass_of_their_own() -> None:
    """The product's forward pass of a training batch (masked patches first): the masked
    patches come out as if alone, the label-only ones by their own batch statistics, and
    only the masked pass updates the running statistics used at inference."""
    from copy import deepcopy

    torch.manual_seed(0)
    net = JointSegClassNet(3).train()
    x = torch.randn(6, 3, 64, 64)
    x[2:] = x[2:] * 3 + 1  # label-only patches with other statistics
    alone = deepcopy(net)
    seg_alone = alone(x[:2])["probabilities"]
    two_pass = deepcopy(net)
    seg, cls = masked_running_forward(two_pass, x, 2)
    assert seg.shape == (6, 3, 64, 64) and cls is not None and cls.shape == (6, 3)
    assert torch.allclose(seg[:2], seg_alone, atol=1e-5)
    assert torch.allclose(seg[2:], deepcopy(net)(x[2:])["probabilities"], atol=1e-5)
    bn, bn_alone = two_pass.encoder[1], alone.encoder[1]
    assert torch.allclose(bn.running_mean, bn_alone.running_mean)
    assert torch.allclose(bn.running_var, bn_alone.running_var)
    assert all(m.training for m in two_pass.modules())  # train mode is restored
    assert all(m.track_running_stats for m in two_pass.modules()
               if isinstance(m, nn.BatchNorm2d))
    # no masked patch in the batch: one pass
    assert torch.allclose(masked_running_forward(deepcopy(net), x, 0)[0],
                          deepcopy(net)(x)["probabilities"], atol=1e-5)


def test_label_only_patches_reach_training_only_through_l_cls(
        tissue_patches: PatchDataset) -> None:
    """Without L_cls (``cls_weight`` 0), other label-only patches leave the trained
    weights and BatchNorm's running statistics exactly as they were: they reach the
    model only through L_cls, never through the batch statistics of the masked ones."""
    data = limit_masks(tissue_patches.subset(np.arange(16)), 0.25, seed=0)
    other = data.subset(np.arange(len(data)))
    label_only = ~other.has_mask
    other.images[label_only] = 255 - other.images[label_only]  # different label-only patches
    card = joint_card()

    def train(patches: PatchDataset, cls_weight: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = build_module(card)
        fit(module, card, patches, FitConfig(steps=3, batch_size=4, masked_per_batch=2,
                                             lr=1e-3, cls_weight=cls_weight))
        return module.state_dict()

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(train(data, 0.0), train(other, 0.0))
    assert not same(train(data, 1.0), train(other, 1.0))  # through L_cls they do


def test_resume_reproduces_an_uninterrupted_run(tissue_patches: PatchDataset, tmp_path: Path) -> None:
    data = limit_masks(tissue_patches.subset(np.arange(20)), 0.3, seed=0)
    whole, whole_history = _fit_joint(data, 6, tmp_path / "whole")
    _fit_joint(data, 3, tmp_path / "split")
    assert (tmp_path / "split" / "checkpoint.pt").is_file()
    assert (tmp_path / "split" / "card.json").is_file()
    resumed, resumed_history = _fit_joint(data, 6, tmp_path / "split", resume=True, seed=0)
    assert [h["step"] for h in resumed_history] == [4, 5, 6]
    assert [h["loss"] for h in resumed_history] == pytest.approx(
        [h["loss"] for h in whole_history[3:]], rel=1e-5)
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    # the saved checkpoint is a loadable model
    loaded = load_model(ModelCard.model_validate_json((tmp_path / "split" / "card.json").read_text())
                        .model_copy(update={"source": tmp_path / "split" / "card.json"}))
    assert loaded.weights_sha256


def test_unet_needs_masks_and_learns_from_them(tissue_patches: PatchDataset) -> None:
    card = BUILTIN_CARDS["unet"].model_copy(update={
        "classes": STAIN_CLASSES, "params": {"encoder_name": "resnet18", "encoder_depth": 3,
                                             "decoder_channels": [32, 16, 8]}})
    labels_only = tissue_patches.without_masks(np.arange(len(tissue_patches)))
    with pytest.raises(TrainingDataInvalid, match="learns from masks only"):
        fit(build_module(card), card, labels_only, FitConfig(steps=1))
    torch.manual_seed(0)
    module = build_module(card)
    data = tissue_patches.subset(np.arange(16))
    result = fit(module, card, data, FitConfig(steps=12, batch_size=4, lr=3e-3, augment=False,
                                               dice_weight=0.5))
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    metrics = evaluate(module, card, data)
    assert "cls" not in metrics and metrics["seg"]["dice"]["background"] >= 0


def _manual_tta(module: nn.Module, card: ModelCard, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = to_tensor(batch, card, torch.device("cpu"))
    passes = []
    with torch.no_grad():
        for k in range(4):
            for flip in (False, True):
                xt = torch.rot90(x, k, (2, 3))
                xt = xt.flip(3) if flip else xt
                y = module(xt)["probabilities"].softmax(1)
                y = y.flip(3) if flip else y
                passes.append(torch.rot90(y, -k, (2, 3)).numpy())
    stack = np.stack(passes)
    return stack.mean(0), stack.var(0)


def test_tta_averages_the_dihedral_passes_and_reports_their_variance() -> None:
    torch.manual_seed(3)
    card = joint_card()
    module = build_module(card).eval()
    batch = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    predictor = Predictor(LoadedModel(card, module, None, None), device="cpu", tta=True)
    assert [o.name for o in predictor.extra_outputs] == ["variance"]
    assert predictor.extra_outputs[0].max_value == 0.25
    out = predictor(batch)
    mean, var = _manual_tta(module, card, batch)
    assert np.allclose(out["probabilities"], mean, atol=1e-5)
    assert np.allclose(out["variance"], var, atol=1e-5)
    assert 0 < out["variance"].max() <= 0.25 and out["tile_scores"].shape == (2, 3)
    plain = Predictor(LoadedModel(card, module, None, None), device="cpu")(batch)
    assert set(plain) == {"probabilities", "tile_scores"}
    assert not np.allclose(plain["probabilities"], out["probabilities"])
    # an equivariant model (identity) has zero variance and an unchanged mean
    ident = Predictor(load_model(BUILTIN_CARDS["identity"]), device="cpu", tta=True)(batch)
    assert np.allclose(ident["probabilities"] * 255, batch.transpose(0, 3, 1, 2), atol=1e-3)
    assert float(ident["variance"].max()) < 1e-10
    assert not math.isnan(float(out["variance"].mean()))
