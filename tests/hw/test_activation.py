"""Activation (rule R4) vs golden.apply_activation, exhaustive at M = 6."""

from __future__ import annotations

import torch

from dynacc.hw.activation import Activation
from dynacc.hw.types import ActMode
from dynacc.quant.formats import BFPFormat
from dynacc.quant.golden import apply_activation


def test_exhaustive(pipeline):
    fmt = BFPFormat(6)
    dut = Activation(fmt)
    m = fmt.max_mantissa
    cases = [(v, mode, c) for mode, c in ((ActMode.NONE, 0), (ActMode.RELU, 0),
                                          (ActMode.RELU6, 6), (ActMode.RELU6, 0),
                                          (ActMode.RELU6, m))
             for v in range(-m, m + 1)]
    out = pipeline(dut, [{"i": v, "mode": mode, "clamp_max": c} for v, mode, c in cases],
                   ["o"], dut.latency)
    names = {ActMode.NONE: None, ActMode.RELU: "relu", ActMode.RELU6: "relu6"}
    for (v, mode, c), r in zip(cases, out):
        exp = int(apply_activation(torch.tensor([v]), names[mode], c)[0])
        assert r["o"] == exp, (v, mode, c)
