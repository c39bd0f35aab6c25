"""FBS compaction (hw/fbs_layer.py): the compacted layer's golden output, expanded, equals the
dense layer's (rules FBS2-FBS3); errors name the layer and field; the zero-active edge
cases."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dynacc.hw.config import load_named
from dynacc.hw.dual_program import DualProgram
from dynacc.hw.fbs_layer import compact_fbs_layer, expand_fbs_output, fbs_out_size
from dynacc.sim.dual_layers import random_fbs_dense

CFG = load_named("dual")


def _dense(**kw):
    base = dict(c=12, o=10, h=5, w=4, k=3, padding=1, density_in=0.5, density_out=0.5, seed=0)
    base.update(kw)
    return random_fbs_dense("fbs", CFG.fmt, **base)


def _args(d):
    return (d.name, d.x, d.x_lsb, d.w, d.w_lsb, d.bias, d.scale, d.scale_lsb, d.active_in,
            d.active_out, d.out_lsb, d.stride, d.padding, d.activation, d.clamp_max, d.act_bits)


@pytest.mark.parametrize("kw", [
    dict(), dict(density_in=0.25, density_out=0.75, seed=1), dict(density_in=1.0, density_out=1.0),
    dict(density_in=0.1, density_out=0.1, stride=2, seed=2), dict(k=1, seed=3),
    dict(activation="pact", clamp_max=100, margin=-1, seed=4), dict(activation=None, seed=5),
])
def test_compacted_equals_dense(kw):
    d = _dense(**kw)
    layer = d.compact()
    assert layer.mode == "fbs" and layer.msb_bits is None
    assert layer.conv_layer().in_channels == d.active_in.sum()
    assert layer.out_channels == d.active_out.sum()
    DualProgram(layer, CFG)                                   # fits the engine
    y = expand_fbs_output(layer.golden(CFG.fmt)[0], d.active_out)
    want = d.golden(CFG.fmt)
    assert (y == want).all()
    assert (y[~d.active_out] == 0).all()


def test_fields_gathered():
    d = _dense(seed=7)
    layer = d.compact()
    oi, ci = np.flatnonzero(d.active_out), np.flatnonzero(d.active_in)
    assert (np.asarray(layer.x) == d.x[ci]).all()
    assert (np.asarray(layer.w) == d.w[oi][:, ci]).all()
    assert (np.asarray(layer.w_lsb) == d.w_lsb[oi][:, ci]).all()
    for f in ("bias", "scale", "out_lsb"):
        assert (np.asarray(getattr(layer, f)) == getattr(d, f)[oi]).all(), f
    assert layer.scale_lsb == d.scale_lsb and layer.x_lsb == d.x_lsb


def test_w_lsb_must_be_constant_per_filter():
    d = _dense()
    w_lsb = d.w_lsb.copy()
    w_lsb[3, 5] += 1
    with pytest.raises(ValueError, match=r"layer 'fbs': field 'w_lsb' of filter 3 is not "
                                         r"constant over its input channels"):
        compact_fbs_layer(*_args(dataclasses.replace(d, w_lsb=w_lsb)))
    per_filter = d.w_lsb[:, 0]                                # [O] is accepted
    a = compact_fbs_layer(*_args(dataclasses.replace(d, w_lsb=per_filter)))
    assert (np.asarray(a.w_lsb) == np.asarray(d.compact().w_lsb)).all()


def test_inactive_input_must_be_zero():
    d = _dense()
    x = d.x.copy()
    c = int(np.flatnonzero(~d.active_in)[0])
    x[c, 1, 1] = 3
    with pytest.raises(ValueError, match=rf"layer 'fbs': field 'x' channel {c} is inactive but "
                                         r"not zero"):
        compact_fbs_layer(*_args(dataclasses.replace(d, x=x)))


@pytest.mark.parametrize("field, value, match", [
    ("active_in", np.ones(11, dtype=bool), r"field 'active_in' must be a bool \[12\]"),
    ("active_out", np.ones(10, dtype=np.int64), r"field 'active_out' must be a bool \[10\]"),
    ("scale", np.ones(4, dtype=np.int64), r"field 'scale' must be a scalar or \[10\]"),
    ("clamp_max", np.arange(10), r"field 'clamp_max' must be one value"),
])
def test_field_errors(field, value, match):
    d = _dense(activation="pact", clamp_max=100) if field == "clamp_max" else _dense()
    with pytest.raises(ValueError, match=r"layer 'fbs': " + match):
        compact_fbs_layer(*_args(dataclasses.replace(d, **{field: value})))


def test_no_active_output_runs_nothing():
    d = _dense(active_out=np.zeros(10, dtype=bool))
    assert d.compact() is None
    size = fbs_out_size(d.x.shape, d.w.shape, d.stride, d.padding)
    y = expand_fbs_output(None, d.active_out, size)
    assert y.shape == (10, 5, 4) and (y == 0).all() and (y == d.golden(CFG.fmt)).all()
    with pytest.raises(ValueError, match="needs out_size"):
        expand_fbs_output(None, d.active_out)


def test_no_active_input_gives_requantized_bias():
    """acc = 0, so every active output is activation(requantize(bias)) (one zero channel with
    zero weights keeps the layer runnable)."""
    d = _dense(active_in=np.zeros(12, dtype=bool), activation=None, seed=8)
    assert (d.x == 0).all()
    layer = d.compact()
    assert np.shape(layer.x)[0] == 1 and not np.asarray(layer.w).any()
    y = expand_fbs_output(layer.golden(CFG.fmt)[0], d.active_out)
    assert (y == d.golden(CFG.fmt)).all()
    assert (y[d.active_out] != 0).any()
    DualProgram(layer, CFG)


def test_expand_checks_rows():
    with pytest.raises(ValueError, match=r"y_compact must be \[2, Ho, Wo\]"):
        expand_fbs_output(np.zeros((3, 2, 2)), np.array([True, False, True]))
