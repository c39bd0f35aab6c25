"""Every Channel Gating layer of the digits-trained CG ResNet-20 on the dual-precision engine
(mode ``cg``), on real test digits: outputs and gate outcomes ``==`` the golden model, cycles
== the model.

The CG model is the one ``make gen MODEL=cg_resnet20`` uses (``train-cg`` defaults, trained
once into build/cache). Each CG layer's input is the golden activation of a real digit. The
first CG layer also runs with no output passing (thresholds on each filter's largest gate
value: ties) and with every output passing (the dense conv), which must cost the layer
program's two cycle bounds; one layer runs with its thresholds moved onto observed gate
values, so that exact ties occur on trained data in both directions (T = g: must not pass,
T = g - 1: passes by one), with gate signs +1 and -1.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dynacc.gen.engine_layers import dual_layer
from dynacc.gen.gated_models import gated_checkpoint
from dynacc.gen.layer_program import build_layer_program
from dynacc.hw.config import load_named
from dynacc.quant.checkpoint import load_checkpoint
from dynacc.quant.flow import load_data
from dynacc.sim.dual import verify_dual_layers
from dynacc.sim.dual_layers import gate_values

HW = load_named("dual")
#: digits test images whose CG layers run on the RTL
IMAGES = (3, 8)
TIED = 4             # index of the CG layer whose thresholds sit on observed gate values


@pytest.fixture(scope="module")
def trained_cg():
    program = load_checkpoint(gated_checkpoint("cg_resnet20")).program
    splits = load_data("resnet20", "digits", seed=0)
    images = [splits.test.dataset[i][0][None] for i in IMAGES]
    envs = [program.run_golden(x) for x in images]
    shapes = {n: tuple(t.shape[1:]) for n, t in envs[0].items()}
    lp = build_layer_program("cg_resnet20", program, shapes, HW)
    acts = [{n: t[0] for n, t in env.items()} for env in envs]
    return program, lp, acts


def _with_threshold(layer, name: str, thr: np.ndarray):  # noqa: ANN001, ANN202
    return dataclasses.replace(layer, name=layer.name + name,
                               threshold=np.asarray(thr, dtype=np.int64))


def test_trained_cg_layers_bit_exact_with_gate_outcomes(trained_cg):
    program, lp, acts = trained_cg
    dual = [l for l in lp.engine_layers if l.engine == "dual"]
    assert len(dual) == 9 and all(l.dp_mode == "cg" and l.partitions == 4 for l in dual)
    layers = [dataclasses.replace(dual_layer(program, l, a), name=f"{l.name}/img{i}")
              for i, a in zip(IMAGES, acts) for l in dual]
    assert all(l.mode == "cg" and l.partitions == 4 for l in layers)
    n = len(layers)
    first = layers[0]
    g0 = gate_values(first).reshape(first.out_channels, -1)
    layers.append(_with_threshold(first, "/none", g0.max(axis=1)))
    layers.append(_with_threshold(first, "/all", g0.min(axis=1) - 1))
    # thresholds on observed gate values of a trained layer: even filters T = g (a tie, must
    # not pass), odd filters T = g - 1 (passes by one); the trained gate signs are all +1,
    # filters 2, 3 (mod 4) compare with sign -1 (-acc_base > T)
    t = layers[TIED]
    assert (np.asarray(t.sign) == 1).all()
    f = np.arange(t.out_channels)
    t = dataclasses.replace(t, sign=np.where(f % 4 >= 2, -1, 1))
    g = gate_values(t).reshape(t.out_channels, -1)
    pick = np.sort(g, axis=1)[:, g.shape[1] // 2]
    odd = f % 2 == 1
    layers.append(_with_threshold(t, "/ties", pick - odd))
    results = verify_dual_layers(layers, HW)     # == outputs, == gate outcomes, cycles == model
    # the network golden at each CG layer's output and its gate outcomes, every image
    for k, (a, l) in enumerate((a, l) for a in acts for l in dual):
        r = results[k]
        assert np.array_equal(r.out, a[l.name].numpy()), r.name
        op = program.op(l.name)
        _, gp = program.dual_precision_acc(op, a[op.inputs[0]][None])
        assert np.array_equal(r.passed, gp[0].numpy()), r.name
    passed = [r.passed.mean() for r in results[:n]]
    assert 0.0 < min(passed) and max(passed) < 1.0      # trained gates really gate
    none, every, ties = results[n:]
    assert not none.passed.any() and every.passed.all()
    assert (none.cycles, every.cycles) == (dual[0].cycles_msb, dual[0].cycles)
    assert none.cycles < results[0].cycles < every.cycles
    tp = ties.passed.reshape(t.out_channels, -1)
    for o in f:
        hit = g[o] == pick[o]
        assert hit.any() and (tp[o][hit] == bool(odd[o])).all(), f"{t.name}: filter {o}"
    assert 0 < tp.mean() < 1
