"""Every FBS conv of the digits-trained ``fbs_net`` on the dual-precision engine (mode
``fbs``), on real test digits: each layer of each image is compacted by the host to its
active input / output channels, runs on the RTL and is expanded; the expanded output ``==``
the FBS golden model's (``fbs_layer_cases``: ``run_fbs_golden``) on every element, inactive
output channels exactly zero, no output passes a gate, RTL cycles == ``dual_conv_cycles`` of
the compacted sizes.

The model is ``gated_checkpoint("fbs_net")`` (``train-fbs`` defaults, trained once into
build/cache). Two images at the checkpoint's own density and at 0.5 (0.25 when the
checkpoint's is 0.5), plus, on image 0: exact saliency ties on trained data (one predictor row
copied onto another, so two channels get the same g_q at the k-th / (k+1)-th place: both
inactive, rule FBS1; and a tie at the top: both active), a network at d = 1 (every channel
active: the whole layer), and a layer whose density keeps a single active output (its
successor then has a single active input). All layers run in one simulator process.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from dynacc.gen.gated_models import gated_checkpoint
from dynacc.hw.config import load_named
from dynacc.hw.cycles import dual_conv_cycles
from dynacc.quant.fbs_program import fbs_layer_cases, fbs_model_from_checkpoint, run_fbs_golden
from dynacc.quant.flow import load_data
from dynacc.sim.dual import run_fbs_cases

HW = load_named("dual")
#: digits test images whose FBS layers run on the RTL
IMAGES = (3, 8)
TIED = "conv3"       # FBS conv whose predictor gets tied rows (32 outputs)
SINGLE = "conv4"     # FBS conv run at density 1/O (a single active output)
DENSE = ("conv2", "conv7")   # layers run at d = 1


def _with_gate(fp, name: str, **kw):  # noqa: ANN001, ANN202
    """``fp`` with gate ``name`` replaced by ``dataclasses.replace(gate, **kw)``."""
    return dataclasses.replace(fp, gates=[dataclasses.replace(g, **kw) if g.name == name else g
                                          for g in fp.gates])


def _tied_program(fp, x):  # noqa: ANN001, ANN202
    """``fp`` with the predictor rows of gate :data:`TIED` copied so that, on image ``x``,
    the channels ranked k and k+1 (k = ceil(d*O)) and those ranked 1 and 2 get equal
    saliencies; returns the program and the two tied pairs."""
    gate = fp.gate(TIED)
    g = run_fbs_golden(fp, x[None]).saliency[TIED][0]
    order = torch.argsort(g, descending=True, stable=True).tolist()
    k = math.ceil(gate.density * len(g) - 1e-9)
    pairs = [(order[k - 1], order[k]), (order[0], order[1])]
    phi, rho = gate.phi.clone(), gate.rho.clone()
    for a, b in pairs:
        phi[b], rho[b] = phi[a], rho[a]
    return _with_gate(fp, TIED, phi=phi, rho=rho), pairs, k


@pytest.fixture(scope="module")
def trained_fbs():
    _, fp, meta = fbs_model_from_checkpoint(gated_checkpoint("fbs_net"))
    own = float(fp.gates[0].density)
    densities = [own] + [d for d in (0.5, 0.25) if d != own][:1]
    splits = load_data("fbs_cnn", "digits", seed=0)
    images = [splits.test.dataset[i][0] for i in IMAGES]
    return fp, densities, images


def _cases(fp, x, tag: str, only: tuple[str, ...] | None = None):  # noqa: ANN001, ANN202
    return [{**c, "name": f"{c['name']}/{tag}"} for c in fbs_layer_cases(fp, x)
            if only is None or c["name"] in only]


def test_trained_fbs_layers_bit_exact(trained_fbs):
    fp, densities, images = trained_fbs
    assert len(fp.gates) == 8
    cases = []
    for d in densities:
        fd = fp.with_density(d)
        for i, x in zip(IMAGES, images):
            cases += _cases(fd, x, f"img{i}/d{d:g}")
    n_main = len(cases)
    x0 = images[0]
    # exact ties on trained data (FBS1): rank k / k+1 tied -> both inactive; rank 1 / 2 -> active
    ft, pairs, k = _tied_program(fp.with_density(0.5), x0)
    nxt = f"conv{int(TIED[4:]) + 1}"
    cases += _cases(ft, x0, "ties", (TIED, nxt))
    # every channel active (d = 1): the whole layer
    cases += _cases(fp.with_density(1.0), x0, "d1", DENSE)
    # a single active output (k = 1), then a single active input
    o = fp.program.op(SINGLE).weight.shape[0]
    fs = _with_gate(fp.with_density(0.5), SINGLE, density=1.0 / o)
    cases += _cases(fs, x0, "single", (SINGLE, f"conv{int(SINGLE[4:]) + 1}"))

    runs = run_fbs_cases(cases, HW)   # checks compacted outputs / gates / cycles, == expected
    for c, r in zip(cases, runs):
        act_in, act_out = np.asarray(c["active_in"]), np.asarray(c["active_out"])
        exp = np.asarray(c["expected"])
        assert np.array_equal(r.out, exp), c["name"]
        assert (r.out[~act_out] == 0).all(), c["name"]
        assert r.layer is not None, c["name"]          # trained layers keep active outputs
        assert not r.result.passed.any(), c["name"]
        ho, wo = exp.shape[1:]
        kh, kw = np.shape(c["w"])[2:]
        model = dual_conv_cycles(HW, in_channels=max(int(act_in.sum()), 1),
                                 out_channels=int(act_out.sum()), out_height=ho, out_width=wo,
                                 kernel_h=kh, kernel_w=kw, mode="fbs")
        assert r.result.cycles == model, c["name"]
    main = cases[:n_main]
    # trained decisions really skip: at d < 1 some but not all channels of every layer active
    for c in main:
        a = np.asarray(c["active_out"])
        assert 0 < a.sum() < len(a), c["name"]
        assert a.sum() <= math.ceil(float(c["name"].split("/d")[1]) * len(a) - 1e-9), c["name"]
    # the ties: equal g_q, both of the k / k+1 pair inactive, both of the top pair active
    tie = next(c for c in cases if c["name"] == f"{TIED}/ties")
    g_q, act = np.asarray(tie["scale"]), np.asarray(tie["active_out"])
    (a, b), (t1, t2) = pairs
    assert g_q[a] == g_q[b] and g_q[t1] == g_q[t2] and g_q[t1] > g_q[a]
    assert not act[a] and not act[b] and act[t1] and act[t2]
    assert act.sum() == (g_q > g_q[a]).sum() < k
    y_tie = next(r for r in runs if r.name == f"{TIED}/ties").out
    assert (y_tie[[a, b]] == 0).all() and (y_tie[[t1, t2]] != 0).any()
    assert np.array_equal(next(c for c in cases if c["name"] == f"{nxt}/ties")["active_in"], act)
    # d = 1: every channel read and computed, the dense layer's cycles
    for c in cases:
        if c["name"].endswith("/d1"):
            assert np.asarray(c["active_in"]).all() and np.asarray(c["active_out"]).all()
    # a single active output, then a single active input
    single = [c for c in cases if c["name"].endswith("/single")]
    assert np.asarray(single[0]["active_out"]).sum() == 1
    assert np.asarray(single[1]["active_in"]).sum() == 1
