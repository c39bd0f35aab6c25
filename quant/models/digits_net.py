"""A small CNN for the 8x8 scikit-learn digits, trainable on CPU in seconds.

conv3x3(16) -> BN -> ReLU -> conv3x3(32, stride 2) -> BN -> ReLU ->
conv3x3(32) -> BN -> ReLU -> global average pool -> Linear.
Input ``(N, in_channels, 8, 8)``; feature maps 8x8 -> 4x4; output logits
``(N, num_classes)``. About 14.5 k parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DigitsNet", "digits_net"]


class DigitsNet(nn.Module):
    """Three conv/BN/ReLU layers plus a linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(32, 32, 3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def digits_net(num_classes: int = 10, in_channels: int = 1) -> DigitsNet:
    """Build the digits CNN (expects 8x8 inputs, works for any size >= 2)."""
    return DigitsNet(num_classes=num_classes, in_channels=in_channels)
