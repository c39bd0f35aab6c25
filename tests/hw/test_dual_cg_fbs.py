"""Channel Gating (mode ``cg``) and FBS (mode ``fbs``) on the dual-precision engine without
a simulator: DualProgram checks (errors name the layer and field), images, descriptor, the
cycle and work models. Tiny CG / FBS layers in Amaranth's simulator:
``tests/hw/test_dual_engine.py``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dynacc.hw.config import load_named
from dynacc.hw.cycles import dual_conv_cycles, dual_conv_work
from dynacc.hw.dual_engine import DualEngine
from dynacc.hw.dual_program import MODE_CODES, DualProgram
from dynacc.quant import golden
from dynacc.sim.dual_layers import gate_values, random_cg_layer, random_fbs_layer

CFG = load_named("dual")
K = CFG.lanes


def _cg(**kw):
    base = dict(c=16, o=16, h=4, w=4, k=3, padding=1, partitions=2, pass_fraction=0.3, seed=0)
    base.update(kw)
    return random_cg_layer("CG", CFG.fmt, **base)


def _fbs(**kw):
    base = dict(c=12, o=10, h=4, w=4, k=3, padding=1, density_in=0.75, density_out=1.0, seed=0)
    base.update(kw)
    return random_fbs_layer("F", CFG.fmt, **base)


# -- checks --------------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    (dict(partitions=1), r"layer 'CG': field 'partitions': mode 'cg' needs partitions p >= 2"),
    (dict(partitions=3), r"field 'partitions'.* got p = 3"),
    (dict(partitions=None), r"field 'partitions'.* got p = None"),
    (dict(msb_bits=4), r"field 'msb_bits' = 4 must be None \(or act_bits = 8\) in mode 'cg'"),
    (dict(threshold=None), r"field 'threshold' is needed in mode 'cg'"),
    (dict(scale=np.ones(16, dtype=np.int64)), r"field 'scale' is only used in mode 'fbs'"),
])
def test_cg_errors_name_layer_and_field(change, match):
    with pytest.raises(ValueError, match=match):
        DualProgram(dataclasses.replace(_cg(), **change), CFG)


@pytest.mark.parametrize("c, o, p", [(16, 8, 4), (8, 16, 4), (12, 16, 2), (16, 12, 2)])
def test_cg_partition_must_hold_whole_words_and_tiles(c, o, p):
    """(C/p) % K and (O/p) % K: a tile's lanes share one partition and its base words."""
    layer = random_cg_layer("cgp", CFG.fmt, c=c, o=o, h=3, w=3, k=1, partitions=2, seed=1)
    w = np.zeros((o, c, 1, 1), dtype=np.int64)
    layer = dataclasses.replace(layer, x=np.zeros((c, 3, 3), dtype=np.int64), w=w,
                                w_lsb=np.zeros((o, c), dtype=np.int64), bias=None,
                                threshold=0, sign=None, out_lsb=0, partitions=p)
    with pytest.raises(ValueError, match=rf"layer 'cgp': field 'partitions'.*C = {c}, O = {o}"):
        DualProgram(layer, CFG)


def test_mode_fields_are_refused_elsewhere():
    from dynacc.sim.dual_layers import random_dual_layer

    layer = random_dual_layer("PG", CFG.fmt, c=4, o=4, h=3, w=3, k=1, seed=0)
    with pytest.raises(ValueError, match=r"layer 'PG': field 'partitions' = 2 is only used in "
                                         r"mode 'cg', not 'gated'"):
        DualProgram(dataclasses.replace(layer, partitions=2), CFG)
    with pytest.raises(ValueError, match=r"field 'msb_bits' = None must be an integer"):
        DualProgram(dataclasses.replace(layer, msb_bits=None), CFG)


@pytest.mark.parametrize("change, match", [
    (dict(scale=None), r"layer 'F': field 'scale' is needed in mode 'fbs'"),
    (dict(scale=np.full(10, 256)), r"field 'scale' of filter 0 = 256 must be an unsigned "
                                   r"8-bit integer in \[0, 255\]"),
    (dict(scale=np.array([3] * 9 + [-1])), r"field 'scale' of filter 9 = -1"),
    (dict(scale=np.ones(3, dtype=np.int64)), r"field 'scale' must be a scalar or \[10\]"),
    (dict(bias=np.full(10, 1 << 39)), r"field 'bias' of filter 0 = 549755813888 exceeds the "
                                      r"40-bit bias word"),
    (dict(msb_bits=3), r"field 'msb_bits' = 3 must be None \(or act_bits = 8\) in mode 'fbs'"),
    (dict(scale_lsb=0.5), r"field 'scale_lsb' = 0.5 must be an integer"),
    (dict(threshold=None, partitions=2), r"field 'partitions' = 2 is only used in mode 'cg'"),
])
def test_fbs_errors_name_layer_and_field(change, match):
    layer = _fbs()
    assert layer.out_channels == 10
    with pytest.raises(ValueError, match=match):
        DualProgram(dataclasses.replace(layer, **change), CFG)


