"""Co-simulation of the dual-precision engine (Verilator + cocotb) against the golden model.

Every case compares every output element AND every gate outcome with ``==`` (the engine's
``passed`` port) and asserts that the RTL cycle counter equals
``hw.cycles.dual_conv_cycles`` of the golden gate outcomes. Cases that claim an edge assert
that the golden model really exercises it. All cases run in one simulator process.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import pytest
import torch

from dynacc.hw.config import HwConfig, load_named
from dynacc.hw.dual_program import DualLayer
from dynacc.quant import golden
from dynacc.sim.dual import check_dual_result, run_dual_layers, verify_dual_layers
from dynacc.sim.dual_layers import fit_dual_out_lsb, gate_values, random_dual_layer

DUAL = load_named("dual")


def _ties(layer: DualLayer) -> int:
    """Outputs whose gate value equals the threshold exactly (they must not pass)."""
    g = gate_values(layer)
    thr = np.broadcast_to(np.asarray(layer.threshold).reshape(-1), (layer.out_channels,))
    return int((g == thr[:, None, None]).sum())


def case_gated_3x3(cfg: HwConfig) -> DualLayer:
    """C and O not multiples of K (2 output tiles, a padded input word), padding 1, ties."""
    k = cfg.lanes
    layer = random_dual_layer("gated_3x3_ties", cfg.fmt, c=2 * k + 3, o=k + 3, h=6, w=7, k=3,
                              padding=1, pass_fraction=0.35, seed=1)
    assert _ties(layer) >= layer.out_channels, "every filter needs an exact tie"
    return layer


def case_msb(cfg: HwConfig) -> DualLayer:
    """DFS low precision: nothing passes, the result is the MSB part plus bias."""
    return random_dual_layer("msb_mode", cfg.fmt, c=cfg.lanes + 1, o=cfg.lanes, h=5, w=5, k=3,
                             padding=1, mode="msb", act_bits=6, msb_bits=2, seed=2)


def case_full(cfg: HwConfig) -> DualLayer:
    """Everything passes: the result equals the plain conv (checked here too)."""
    layer = random_dual_layer("full_mode", cfg.fmt, c=2 * cfg.lanes, o=cfg.lanes + 1, h=5,
                              w=4, k=3, padding=1, mode="full", seed=3)
    plain = layer.conv_layer().golden(cfg.fmt)
    assert (layer.golden(cfg.fmt)[0] == plain).all()
    return layer


def case_zero_input(cfg: HwConfig) -> DualLayer:
    """All-zero inputs: gate value 0; T = -1 passes, T = 0 (a tie) does not."""
    layer = random_dual_layer("zero_input", cfg.fmt, c=cfg.lanes, o=2 * cfg.lanes, h=4, w=4,
                              k=3, padding=1, seed=4)
    o = layer.out_channels
    thr = np.where(np.arange(o) % 2 == 0, -1, 0)
    sign = np.where(np.arange(o) % 4 < 2, 1, -1)
    layer = dataclasses.replace(layer, x=np.zeros_like(np.asarray(layer.x)), threshold=thr,
                                sign=sign, out_lsb=0)
    passed = layer.golden(cfg.fmt)[1]
    assert passed[0::2].all() and not passed[1::2].any()
    return layer


def case_saturation_pact(cfg: HwConfig) -> DualLayer:
    """Outputs beyond the mantissa range, then the PACT clamp to 2**b - 1."""
    clamp = (1 << 7) - 1
    layer = random_dual_layer("saturation_pact", cfg.fmt, c=cfg.lanes, o=cfg.lanes, h=5, w=5,
                              k=3, padding=1, activation="pact", clamp_max=clamp, margin=-1,
                              pass_fraction=0.5, seed=5)
    y = layer.golden(cfg.fmt)[0]
    assert (y == clamp).sum() > 10 and (y == 0).sum() > 5 and ((y > 0) & (y < clamp)).any()
    return layer


def case_saturation_none(cfg: HwConfig) -> DualLayer:
    layer = random_dual_layer("saturation_none", cfg.fmt, c=cfg.lanes, o=cfg.lanes, h=5, w=5,
                              k=3, padding=1, activation=None, margin=-3, seed=6)
    m = cfg.fmt.max_mantissa
    y = layer.golden(cfg.fmt)[0]
    assert (y == m).sum() > 5 and (y == -m).sum() > 5
    return layer


def case_stride2(cfg: HwConfig) -> DualLayer:
    """3×3 stride 2, b = 6 split 2 + 4."""
    return random_dual_layer("stride2_3x3", cfg.fmt, c=cfg.lanes + 2, o=cfg.lanes, h=7, w=8,
                             k=3, stride=2, padding=1, act_bits=6, msb_bits=2,
                             pass_fraction=0.4, seed=7)


def case_1x1(cfg: HwConfig) -> DualLayer:
    """1×1 over one input word: one step per output (S = 1), groups back to back."""
    return random_dual_layer("1x1_one_word", cfg.fmt, c=cfg.lanes, o=2 * cfg.lanes, h=5, w=6,
                             k=1, pass_fraction=0.6, seed=8)


def case_1x1_stride2(cfg: HwConfig) -> DualLayer:
    return random_dual_layer("1x1_stride2", cfg.fmt, c=2 * cfg.lanes, o=cfg.lanes, h=7, w=6,
                             k=1, stride=2, pass_fraction=0.3, seed=9)


def case_split_extremes(cfg: HwConfig) -> DualLayer:
    """The widest LSB part: b = M - 1 bits split 1 + (M - 2) (L = M - 2)."""
    b = cfg.mantissa_bits - 1
    return random_dual_layer("split_1_plus_L_max", cfg.fmt, c=cfg.lanes, o=cfg.lanes, h=4,
                             w=4, k=3, padding=1, act_bits=b, msb_bits=1, pass_fraction=0.5,
                             seed=10)


def case_split_narrow(cfg: HwConfig) -> DualLayer:
    """The narrowest input: b = 2 bits split 1 + 1."""
    return random_dual_layer("split_1_plus_1", cfg.fmt, c=cfg.lanes, o=cfg.lanes, h=4, w=4,
                             k=3, padding=1, act_bits=2, msb_bits=1, pass_fraction=0.5,
                             seed=11)


def case_worst_accumulation(cfg: HwConfig) -> DualLayer:
    """max_in_channels × max_kernel² at full scale, the largest alignment shift and a bias
    that puts the accumulator at exactly ±(2**(acc_bits-1) - 1); the gate compares the
    extreme MSB sums: T = the value itself (a tie: no pass) or one below (pass)."""
    k, m = cfg.lanes, cfg.fmt.max_mantissa
    b = cfg.mantissa_bits - 1
    c, kk, o = cfg.max_in_channels, cfg.max_kernel, k
    x = np.full((c, kk, kk), (1 << b) - 1, dtype=np.int64)
    sgn = np.where(np.arange(o) % 2 == 0, 1, -1)
    w = np.broadcast_to((sgn * m)[:, None, None, None], (o, c, kk, kk)).copy()
    w_lsb = np.full((o, c), cfg.align_span, dtype=np.int64)
    w_lsb[:, :k] = 0
    total = m * ((1 << b) - 1) * kk * kk * int((1 << w_lsb).sum(axis=1)[0])
    top = (1 << (cfg.acc_bits - 1)) - 1
    assert total <= top, "the config must admit its worst case"
    bias = sgn * (top - total)
    s = np.full(o, cfg.acc_bits - cfg.mantissa_bits)
    base = DualLayer("worst_accumulation", x, 0, w, w_lsb, bias, s, b, 3, None, sgn, "gated")
    g = gate_values(base)[:, 0, 0]
    layer = dataclasses.replace(base, threshold=g - np.array([0, 0, 1, 1])[np.arange(o) % 4])
    acc, passed, _ = golden.dual_precision_conv2d(
        torch.as_tensor(x)[None], 0, torch.as_tensor(w), torch.as_tensor(w_lsb),
        torch.as_tensor(bias), act_bits=b, msb_bits=3, threshold=torch.as_tensor(layer.threshold),
        sign=torch.as_tensor(sgn), mode="gated")
    assert passed[0, 2:].all() and not passed[0, :2].any()
    assert int(acc[0, 2:].abs().max()) == top and int(acc.min()) == -top
    return layer


def case_bias_only(cfg: HwConfig) -> DualLayer:
    """All-zero weights of some filters: outputs are the requantized bias, gate value 0."""
    layer = random_dual_layer("zero_filters", cfg.fmt, c=cfg.lanes, o=cfg.lanes, h=4, w=4, k=3,
                              padding=1, pass_fraction=0.5, seed=12)
    w = np.array(layer.w)
    w[1] = 0
    w[3] = 0
    thr = np.array(layer.threshold)
    thr[3] = -1
    layer = dataclasses.replace(layer, w=w, threshold=thr)
    return dataclasses.replace(layer, out_lsb=fit_dual_out_lsb(layer, cfg.fmt))


EDGE_CASES: dict[str, Callable[[HwConfig], DualLayer]] = {
    "gated_3x3": case_gated_3x3,
    "msb": case_msb,
    "full": case_full,
    "zero_input": case_zero_input,
    "saturation_pact": case_saturation_pact,
    "saturation_none": case_saturation_none,
    "stride2": case_stride2,
    "1x1": case_1x1,
    "1x1_stride2": case_1x1_stride2,
    "split_extremes": case_split_extremes,
    "split_narrow": case_split_narrow,
    "worst_accumulation": case_worst_accumulation,
    "bias_only": case_bias_only,
}


def test_dual_edges():
    """Every edge case, one simulator run: outputs, gate outcomes and cycles exact."""
    verify_dual_layers([make(DUAL) for make in EDGE_CASES.values()], DUAL)


def test_gating_saves_cycles_as_modelled():
    """One layer in the three modes: cycles ordered msb < gated < full, each equal to the
    model, and the gated LSB work proportional to the passing outputs."""
    base = random_dual_layer("modes", DUAL.fmt, c=2 * DUAL.lanes, o=DUAL.lanes, h=6, w=6, k=3,
                             padding=1, pass_fraction=0.25, seed=13)
    layers = [dataclasses.replace(base, name=f"modes_{m}", mode=m)
              for m in ("msb", "gated", "full")]
    rs = run_dual_layers(layers, DUAL)
    for layer, r in zip(layers, rs):
        check_dual_result(layer, r, DUAL)
    c_msb, c_gated, c_full = (r.cycles for r in rs)
    assert c_msb < c_gated < c_full
    n = int(rs[1].passed.sum())
    steps = 9 * 2                                  # kh*kw*CW
    lsb_gated = -(-n // DUAL.lanes) * steps
    lsb_full = 36 * steps
    assert (c_gated - c_msb) - lsb_gated == (c_full - c_msb) - lsb_full


def test_rtl_mismatch_is_reported():
    """A wrong gate threshold in the golden layer must make the check fail, naming the
    layer (the check really compares the gate outcomes)."""
    layer = random_dual_layer("mismatch", DUAL.fmt, c=DUAL.lanes, o=DUAL.lanes, h=4, w=4, k=3,
                              padding=1, pass_fraction=0.5, seed=14)
    r = run_dual_layers([layer], DUAL)[0]
    wrong = dataclasses.replace(layer, threshold=np.asarray(layer.threshold) - 10**9)
    with pytest.raises(AssertionError, match="mismatch"):
        check_dual_result(wrong, r, DUAL)
