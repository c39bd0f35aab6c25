"""ConvProgram: every limit and exactness precondition is checked, naming the layer."""

from __future__ import annotations

import numpy as np
import pytest

from dynacc.hw.config import load_named
from dynacc.hw.program import ConvLayer

CFG = load_named("small")   # 4 lanes, M = 6, acc 30 bits, align_span 6, shift_bits 6


def layer(**kw):
    rng = np.random.default_rng(0)
    c, o = kw.pop("c", 8), kw.pop("o", 4)
    base = dict(name="L", x=rng.integers(-31, 32, (c, 5, 5)), x_lsb=0,
                w=rng.integers(-31, 32, (o, c, 3, 3)), w_lsb=np.zeros((o, c), int), bias=None,
                out_lsb=4, padding=1)
    base.update(kw)
    return ConvLayer(**base)


def test_ok_and_images():
    p = layer().program(CFG)
    imgs = p.images()
    assert imgs["act"].shape == (5 * 5 * 2, 4)
    assert imgs["wgt"].shape == (1 * 9 * 2, 16)
    assert imgs["quant"].shape == (1, 12)
    assert p.desc["in_words"] == 2 and p.desc["out_tiles"] == 1


@pytest.mark.parametrize("kw, msg", [
    (dict(c=65), "in_channels = 65 exceeds the hardware limit 64"),
    (dict(o=0), "empty tensor"),
    (dict(stride=3), "stride = 3 exceeds"),
    (dict(w_lsb=np.array([[0, 0, 0, 0, 7, 7, 7, 7]] * 4)), "alignment shift 7 exceeds align_span 6"),
    (dict(w_lsb=np.array([[0, 1, 0, 0, 0, 0, 0, 0]] * 4)), "filter 0, input word 0: .* different"),
    (dict(out_lsb=40), r"requantization shift range \[40, 40\] exceeds \[-32, 31\]"),
    (dict(bias=np.full(4, (1 << 29) - 1000)), "worst-case accumulator .* acc_bits = 30"),
    (dict(activation="relu6"), "relu6 needs clamp_max"),
    (dict(activation="gelu"), "unknown activation 'gelu'"),
    (dict(x=np.full((8, 5, 5), 32)), r"\|x\| exceeds the mantissa range ±31"),
    (dict(residual=np.zeros((4, 5, 5), int)), "a fused residual add needs joint_lsb"),
])
def test_rejects(kw, msg):
    with pytest.raises(ValueError, match="layer 'L': " + msg):
        layer(**kw).program(CFG)
