"""Precision-gated CIFAR ResNet-20 (algorithms.md §2a.1), deployable variant.

Same structure and module names as :mod:`.resnet_cifar` (option-B 1x1 projection shortcuts),
so the float weights of a trained ``resnet20`` load directly (:func:`pg_resnet_from_float`):

* ``conv1`` of every BasicBlock is a :class:`~dynacc.quant.pg.PGConv2d` (9 PG layers);
* the stem ReLU and every block's output ReLU (``relu2``) are quantizing
  :class:`~dynacc.quant.pg.PACT` modules: their output, the input of the next PG conv, is the
  unsigned ``act_bits``-bit activation with a static power-of-two scale (rule G0);
* the block's inner ReLU (``relu1``) is a float PACT clip (it feeds a plain BFP conv);
* the stem conv, ``conv2``, the shortcuts and the FC stay float here (the integer program
  quantizes them as BFP).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..formats import BFPFormat, QuantConfig
from ..pg import PACT, PGConv2d
from .resnet_cifar import init_cifar_weights

__all__ = ["PGBasicBlock", "PGResNet", "pg_resnet20", "pg_resnet_from_float"]


class PGBasicBlock(nn.Module):
    """BasicBlock whose ``conv1`` is precision-gated; ``forward(x, x_lsb) -> (y, y_lsb)``."""

    def __init__(self, in_planes: int, planes: int, stride: int, act_bits: int, msb_bits: int,
                 cfg: QuantConfig, alpha: float, sparse_bp: bool) -> None:
        super().__init__()
        self.conv1 = PGConv2d(in_planes, planes, 3, stride=stride, padding=1, act_bits=act_bits,
                              msb_bits=msb_bits, cfg=cfg, sparse_bp=sparse_bp)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = PACT(alpha)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = PACT(alpha, act_bits)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor, x_lsb: int) -> tuple[Tensor, int]:  # type: ignore[override]
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x, x_lsb)))
        out = self.bn2(self.conv2(out)) + identity
        return self.relu2(out), self.relu2.lsb()


class PGResNet(nn.Module):
    """PG ResNet of depth ``6n + 2``; input ``(N, in_channels, H, W)``, output logits."""

    def __init__(self, n: int = 3, num_classes: int = 10, in_channels: int = 3, *,
                 act_bits: int = 3, msb_bits: int = 2, cfg: QuantConfig | None = None,
                 alpha: float = 6.0, sparse_bp: bool = True) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else QuantConfig(fmt=BFPFormat(9, 8), method="max")
        self.n, self.act_bits, self.msb_bits, self.cfg = n, act_bits, msb_bits, cfg
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = PACT(alpha, act_bits)
        kw = dict(act_bits=act_bits, msb_bits=msb_bits, cfg=cfg, alpha=alpha,
                  sparse_bp=sparse_bp)
        self.layer1 = self._stage(16, 16, n, 1, kw)
        self.layer2 = self._stage(16, 32, n, 2, kw)
        self.layer3 = self._stage(32, 64, n, 2, kw)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_cifar_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int, kw: dict) -> nn.Sequential:
        layers = [PGBasicBlock(in_planes, planes, stride, **kw)]
        layers += [PGBasicBlock(planes, planes, 1, **kw) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def blocks(self) -> list[PGBasicBlock]:
        return [b for stage in (self.layer1, self.layer2, self.layer3) for b in stage]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        lsb = self.relu.lsb()
        for blk in self.blocks():
            x, lsb = blk(x, lsb)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def pg_resnet20(num_classes: int = 10, in_channels: int = 3, **kwargs) -> PGResNet:
    """PG ResNet-20 (n = 3); ``kwargs``: act_bits, msb_bits, cfg, alpha, sparse_bp."""
    return PGResNet(3, num_classes=num_classes, in_channels=in_channels, **kwargs)


def pg_resnet_from_float(float_model: nn.Module, **kwargs) -> PGResNet:
    """A PG ResNet with the conv/BN/FC weights of a trained float ``CifarResNet`` (same module
    names; PG thresholds start at 0 and PACT clips at ``alpha``)."""
    from .resnet_cifar import CifarResNet

    if not isinstance(float_model, CifarResNet):
        raise ValueError(f"PG ResNet needs a CifarResNet to start from, not "
                         f"{type(float_model).__name__}")
    n = (float_model.depth - 2) // 6
    pg = PGResNet(n, num_classes=float_model.fc.out_features,
                  in_channels=float_model.conv1.in_channels, **kwargs)
    missing, unexpected = pg.load_state_dict(float_model.state_dict(), strict=False)
    extra = [k for k in missing if not (k.endswith(".threshold") or k.endswith(".alpha"))]
    if extra or unexpected:
        raise ValueError(f"float model does not fit the PG ResNet: missing {extra[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    return pg
