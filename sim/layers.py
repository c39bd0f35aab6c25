"""Layer generators for the co-simulation tests and benches: random integer layers with
controlled edges, and ResNet-50 layer shapes quantized from float tensors with the project's
own BFP rules (quant.functional)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from dynacc.hw.program import ConvLayer
from dynacc.quant import golden
from dynacc.quant.formats import BFPFormat, WeightBlocking
from dynacc.quant.functional import (quantize, quantize_bias, quantize_weight,
                                     tensor_shared_exponent)

__all__ = ["ResNetConv", "RESNET50", "fit_out_lsb", "random_layer", "quantized_layer",
           "resnet50_layer"]


def fit_out_lsb(layer: ConvLayer, fmt: BFPFormat, margin: int = 0) -> np.ndarray:
    """Per-channel output LSB that maps each channel's largest |accumulator| just inside the
    mantissa range (``margin`` > 0: more headroom, < 0: saturation)."""
    acc, acc_lsb = golden.conv2d_acc(torch.as_tensor(np.asarray(layer.x))[None].long(),
                                     layer.x_lsb, torch.as_tensor(np.asarray(layer.w)).long(),
                                     torch.as_tensor(np.asarray(layer.w_lsb)).long(),
                                     None if layer.bias is None
                                     else torch.as_tensor(np.asarray(layer.bias)).long(),
                                     layer.stride, layer.padding)
    amax = acc.abs().amax(dim=(0, 2, 3))
    bits = torch.tensor([max(int(v).bit_length(), 1) for v in amax])
    return (acc_lsb + bits - (fmt.mantissa_bits - 1) + margin).numpy()


def random_layer(name: str, fmt: BFPFormat, *, c: int, o: int, h: int, w: int, k: int,
                 stride: int = 1, padding: int = 0, block: int = 16, align_spread: int = 3,
                 activation: str | None = None, clamp_max: int | None = None,
                 residual: bool = False, margin: int = 0, seed: int = 0) -> ConvLayer:
    """Uniform random mantissas, per-(filter, ``block`` channels) weight exponents spread over
    ``align_spread`` bits, a random bias and output LSBs fitted to the accumulators."""
    rng = np.random.default_rng(seed)
    m = fmt.max_mantissa
    x = rng.integers(-m, m + 1, (c, h, w))
    wt = rng.integers(-m, m + 1, (o, c, k, k))
    nb = -(-c // block)
    blk = rng.integers(-align_spread, 1, (o, nb)) - 5
    w_lsb = np.repeat(blk, block, axis=1)[:, :c]
    x_lsb = -3
    typical = m * m * int(np.sqrt(c * k * k))
    bias = rng.integers(-typical, typical + 1, o)
    base = ConvLayer(name, x, x_lsb, wt, w_lsb, bias, 0, stride, padding, activation, clamp_max)
    out_lsb = fit_out_lsb(base, fmt, margin)
    if not residual:
        return dataclasses.replace(base, out_lsb=out_lsb)
    ho, wo = base.out_size
    res = rng.integers(-m, m + 1, (o, ho, wo))
    joint = out_lsb - 1   # conv and residual land on a finer joint grid, the sum goes up one
    return dataclasses.replace(base, out_lsb=out_lsb, residual=res,
                               residual_lsb=joint + rng.integers(-1, 2, o), joint_lsb=joint)


def quantized_layer(name: str, fmt: BFPFormat, x: torch.Tensor, w: torch.Tensor,
                    b: torch.Tensor | None, *, stride: int = 1, padding: int = 0,
                    activation: str | None = None, group: int = 64, align_span: int = 15,
                    acc_bits: int = 48, residual: torch.Tensor | None = None) -> ConvLayer:
    """Quantize a float conv (``x [C,H,W]``, ``w [O,C,kh,kw]``) with the project's rules:
    Q3 tensor exponent for x, W1-W3 weight blocks, B1 bias, the output exponent from the
    float output's max (rule Q3 again) and, with a residual, a joint exponent of both."""
    xe = tensor_shared_exponent(x, fmt)
    x_lsb = fmt.lsb(xe)
    xm = quantize(x, x_lsb, fmt)
    wm, _, w_lsb = quantize_weight(w, fmt, WeightBlocking(group, align_span))
    acc_lsb, _ = golden.conv_alignment(x_lsb, w_lsb)
    bias = None if b is None else quantize_bias(b, acc_lsb, acc_bits)
    y = F.conv2d(x[None], w, b, stride, padding)[0]
    relu6_clamp = None
    if residual is None:
        out = y.relu() if activation else y
        out_lsb = fmt.lsb(tensor_shared_exponent(out, fmt))
        return ConvLayer(name, xm.numpy(), x_lsb, wm.numpy(), w_lsb.numpy(),
                         None if bias is None else bias.numpy(), out_lsb, stride, padding,
                         activation, relu6_clamp)
    r_lsb = fmt.lsb(tensor_shared_exponent(residual, fmt))
    rm = quantize(residual, r_lsb, fmt)
    joint_lsb = fmt.lsb(tensor_shared_exponent(torch.cat([y.flatten(), residual.flatten()]), fmt))
    s = y + residual
    out = s.relu() if activation else s
    out_lsb = fmt.lsb(tensor_shared_exponent(out, fmt))
    return ConvLayer(name, xm.numpy(), x_lsb, wm.numpy(), w_lsb.numpy(),
                     None if bias is None else bias.numpy(), out_lsb, stride, padding,
                     activation, relu6_clamp, rm.numpy(), r_lsb, joint_lsb)


