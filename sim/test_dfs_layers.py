"""Every gated-block conv of the digits-trained DFS ResNet-20 on the dual-precision engine, in
both DFS precisions, on a real test image: outputs ``==`` the golden model, cycles == model.

The DFS model is the one ``make gen MODEL=dfs_resnet20`` uses (``train-dfs`` defaults,
trained once into build/cache). The gate runs on the host; its decision (``msb``: the top
``msb_bits`` of each activation, ``full``: all of them) is an input of the datapath, so each
layer runs once per precision, on the golden input of a full-precision pass.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dynacc.gen.engine_layers import dual_layer
from dynacc.gen.gated_models import gated_checkpoint, stored_dual_program
from dynacc.gen.layer_program import build_layer_program
from dynacc.hw.config import load_named
from dynacc.quant.checkpoint import load_checkpoint
from dynacc.quant.flow import load_data
from dynacc.sim.dual import verify_dual_layers

HW = load_named("dual")


@pytest.fixture(scope="module")
def trained_dfs():
    program = stored_dual_program(load_checkpoint(gated_checkpoint("dfs_resnet20")))
    splits = load_data("resnet20", "digits", seed=0)
    env = program.run_golden(splits.test.dataset[5][0][None])
    shapes = {n: tuple(t.shape[1:]) for n, t in env.items()}
    lp = build_layer_program("dfs_resnet20", program, shapes, HW)
    return program, lp, {n: t[0] for n, t in env.items()}


def test_trained_dfs_layers_bit_exact_in_both_precisions(trained_dfs):
    program, lp, acts = trained_dfs
    dual = [l for l in lp.engine_layers if l.engine == "dual"]
    assert len(dual) >= 8
    layers = []
    for l in dual:
        full = dual_layer(program, l, acts, mode="full")
        layers += [dataclasses.replace(full, name=l.name + "/msb", mode="msb"),
                   dataclasses.replace(full, name=l.name + "/full")]
    results = verify_dual_layers(layers, HW)     # == outputs, == gate outcomes, cycles == model
    for l, r_msb, r_full in zip(dual, results[0::2], results[1::2]):
        assert np.array_equal(r_full.out, acts[l.name].numpy()), l.name   # the network golden
        assert r_msb.cycles < r_full.cycles
        assert not r_msb.passed.any() and r_full.passed.all()
    assert any(not np.array_equal(a.out, b.out) for a, b in zip(results[0::2], results[1::2]))
