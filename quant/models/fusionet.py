"""FusioNet-style networks: bottleneck units whose inner layers can be fused (``quant/fusion.py``).

:class:`FusionUnit` is the ShuffleNet-style unit of FusioNet (algorithms.md §5.3):
grouped 1×1 expand (``groups`` groups, ``in·e`` channels) → BN → ReLU → depthwise 3×3
(stride s, padding 1) → BN → ReLU → grouped 1×1 project → BN → channel shuffle
(``groups`` groups) → residual add when stride is 1 and in == out.

:class:`FusioNetDigits` is a small FusioNet for the 16×16 upsampled digits with large
expansions (the mid width mostly costs additions once fused):
stem conv3×3 ×16 stride 2 → BN → ReLU; units 16→16 e16, 16→32 e16 s2, 32→32 e24;
head grouped 1×1 32→128 → BN → ReLU; global average pool; Linear 10.
Feature maps 8×8 → 4×4. About 0.7 M dense block multiplications per image.

:func:`mbv2_fusion_digits` is MobileNetV2 "modified for fusion" (algorithms.md §5.3: narrow
block I/O, large expansion) on the same frame: inverted residuals, i.e. :class:`FusionUnit`
with one group (dense 1×1 expand → BN → ReLU → depthwise 3×3 → BN → ReLU → linear 1×1
project → BN → residual; the shuffle of one group is the identity), units 8→8 e32,
8→8 e32 s2, 8→8 e32, dense 1×1 head 8→64. Its units use ReLU where MobileNetV2
(``models/mobilenetv2.py``) uses ReLU6: a sign mask alone cannot replace ReLU6's clip at 6
(it would need a second, saturation mask that the 4-bit predictor, whose levels end at 5.6,
cannot see).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["channel_shuffle", "shuffle_permutation", "FusionUnit", "FusioNetDigits",
           "fusionet_digits", "mbv2_fusion_digits", "FUSIONET_DIGITS_UNITS",
           "MBV2_FUSION_DIGITS_UNITS"]

#: ``(in, out, expansion, stride)`` of the units of :class:`FusioNetDigits`.
FUSIONET_DIGITS_UNITS: tuple[tuple[int, int, int, int], ...] = (
    (16, 16, 16, 1), (16, 32, 16, 2), (32, 32, 24, 1))

#: ``(in, out, expansion, stride)`` of the inverted residuals of :func:`mbv2_fusion_digits`.
MBV2_FUSION_DIGITS_UNITS: tuple[tuple[int, int, int, int], ...] = (
    (8, 8, 32, 1), (8, 8, 32, 2), (8, 8, 32, 1))


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle: ``[N, g·c, H, W]`` viewed as ``[N, g, c, H, W]``, transposed
    to ``[N, c, g, H, W]`` and flattened. Output channel ``j`` is input channel
    ``shuffle_permutation(C, g)[j]``."""
    n, ch, h, w = x.shape
    return x.reshape(n, groups, ch // groups, h, w).transpose(1, 2).reshape(n, ch, h, w)


def shuffle_permutation(channels: int, groups: int) -> torch.Tensor:
    """Index ``perm`` with ``channel_shuffle(x)[:, j] == x[:, perm[j]]`` (int64 ``[C]``)."""
    c = channels // groups
    j = torch.arange(channels)
    return (j % groups) * c + j // groups


class FusionUnit(nn.Module):
    """Fusable bottleneck: ``expand`` (grouped 1×1) → ``bn1`` → ReLU → ``dw`` (3×3 depthwise,
    ``stride``) → ``bn2`` → ReLU → ``project`` (grouped 1×1) → ``bn3`` → shuffle → (+ input).

    ``groups`` must divide ``in_channels``, ``out_channels`` and the mid width
    ``in_channels · expansion``. The residual add is used when ``stride == 1`` and
    ``in_channels == out_channels`` (``residual=False`` turns it off)."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int = 1,
                 groups: int = 4, residual: bool = True) -> None:
        super().__init__()
        mid = in_channels * expansion
        if stride not in (1, 2):
            raise ValueError(f"FusionUnit stride must be 1 or 2, got {stride}")
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("mid", mid)):
            if v % groups:
                raise ValueError(f"FusionUnit: groups={groups} must divide {name}={v}")
        self.in_channels, self.out_channels, self.mid = in_channels, out_channels, mid
        self.stride, self.groups = stride, groups
        self.use_res = residual and stride == 1 and in_channels == out_channels
        self.expand = nn.Conv2d(in_channels, mid, 1, bias=False, groups=groups)
        self.bn1 = nn.BatchNorm2d(mid)
        self.dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.project = nn.Conv2d(mid, out_channels, 1, bias=False, groups=groups)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.expand(x)))
        h = torch.relu(self.bn2(self.dw(h)))
        y = channel_shuffle(self.bn3(self.project(h)), self.groups)
        return x + y if self.use_res else y


class FusioNetDigits(nn.Module):
    """Stem, :data:`FUSIONET_DIGITS_UNITS`, grouped 1×1 head, GAP, FC (see module doc)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, groups: int = 4,
                 units: tuple[tuple[int, int, int, int], ...] = FUSIONET_DIGITS_UNITS,
                 head_channels: int = 128) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, units[0][0], 3, 2, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(units[0][0])
        self.units = nn.Sequential(*[FusionUnit(i, o, e, s, groups) for i, o, e, s in units])
        self.head = nn.Conv2d(units[-1][1], head_channels, 1, bias=False, groups=groups)
        self.head_bn = nn.BatchNorm2d(head_channels)
        self.fc = nn.Linear(head_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.units(x)
        x = torch.relu(self.head_bn(self.head(x)))
        return self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))


def fusionet_digits(num_classes: int = 10, in_channels: int = 1) -> FusioNetDigits:
    """The digits FusioNet (16×16 inputs)."""
    return FusioNetDigits(num_classes=num_classes, in_channels=in_channels)


def mbv2_fusion_digits(num_classes: int = 10, in_channels: int = 1) -> FusioNetDigits:
    """MobileNetV2-style inverted residuals modified for fusion, on digits (see module doc)."""
    return FusioNetDigits(num_classes=num_classes, in_channels=in_channels, groups=1,
                          units=MBV2_FUSION_DIGITS_UNITS, head_channels=64)
