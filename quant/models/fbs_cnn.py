"""A small plain (no residual) CNN in the style of FBS's M-CifarNet, the dense backbone of
Feature Boosting and Suppression (``quant/fbs.py``).

Eight 3x3 convs, padding 1, each conv -> BN -> ReLU, with output channels
16, 16, 32/s2, 32, 32, 64/s2, 64, 64 (:data:`FBS_CNN_LAYERS`), then global average pooling
and one linear classifier. On the 16x16 upsampled digits the feature maps are 16, 8 and 4 px;
about 3.6 M conv MACs per image. M-CifarNet's widths (64..192), its dropout and its valid
first conv are dropped: the digits need far less, and every conv keeps the same geometry.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FBS_CNN_LAYERS", "FBSCNN", "fbs_cnn"]

#: ``(out_channels, stride)`` of the eight convs.
FBS_CNN_LAYERS: tuple[tuple[int, int], ...] = (
    (16, 1), (16, 1), (32, 2), (32, 1), (32, 1), (64, 2), (64, 1), (64, 1))


class FBSCNN(nn.Module):
    """Dense backbone: ``conv<i>`` / ``bn<i>`` / ``relu<i>`` for i = 1..8, ``avgpool``, ``fc``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        c_in = in_channels
        for i, (c_out, stride) in enumerate(FBS_CNN_LAYERS, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1,
                                                bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c_out))
            setattr(self, f"relu{i}", nn.ReLU(inplace=True))
            c_in = c_out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def n_convs(self) -> int:
        return len(FBS_CNN_LAYERS)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, len(FBS_CNN_LAYERS) + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def fbs_cnn(num_classes: int = 10, in_channels: int = 1) -> FBSCNN:
    """Build the dense FBS backbone (any input size >= 4 px)."""
    return FBSCNN(num_classes=num_classes, in_channels=in_channels)
