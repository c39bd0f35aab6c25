"""Every Precision Gating layer of the digits-trained PG ResNet-20 on the dual-precision engine,
on a real test image: outputs and gate outcomes ``==`` the golden model, cycles == the model.

The PG model is the one ``make gen MODEL=pg_resnet20`` uses (``train-pg`` defaults, trained once
into build/cache). Each PG layer's input is the golden activation of a real digit. The first
PG layer also runs in the two DFS precisions (``msb``: no LSB pass, ``full``: every output), and
one layer runs with its thresholds moved onto observed gate values, so that exact ties occur
on trained data and must not pass.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dynacc.gen.engine_layers import dual_layer
from dynacc.gen.gated_models import gated_checkpoint
from dynacc.gen.layer_program import build_layer_program
from dynacc.hw.config import load_named
from dynacc.quant.checkpoint import load_checkpoint
from dynacc.quant.flow import load_data
from dynacc.sim.dual import verify_dual_layers
from dynacc.sim.dual_layers import gate_values

HW = load_named("dual")


@pytest.fixture(scope="module")
def trained_pg():
    program = load_checkpoint(gated_checkpoint("pg_resnet20")).program
    splits = load_data("resnet20", "digits", seed=0)
    image = splits.test.dataset[3][0][None]
    env = program.run_golden(image)
    shapes = {n: tuple(t.shape[1:]) for n, t in env.items()}
    lp = build_layer_program("pg_resnet20", program, shapes, HW)
    acts = {n: t[0] for n, t in env.items()}
    return program, lp, acts


def test_trained_pg_layers_bit_exact_with_gate_outcomes(trained_pg):
    program, lp, acts = trained_pg
    dual = [l for l in lp.engine_layers if l.engine == "dual"]
    assert len(dual) == 9
    layers = [dual_layer(program, l, acts) for l in dual]
    first = layers[0]
    layers.append(dataclasses.replace(first, name=first.name + "/msb", mode="msb"))
    layers.append(dataclasses.replace(first, name=first.name + "/full", mode="full"))
    # thresholds on observed gate values of a trained layer: exact ties on real data
    g = gate_values(layers[4])
    sign = np.asarray(layers[4].sign).reshape(-1)
    tied = np.array([sign[o] * g[o].reshape(-1)[len(g[o].reshape(-1)) // 2]
                     for o in range(g.shape[0])])
    layers.append(dataclasses.replace(layers[4], name=layers[4].name + "/ties", threshold=tied))
    results = verify_dual_layers(layers, HW)     # == outputs, == gate outcomes, cycles == model
    # the network golden at each PG layer's output too
    for l, r in zip(dual, results):
        assert np.array_equal(r.out, acts[l.name].numpy()), l.name
    passed = [r.passed.mean() for r in results[:9]]
    assert 0.0 < min(passed) and max(passed) < 1.0      # trained gates really gate
    assert not results[9].passed.any() and results[10].passed.all()
    assert results[9].cycles < results[0].cycles < results[10].cycles
    ties = sum(int((sign[o] * g[o] == tied[o]).sum()) for o in range(g.shape[0]))
    assert ties >= g.shape[0]
