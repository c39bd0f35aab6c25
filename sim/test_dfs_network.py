"""Whole-network co-simulation of the digits-trained DFS ResNet-20
(``gated_checkpoint("dfs_resnet20")``) from its deploy folder, with per-image host-gate
decisions: images 0 and 1 run the options the folder's host gate picks on the RTL's own block
outputs, image 2 forced decisions that skip a plain block and both transition blocks (their
1x1 shortcut on the engine in mode full) and run blocks at 4 and 8 bits. Every tensor each
image computes, every gate outcome and the predictions equal the DFS golden model on the same
decisions; the gate's picks on the RTL tensors equal its picks on the golden ones (and the
free images' decisions equal ``run_dfs_golden``'s); RTL cycles == ``conv_cycles`` /
``DualProgram.cycles`` per layer and image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynacc.gen.gated_models import gated_checkpoint
from dynacc.hw.config import load_named
from dynacc.quant.dfs_program import load_dfs_checkpoint, run_dfs_golden
from dynacc.quant.flow import load_data
from dynacc.sim.dfs_network import check_dfs_network
from dynacc.sim.network import run_network
from dynacc.sw.export import deploy_model
from dynacc.sw.reader import load_deploy

HW = load_named("dual")
#: image 2: block 1 skip, 2 skip, 3 (transition) skip, 4 at 4 bits, 5 at 8 bits, 6
#: (transition) skip, 7 at 4 bits, 8 at 8 bits (option indices of skip,4,8)
FORCED = [0, 0, 0, 1, 2, 0, 1, 2]


@pytest.fixture(scope="module")
def dfs_run(tmp_path_factory):
    _, program, gate, _ = load_dfs_checkpoint(gated_checkpoint("dfs_resnet20"))
    path = tmp_path_factory.mktemp("deploy") / "dfs_resnet20"
    deploy_model("dfs_resnet20", path, HW, log=lambda m: None)
    dep = load_deploy(path, HW, images=False)
    splits = load_data("resnet20", "digits", seed=0)
    x = torch.cat([a for a, _ in splits.test])[:3]
    forced = np.full((3, gate.n_gated), -1)
    forced[2] = FORCED
    res = run_network(dep, x, dfs=True, decisions=forced)
    return program, gate, dep, x, res


def test_dfs_resnet20_whole_network_on_rtl(dfs_run):
    program, gate, dep, x, res = dfs_run
    chk = check_dfs_network(program, gate, res, x)
    chk.assert_ok()     # first mismatch: image, layer, channel, y, x, RTL and golden values
    assert chk.total_layers == len(dep.layers) == 22
    assert chk.bit_exact_layers == 22 and all(h.exact for h in chk.host)
    assert all(l.gates_exact and l.cycles_ok for l in chk.layers)
    np.testing.assert_array_equal(chk.rtl_pred, chk.golden_pred)
    # free images: the gate on the RTL tensors decides as run_dfs_golden does
    _, free = run_dfs_golden(program, gate, x[:2])
    np.testing.assert_array_equal(res.dfs["decisions"][:2], free.numpy())
    np.testing.assert_array_equal(res.dfs["decisions"][2], FORCED)
    np.testing.assert_array_equal(res.dfs["gate_decisions"], chk.gate_decisions_golden)
    # image 2: skipped blocks run no conv1 / conv2, a skipped transition block its shortcut
    cyc = res.cycles
    for name in ("layer1.1.conv1", "layer2.0.conv2", "layer3.0.conv1"):
        assert cyc[name][2] == -1, name
    for name in ("layer2.0.downsample.0", "layer3.0.downsample.0"):
        assert cyc[name][2] == dep.layer(name).cycles, name      # mode full
    assert cyc["layer2.1.conv1"][2] == dep.layer("layer2.1.conv1").cycles_msb   # 4 bits
    assert not res.passed["layer2.1.conv1"][2].any()
    assert cyc["layer2.2.conv1"][2] == dep.layer("layer2.2.conv1").cycles      # 8 bits
    assert res.passed["layer2.2.conv1"][2].all()
    per = chk.cycles_per_image
    assert (per <= sum(l.cycles for l in dep.layers)).all()
    print(f"\nDFS decisions (option index per gated block, {dep.dfs['options']}):\n"
          f"{res.dfs['decisions']}\nengine cycles per image: {per.tolist()} (dual engine: "
          f"{chk.dual_cycles_per_image.tolist()}; every block full: "
          f"{sum(l.cycles for l in dep.layers):,})")