def test_fbs_requantization_shift_includes_scale_lsb():
    layer = _fbs()
    prog = DualProgram(layer, CFG)
    acc_lsb = golden.conv_alignment(layer.x_lsb, golden.torch.as_tensor(layer.w_lsb))[0].numpy()
    want = np.asarray(layer.out_lsb) - acc_lsb - layer.scale_lsb
    assert (prog.conv.shifts[:, 0].numpy() == want).all()
    # a scale_lsb that pushes the shift out of the shift_bits range is refused
    with pytest.raises(ValueError, match=r"layer 'F': requantization shift range .* exceeds"):
        DualProgram(dataclasses.replace(layer, scale_lsb=-200), CFG)


def test_fbs_scaled_accumulator_bound():
    """|acc*scale + bias| fits acc_bits + scale_bits: |acc| <= 2**(acc_bits-1) - 1 (rule A4
    without the bias), scale <= 2**scale_bits - 1 and |bias| <= 2**(acc_bits-1) - 1 (the bias
    word) give |acc*scale + bias| <= (2**(acc_bits-1) - 1) * 2**scale_bits. The largest
    admitted layer with the largest scale and bias is accepted."""
    m = CFG.fmt.max_mantissa
    c, o = CFG.max_in_channels, K
    x = np.full((c, 3, 3), 255, dtype=np.int64)
    w = np.full((o, c, 3, 3), m, dtype=np.int64)
    w_lsb = np.full((o, c), CFG.align_span, dtype=np.int64)
    w_lsb[:, :K] = 0                                 # alignment shifts up to align_span
    big = (1 << (CFG.acc_bits - 1)) - 1
    layer = dataclasses.replace(_fbs(), x=x, w=w, w_lsb=w_lsb, padding=0,
                                bias=np.full(o, -big), scale=np.full(o, 255),
                                out_lsb=np.full(o, 30))
    DualProgram(layer, CFG)
    acc = golden.accumulator_bound(golden.torch.as_tensor(w),
                                   golden.conv_alignment(0, golden.torch.as_tensor(w_lsb))[1],
                                   golden.torch.zeros(o).long(), m)
    assert int(acc[0]) * 255 + big < 1 << (CFG.acc_bits + CFG.scale_bits - 1)
    # the FBS bias is added after the scale: it does not enter the accumulator's A4 bound,
    # while the same bias on the accumulator LSB (mode full) would make it wrap
    full = dataclasses.replace(layer, mode="full", msb_bits=4, scale=None)
    with pytest.raises(ValueError, match=r"layer 'F': worst-case accumulator .* acc_bits = 40"):
        DualProgram(full, CFG)


# -- images and descriptor ---------------------------------------------------------------
def test_cg_images_and_descriptor():
    layer = _cg(o=16, c=32, partitions=2)          # CW = 8, nb = 4, 2 tiles per partition
    prog = DualProgram(layer, CFG)
    d = prog.desc
    assert d["mode"] == MODE_CODES["cg"] == 3 and d["lsb_bits"] == 0
    assert d["base_words"] == 4 and d["chunk_tiles"] == 2 and d["in_words"] == 8
    imgs = prog.images()
    gate = imgs["gate"].reshape(-1, 2)
    assert (gate[:, 0] == np.asarray(layer.threshold)).all()
    assert (gate[:, 1] == (np.asarray(layer.sign) < 0)).all()
    plain = dataclasses.replace(layer, mode="full", msb_bits=4, partitions=None)
    pimgs = DualProgram(plain, CFG).images()
    for m in ("act", "wgt", "align", "bias", "quant"):
        assert (imgs[m] == pimgs[m]).all(), m
    p4 = DualProgram(_cg(o=16, c=16, partitions=4), CFG).desc
    assert p4["base_words"] == 1 and p4["chunk_tiles"] == 1


