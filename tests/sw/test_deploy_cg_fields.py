"""A Channel Gating layer's deploy fields (``dp_mode: cg``): the reader's checks of its
``partitions``, ``msb_bits`` and descriptor (``lsb_bits`` 0, ``base_words``, ``chunk_tiles``)
and its row of the C header's dual-layer table, on a manifest layer built from a
:class:`DualProgram` (no trained CG model needed)."""

from __future__ import annotations

import dataclasses

import pytest

from dynacc.hw.config import load_named
from dynacc.hw.dual_program import DualProgram
from dynacc.sim.dual_layers import random_cg_layer
from dynacc.sw.cheader import _dual_tables
from dynacc.sw.reader import DeployError, DeployLayer, _check_dual_layer

HW = load_named("dual")


def _deploy_layer(**change) -> DeployLayer:
    layer = random_cg_layer("cg1", HW.fmt, c=16, o=32, h=8, w=8, k=3, padding=1, partitions=4)
    prog = DualProgram(layer, HW)
    full = prog.cycles(layer.golden(HW.fmt)[1] | True)
    s = DeployLayer(
        index=0, name="cg1", kind="conv", input="a", output="b", residual=None,
        in_channels=16, height=8, width=8, out_channels=32, out_height=8, out_width=8, kernel=3,
        stride=1, padding=1, im2col=None, in_words=4, tiles=8, act_words=256,
        out_words=prog.out_words, activation="relu", in_lsb=-4, out_lsb=0, joint_lsb=None,
        residual_lsb=None, macs=0, cycles=full, ideal_cycles=0, descriptor=dict(prog.desc),
        descriptor_bits=0, files={}, memories={}, engine="dual", act_bits=8, msb_bits=None,
        dp_mode="cg", cycles_msb=prog.cycles(layer.golden(HW.fmt)[1] & False), partitions=4)
    return dataclasses.replace(s, **change)


def test_cg_layer_fields_pass():
    s = _deploy_layer()
    assert s.descriptor["base_words"] == 1 and s.descriptor["chunk_tiles"] == 2
    _check_dual_layer("m", s, HW)


@pytest.mark.parametrize("change, match", [
    (dict(msb_bits=4), r"field 'msb_bits' = 4 must be null in dp_mode 'cg'"),
    (dict(partitions=3), r"field 'partitions': mode 'cg' needs partitions p >= 2"),
    (dict(partitions=None), r"field 'partitions': .* got p = None"),
    (dict(partitions=2), r"descriptor field 'base_words' = 1 != 2 of partitions 2"),
    (dict(dp_mode="fbs"), r"field 'dp_mode' = 'fbs' must be one of \('gated', 'msb', 'full', "
                          r"'cg'\)"),
])
def test_cg_layer_field_errors(change, match):
    with pytest.raises(DeployError, match=rf"m: layer 'cg1': {match}"):
        _check_dual_layer("m", _deploy_layer(**change), HW)


def test_cg_descriptor_fields_checked():
    s = _deploy_layer()
    for f, v, match in (("lsb_bits", 2, r"'lsb_bits' = 2 != act_bits - msb_bits = 0 "
                                        r"\(dp_mode 'cg': 0\)"),
                        ("chunk_tiles", 1, r"'chunk_tiles' = 1 != 2 of partitions 4")):
        bad = dataclasses.replace(s, descriptor={**s.descriptor, f: v})
        with pytest.raises(DeployError, match=match):
            _check_dual_layer("m", bad, HW)


def test_partitions_refused_outside_cg():
    s = _deploy_layer(dp_mode="gated", msb_bits=4,
                      descriptor={**_deploy_layer().descriptor, "lsb_bits": 4, "mode": 0})
    with pytest.raises(DeployError, match=r"field 'partitions' = 4 is only used in dp_mode 'cg'"):
        _check_dual_layer("m", s, HW)


def test_c_header_row_of_a_cg_layer():
    s = _deploy_layer()
    entry = {"engine": "dual", "act_bits": 8, "msb_bits": None, "cycles_msb": s.cycles_msb,
             "descriptor": s.descriptor,
             "memories": {"gate": {"offset": 0, "size": 48, "words": 8}}}
    text = "\n".join(_dual_tables([entry]))
    assert "DYNACC_DUAL_CG = 3," in text and "DYNACC_DUAL_FBS = 4," in text
    assert f"    {{0, 8, 8, 0, 3, 1, 2, {s.cycles_msb}ULL, {{0ULL, 48ULL, 8}}}}," in text
