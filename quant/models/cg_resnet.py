"""Channel-gated CIFAR ResNet-20 (algorithms.md §2b.1, the original variant), deployable.

The layout of :class:`~.pg_resnet.PGResNet` (module names of :mod:`.resnet_cifar`, option-B
1x1 projection shortcuts, so a trained float ``resnet20`` loads with
:func:`cg_resnet_from_float`), with ``conv1`` of every BasicBlock a
:class:`~dynacc.quant.cg.CGConv2d` (9 CG layers in ResNet-20):

* the stem ReLU and every block's output ReLU (``relu2``) are quantizing PACTs: the input of
  every CG conv is an unsigned ``act_bits``-bit activation with a static power-of-two scale
  (rule G0; CG runs on the dual-precision engine), 8 bits by default;
* the block's inner ReLU (``relu1``) is a float PACT clip; the stem conv, ``conv2``, the
  shortcuts and the FC stay float here (the integer program quantizes them as BFP).
"""

from __future__ import annotations

from torch import nn

from ..cg import CG_THRESHOLD_INIT, CGConv2d, check_cg_partitions
from ..formats import QuantConfig
from .pg_resnet import PGResNet

__all__ = ["CGResNet", "cg_layer_channels", "cg_resnet20", "cg_resnet_from_float"]


def cg_layer_channels(n: int) -> list[tuple[str, int, int]]:
    """``(name, C, O)`` of the CG convs (every block's ``conv1``) of the CG ResNet with ``n``
    blocks per stage (16/32/64 channels), for :func:`~dynacc.quant.cg.check_cg_partitions`."""
    layers, c = [], 16
    for stage, planes in (("layer1", 16), ("layer2", 32), ("layer3", 64)):
        for i in range(n):
            layers.append((f"{stage}.{i}.conv1", c, planes))
            c = planes
    return layers


class CGResNet(PGResNet):
    """CG ResNet of depth ``6n + 2``; input ``(N, in_channels, H, W)``, output logits.

    Built as the PG ResNet of the same ``act_bits`` (its blocks, PACTs and forward) whose block
    ``conv1`` convs are then replaced by :class:`CGConv2d` with the same initial weights.
    ``msb_bits`` is ``None``: CG splits the input channels, not the activation bits.
    """

    def __init__(self, n: int = 3, num_classes: int = 10, in_channels: int = 3, *,
                 partitions: int = 4, act_bits: int = 8, cfg: QuantConfig | None = None,
                 alpha: float = 6.0, sparse_bp: bool = True,
                 threshold_init: float = CG_THRESHOLD_INIT) -> None:
        check_cg_partitions(partitions, cg_layer_channels(n))
        super().__init__(n, num_classes, in_channels, act_bits=act_bits,
                         msb_bits=max(1, act_bits - 1), cfg=cfg, alpha=alpha, sparse_bp=sparse_bp)
        self.msb_bits = None
        self.partitions = partitions
        for (name, _, _), blk in zip(cg_layer_channels(n), self.blocks()):
            old = blk.conv1
            blk.conv1 = CGConv2d(old.in_channels, old.out_channels, 3, stride=old.stride,
                                 padding=old.padding, partitions=partitions, act_bits=act_bits,
                                 cfg=self.cfg, sparse_bp=sparse_bp, threshold_init=threshold_init,
                                 name=name)
            blk.conv1.weight.data.copy_(old.weight.data)


def cg_resnet20(num_classes: int = 10, in_channels: int = 3, **kwargs) -> CGResNet:
    """CG ResNet-20 (n = 3); ``kwargs``: partitions, act_bits, cfg, alpha, sparse_bp,
    threshold_init."""
    return CGResNet(3, num_classes=num_classes, in_channels=in_channels, **kwargs)


def cg_resnet_from_float(float_model: nn.Module, **kwargs) -> CGResNet:
    """A CG ResNet with the conv/BN/FC weights of a trained float ``CifarResNet`` (same module
    names; thresholds start at ``threshold_init``, the gate BNs at mean 0 / variance 1, PACT
    clips at ``alpha``)."""
    from .resnet_cifar import CifarResNet

    if not isinstance(float_model, CifarResNet):
        raise ValueError(f"CG ResNet needs a CifarResNet to start from, not "
                         f"{type(float_model).__name__}")
    cg = CGResNet((float_model.depth - 2) // 6, num_classes=float_model.fc.out_features,
                  in_channels=float_model.conv1.in_channels, **kwargs)
    missing, unexpected = cg.load_state_dict(float_model.state_dict(), strict=False)
    extra = [k for k in missing if not (k.endswith((".threshold", ".alpha")) or ".bn_gate." in k)]
    if extra or unexpected:
        raise ValueError(f"float model does not fit the CG ResNet: missing {extra[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    return cg
