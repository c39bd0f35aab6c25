"""Deploy export of the digits-trained DFS ResNet-20: the host gate's float32 parameters, the
options and the block layout round-trip through the folder and are validated by the reader;
the host chain with the deploy's own gate (engines answered by their golden models) equals
the DFS golden model, decisions included; both CLI spellings export the same folder."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dynacc.gen.engine_layers import conv_layer, dual_layer
from dynacc.gen.gated_models import gated_checkpoint
from dynacc.hw.config import load_named
from dynacc.quant.dfs_program import load_dfs_checkpoint, run_dfs_golden, run_dfs_golden_env
from dynacc.quant.flow import load_data
from dynacc.sw.deploy import main as deploy_main
from dynacc.sw.dfs_deploy import deploy_host_gate
from dynacc.sw.dfs_host import DfsHost
from dynacc.sw.export import deploy_model
from dynacc.sw.reader import DeployError, load_deploy
from dynacc.sw.runtime import job_descriptor, run_chain

HW = load_named("dual")
HERE = Path(__file__).resolve().parent
#: image 2: skip a plain block, skip both transition blocks, 4 bits, 8 bits
FORCED = [2, 0, 0, 1, 2, 0, 1, 2]


def _reader_helpers():  # noqa: ANN202
    import importlib.util
    spec = importlib.util.spec_from_file_location("_test_deploy_reader",
                                                  HERE / "test_deploy_reader.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.rewrite_manifest, mod.rewrite_arrays


rewrite_manifest, rewrite_arrays = _reader_helpers()


@pytest.fixture(scope="module")
def dfs_deploy(tmp_path_factory):
    ckpt = gated_checkpoint("dfs_resnet20")
    _, program, gate, meta = load_dfs_checkpoint(ckpt)
    path = tmp_path_factory.mktemp("deploy") / "dfs_resnet20"
    res = deploy_model("dfs_resnet20", path, HW, log=lambda m: None)
    splits = load_data("resnet20", "digits", seed=0)
    x = torch.cat([a for a, _ in splits.test])[:3]
    return ckpt, program, gate, meta, res, path, x


@pytest.fixture
def folder(dfs_deploy, tmp_path) -> Path:
    dst = tmp_path / "dep"
    shutil.copytree(dfs_deploy[5], dst)
    return dst


def test_dfs_fields_round_trip(dfs_deploy):
    _, program, gate, meta, _, path, x = dfs_deploy
    dep = load_deploy(path, HW)
    sec = dep.dfs
    assert sec["options"] == ["skip", 4, 8] and sec["costs"] == [0.0, 0.5, 1.0]
    assert sec["act_bits"] == 8 and len(sec["blocks"]) == 9
    for blk, ref in zip(sec["blocks"], gate.layout):
        assert (blk["input"], blk["output"], blk["conv1"], blk["conv2"], blk["shortcut"]) == (
            ref.input, ref.output, ref.conv1, ref.conv2, ref.shortcut)
    assert [b["shortcut"] for b in sec["blocks"] if b["shortcut"]] == [
        "layer2.0.downsample.0", "layer3.0.downsample.0"]
    state = meta["dfs"]["gate_state"]
    assert sorted(f"gate/{k}" for k in state) == sec["gate"]["arrays"]
    for k, v in state.items():
        a = dep.arrays[f"gate/{k}"]
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, v.numpy())
    # the deploy's gate decides like the checkpoint's on the golden block outputs
    g2 = deploy_host_gate(dep)
    ref = run_dfs_golden_env(program, gate, x)
    again = run_dfs_golden_env(program, g2, x)
    assert torch.equal(ref.decisions, again.decisions)
    assert torch.equal(ref.logits, again.logits)
    text = (path / "model.h").read_text()
    assert "DYNACC_NUM_DUAL_LAYERS 18" in text


def test_cli_with_backbone_name_and_checkpoint_exports_the_same(dfs_deploy, tmp_path):
    ckpt, *_, path, _ = dfs_deploy
    out = tmp_path / "again"
    rc = deploy_main(["--model", "resnet20", "--checkpoint", str(ckpt), "--hw",
                      "configs/hw/dual.yaml", "--out", str(out)])
    assert rc == 0
    a, b = load_deploy(path, HW), load_deploy(out, HW)
    assert a.dfs == b.dfs
    assert (path / "arrays.npz").read_bytes() == (out / "arrays.npz").read_bytes()


def _golden_engine(program, lp, b):  # noqa: ANN001, ANN202
    eng = {l.name: l for l in lp.engine_layers}

    def engine(job):
        g = eng[job.layer.name]
        if job.layer.engine == "dual":
            dl = dual_layer(program, g, {g.input: torch.from_numpy(job.x)}, mode=job.mode)
            if job.msb_bits is not None:
                dl = dataclasses.replace(dl, msb_bits=job.msb_bits)
                # the repacked descriptor is the engine's own for that precision
                assert job_descriptor(job.layer, job.mode, job.msb_bits) == {
                    k: int(v) for k, v in dl.program(HW).desc.items()}
            return dl.golden(HW.fmt)[0]
        cl = dataclasses.replace(conv_layer(program, g), x=torch.from_numpy(job.x),
                                 residual=None if job.residual is None
                                 else torch.from_numpy(job.residual))
        return cl.golden(HW.fmt)
    return engine


def test_host_chain_with_deploy_gate_equals_dfs_golden(dfs_deploy):
    """The chain walks the folder with its own host gate (images 0, 1) and forced decisions
    (image 2: skips incl. both transition blocks, 4 and 8 bits); every tensor each image
    computes equals run_dfs_golden_env on the same decisions, the gate's picks are equal."""
    _, program, gate, _, res, path, x = dfs_deploy
    dep = load_deploy(path, HW, images=False)
    forced = np.full((3, 8), -1)
    forced[2] = FORCED
    host = DfsHost(dep, 3, forced)
    acts = run_chain(dep, x, _golden_engine(program, res.layer_program, 8), dfs=host)
    assert host.decisions[2].tolist() == FORCED
    _, free = run_dfs_golden(program, gate, x[:2])
    assert torch.equal(host.decisions[:2], free)
    gold = run_dfs_golden_env(program, gate, x, host.decisions)
    assert torch.equal(host.gate_decisions, gold.gate_decisions)
    for s in dep.steps:
        ran = gold.ran[s.output]
        assert torch.equal(acts[s.output][ran], gold.env[s.output][ran]), s.output
    assert not gold.ran["layer2.0.conv1"][2] and gold.ran["layer2.0.downsample.0"][2]


