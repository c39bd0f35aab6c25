"""Co-simulation of Channel Gating (mode ``cg``, rules CG1-CG3) on the dual-precision engine
(Verilator + cocotb) against :func:`dynacc.quant.golden.channel_gated_conv2d`.

Every case compares every output element AND every gate outcome with ``==`` and asserts that
the RTL cycle counter equals ``hw.cycles.dual_conv_cycles`` of the golden gate outcomes.
Cases that claim an edge assert that the golden model really exercises it. All edge cases
run in one simulator process.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from dynacc.hw.config import HwConfig, load_named
from dynacc.hw.cycles import dual_conv_cycles
from dynacc.hw.dual_engine import DualEngine
from dynacc.hw.dual_program import DualLayer
from dynacc.quant import golden
from dynacc.sim.dual import check_dual_result, run_dual_layers, verify_dual_layers
from dynacc.sim.dual_layers import fit_dual_out_lsb, gate_values, random_cg_layer

DUAL = load_named("dual")


def _cg(name: str, cfg: HwConfig, **kw) -> DualLayer:
    return random_cg_layer(name, cfg.fmt, **kw)


def _with_thresholds(layer: DualLayer, thr: np.ndarray, cfg: HwConfig) -> DualLayer:
    layer = dataclasses.replace(layer, threshold=np.asarray(thr, dtype=np.int64))
    return dataclasses.replace(layer, out_lsb=fit_dual_out_lsb(layer, cfg.fmt))


def case_ties_both_ways(cfg: HwConfig) -> DualLayer:
    """p = 2, 3×3, two tiles per partition. Even filters: T = one of their gate values (that
    output must not pass); odd filters: T = a gate value - 1 (that output passes by one);
    gate signs of both kinds."""
    layer = _cg("cg_ties_both_ways", cfg, c=16, o=16, h=6, w=5, k=3, padding=1, partitions=2,
                seed=1)
    g = gate_values(layer).reshape(layer.out_channels, -1)
    pick = np.sort(g, axis=1)[:, g.shape[1] // 2]
    odd = np.arange(layer.out_channels) % 2 == 1
    layer = _with_thresholds(layer, pick - odd, cfg)
    passed = layer.golden(cfg.fmt)[1].reshape(layer.out_channels, -1)
    sign = np.asarray(layer.sign)
    assert (sign[~odd] == 1).any() and (sign[~odd] == -1).any()
    assert (sign[odd] == 1).any() and (sign[odd] == -1).any()
    for f in range(layer.out_channels):
        hit = g[f] == pick[f]
        assert hit.any() and (passed[f][hit] == bool(odd[f])).all(), f"filter {f}"
    return layer


def case_p4_stride2(cfg: HwConfig) -> DualLayer:
    """p = 4 (one base word of CW = 4, one tile per partition), 3×3 stride 2."""
    return _cg("cg_p4_3x3_stride2", cfg, c=16, o=16, h=7, w=8, k=3, stride=2, padding=1,
               partitions=4, pass_fraction=0.4, seed=2)


def case_p2_1x1(cfg: HwConfig) -> DualLayer:
    """1×1, CW = 2: one step per output in each phase, groups back to back."""
    return _cg("cg_p2_1x1", cfg, c=8, o=16, h=5, w=6, k=1, partitions=2, pass_fraction=0.6,
               seed=3)


def case_p4_1x1_stride2(cfg: HwConfig) -> DualLayer:
    """1×1 stride 2, CW = 8, nb = 2: the second phase wraps around word 0."""
    return _cg("cg_p4_1x1_stride2", cfg, c=32, o=16, h=7, w=6, k=1, stride=2, partitions=4,
               pass_fraction=0.2, seed=4)


def case_low_pass(cfg: HwConfig) -> DualLayer:
    """p = 2, CW = 8 (nb = 4), one tile per partition, pass fraction 0.1."""
    return _cg("cg_p2_c32_f0.1", cfg, c=32, o=8, h=5, w=5, k=3, padding=1, partitions=2,
               pass_fraction=0.1, seed=5)


def case_high_pass(cfg: HwConfig) -> DualLayer:
    """p = 4, two tiles per partition, pass fraction 0.9."""
    return _cg("cg_p4_f0.9", cfg, c=16, o=32, h=4, w=4, k=3, padding=1, partitions=4,
               pass_fraction=0.9, seed=6)


def case_all_pass(cfg: HwConfig) -> DualLayer:
    """T below every gate value: every output gets its rest phase = the plain conv."""
    layer = _cg("cg_all_pass", cfg, c=16, o=8, h=5, w=4, k=3, padding=1, partitions=2, seed=7)
    g = gate_values(layer).reshape(layer.out_channels, -1)
    layer = _with_thresholds(layer, g.min(axis=1) - 1, cfg)
    y, passed = layer.golden(cfg.fmt)
    plain = dataclasses.replace(layer, mode="full", msb_bits=4, partitions=None).golden(cfg.fmt)[0]
    assert passed.all() and (y == plain).all()
    return layer


def case_none_pass(cfg: HwConfig) -> DualLayer:
    """T = the largest gate value of each filter (a tie): nothing passes, the result is the
    base partial sum plus bias."""
    layer = _cg("cg_none_pass", cfg, c=16, o=16, h=5, w=4, k=3, padding=1, partitions=4, seed=8)
    g = gate_values(layer).reshape(layer.out_channels, -1)
    layer = _with_thresholds(layer, g.max(axis=1), cfg)
    assert not layer.golden(cfg.fmt)[1].any()
    return layer


def case_saturation_pact(cfg: HwConfig) -> DualLayer:
    clamp = (1 << 7) - 1
    layer = _cg("cg_saturation_pact", cfg, c=8, o=8, h=5, w=5, k=3, padding=1, partitions=2,
                activation="pact", clamp_max=clamp, margin=-1, pass_fraction=0.5, seed=9)
    y = layer.golden(cfg.fmt)[0]
    assert (y == clamp).sum() > 10 and (y == 0).sum() > 5 and ((y > 0) & (y < clamp)).any()
    return layer


def case_saturation_none(cfg: HwConfig) -> DualLayer:
    layer = _cg("cg_saturation_none", cfg, c=8, o=8, h=5, w=5, k=3, padding=1, partitions=2,
                activation=None, margin=-3, pass_fraction=0.5, seed=10)
    m = cfg.fmt.max_mantissa
    y = layer.golden(cfg.fmt)[0]
    assert (y == m).sum() > 5 and (y == -m).sum() > 5
    return layer


def case_worst_accumulation(cfg: HwConfig) -> DualLayer:
    """max_in_channels × max_kernel² at full scale (x = 2**b - 1, |w| = max mantissa), the
    largest alignment shift and a bias that puts each passing output at exactly
    ±(2**(acc_bits-1) - 1); the gate compares the extreme base sums: T = the value (a tie:
    no pass) or one below (pass)."""
    k, m = cfg.lanes, cfg.fmt.max_mantissa
    b = cfg.mantissa_bits - 1
    c, kk, p = cfg.max_in_channels, cfg.max_kernel, 2
    o = p * k
    x = np.full((c, kk, kk), (1 << b) - 1, dtype=np.int64)
    sgn = np.where(np.arange(o) % 2 == 0, 1, -1)
    w = np.broadcast_to((sgn * m)[:, None, None, None], (o, c, kk, kk)).copy()
    w_lsb = np.full((o, c), cfg.align_span, dtype=np.int64)
    w_lsb[:, :k] = 0
    w_lsb[:, c // 2:c // 2 + k] = 0           # partition 1's base also starts unshifted
    total = m * ((1 << b) - 1) * kk * kk * int((1 << w_lsb).sum(axis=1)[0])
    top = (1 << (cfg.acc_bits - 1)) - 1
    assert total <= top, "the config must admit its worst case"
    bias = sgn * (top - total)
    s = np.full(o, cfg.acc_bits - cfg.mantissa_bits)
    base = DualLayer("cg_worst_accumulation", x, 0, w, w_lsb, bias, s, b, None, 0, sgn, "cg",
                     partitions=p)
    g = gate_values(base)[:, 0, 0]
    layer = dataclasses.replace(base, threshold=g - (np.arange(o) % 4 >= 2))
    acc, passed, _ = golden.channel_gated_conv2d(
        torch.as_tensor(x)[None], 0, torch.as_tensor(w), torch.as_tensor(w_lsb),
        torch.as_tensor(bias), partitions=p, threshold=torch.as_tensor(layer.threshold),
        sign=torch.as_tensor(sgn))
    lane = np.arange(o) % 4
    assert passed[0, lane >= 2].all() and not passed[0, lane < 2].any()
    assert (acc[0, lane >= 2].abs() == top).all() and int(acc.max()) == top
    assert int(acc.min()) == -top
    return layer


def case_zero_blocks(cfg: HwConfig) -> DualLayer:
    """Zero weight blocks and a zero input partition: input partition 1 is all zero, so
    partition 1's base sums are 0 (T = 0 on tile 2: ties, nothing passes; T = -1 on tile 3:
    all pass) and partition 0's rest sums are 0; filter 0 has an all-zero base block (gate
    value 0, T = -1: passes, output = bias), filter 1 one all-zero base word."""
    k = cfg.lanes
    layer = _cg("cg_zero_blocks", cfg, c=16, o=16, h=4, w=4, k=3, padding=1, partitions=2,
                seed=11)
    x, w = np.array(layer.x), np.array(layer.w)
    x[8:] = 0                                # input partition 1
    w[0, :8] = 0                             # filter 0 (partition 0): base block
    w[1, :k] = 0                             # filter 1 (partition 0): one base word
    sign = np.asarray(layer.sign).copy()
    sign[0] = 1
    layer = dataclasses.replace(layer, x=x, w=w, sign=sign)
    g = gate_values(layer).reshape(16, -1)
    thr = np.median(g, axis=1).astype(np.int64)
    thr[0] = -1
    thr[1] = g[1].min() - 1
    thr[8:8 + k] = 0
    thr[8 + k:] = -1
    layer = _with_thresholds(layer, thr, cfg)
    passed = layer.golden(cfg.fmt)[1]
    assert (g[8:] == 0).all() and passed[0].all() and passed[1].all()
    assert not passed[8:8 + k].any() and passed[8 + k:].all()
    return layer


EDGE_CASES: dict[str, Callable[[HwConfig], DualLayer]] = {
    "ties_both_ways": case_ties_both_ways,
    "p4_stride2": case_p4_stride2,
    "p2_1x1": case_p2_1x1,
    "p4_1x1_stride2": case_p4_1x1_stride2,
    "low_pass": case_low_pass,
    "high_pass": case_high_pass,
    "all_pass": case_all_pass,
    "none_pass": case_none_pass,
    "saturation_pact": case_saturation_pact,
    "saturation_none": case_saturation_none,
    "worst_accumulation": case_worst_accumulation,
    "zero_blocks": case_zero_blocks,
}


def test_cg_edges():
    """Every edge case, one simulator run: outputs, gate outcomes and cycles exact."""
    verify_dual_layers([make(DUAL) for make in EDGE_CASES.values()], DUAL)


def test_cg_saves_cycles_as_modelled():
    """One layer with none / some / all outputs passing, and the same tensors in mode
    ``full`` (the PG engine's dense run): the rest phase costs ``ceil(n_t/K)*kh*kw*(CW-nb)``
    cycles per tile plus its drain, the base phase ``P*kh*kw*nb``."""
    base = _cg("cg_cycles", DUAL, c=16, o=16, h=6, w=6, k=3, padding=1, partitions=4,
               pass_fraction=0.3, seed=12)
    g = gate_values(base).reshape(16, -1)
    none = _with_thresholds(dataclasses.replace(base, name="cg_none"), g.max(axis=1), DUAL)
    some = base
    every = _with_thresholds(dataclasses.replace(base, name="cg_all"), g.min(axis=1) - 1, DUAL)
    layers = [none, some, every]
    rs = run_dual_layers(layers, DUAL)
    for layer, r in zip(layers, rs):
        check_dual_result(layer, r, DUAL)
    c_none, c_some, c_all = (r.cycles for r in rs)
    assert c_none < c_some < c_all
    k, p, cw, nb = DUAL.lanes, 36, 4, 1
    drain = DualEngine.drains(DUAL)["lsb"]
    counts = [int(rs[1].passed[t * k:(t + 1) * k].sum()) for t in range(4)]
    assert c_some - c_none == sum(-(-n // k) * 9 * (cw - nb) + drain for n in counts if n)
    assert c_all - c_none == 4 * (p * 9 * (cw - nb) + drain)
    # phase 1 of the none-pass run: P*kh*kw*nb per tile
    shape = none.shape_kwargs()
    assert c_none == dual_conv_cycles(DUAL, **shape, mode="msb") - 4 * p * 9 * (cw - nb)
