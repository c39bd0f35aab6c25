"""Co-simulation of FBS layers (rules FBS2-FBS3) on the dual-precision engine (Verilator +
cocotb): each dense FBS layer of one image is compacted on the host
(:func:`dynacc.hw.fbs_layer.compact_fbs_layer`), the compacted layer runs in mode ``fbs``
(one pass, then ``acc*scale + bias``), and the expanded output is compared with ``==`` to the
dense golden :func:`dynacc.quant.golden.fbs_conv2d`; every compacted layer's output, gate
outcomes (none pass) and cycles (``dual_conv_cycles``) are checked too. All cases run in one
simulator process.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from dynacc.hw.config import HwConfig, load_named
from dynacc.hw.cycles import dual_conv_cycles
from dynacc.sim.dual import run_fbs_cases
from dynacc.sim.dual_layers import FbsDense, random_fbs_dense

DUAL = load_named("dual")


def _d(name: str, cfg: HwConfig, **kw) -> FbsDense:
    return random_fbs_dense(name, cfg.fmt, **kw)


def case_density_quarter(cfg: HwConfig) -> FbsDense:
    """d = 0.25 of 32 inputs (8 = two words) and of 16 outputs (4 = one tile), 3×3."""
    return _d("fbs_d0.25", cfg, c=32, o=16, h=6, w=5, k=3, padding=1, density_in=0.25,
              density_out=0.25, seed=1)


def case_density_half_stride2(cfg: HwConfig) -> FbsDense:
    """d = 0.5 of 22 inputs (11: a padded word) and 14 outputs (7: a padded lane), stride 2."""
    return _d("fbs_d0.5_stride2", cfg, c=22, o=14, h=7, w=8, k=3, stride=2, padding=1,
              density_in=0.5, density_out=0.5, seed=2)


def case_density_1x1(cfg: HwConfig) -> FbsDense:
    """1×1, d = 0.75 in, 0.6 out."""
    return _d("fbs_1x1", cfg, c=16, o=20, h=5, w=6, k=1, density_in=0.75, density_out=0.6,
              seed=3)


def case_all_active(cfg: HwConfig) -> FbsDense:
    """Every channel active: the compacted layer is the dense one."""
    d = _d("fbs_all_active", cfg, c=12, o=8, h=5, w=5, k=3, padding=1, density_in=1.0,
           density_out=1.0, seed=4)
    assert d.active_in.all() and d.active_out.all()
    return d


def case_one_active(cfg: HwConfig) -> FbsDense:
    """One input and one output channel active."""
    return _d("fbs_one_active", cfg, c=16, o=16, h=5, w=4, k=3, padding=1,
              active_in=np.arange(16) == 5, active_out=np.arange(16) == 11, seed=5)


def case_no_active_input(cfg: HwConfig) -> FbsDense:
    """No active input: every active output is activation(requantize(bias))."""
    d = _d("fbs_no_input", cfg, c=8, o=8, h=4, w=4, k=3, padding=1, activation=None,
           active_in=np.zeros(8, dtype=bool), density_out=0.5, seed=6)
    y = d.golden(cfg.fmt)
    assert (y[d.active_out] != 0).any()
    return d


def case_no_active_output(cfg: HwConfig) -> FbsDense:
    """No active output: nothing runs, the output is all zeros."""
    return _d("fbs_no_output", cfg, c=8, o=8, h=4, w=4, k=3, padding=1,
              active_out=np.zeros(8, dtype=bool), seed=7)


def case_scales(cfg: HwConfig) -> FbsDense:
    """Scales 0 (output = bias), 1 and 255 on active outputs of both signs."""
    o = 12
    scale = np.tile([0, 1, 255], o // 3)
    return _d("fbs_scale_0_1_255", cfg, c=12, o=o, h=5, w=5, k=3, padding=1, density_in=0.75,
              density_out=1.0, scale=scale, activation=None, seed=8)


def case_bias_extremes(cfg: HwConfig) -> FbsDense:
    """Biases ±(2**(acc_bits-1) - 1) (the bias word's extremes) with scale 255: ``acc*scale +
    bias`` leaves the acc_bits range (the scaled path is acc_bits + scale_bits wide)."""
    d = _d("fbs_bias_extremes", cfg, c=16, o=8, h=5, w=5, k=3, padding=1, density_in=1.0,
           density_out=1.0, scale=np.full(8, 255), activation=None, seed=9)
    top = (1 << (cfg.acc_bits - 1)) - 1
    d = dataclasses.replace(d, bias=np.where(np.arange(8) % 2 == 0, top, -top))
    d = _refit(d, cfg)
    acc = _scaled_acc(d)
    assert np.abs(acc).max() > top
    return d


def case_saturation(cfg: HwConfig) -> FbsDense:
    """Outputs beyond the mantissa range (no activation), then the PACT clamp."""
    d = _d("fbs_saturation", cfg, c=12, o=8, h=5, w=5, k=3, padding=1, density_in=0.75,
           density_out=1.0, activation=None, margin=-3, seed=10)
    m = cfg.fmt.max_mantissa
    y = d.golden(cfg.fmt)
    assert (y == m).sum() > 5 and (y == -m).sum() > 5
    return d


def case_saturation_pact(cfg: HwConfig) -> FbsDense:
    clamp = (1 << 7) - 1
    d = _d("fbs_saturation_pact", cfg, c=12, o=8, h=5, w=5, k=3, padding=1, density_in=0.5,
           density_out=1.0, activation="pact", clamp_max=clamp, margin=-1, seed=11)
    y = d.golden(cfg.fmt)
    assert (y == clamp).sum() > 5 and (y == 0).sum() > 5 and ((y > 0) & (y < clamp)).any()
    return d


def case_worst_accumulation(cfg: HwConfig) -> FbsDense:
    """max_in_channels × max_kernel² active at full scale (x = 2**b - 1, |w| = max mantissa),
    scale 255 and the extreme bias of the same sign: the largest ``|acc*scale + bias|``."""
    k, m = cfg.lanes, cfg.fmt.max_mantissa
    b = cfg.mantissa_bits - 1
    c, kk, o = cfg.max_in_channels, cfg.max_kernel, k
    sgn = np.where(np.arange(o) % 2 == 0, 1, -1)
    top = (1 << (cfg.acc_bits - 1)) - 1
    d = FbsDense("fbs_worst_accumulation", np.full((c, kk, kk), (1 << b) - 1), 0,
                 np.broadcast_to((sgn * m)[:, None, None, None], (o, c, kk, kk)).copy(),
                 np.zeros((o, c), dtype=np.int64), sgn * top, np.full(o, 255), -8,
                 np.ones(c, dtype=bool), np.ones(o, dtype=bool), np.zeros(o, dtype=np.int64),
                 1, 0, None, None, b)
    d = _refit(d, cfg)
    acc = _scaled_acc(d)
    assert (np.abs(acc) == m * ((1 << b) - 1) * kk * kk * c * 255 + top).all()
    return d


def _scaled_acc(d: FbsDense) -> np.ndarray:
    from dynacc.sim.dual_layers import _layer_acc

    return _layer_acc(d.compact())[0][0].numpy()


def _refit(d: FbsDense, cfg: HwConfig) -> FbsDense:
    """Output LSBs fitted to the active outputs' ``acc*scale + bias``."""
    from dynacc.sim.dual_layers import fit_dual_out_lsb

    out = np.zeros(len(d.active_out), dtype=np.int64)
    out[d.active_out] = fit_dual_out_lsb(d.compact(), cfg.fmt)
    return dataclasses.replace(d, out_lsb=out)


EDGE_CASES: dict[str, Callable[[HwConfig], FbsDense]] = {
    "density_quarter": case_density_quarter,
    "density_half_stride2": case_density_half_stride2,
    "density_1x1": case_density_1x1,
    "all_active": case_all_active,
    "one_active": case_one_active,
    "no_active_input": case_no_active_input,
    "no_active_output": case_no_active_output,
    "scales": case_scales,
    "bias_extremes": case_bias_extremes,
    "saturation": case_saturation,
    "saturation_pact": case_saturation_pact,
    "worst_accumulation": case_worst_accumulation,
}


def test_fbs_edges():
    """Every edge case, one simulator run: compacted outputs, gate outcomes (none) and cycles
    exact; expanded outputs == the dense golden model."""
    denses = [make(DUAL) for make in EDGE_CASES.values()]
    runs = run_fbs_cases([d.case(DUAL.fmt) for d in denses], DUAL)
    for d, r in zip(denses, runs):
        assert (r.out == d.golden(DUAL.fmt)).all()
        if r.layer is None:
            assert not d.active_out.any() and (r.out == 0).all()
        else:
            assert not r.result.passed.any()


def test_fbs_per_image_and_cycles():
    """One dense layer, two images with different active sets and scales back to back (the
    scale and bias memories are reloaded per run); each compacted run costs the single-pass
    cycles of its compacted sizes, fewer than the dense layer's."""
    a = _d("fbs_image0", DUAL, c=32, o=32, h=6, w=6, k=3, padding=1, density_in=0.5,
           density_out=0.5, seed=20)
    b = _d("fbs_image1", DUAL, c=32, o=32, h=6, w=6, k=3, padding=1, density_in=0.25,
           density_out=0.75, seed=21)
    b = _refit(dataclasses.replace(b, w=a.w, w_lsb=a.w_lsb), DUAL)
    assert (a.active_out != b.active_out).any() and (a.scale != b.scale).any()
    runs = run_fbs_cases([a.case(DUAL.fmt), b.case(DUAL.fmt)], DUAL)
    dense = dual_conv_cycles(DUAL, in_channels=32, out_channels=32, out_height=6, out_width=6,
                             kernel_h=3, kernel_w=3, mode="fbs")
    for d, r in zip((a, b), runs):
        assert r.result.cycles == dual_conv_cycles(
            DUAL, in_channels=int(d.active_in.sum()), out_channels=int(d.active_out.sum()),
            out_height=6, out_width=6, kernel_h=3, kernel_w=3, mode="fbs")
        assert r.result.cycles < dense
