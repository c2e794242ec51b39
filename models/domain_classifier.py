"""The domain evaluator's network: a small CNN classifier of a dataset's own images, whose
penultimate features stand in for Inception's (pipelines/evaluate/domain.py scores with them)."""

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class DomainClassifier(nn.Module):
    """Conv stages (conv3x3 -> GroupNorm -> ReLU, x blocks; 2x average-pool between stages) -> GAP -> linear.

    GroupNorm, not BatchNorm: a feature depends on its own image only, in training and in
    evaluation alike, so the features do not shift with the batch or with running statistics
    estimated from a few hundred images.
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (32, 64, 128, 128), blocks: int = 1,
                 groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, w in enumerate(widths):
            for _ in range(blocks):
                layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.GroupNorm(math.gcd(groups, w), w),
                           nn.ReLU(inplace=True)]
                c_in = w
            if i < len(widths) - 1:
                layers.append(nn.AvgPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, feature_dim) penultimate features."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [-1, 1] -> (features (B, D), logits (B, K))."""
        h = self.features(x)
        return h, self.head(h)


def to_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, S, S) in [-1, 1] (ADM's x / 127.5 - 1), resized if H, W != S."""
    x = images.float()
    if x.shape[-2:] != (image_size, image_size):
        # Antialiased bilinear, as torchvision's Resize on tensors: a 256 px sample brought to a
        # 48 px evaluator must not alias (the training images were made by ADM's BOX+BICUBIC).
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=True).clamp(0, 255)
    return x.div(127.5).sub(1.0)
