"""Deploy export of the digits-trained Channel Gating ResNet-20 (``make gen``'s cg_resnet20,
cached in build/cache): its 9 CG convs are dual layers in dp_mode ``cg`` with a
``partitions`` array; the reader round-trips and validates them, the C header describes them,
the host chain equals the golden model, the CLI exports the trained program as stored."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dynacc.gen.engine_layers import conv_layer, dual_layer
from dynacc.gen.gated_models import gated_checkpoint
from dynacc.hw.config import load_named
from dynacc.hw.cycles import cg_base_words
from dynacc.hw.dual_program import MODE_CODES
from dynacc.hw.dual_sequencer import dual_desc_layout
from dynacc.quant.checkpoint import load_checkpoint
from dynacc.quant.flow import load_data
from dynacc.sw.export import deploy_model
from dynacc.sw.reader import DeployError, load_deploy
from dynacc.sw.runtime import run_chain

HW = load_named("dual")
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _load_test_module(name: str, path: Path):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_reader = _load_test_module("_test_deploy_reader", HERE / "test_deploy_reader.py")
rewrite_manifest, rewrite_arrays = _reader.rewrite_manifest, _reader.rewrite_arrays


@pytest.fixture(scope="module")
def cg_deploy(tmp_path_factory):
    """cg_resnet20 exported for the dual config, as ``python sw/deploy.py`` does."""
    path = tmp_path_factory.mktemp("deploy") / "cg"
    res = deploy_model("cg_resnet20", path, HW, log=lambda m: None)
    return res.program, res.layer_program, path


@pytest.fixture
def folder(cg_deploy, tmp_path) -> Path:
    dst = tmp_path / "dep"
    shutil.copytree(cg_deploy[2], dst)
    return dst


def test_cg_layers_round_trip(cg_deploy):
    prog, lp, path = cg_deploy
    stored = load_checkpoint(gated_checkpoint("cg_resnet20")).program
    dep = load_deploy(path, "dual")      # memory images, gate words and arrays checked too
    eng = {l.name: l for l in lp.engine_layers}
    duals = [l for l in dep.layers if l.engine == "dual"]
    assert [l.name for l in duals] == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert len(dep.layers) == 22
    a = dep.arrays
    for l in duals:
        op = prog.op(l.name)
        assert op.channel_gated and torch.equal(op.dp_threshold,
                                                stored.op(l.name).dp_threshold)
        dp = dual_layer(prog, eng[l.name]).program(HW)
        assert (l.dp_mode, l.partitions, l.msb_bits, l.act_bits) == ("cg", 4, None, 8)
        assert (l.cycles, l.cycles_msb) == (eng[l.name].cycles, eng[l.name].cycles_msb)
        np.testing.assert_array_equal(a[f"{l.name}/threshold"], op.dp_threshold.numpy())
        np.testing.assert_array_equal(a[f"{l.name}/sign"], op.dp_sign.numpy())
        assert a[f"{l.name}/partitions"].tolist() == [4]
        assert a[f"{l.name}/act_bits"].tolist() == [8]
        assert a[f"{l.name}/mode"].tolist() == [MODE_CODES["cg"]]
        assert f"{l.name}/msb_bits" not in a
        assert set(l.memories) == {"wgt", "align", "bias", "quant", "gate"}
        imgs = dp.images()
        for m in l.memories:
            np.testing.assert_array_equal(dep.images[l.name][m], imgs[m], err_msg=f"{l.name}/{m}")
        assert l.descriptor == dp.desc and l.descriptor["lsb_bits"] == 0
        assert l.descriptor["base_words"] == cg_base_words(
            HW, in_channels=l.in_channels, out_channels=l.out_channels, partitions=4)
        assert l.descriptor["chunk_tiles"] == l.tiles // 4
        assert l.descriptor_bits == int(dual_desc_layout(HW).const(dp.desc).as_bits())
    gate = (path / "gate.bin").read_bytes()
    assert len(gate) == dep.manifest["blobs"]["gate"]["size"] == sum(
        l.memories["gate"]["size"] for l in duals)


def test_chain_with_cg_layers_equals_golden(cg_deploy):
    """Host steps from the deploy folder; conv and CG layers answered by the golden model of
    their engine, on real test digits: every tensor equals ``program.run_golden``."""
    prog, lp, path = cg_deploy
    dep = load_deploy(path, images=False)
    eng = {l.name: l for l in lp.engine_layers}
    splits = load_data("resnet20", "digits", seed=0)
    x = torch.cat([a for a, _ in splits.test])[:2]
    passed = {}

    def engine(job):  # noqa: ANN001, ANN202
        g = eng[job.layer.name]
        if job.layer.engine == "dual":
            y, p = dual_layer(prog, g, {g.input: torch.from_numpy(job.x)}).golden(HW.fmt)
            passed.setdefault(g.name, []).append(p)
            return y
        cl = dataclasses.replace(conv_layer(prog, g), x=torch.from_numpy(job.x),
                                 residual=None if job.residual is None
                                 else torch.from_numpy(job.residual))
        return cl.golden(HW.fmt)

    acts = run_chain(dep, x, engine)
    env = prog.run_golden(x)
    for s in dep.steps:
        assert torch.equal(acts[s.output], env[s.output]), s.output
    for name, ps in passed.items():
        op = prog.op(name)
        _, gp = prog.dual_precision_acc(op, env[op.inputs[0]])
        assert np.array_equal(np.stack(ps), gp.numpy()), name
        assert 0 < gp.double().mean() < 1, name


def test_c_header_describes_cg_layers(cg_deploy, tmp_path):
    _, lp, path = cg_deploy
    text = (path / "model.h").read_text()
    assert "#define DYNACC_NUM_DUAL_LAYERS 9" in text and "DYNACC_DUAL_CG = 3," in text
    dep = load_deploy(path, images=False)
    for l in (l for l in dep.layers if l.engine == "dual"):
        d = l.descriptor
        row = (f"    {{{l.index}, 8, 8, 0, 3, {d['base_words']}, {d['chunk_tiles']}, "
               f"{l.cycles_msb}ULL, ")
        assert row in text, l.name
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "use.c"
    src.write_text(
        '#include "model.h"\n'
        "int main(void) {\n"
        "    uint64_t c = 0;\n"
        "    for (int i = 0; i < DYNACC_NUM_DUAL_LAYERS; i++) {\n"
        "        const dynacc_dual_layer_t *d = &dynacc_dual_layers[i];\n"
        "        if (d->mode != DYNACC_DUAL_CG || d->lsb_bits != 0) return 1;\n"
        "        /* p = input words / base words = tiles / chunk tiles */\n"
        "        c += dynacc_layers[d->layer].desc.in_words / d->base_words;\n"
        "        c += d->gate.size + d->cycles_msb + d->chunk_tiles;\n"
        "        c += dynacc_layer_engine[d->layer] == DYNACC_ENGINE_DUAL;\n"
        "    }\n"
        "    return (int)(c + DYNACC_GATE_WORD_BYTES) & 1;\n"
        "}\n")
    r = subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror",
                        "-fsyntax-only", "-I", str(path), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _set_engine_field(name: str, field: str, value):  # noqa: ANN001, ANN202
    def mutate(man):
        for s in man["steps"]:
            if "engine" in s and s["engine"]["name"] == name:
                s["engine"][field] = value
    return mutate


@pytest.mark.parametrize("field,value,match", [
    ("partitions", 2, r"descriptor field 'base_words' = 1 != 2 of partitions 2"),
    ("partitions", None, r"field 'partitions': .* got p = None"),
    ("msb_bits", 4, r"field 'msb_bits' = 4 must be null in dp_mode 'cg'"),
])
def test_bad_cg_manifest_fields(folder, field, value, match):
    name = "layer1.0.conv1"
    rewrite_manifest(folder, _set_engine_field(name, field, value))
    with pytest.raises(DeployError, match=rf"manifest.yaml: layer '{name}': {match}"):
        load_deploy(folder)


def test_partitions_array_must_match(folder):
    name = "layer2.1.conv1"

    def edit(arrays):
        arrays[f"{name}/partitions"] = arrays[f"{name}/partitions"] // 2
    rewrite_arrays(folder, edit)
    with pytest.raises(DeployError, match=rf"arrays.npz: '{name}/partitions' = \[2\] disagrees "
                                          r"with the manifest \(partitions 4\)"):
        load_deploy(folder, images=False)


def test_cli_exports_the_trained_cg_checkpoint_as_stored(tmp_path, capsys):
    """`--model cg_resnet20` is `--model resnet20 --checkpoint <its checkpoint> --hw dual`;
    the trained program is exported unchanged (not recalibrated)."""
    from dynacc.sw.deploy import main

    ckpt = gated_checkpoint("cg_resnet20")
    assert main(["--model", "cg_resnet20", "--out", str(tmp_path / "a")]) == 0
    cap = capsys.readouterr()
    assert "9 dual-precision" in cap.out and "exported as stored" in cap.err
    assert main(["--model", "resnet20", "--checkpoint", str(ckpt), "--hw",
                 str(REPO / "configs/hw/dual.yaml"), "--out", str(tmp_path / "b")]) == 0
    a, b = load_deploy(tmp_path / "a", "dual"), load_deploy(tmp_path / "b", "dual")
    assert a.manifest["model"] == "cg_resnet20" and b.manifest["model"] == "resnet20"
    assert set(a.arrays) == set(b.arrays)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=k)
    assert [l.dp_mode for l in a.layers if l.engine == "dual"] == ["cg"] * 9
