"""Whole-network co-simulation of the digits-trained Channel Gating ResNet-20
(``gated_checkpoint("cg_resnet20")``) from its deploy folder: conv layers on the conv engine,
the 9 Channel Gating layers on the dual-precision engine (mode ``cg``), both in one simulator
(the two-engine top), every layer fed by the previous RTL outputs. Every tensor and every gate
outcome equal to the golden model, predictions equal, RTL cycles == ``conv_cycles`` /
``DualProgram.cycles`` per layer and image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynacc.gen.gated_models import gated_checkpoint
from dynacc.hw.config import load_named
from dynacc.quant.checkpoint import load_checkpoint
from dynacc.quant.flow import load_data
from dynacc.sim.network import check_network, run_network
from dynacc.sw.export import deploy_model
from dynacc.sw.reader import load_deploy

HW = load_named("dual")
N_IMAGES = 2


@pytest.fixture(scope="module")
def cg_run(tmp_path_factory):
    program = load_checkpoint(gated_checkpoint("cg_resnet20")).program
    path = tmp_path_factory.mktemp("deploy") / "cg_resnet20"
    deploy_model("cg_resnet20", path, HW, log=lambda m: None)
    dep = load_deploy(path, HW, images=False)
    splits = load_data("resnet20", "digits", seed=0)
    x = torch.cat([a for a, _ in splits.test])[:N_IMAGES]
    res = run_network(dep, x)
    return program, dep, x, res


def test_cg_resnet20_whole_network_on_rtl(cg_run):
    program, dep, x, res = cg_run
    chk = check_network(program, res, x)
    chk.assert_ok()      # first mismatch: image, layer, channel, y, x, RTL and golden values
    duals = [l for l in chk.layers if l.engine == "dual"]
    assert chk.total_layers == len(dep.layers) == 22 and len(duals) == 9
    assert chk.bit_exact_layers == chk.total_layers and all(h.exact for h in chk.host)
    assert all(l.gates_exact and l.cycles_ok for l in chk.layers)
    np.testing.assert_array_equal(chk.rtl_pred, chk.golden_pred)
    assert all(0.0 < l.passed_fraction < 1.0 for l in duals)    # trained gates really gate
    for l in dep.layers:
        cyc = res.cycles[l.name]
        if l.engine == "dual":
            assert (l.dp_mode, l.partitions) == ("cg", 4), l.name
            assert ((l.cycles_msb < cyc) & (cyc < l.cycles)).all(), l.name
            assert res.passed[l.name].shape == (N_IMAGES, l.out_channels, l.out_height,
                                                l.out_width)
        else:
            assert cyc.tolist() == [l.cycles] * N_IMAGES, l.name
    # gating skips work: every image costs less than every output passing
    dense = sum(l.cycles for l in dep.layers)
    assert (res.cycles_per_image < dense).all()


def test_a_flipped_gate_outcome_is_reported(cg_run):
    program, dep, x, res = cg_run
    name = "layer2.1.conv1"
    p = res.passed[name]
    p[1, 5, 2, 3] = not p[1, 5, 2, 3]
    try:
        chk = check_network(program, res, x)
    finally:
        p[1, 5, 2, 3] = not p[1, 5, 2, 3]
    bad = next(l for l in chk.layers if l.name == name)
    assert bad.exact and not bad.gates_exact
    with pytest.raises(AssertionError, match=rf"image 1: layer '{name} \(gate outcomes\)': "
                                             r"output channel 5, y 2, x 3"):
        chk.assert_ok()


def test_forced_modes_are_refused_on_cg_layers(cg_run):
    _, dep, x, _ = cg_run
    with pytest.raises(ValueError, match=r"modes\[0\]: layer 'layer1.0.conv1' is a Channel "
                                         r"Gating layer \(dp_mode 'cg'\): it runs gated only"):
        run_network(dep, x, modes={"layer1.0.conv1": "full"})
