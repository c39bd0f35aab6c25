"""DualProgram checks (errors name the layer and field), its images and descriptor, and the
cycle / work models of the dual-precision engine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dynacc.hw.config import load_named
from dynacc.hw.cycles import dual_conv_cycles, dual_conv_work
from dynacc.hw.dual_engine import DualEngine
from dynacc.hw.dual_program import DualProgram
from dynacc.sim.dual_layers import random_dual_layer

CFG = load_named("dual")


def _layer(**kw):
    base = dict(c=6, o=5, h=4, w=4, k=3, padding=1, pass_fraction=0.3, seed=0)
    base.update(kw)
    return random_dual_layer("L", CFG.fmt, **base)


@pytest.mark.parametrize("change, match", [
    (dict(act_bits=9), r"layer 'L': field 'act_bits' = 9 must be an integer in \[2, 8\]"),
    (dict(act_bits=1, msb_bits=1), r"field 'act_bits' = 1"),
    (dict(msb_bits=8), r"field 'msb_bits' = 8 must be an integer in \[1, act_bits - 1 = 7\]"),
    (dict(msb_bits=0), r"field 'msb_bits' = 0"),
    (dict(mode="skip"), r"field 'mode' = 'skip'"),
    (dict(activation="relu6", clamp_max=6), r"field 'activation' = 'relu6'"),
    (dict(threshold=None), r"field 'threshold' is needed in mode 'gated'"),
    (dict(threshold=np.full(5, 1 << 39)),
     r"field 'threshold' of filter 0 = 549755813888 exceeds the comparator range"),
    (dict(sign=np.array([1, -1, 0, 1, 1])), r"field 'sign' must be \+1 or -1"),
    (dict(threshold=np.zeros(3, dtype=np.int64)), r"field 'threshold' must be a scalar or \[5\]"),
])
def test_errors_name_layer_and_field(change, match):
    layer = dataclasses.replace(_layer(), **change)
    with pytest.raises(ValueError, match=match):
        DualProgram(layer, CFG)


def test_input_range_rule_g0():
    layer = _layer(act_bits=6, msb_bits=2)
    x = np.array(layer.x)
    x[0, 0, 0] = 64
    with pytest.raises(ValueError, match=r"field 'x' must hold unsigned 6-bit values in \[0, 63\]"):
        DualProgram(dataclasses.replace(layer, x=x), CFG)
    x[0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"unsigned 6-bit"):
        DualProgram(dataclasses.replace(layer, x=x), CFG)


def test_accumulator_bound_and_limits_come_from_conv_program():
    layer = _layer(c=65)
    with pytest.raises(ValueError, match=r"layer 'L': in_channels = 65 exceeds the hardware limit 64"):
        DualProgram(layer, CFG)
    layer = _layer()
    bias = np.array(layer.bias)
    bias[2] = (1 << (CFG.acc_bits - 1)) - 1     # any product on top of it would wrap
    with pytest.raises(ValueError, match=r"layer 'L': worst-case accumulator .* acc_bits = 40"):
        DualProgram(dataclasses.replace(layer, bias=bias), CFG)


def test_images_and_descriptor():
    layer = _layer(o=5)
    prog = DualProgram(layer, CFG)
    imgs = prog.images()
    assert set(imgs) == {"act", "wgt", "align", "bias", "quant", "gate", "scale"}
    assert (imgs["scale"] == 1).all()          # unused outside mode fbs
    gate = imgs["gate"].reshape(prog.tiles * CFG.lanes, 2)
    o = layer.out_channels
    assert (gate[:o, 0] == np.asarray(layer.threshold)).all()
    assert (gate[:o, 1] == (np.asarray(layer.sign) < 0)).all()
    # padding lanes of the last tile can never pass (largest threshold, sign +1)
    assert (gate[o:, 0] == (1 << (CFG.acc_bits - 1)) - 1).all() and (gate[o:, 1] == 0).all()
    assert prog.desc["lsb_bits"] == layer.act_bits - layer.msb_bits
    assert prog.desc["mode"] == 0 and "residual" not in prog.desc
    assert "base_words" not in prog.desc and "chunk_tiles" not in prog.desc
    for mode, code in (("msb", 1), ("full", 2)):
        assert DualProgram(dataclasses.replace(layer, mode=mode), CFG).desc["mode"] == code


def test_cycle_model_structure():
    st = DualEngine.stages(CFG)
    dr = DualEngine.drains(CFG)
    lat = DualEngine.out_stages(CFG)["write"]
    shape = dict(in_channels=16, out_channels=8, out_height=8, out_width=8, kernel_h=3,
                 kernel_w=3)
    p, s, k = 64, 9 * 4, CFG.lanes
    assert dr["msb"] == st["msb_wr"] + 2
    msb = dual_conv_cycles(CFG, **shape, mode="msb")
    assert msb == 2 + lat + 2 * (p * s + dr["msb"] + p)
    # one LSB group per K passing outputs (rounded up per tile), plus one drain per tile
    g = dual_conv_cycles(CFG, **shape, mode="gated", passed_counts=[5, 0])
    assert g == msb + 2 * s + dr["lsb"]
    g2 = dual_conv_cycles(CFG, **shape, mode="gated", passed_counts=[8, 1])
    assert g2 == msb + 3 * s + 2 * dr["lsb"]
    full = dual_conv_cycles(CFG, **shape, mode="full")
    assert full == msb + 2 * (p * s + dr["lsb"])
    assert dual_conv_cycles(CFG, **shape, mode="gated", passed_counts=[p * k] * 2) == full
    with pytest.raises(ValueError, match="passed_counts"):
        dual_conv_cycles(CFG, **shape, mode="gated")
    with pytest.raises(ValueError, match=r"passed_counts\[1\] = 257"):
        dual_conv_cycles(CFG, **shape, mode="gated", passed_counts=[0, 257])


def test_work_model():
    kw = dict(out_channels=4, out_height=5, out_width=5)
    assert dual_conv_work(**kw, mode="full") == 2.0
    assert dual_conv_work(**kw, mode="msb") == 1.0
    assert dual_conv_work(**kw, mode="gated", passed=25) == 1.25
    with pytest.raises(ValueError, match="passed in"):
        dual_conv_work(**kw, mode="gated", passed=101)
