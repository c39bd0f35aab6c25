"""Whole-network co-simulation of the digits-trained Precision Gating ResNet-20
(``gated_checkpoint("pg_resnet20")``) from its deploy folder: conv layers on the conv engine,
the 9 dual-precision layers on the dual-precision engine, both in one simulator (the
two-engine top), every layer fed by the previous RTL outputs. Every tensor and every gate
outcome equal to the golden model, predictions equal, RTL cycles == ``conv_cycles`` /
``DualProgram.cycles`` per layer and image; the second image runs two layers in forced modes
(the ``modes`` hook a DFS host uses)."""

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
#: image 1 runs these dual layers in a forced mode instead of the exported "gated"
FORCED = {"layer2.0.conv1": "msb", "layer3.1.conv1": "full"}


@pytest.fixture(scope="module")
def pg_run(tmp_path_factory):
    ckpt = gated_checkpoint("pg_resnet20")
    program = load_checkpoint(ckpt).program
    path = tmp_path_factory.mktemp("deploy") / "pg_resnet20"
    deploy_model("pg_resnet20", path, HW, log=lambda m: None)
    dep = load_deploy(path, HW, images=False)
    splits = load_data("resnet20", "digits", seed=0)
    x = torch.cat([a for a, _ in splits.test])[:N_IMAGES]
    res = run_network(dep, x, modes=[{}, FORCED])
    return program, dep, x, res


def test_pg_resnet20_whole_network_on_rtl(pg_run):
    program, dep, x, res = pg_run
    chk = check_network(program, res, x)
    chk.assert_ok()      # first mismatch: image, layer, channel, y, x, RTL and golden values
    duals = [l for l in chk.layers if l.engine == "dual"]
    assert chk.total_layers == len(dep.layers) == 22 and len(duals) == 9
    assert chk.bit_exact_layers == chk.total_layers and all(h.exact for h in chk.host)
    assert all(l.gates_exact and l.cycles_ok for l in chk.layers)
    np.testing.assert_array_equal(chk.rtl_pred, chk.golden_pred)
    for l in dep.layers:
        cyc = res.cycles[l.name]
        if l.engine == "dual":
            lo = l.cycles_msb
            assert ((lo <= cyc) & (cyc <= l.cycles)).all(), l.name
            assert res.passed[l.name].shape == (N_IMAGES, l.out_channels, l.out_height,
                                                l.out_width)
        else:
            assert cyc.tolist() == [l.cycles] * N_IMAGES, l.name
    # gating skips work: image 0 (all gated) costs less than every output passing
    dense = sum(l.cycles for l in dep.layers)
    assert res.cycles_per_image[0] < dense
    # forced modes: msb runs no LSB pass, full runs every output's
    assert res.cycles["layer2.0.conv1"][1] == dep.layer("layer2.0.conv1").cycles_msb
    assert res.cycles["layer3.1.conv1"][1] == dep.layer("layer3.1.conv1").cycles
    assert res.passed["layer2.0.conv1"][1].sum() == 0
    assert res.passed["layer3.1.conv1"][1].all()


def test_a_flipped_gate_outcome_is_reported(pg_run):
    program, dep, x, res = pg_run
    name = "layer1.1.conv1"
    p = res.passed[name]
    p[0, 3, 5, 6] = not p[0, 3, 5, 6]
    try:
        chk = check_network(program, res, x)
    finally:
        p[0, 3, 5, 6] = not p[0, 3, 5, 6]
    bad = next(l for l in chk.layers if l.name == name)
    assert bad.exact and not bad.gates_exact
    with pytest.raises(AssertionError, match=rf"image 0: layer '{name} \(gate outcomes\)': "
                                             r"output channel 3, y 5, x 6"):
        chk.assert_ok()


def test_bad_modes_are_refused_before_simulation(pg_run):
    _, dep, x, _ = pg_run
    with pytest.raises(ValueError, match=r"layer 'layer1.0.conv2' is not a dual-precision"):
        run_network(dep, x, modes={"layer1.0.conv2": "msb"})
    with pytest.raises(ValueError, match=r"mode 'half' must be one of"):
        run_network(dep, x, modes={"layer1.0.conv1": "half"})
    with pytest.raises(ValueError, match=r"modes: 1 entries for 2 images"):
        run_network(dep, x, modes=[{}])