def test_fbs_images_and_descriptor():
    layer = _fbs()
    prog = DualProgram(layer, CFG)
    o = layer.out_channels
    assert prog.desc["mode"] == MODE_CODES["fbs"] == 4 and prog.desc["lsb_bits"] == 0
    assert "base_words" not in prog.desc
    imgs = prog.images()
    sc = imgs["scale"].reshape(-1)
    assert (sc[:o] == np.asarray(layer.scale)).all() and (sc[o:] == 0).all()
    b = imgs["bias"].reshape(-1)
    assert (b[:o] == np.asarray(layer.bias)).all() and (b[o:] == 0).all()


def test_golden_of_modes():
    """cg: the golden channel-gated conv; fbs: nothing passes, acc*scale + bias."""
    layer = _cg()
    y, passed = layer.golden(CFG.fmt)
    g = gate_values(layer)
    thr = np.asarray(layer.threshold)[:, None, None]
    assert (passed == (g > thr)).all() and passed.any() and not passed.all()
    assert (g == thr).any()
    f = _fbs()
    _, fp = f.golden(CFG.fmt)
    assert not fp.any()


# -- cycle and work models -----------------------------------------------------------------
def test_cg_cycle_model_structure():
    st = DualEngine.drains(CFG)
    lat = DualEngine.out_stages(CFG)["write"]
    shape = dict(in_channels=32, out_channels=16, out_height=8, out_width=8, kernel_h=3,
                 kernel_w=3)
    p, cw = 64, 8
    for parts in (2, 4):
        nb = cw // parts
        s1, s2 = 9 * nb, 9 * (cw - nb)
        none = dual_conv_cycles(CFG, **shape, mode="cg", partitions=parts,
                                passed_counts=[0] * 4)
        assert none == 2 + lat + 4 * (p * s1 + st["msb"] + p)
        some = dual_conv_cycles(CFG, **shape, mode="cg", partitions=parts,
                                passed_counts=[5, 0, 256, 4])
        assert some == none + (2 + 64 + 1) * s2 + 3 * st["lsb"]
    with pytest.raises(ValueError, match=r"mode 'cg' needs partitions p >= 2"):
        dual_conv_cycles(CFG, **shape, mode="cg", partitions=3, passed_counts=[0] * 4)
    with pytest.raises(ValueError, match="passed_counts"):
        dual_conv_cycles(CFG, **shape, mode="cg", partitions=2)


def test_fbs_cycle_model_is_one_pass():
    shape = dict(in_channels=10, out_channels=7, out_height=5, out_width=4, kernel_h=3,
                 kernel_w=3)
    dr = DualEngine.drains(CFG)
    lat = DualEngine.out_stages(CFG)["write"]
    p, s = 20, 9 * 3
    assert dual_conv_cycles(CFG, **shape, mode="fbs") == 2 + lat + 2 * (p * s + dr["msb"] + p)
    assert dual_conv_cycles(CFG, **shape, mode="fbs") == dual_conv_cycles(CFG, **shape,
                                                                          mode="msb")


def test_output_pipeline_latency_from_units():
    from dynacc.hw.activation import Activation
    from dynacc.hw.lsb_buffer import LsbBuffer
    from dynacc.hw.requantizer import Requantizer
    from dynacc.hw.scaler import Scaler

    s = DualEngine.out_stages(CFG)
    assert s["scale"] == 1 + LsbBuffer.LATENCY + 1
    assert s["write"] == s["scale"] + Scaler.LATENCY + Requantizer.LATENCY + Activation.LATENCY


def test_cg_fbs_work_model():
    kw = dict(out_channels=8, out_height=5, out_width=5)
    assert dual_conv_work(**kw, mode="cg", partitions=4, passed=0) == 0.25
    assert dual_conv_work(**kw, mode="cg", partitions=4, passed=200) == 1.0
    assert dual_conv_work(**kw, mode="cg", partitions=2, passed=50) == 0.5 + 0.5 * 0.25
    assert dual_conv_work(**kw, mode="fbs", in_channels=8, dense_in_channels=16,
                          dense_out_channels=32) == 0.125
    with pytest.raises(ValueError, match="mode 'cg' needs passed"):
        dual_conv_work(**kw, mode="cg", partitions=2)
    with pytest.raises(ValueError, match="mode 'fbs' needs compacted"):
        dual_conv_work(**kw, mode="fbs", in_channels=8)