def test_free_decisions_match_golden_decisions(dfs_deploy):
    _, program, gate, _, res, path, x = dfs_deploy
    dep = load_deploy(path, HW, images=False)
    host = DfsHost(dep, 3)
    run_chain(dep, x, _golden_engine(program, res.layer_program, 8), dfs=host)
    _, dec = run_dfs_golden(program, gate, x)
    assert torch.equal(host.decisions, dec) and torch.equal(host.gate_decisions, dec)


def test_bad_decisions_are_refused(dfs_deploy):
    dep = load_deploy(dfs_deploy[5], HW, images=False)
    with pytest.raises(ValueError, match=r"DFS decisions must be \[3, 8\]"):
        DfsHost(dep, 3, np.zeros((3, 7), dtype=int))
    with pytest.raises(ValueError, match=r"DFS decision indices must be in \[0, 2\]"):
        DfsHost(dep, 1, [[3] * 8])
    with pytest.raises(ValueError, match=r"msb_bits 8 must be in \[1, act_bits - 1 = 7\]"):
        job_descriptor(dep.layer("layer1.1.conv1"), "msb", 8)


def _dfs(mutate):  # noqa: ANN001, ANN202
    def f(man):
        mutate(man["dfs"])
    return f


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(options=["skip", "half", 8]), r"field 'dfs.options' / 'dfs.costs': "
                                                     r"unknown DFS option 'half'"),
    (lambda d: d.update(costs=[0.0, 1.0]), r"field 'dfs.options' / 'dfs.costs'"),
    (lambda d: d.update(act_bits=4), r"field 'dfs.act_bits' = 4 != the largest precision"),
    (lambda d: d.pop("blocks"), r"missing field 'dfs.blocks'"),
    (lambda d: d["blocks"][3].update(conv1="nope"),
     r"field 'dfs.blocks\[3\].conv1' = 'nope' is not an engine layer"),
    (lambda d: d["blocks"][3].update(shortcut="layer2.0.conv2"),
     r"field 'dfs.blocks\[3\].shortcut': layer 'layer2.0.conv2' reads"),
    (lambda d: d["blocks"][2].update(output="layer1.2.conv2"),
     r"field 'dfs.blocks\[2\].output' = 'layer1.2.conv2': a gated block's output must be"),
    (lambda d: d["blocks"][1].update(gated=False), r"field 'dfs.blocks\[1\]': index 1 / gated"),
    (lambda d: d["gate"]["channels"].pop(), r"field 'dfs.gate.channels' has 7 entries for 9 blocks"),
    (lambda d: d["gate"]["channels"].__setitem__(0, 32),
     r"field 'dfs.gate.channels\[0\]' = 32 != channels 16 of block output 'add'"),
    (lambda d: d["gate"]["arrays"].remove("gate/proj.bias"),
     r"arrays \['gate/proj.bias'\] are not listed in dfs.gate.arrays"),
])
def test_bad_dfs_manifest_fields(folder, mutate, match):
    rewrite_manifest(folder, _dfs(mutate))
    with pytest.raises(DeployError, match=r"manifest.yaml: " + match):
        load_deploy(folder)


@pytest.mark.parametrize("key,value,match", [
    ("gate/proj.weight", np.zeros((3, 9), np.float32),
     r"array 'gate/proj.weight' has shape \(3, 9\), expected \(3, 10\)"),
    ("gate/proj.bias", np.zeros(3, np.float64),
     r"array 'gate/proj.bias' has dtype float64, expected float32"),
    ("gate/lstm.bias_hh_l0", None, r"missing array 'gate/lstm.bias_hh_l0'"),
    ("gate/proj.bias", np.array([0.0, np.nan, 0.0], np.float32), r"holds NaN/Inf"),
])
def test_bad_gate_arrays(folder, key, value, match):
    def mutate(arrays):
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    rewrite_arrays(folder, mutate)
    with pytest.raises(DeployError, match=match):
        load_deploy(folder)
