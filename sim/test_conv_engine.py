"""Co-simulation of the conv engine (Verilator + cocotb) against the golden model.

Every case compares every output element with ``==`` (``check_conv_output`` names the layer,
channel, y, x and both values of the first mismatch) and asserts that the RTL cycle counter
equals ``hw.cycles.conv_cycles``. Cases that claim an edge also assert that the golden
output really exercises it. Builds are shared per hardware config (``build/sim``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import pytest
import torch

from dynacc.hw.config import HwConfig, load_named
from dynacc.hw.program import ConvLayer
from dynacc.quant import golden
from dynacc.sim.conv import check_conv_output, verify_conv_layers
from dynacc.sim.layers import fit_out_lsb, random_layer, resnet50_layer

DEFAULT = load_named("default")
SMALL = load_named("small")


def _acc(layer: ConvLayer):
    return golden.conv2d_acc(torch.as_tensor(layer.x)[None].long(), layer.x_lsb,
                             torch.as_tensor(layer.w).long(), torch.as_tensor(layer.w_lsb).long(),
                             None if layer.bias is None else torch.as_tensor(layer.bias).long(),
                             layer.stride, layer.padding)


# -- edge cases -------------------------------------------------------------------------
def case_random_3x3(cfg: HwConfig) -> ConvLayer:
    return random_layer("random_3x3_pad1_relu", cfg.fmt, c=2 * cfg.lanes + 3, o=cfg.lanes + 5,
                        h=6, w=7, k=3, padding=1, block=cfg.lanes, activation="relu", seed=1)


def case_saturation(cfg: HwConfig) -> ConvLayer:
    layer = random_layer("saturation", cfg.fmt, c=cfg.lanes, o=cfg.lanes, h=5, w=5, k=3,
                         padding=1, block=cfg.lanes, margin=-3, seed=2)
    y = layer.golden(cfg.fmt)
    m = cfg.fmt.max_mantissa
    assert (y == m).sum() > 10 and (y == -m).sum() > 10, "case must saturate both ways"
    return layer


def case_rounding_ties(cfg: HwConfig) -> ConvLayer:
    """acc[o] = bias[o] + x[o % K]: with shifts 1..3 many accumulators end in exactly .5."""
    k, m = cfg.lanes, cfg.fmt.max_mantissa
    rng = np.random.default_rng(3)
    o = 2 * k
    x = rng.integers(-m, m + 1, (k, 6, 6))
    w = np.zeros((o, k, 1, 1), dtype=np.int64)
    w[np.arange(o), np.arange(o) % k] = 1
    bias = rng.integers(-20, 21, o)
    shifts = 1 + np.arange(o) % 3
    layer = ConvLayer("rounding_ties", x, 0, w, np.zeros((o, k), int), bias, shifts)
    acc, acc_lsb = _acc(layer)
    assert int(acc_lsb.abs().max()) == 0
    s = torch.as_tensor(shifts)[None, :, None, None]
    rem = acc - ((acc >> s) << s)
    tie = rem == (1 << (s - 1))
    q_odd = ((acc >> s) & 1) == 1
    assert (tie & q_odd).sum() > 20 and (tie & ~q_odd).sum() > 20, "needs ties both ways"
    assert (tie & (acc < 0)).sum() > 10, "needs negative ties"
    return layer


def case_zero_blocks(cfg: HwConfig) -> ConvLayer:
    """All-zero filters (bias only), all-zero weight blocks, all-zero input words."""
    k = cfg.lanes
    layer = random_layer("zero_blocks", cfg.fmt, c=3 * k, o=2 * k, h=5, w=4, k=3, padding=1,
                         block=k, seed=4)
    x = np.array(layer.x)
    w = np.array(layer.w)
    x[k:2 * k] = 0                 # a whole input word is zero
    w[0] = 0                       # an all-zero filter: output = requantized bias
    w[1, :k] = 0                   # a zero weight block
    w[2:, 2 * k:] = 0              # zero tail blocks
    bias = np.array(layer.bias)
    bias[3] = 0
    w[3] = 0                       # zero filter with zero bias: exactly 0
    layer = dataclasses.replace(layer, x=x, w=w, bias=bias)
    return dataclasses.replace(layer, out_lsb=fit_out_lsb(layer, cfg.fmt))


def case_exponent_extremes(cfg: HwConfig) -> ConvLayer:
    """Alignment shifts 0 and align_span in one filter; requantization shifts from the
    largest right shift to left shifts (per output channel)."""
    k, m = cfg.lanes, cfg.fmt.max_mantissa
    rng = np.random.default_rng(5)
    c, o = 2 * k, 4 * k
    x = rng.integers(-m, m + 1, (c, 4, 4))
    w = rng.integers(-m, m + 1, (o, c, 3, 3))
    w_lsb = np.zeros((o, c), dtype=np.int64)
    w_lsb[:, k:] = cfg.align_span            # d = align_span on the second word
    w_lsb[::2, k:] = 0
    w_lsb[1::4, :k] = cfg.align_span         # ... or on the first
    w_lsb[1::4, k:] = 0
    base = ConvLayer("exponent_extremes", x, -2, w, w_lsb, None, 0, padding=1)
    acc, acc_lsb = _acc(base)
    amax = acc.abs().amax(dim=(0, 2, 3))
    fit = acc_lsb + torch.tensor([int(v).bit_length() for v in amax]) - (cfg.fmt.mantissa_bits - 1)
    # golden's int64 shift limits (reported): right shifts <= 63, |acc| << left < 2**63
    s_big = min(cfg.shift_max, 63)
    s_small = max(cfg.shift_min, -(62 - int(amax.max()).bit_length()))
    s = (fit - acc_lsb).clone()
    s[0::8] = s_big
    s[1::8] = cfg.acc_bits - 2
    s[2::8] = 0
    s[3::8] = -1
    s[4::8] = s_small
    out_lsb = (acc_lsb + s).numpy()
    _, d = golden.conv_alignment(-2, torch.as_tensor(w_lsb))
    assert int(d.max()) == cfg.align_span and int(d.min()) == 0
    return dataclasses.replace(base, out_lsb=out_lsb)


def case_worst_accumulation(cfg: HwConfig) -> ConvLayer:
    """The largest admitted reduction (max_in_channels × max_kernel²) at full scale with the
    largest alignment shift, and a bias that puts the accumulator exactly at
    ±(2**(acc_bits-1) - 1)."""
    k, m = cfg.lanes, cfg.fmt.max_mantissa
    c, kk, o = cfg.max_in_channels, cfg.max_kernel, k
    x = np.full((c, kk, kk), m, dtype=np.int64)
    sign = np.where(np.arange(o) % 2 == 0, 1, -1)
    w = np.broadcast_to((sign * m)[:, None, None, None], (o, c, kk, kk)).copy()
    w_lsb = np.full((o, c), cfg.align_span, dtype=np.int64)
    w_lsb[:, :k] = 0
    d = w_lsb                                        # x_lsb = 0, acc_lsb = 0
    total = m * m * kk * kk * int((1 << d).sum(axis=1)[0])
    top = (1 << (cfg.acc_bits - 1)) - 1
    assert total <= top, "the config must admit its worst case"
    bias = sign * (top - total)
    s = np.full(o, cfg.acc_bits - cfg.fmt.mantissa_bits)   # saturates: |acc|/2**s ~ 2**(M-1)
    s[2::4] += 1
    s[3::4] += 2
    layer = ConvLayer("worst_accumulation", x, 0, w, w_lsb, bias, s)
    acc, _ = _acc(layer)
    assert int(acc.abs().max()) == top and int(acc.min()) == -top
    return layer


def case_stride2_7x7(cfg: HwConfig) -> ConvLayer:
    clamp = cfg.fmt.max_mantissa // 3
    layer = random_layer("stride2_7x7_pad3_relu6", cfg.fmt, c=3, o=cfg.lanes, h=11, w=9, k=7,
                         stride=2, padding=3, block=3, activation="relu6", clamp_max=clamp,
                         margin=-1, seed=6)
    y = layer.golden(cfg.fmt)
    assert (y == clamp).sum() > 5 and (y == 0).sum() > 5 and ((y > 0) & (y < clamp)).any()
    return layer


def case_stride2_1x1(cfg: HwConfig) -> ConvLayer:
    return random_layer("stride2_1x1", cfg.fmt, c=2 * cfg.lanes, o=2 * cfg.lanes, h=7, w=6,
                        k=1, stride=2, block=cfg.lanes, seed=7)


def case_stride2_3x3_small_image(cfg: HwConfig) -> ConvLayer:
    """A 3×3 stride-2 conv on a 3×2 image with padding 2 (the kernel overhangs everywhere)."""
    return random_layer("stride2_3x3_tiny_pad2", cfg.fmt, c=cfg.lanes, o=cfg.lanes, h=3, w=2,
                        k=3, stride=2, padding=2, block=cfg.lanes, activation="relu", seed=8)


def case_residual(cfg: HwConfig) -> ConvLayer:
    return random_layer("fused_residual_relu", cfg.fmt, c=cfg.lanes, o=2 * cfg.lanes, h=5, w=5,
                        k=3, padding=1, block=cfg.lanes, activation="relu", residual=True,
                        seed=9)


def case_residual_shifts(cfg: HwConfig) -> ConvLayer:
    layer = random_layer("fused_residual_shifts", cfg.fmt, c=cfg.lanes, o=cfg.lanes, h=4, w=4,
                         k=1, block=cfg.lanes, residual=True, seed=10)
    o = layer.out_channels
    res_lsb = np.asarray(layer.joint_lsb) + np.resize([-3, 0, 2, 5], o)   # s_r: left and right
    out_lsb = np.asarray(layer.joint_lsb) + np.resize([0, 1, 2, -1], o)   # s2: 0, right, left
    return dataclasses.replace(layer, residual_lsb=res_lsb, out_lsb=out_lsb)


EDGE_CASES: dict[str, Callable[[HwConfig], ConvLayer]] = {
    "random_3x3": case_random_3x3,
    "saturation": case_saturation,
    "rounding_ties": case_rounding_ties,
    "zero_blocks": case_zero_blocks,
    "exponent_extremes": case_exponent_extremes,
    "worst_accumulation": case_worst_accumulation,
    "stride2_7x7": case_stride2_7x7,
    "stride2_1x1": case_stride2_1x1,
    "stride2_3x3_small_image": case_stride2_3x3_small_image,
    "residual": case_residual,
    "residual_shifts": case_residual_shifts,
}


def _verify(layers: list[ConvLayer], cfg: HwConfig) -> None:
    """Bit-exact against the golden model and RTL cycles == conv_cycles, every layer."""
    verify_conv_layers(layers, cfg)


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_default(case):
    _verify([EDGE_CASES[case](DEFAULT)], DEFAULT)


def test_edges_small_config():
    """All edge cases in one simulator run on the 4-lane, 6-bit, 30-bit-accumulator engine."""
    _verify([make(SMALL) for make in EDGE_CASES.values()], SMALL)


# -- ResNet-50 shapes (cropped), quantized from float tensors ---------------------------------
RESNET_CROPS = [
    ("conv2_3x3", 8, False),
    ("conv2_1x1_reduce", 8, False),
    ("conv2_1x1_expand", 6, True),        # bottleneck end: fused residual add + relu
    ("conv3_3x3_s2", 8, False),
    ("conv3_downsample", 8, False),
    ("conv1_im2col", 6, False),
    ("fc", None, False),
]


@pytest.mark.parametrize("key, crop, residual", RESNET_CROPS,
                         ids=[f"{k}-{c}{'-res' if r else ''}" for k, c, r in RESNET_CROPS])
def test_resnet50_crop(key, crop, residual):
    layer = resnet50_layer(key, DEFAULT.fmt, crop=crop, residual=residual, seed=11)
    _verify([layer], DEFAULT)


def test_mismatch_report_names_the_element():
    y = np.zeros((3, 4, 5), dtype=np.int64)
    r = y.copy()
    r[2, 1, 3] = 7
    r[2, 3, 0] = -1
    with pytest.raises(AssertionError, match=r"layer 'L': output channel 2, y 1, x 3: RTL 7 != "
                                             r"golden 0 \(2 of 60 elements differ\)"):
        check_conv_output("L", r, y)
