"""The joint classification-segmentation network of Ciga & Martel.

"Learning to segment images with classification labels" (Medical Image Analysis, 2021):
a ResNet-18 cut after ``layer3`` (256 x 8 x 8 for a 128 px input), a segmentation head
``conv3x3 256->64 (no bias) + BN + ReLU -> upsample x2 -> conv1x1 64->C`` giving a
C x 16 x 16 map that is upsampled (nearest) to the input size, and a classification
head on that C x 16 x 16 map *before* the final upsampling: ``adaptive average pool ->
conv1x1 C->8 (no bias) + BN + ReLU -> conv1x1 8->C``. Because the classifier only sees
the segmentation map, class labels of whole patches train the segmentation head too
(``L = L_seg + L_cls``, see ``models.seg_training``).

``classifier`` picks how the patch class comes out of that map. ``head`` (default) is
the head the paper describes, above. ``max`` is what the authors' released code
(github.com/ozanciga/learning-to-segment, ``models.domain_classifier``) actually runs:
the class logits are the global max of each class's segmentation logits, with no
layers of their own. Then L_cls can only raise or lower a class's own map, where the
head may use the segmentation channels as free features. In the CMU region experiment
(``experiments.joint_vs_masks``, README) the labels cost Dice through the head;
through the max they cost none, but did not reliably add any either.

The forward pass returns both outputs keyed by the names the engine stores them under:
``{"probabilities": (N, C, H, W) segmentation logits, "tile_scores": (N, C) class
logits}``; the predictor applies the card's softmax to both.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

#: How class logits come out of the segmentation map (see the module docstring).
CLASSIFIERS = ("head", "max")

#: Output names, as the model card declares them.
SEGMENTATION = "probabilities"
CLASSIFICATION = "tile_scores"


def resnet18_trunk() -> nn.Sequential:
    """torchvision's ResNet-18 up to and including ``layer3`` (stride 16, 256 channels),
    randomly initialised: nothing is downloaded."""
    from models._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                         net.layer1, net.layer2, net.layer3)


class JointSegClassNet(nn.Module):
    """Segmentation and patch classification from one ResNet-18 trunk.

    ``upsample`` is the mode of the x2 upsampling inside the segmentation head
    (``bilinear`` by default; the final upsampling to the input size is always nearest).
    ``classifier="max"`` has no ``cls_head``: the class logits are the per-class maxima
    of the coarse segmentation logits.
    """

    def __init__(self, n_classes: int, *, seg_channels: int = 64, cls_channels: int = 8,
                 upsample: str = "bilinear", classifier: Literal["head", "max"] = "head") -> None:
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
        self.n_classes = n_classes
        self.classifier = classifier
        self.encoder = resnet18_trunk()
        up = (nn.Upsample(scale_factor=2, mode="nearest") if upsample == "nearest"
              else nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        self.seg_head = nn.Sequential(
            nn.Conv2d(256, seg_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(seg_channels),
            nn.ReLU(inplace=True),
            up,
            nn.Conv2d(seg_channels, n_classes, kernel_size=1),
        )
        self.cls_head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(n_classes, cls_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(cls_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(cls_channels, n_classes, kernel_size=1),
        ) if classifier == "head" else None

    def coarse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C x H/8 x W/8 segmentation logits before the final upsampling, (N, C) class
        logits)."""
        seg = self.seg_head(self.encoder(x))
        if self.cls_head is None:
            return seg, torch.amax(seg, dim=(2, 3))
        return seg, self.cls_head(seg).flatten(1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        seg, cls = self.coarse(x)
        full = nn.functional.interpolate(seg, size=x.shape[-2:], mode="nearest")
        return {SEGMENTATION: full, CLASSIFICATION: cls}
