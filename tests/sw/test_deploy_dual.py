"""Deploy export of a Precision Gating program: dual-precision layers carry the dual engine's
memory images (with the gate memory), descriptor and gate arrays; the reader round-trips and
validates them; the C header describes them; the CLI exports a trained PG checkpoint as
stored."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dynacc.gen.engine_layers import dual_layer
from dynacc.hw.config import load_named
from dynacc.hw.dual_program import MODE_CODES
from dynacc.hw.dual_sequencer import dual_desc_layout
from dynacc.quant.data import random_images
from dynacc.sw import fileformat as ff
from dynacc.sw.export import export_program
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


_gen_dual = _load_test_module("_test_gen_dual", HERE.parent / "gen" / "test_gen_dual.py")
_reader = _load_test_module("_test_deploy_reader", HERE / "test_deploy_reader.py")
rewrite_manifest, rewrite_arrays = _reader.rewrite_manifest, _reader.rewrite_arrays


@pytest.fixture(scope="module")
def pg_deploy(tmp_path_factory):
    """The hand-gated resnet20 of tests/gen/test_gen_dual.py, exported for the dual config."""
    prog, shapes = _gen_dual._gated_program()
    path = tmp_path_factory.mktemp("deploy") / "pg"
    lp = export_program(path, prog, shapes, HW, model="resnet20", dataset="digits",
                        source={"random_weights": True, "seed": 0})
    return prog, shapes, lp, path


@pytest.fixture
def folder(pg_deploy, tmp_path) -> Path:
    dst = tmp_path / "dep"
    shutil.copytree(pg_deploy[3], dst)
    return dst


def _dual_name(root: Path) -> str:
    man = yaml.safe_load((root / ff.MANIFEST).read_text())
    return next(s["engine"]["name"] for s in man["steps"]
                if "engine" in s and s["engine"]["engine"] == "dual")


def test_dual_layers_round_trip(pg_deploy):
    prog, _, lp, path = pg_deploy
    dep = load_deploy(path, "dual")
    eng = {l.name: l for l in lp.engine_layers}
    duals = [l for l in dep.layers if l.engine == "dual"]
    assert [l.name for l in duals] == [l.name for l in lp.engine_layers if l.engine == "dual"]
    assert len(duals) == 9 and any(l.engine == "conv" for l in dep.layers)
    for l in duals:
        op = prog.op(l.name)
        dp = dual_layer(prog, eng[l.name]).program(HW)
        a = dep.arrays
        np.testing.assert_array_equal(a[f"{l.name}/threshold"], op.dp_threshold.numpy())
        np.testing.assert_array_equal(a[f"{l.name}/sign"], op.dp_sign.numpy())
        assert a[f"{l.name}/sign"].dtype == np.int8
        assert a[f"{l.name}/act_bits"].tolist() == [op.dp_act_bits] == [l.act_bits]
        assert a[f"{l.name}/msb_bits"].tolist() == [op.dp_msb_bits] == [l.msb_bits]
        assert a[f"{l.name}/mode"].tolist() == [MODE_CODES["gated"]]
        assert (l.dp_mode, l.cycles, l.cycles_msb) == ("gated", eng[l.name].cycles,
                                                       eng[l.name].cycles_msb)
        imgs = dp.images()
        assert set(l.memories) == {"wgt", "align", "bias", "quant", "gate"}
        for m in l.memories:
            np.testing.assert_array_equal(dep.images[l.name][m], imgs[m], err_msg=f"{l.name}/{m}")
        assert l.descriptor == dp.desc and "residual" not in l.descriptor
        assert l.descriptor_bits == int(dual_desc_layout(HW).const(dp.desc).as_bits())
    man = dep.manifest
    assert list(man["blobs"]) == ["wgt", "align", "bias", "quant", "gate"]
    gate = (path / "gate.bin").read_bytes()
    assert len(gate) == man["blobs"]["gate"]["size"] == sum(
        l.memories["gate"]["size"] for l in duals)
    for s in man["steps"]:
        if "engine" in s:
            assert s["engine"]["engine"] in ("conv", "dual")


def test_dual_export_is_deterministic(pg_deploy, tmp_path):
    prog, shapes, _, path = pg_deploy
    export_program(tmp_path / "again", prog, shapes, HW, model="resnet20", dataset="digits",
                   source={"random_weights": True, "seed": 0})
    for p in sorted(path.rglob("*")):
        if p.is_file():
            assert p.read_bytes() == (tmp_path / "again" / p.relative_to(path)).read_bytes(), p


def test_chain_with_dual_layers_equals_golden(pg_deploy):
    """Host steps from the deploy folder; conv layers and dual layers answered by the golden
    model of their engine: every tensor equals program.run_golden."""
    from dynacc.gen.engine_layers import conv_layer

    prog, _, lp, path = pg_deploy
    dep = load_deploy(path, images=False)
    eng = {l.name: l for l in lp.engine_layers}
    x = random_images(2, (1, 16, 16), seed=11)

    def engine(job):
        g = eng[job.layer.name]
        if job.layer.engine == "dual":
            return dual_layer(prog, g, {g.input: torch.from_numpy(job.x)}).golden(HW.fmt)[0]
        cl = dataclasses.replace(conv_layer(prog, g), x=torch.from_numpy(job.x),
                                 residual=None if job.residual is None
                                 else torch.from_numpy(job.residual))
        return cl.golden(HW.fmt)

    acts = run_chain(dep, x, engine)
    env = prog.run_golden(x)
    for s in dep.steps:
        assert torch.equal(acts[s.output], env[s.output]), s.output


def test_c_header_describes_dual_layers(pg_deploy, tmp_path):
    path = pg_deploy[3]
    text = (path / "model.h").read_text()
    assert "#define DYNACC_NUM_DUAL_LAYERS 9" in text and "DYNACC_GATE_BIN" in text
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
        "        c += d->gate.size + d->lsb_bits + d->cycles_msb;\n"
        "        c += dynacc_layers[d->layer].cycles;\n"
        "        c += dynacc_layer_engine[d->layer] == DYNACC_ENGINE_DUAL;\n"
        "        c += d->mode == DYNACC_DUAL_GATED;\n"
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
    ("act_bits", 9, r"field 'act_bits' = 9 must be an integer in \[2, 8\]"),
    ("msb_bits", 3, r"field 'msb_bits' = 3 must be an integer in \[1, act_bits - 1 = 2\]"),
    ("dp_mode", "half", r"field 'dp_mode' = 'half' must be one of"),
    ("engine", "tpu", r"field 'engine' = 'tpu' must be one of"),
    ("residual", "add", r"field 'residual' = 'add': the dual-precision engine has no fused"),
])
def test_bad_dual_manifest_fields(folder, field, value, match):
    name = _dual_name(folder)
    rewrite_manifest(folder, _set_engine_field(name, field, value))
    with pytest.raises(DeployError, match=rf"manifest.yaml: layer '{name}': {match}"):
        load_deploy(folder)


def test_dual_layer_without_gate_memory(folder):
    name = _dual_name(folder)

    def drop(man):
        for s in man["steps"]:
            if "engine" in s and s["engine"]["name"] == name:
                s["engine"]["memories"].pop("gate")
    rewrite_manifest(folder, drop)
    with pytest.raises(DeployError, match=rf"layer '{name}': field 'memories' lists .*"
                                          r"an engine: dual layer has"):
        load_deploy(folder)


def test_descriptor_mode_must_match(folder):
    name = _dual_name(folder)

    def mutate(man):
        for s in man["steps"]:
            if "engine" in s and s["engine"]["name"] == name:
                s["engine"]["dp_mode"] = "full"
    rewrite_manifest(folder, mutate)
    with pytest.raises(DeployError, match=rf"layer '{name}': descriptor field 'mode' = 0 != "
                                          r"code 2 of dp_mode 'full'"):
        load_deploy(folder)


@pytest.mark.parametrize("key,mutate,match", [
    ("threshold", lambda a: a[:3], r"'{n}/threshold' has shape \(3,\), expected \(16,\)"),
    ("threshold", lambda a: a + (1 << 45), r"'{n}/threshold' holds threshold \d+ outside"),
    ("sign", lambda a: a * 0, r"'{n}/sign' holds \[0\]: a gate sign is \+1 or -1"),
    ("act_bits", lambda a: a + 1, r"'{n}/act_bits' = \[4\] disagrees with the manifest "
                                  r"\(act_bits 3\)"),
    ("mode", lambda a: a + 1, r"'{n}/mode' = \[1\] disagrees with the manifest \(mode 0, "
                              r"dp_mode 'gated'\)"),
])
def test_bad_dual_arrays(folder, key, mutate, match):
    name = _dual_name(folder)

    def edit(arrays):
        arrays[f"{name}/{key}"] = mutate(arrays[f"{name}/{key}"])
    rewrite_arrays(folder, edit)
    with pytest.raises(DeployError, match=r"arrays.npz: " + match.replace("{n}", name)):
        load_deploy(folder, images=False)


def test_gate_words_must_match_the_thresholds(folder):
    name = _dual_name(folder)

    def edit(arrays):
        arrays[f"{name}/threshold"] = arrays[f"{name}/threshold"] + 1
    rewrite_arrays(folder, edit)
    load_deploy(folder, images=False)        # the arrays alone are consistent
    with pytest.raises(DeployError, match=rf"gate.mem: gate words of layer '{name}' disagree "
                                          rf"with {name}/threshold"):
        load_deploy(folder)


def test_cli_exports_the_trained_pg_checkpoint_as_stored(tmp_path, capsys):
    """`--model pg_resnet20` is `--model resnet20 --checkpoint <its checkpoint> --hw dual`;
    the trained program is exported unchanged (not recalibrated)."""
    from dynacc.gen.gated_models import gated_checkpoint
    from dynacc.quant.checkpoint import load_checkpoint
    from dynacc.sw.deploy import main

    ckpt = gated_checkpoint("pg_resnet20")
    assert main(["--model", "pg_resnet20", "--out", str(tmp_path / "a")]) == 0
    cap = capsys.readouterr()
    assert "9 dual-precision" in cap.out and "exported as stored" in cap.err
    assert main(["--model", "resnet20", "--checkpoint", str(ckpt), "--hw",
                 str(REPO / "configs/hw/dual.yaml"), "--out", str(tmp_path / "b")]) == 0
    a, b = load_deploy(tmp_path / "a", "dual"), load_deploy(tmp_path / "b", "dual")
    assert a.manifest["model"] == "pg_resnet20" and b.manifest["model"] == "resnet20"
    assert a.manifest["source"] == b.manifest["source"]
    assert set(a.arrays) == set(b.arrays)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=k)
    prog = load_checkpoint(ckpt).program
    for l in a.layers:
        op = prog.op(l.name)
        np.testing.assert_array_equal(a.arrays[f"{l.name}/weight"], op.weight.numpy())
        if l.engine == "dual":
            np.testing.assert_array_equal(a.arrays[f"{l.name}/threshold"],
                                          op.dp_threshold.numpy())
    assert sum(l.engine == "dual" for l in a.layers) == 9