@dataclasses.dataclass(frozen=True)
class ResNetConv:
    """A conv of ResNet-50 (v1.5, 224×224 input) as the engine sees it."""

    name: str
    c: int
    o: int
    hw: int        # input height = width
    k: int
    stride: int
    padding: int


#: one 1×1 and one 3×3 conv per stage, the stem as host im2col (1×1, C' = 3·7·7 = 147,
#: on the 112×112 output grid) and the FC layer (1×1 on a 1×1 image)
RESNET50 = {
    "conv1_im2col": ResNetConv("conv1_im2col", 147, 64, 112, 1, 1, 0),
    "conv2_1x1_reduce": ResNetConv("conv2_1x1_reduce", 256, 64, 56, 1, 1, 0),
    "conv2_3x3": ResNetConv("conv2_3x3", 64, 64, 56, 3, 1, 1),
    "conv2_1x1_expand": ResNetConv("conv2_1x1_expand", 64, 256, 56, 1, 1, 0),
    "conv3_3x3_s2": ResNetConv("conv3_3x3_s2", 128, 128, 56, 3, 2, 1),
    "conv3_downsample": ResNetConv("conv3_downsample", 256, 512, 56, 1, 2, 0),
    "conv3_1x1_reduce": ResNetConv("conv3_1x1_reduce", 512, 128, 28, 1, 1, 0),
    "conv4_3x3": ResNetConv("conv4_3x3", 256, 256, 14, 3, 1, 1),
    "conv4_1x1_expand": ResNetConv("conv4_1x1_expand", 256, 1024, 14, 1, 1, 0),
    "conv5_3x3": ResNetConv("conv5_3x3", 512, 512, 7, 3, 1, 1),
    "conv5_1x1_reduce": ResNetConv("conv5_1x1_reduce", 2048, 512, 7, 1, 1, 0),
    "fc": ResNetConv("fc", 2048, 1000, 1, 1, 1, 0),
}


def resnet50_layer(key: str, fmt: BFPFormat, *, crop: int | None = None, seed: int = 0,
                   residual: bool = False, group: int = 64, align_span: int = 15,
                   acc_bits: int = 48) -> ConvLayer:
    """ResNet-50 conv ``key`` with He-initialised float weights and ReLU-distributed inputs,
    quantized; ``crop`` limits the input to ``crop × crop`` pixels."""
    spec = RESNET50[key]
    g = torch.Generator().manual_seed(seed)
    hw = spec.hw if crop is None else min(crop, spec.hw)
    x = torch.randn(spec.c, hw, hw, generator=g, dtype=torch.float64).relu()
    fan_in = spec.c * spec.k * spec.k
    w = torch.randn(spec.o, spec.c, spec.k, spec.k, generator=g, dtype=torch.float64) \
        * (2.0 / fan_in) ** 0.5
    b = torch.randn(spec.o, generator=g, dtype=torch.float64) * 0.1
    res = None
    if residual:
        ho = (hw + 2 * spec.padding - spec.k) // spec.stride + 1
        res = torch.randn(spec.o, ho, ho, generator=g, dtype=torch.float64).relu()
    name = key if crop is None else f"{key}@{hw}x{hw}"
    if residual:
        name += "+res"
    return quantized_layer(name, fmt, x, w, b, stride=spec.stride, padding=spec.padding,
                           activation="relu" if key != "fc" else None, group=group,
                           align_span=align_span, acc_bits=acc_bits, residual=res)
