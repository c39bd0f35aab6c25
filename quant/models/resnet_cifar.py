"""CIFAR-style ResNets (He et al. 2016, Sec. 4.2), the SkipNet/DFS backbone.

Three stages of BasicBlocks with 16/32/64 channels and ``n`` blocks per stage,
depth ``6n + 2``. Spatial size halves at the first block of stages 2 and 3
(32x32 -> 16x16 -> 8x8 for CIFAR inputs). Downsampling shortcuts use a 1x1
convolution with stride 2 followed by BatchNorm ("option B"), so every layer is
a plain conv/BN/ReLU/add that the quantiser and the hardware mapper can see.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet38", "resnet74", "init_cifar_weights"]


def init_cifar_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convs, BN gamma = 1 and beta = 0, in module order."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity or 1x1-projection shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class CifarResNet(nn.Module):
    """ResNet of depth ``6 * n + 2`` for small (e.g. 32x32) images.

    Input ``(N, in_channels, H, W)``; output logits ``(N, num_classes)``.
    """

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"blocks per stage must be >= 1, got {n}")
        self.depth = 6 * n + 2
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(16, 16, n, stride=1)
        self.layer2 = self._make_stage(16, 32, n, stride=2)
        self.layer3 = self._make_stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_cifar_weights(self)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (n=3, ~0.27 M parameters)."""
    return CifarResNet(3, num_classes=num_classes, in_channels=in_channels)


def resnet38(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-38 (n=6, ~0.56 M parameters)."""
    return CifarResNet(6, num_classes=num_classes, in_channels=in_channels)


def resnet74(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-74 (n=12, ~1.15 M parameters)."""
    return CifarResNet(12, num_classes=num_classes, in_channels=in_channels)
