"""Deploy export: round trip, determinism, atomicity, memory words, C header, host chaining."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dynacc.gen.engine_layers import conv_layer
from dynacc.gen.layer_program import EngineLayer
from dynacc.hw.config import load_named
from dynacc.sim.memfile import pack_words
from dynacc.sw import fileformat as ff
from dynacc.sw.export import export_program
from dynacc.sw.reader import DeployLayer, load_deploy
from dynacc.sw.runtime import act_image, run_chain, unpack_output

HW = load_named("default")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_round_trip_arrays_and_images(resnet20_deploy):
    e = resnet20_deploy
    dep = load_deploy(e.path, HW)
    prog, lp = e.program, e.layer_program
    assert [l.name for l in dep.layers] == [l.name for l in lp.engine_layers]
    assert [s.name for s in dep.steps] == [s.name for s in lp.steps]
    for l, g in zip(dep.layers, lp.engine_layers):
        op = prog.op(l.name)
        a = dep.arrays
        assert a[f"{l.name}/weight"].dtype == np.int8
        np.testing.assert_array_equal(a[f"{l.name}/weight"], op.weight.numpy())
        np.testing.assert_array_equal(a[f"{l.name}/block_exp"], op.block_exp.numpy())
        np.testing.assert_array_equal(a[f"{l.name}/align_shift"], op.shift.numpy())
        np.testing.assert_array_equal(a[f"{l.name}/bias"], op.bias.numpy())
        np.testing.assert_array_equal(a[f"{l.name}/acc_lsb"], op.acc_lsb.numpy())
        np.testing.assert_array_equal(a[f"{l.name}/out_lsb"], prog.lsb[l.output].numpy())
        np.testing.assert_array_equal(dep.w_lsb(l.name), op.w_lsb.numpy())
        cp = conv_layer(prog, g).program(HW)
        for j, s in enumerate(("acc", "res", "out")):
            np.testing.assert_array_equal(a[f"{l.name}/shift_{s}"], cp.shifts[:, j].numpy())
        imgs = cp.images()
        for m in ff.WEIGHT_MEMORIES:
            np.testing.assert_array_equal(dep.images[l.name][m], imgs[m], err_msg=f"{l.name}/{m}")
        assert l.descriptor == cp.desc
        assert (l.cycles, l.ideal_cycles, l.residual, l.in_lsb, l.out_lsb) == \
            (g.cycles, g.ideal_cycles, g.residual, g.in_lsb, g.out_lsb)
        assert l.files["wgt"].is_file()
    for t, lsb in prog.lsb.items():
        np.testing.assert_array_equal(dep.arrays[f"{t}/lsb"], lsb.numpy())
        assert dep.tensors[t]["exponent"] == int(lsb[0]) + prog.fmt.lsb_offset
    assert any(l.residual for l in dep.layers) and dep.layers[0].im2col
    assert dep.manifest["bfp"]["rounding"] == "half-to-even"
    assert dep.manifest["bfp"]["saturation"] == {"min": -127, "max": 127}


def test_bin_blobs_hold_the_mem_words(resnet20_deploy):
    dep = load_deploy(resnet20_deploy.path)
    for m in ff.WEIGHT_MEMORIES:
        blob = (dep.path / ff.bin_name(m)).read_bytes()
        lay = ff.layout_of(m, HW)
        assert len(blob) == dep.manifest["blobs"][m]["size"]
        pos = 0
        for l in dep.layers:
            ref = l.memories[m]
            assert ref["offset"] == pos
            words = ff.bytes_to_bits(blob[pos:pos + ref["size"]], lay.size)
            np.testing.assert_array_equal(words, pack_words(dep.images[l.name][m], lay))
            pos += ref["size"]
        assert pos == len(blob)


def test_export_is_deterministic(resnet20_deploy, tmp_path):
    e = resnet20_deploy
    export_program(tmp_path / "again", e.program, e.shapes, HW, model="resnet20",
                   dataset="digits", source={"random_weights": True, "seed": 0})
    a, b = _files(e.path), _files(tmp_path / "again")
    assert list(a) == list(b)
    for k in a:
        assert a[k] == b[k], f"{k} differs between two exports"


@pytest.mark.parametrize("stage", ["layer:layer2.0.conv1", "arrays", "header", "manifest"])
def test_failed_export_leaves_nothing_and_keeps_the_old_folder(resnet20_deploy, tmp_path, stage):
    e = resnet20_deploy

    def hook(where: str) -> None:
        if where == stage:
            raise RuntimeError(f"injected failure at {where}")

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="injected failure"):
        export_program(fresh, e.program, e.shapes, HW, model="resnet20", _hook=hook)
    assert not fresh.exists()
    assert list(tmp_path.iterdir()) == []          # no temporary folder left behind

    old = tmp_path / "old"
    shutil.copytree(e.path, old)
    before = _files(old)
    with pytest.raises(RuntimeError, match="injected failure"):
        export_program(old, e.program, e.shapes, HW, model="resnet20", _hook=hook)
    assert _files(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_act_words_and_output_unpacking_match_the_engine_program(resnet20_deploy):
    e = resnet20_deploy
    dep = load_deploy(e.path, images=False)
    g = next(l for l in e.layer_program.engine_layers if l.residual and l.tiles > 1)
    rng = np.random.default_rng(0)
    x = rng.integers(-127, 128, (g.in_channels, g.height, g.width))
    r = rng.integers(-127, 128, (g.out_channels, g.out_height, g.out_width))
    cl = dataclasses.replace(conv_layer(e.program, g), x=torch.from_numpy(x),
                             residual=torch.from_numpy(r))
    cp = cl.program(HW)
    imgs = cp.images()
    np.testing.assert_array_equal(act_image(x, HW.lanes), imgs["act"])
    np.testing.assert_array_equal(act_image(r, HW.lanes), imgs["res"])
    words = rng.integers(-127, 128, (cp.out_words, HW.lanes))
    np.testing.assert_array_equal(unpack_output(words, dep.layer(g.name), HW.lanes),
                                  cp.unpack_output(words))


def test_chain_from_the_deploy_folder_equals_golden(resnet20_deploy):
    """Host steps from the deploy folder, engine layers by the golden model: every tensor
    equals program.run_golden (the RTL bench uses the same chain)."""
    e = resnet20_deploy
    dep = load_deploy(e.path, images=False)
    eng = {l.name: l for l in e.layer_program.engine_layers}
    seen: list[tuple[str, int]] = []

    def engine(job):
        assert isinstance(job.layer, DeployLayer)
        seen.append((job.layer.name, job.image))
        cl = dataclasses.replace(
            conv_layer(e.program, eng[job.layer.name]), x=torch.from_numpy(job.x),
            residual=None if job.residual is None else torch.from_numpy(job.residual))
        return cl.golden(HW.fmt)

    acts = run_chain(dep, e.images, engine)
    env = e.program.run_golden(e.images)
    for s in dep.steps:
        assert torch.equal(acts[s.output], env[s.output]), s.output
    n = len(e.images)
    assert seen == [(l.name, i) for l in dep.layers for i in range(n)]   # layer-major


def test_c_header_compiles(resnet20_deploy, tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "use.c"
    src.write_text(
        '#include "model.h"\n'
        "int main(void) {\n"
        "    uint64_t c = 0;\n"
        "    for (int i = 0; i < DYNACC_NUM_LAYERS; i++)\n"
        "        c += dynacc_layers[i].cycles + dynacc_layers[i].wgt.size + dynacc_layers[i].desc.in_words;\n"
        "    for (int i = 0; i < DYNACC_NUM_STEPS; i++) c += dynacc_steps[i].inputs[0];\n"
        "    return (int)(c + dynacc_tensors[DYNACC_OUTPUT_TENSOR].c + DYNACC_WGT_WORD_BYTES) & 1;\n"
        "}\n")
    for std in ("c99", "c11"):
        r = subprocess.run([cc, f"-std={std}", "-Wall", "-Wextra", "-pedantic", "-Werror",
                            "-fsyntax-only", "-I", str(resnet20_deploy.path), str(src)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([cc, "-std=c99", "-Wall", "-Werror", "-fsyntax-only", "-x", "c",
                        str(resnet20_deploy.path / "model.h")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = (resnet20_deploy.path / "model.h").read_text()
    n = len(resnet20_deploy.layer_program.engine_layers)
    assert f"#define DYNACC_NUM_LAYERS {n}" in text and "#define DYNACC_LANES 16" in text


def test_engine_layer_fields_are_in_the_manifest(resnet20_deploy):
    dep = load_deploy(resnet20_deploy.path, images=False)
    fields = {f.name for f in dataclasses.fields(EngineLayer)}
    for s in dep.manifest["steps"]:
        if "engine" in s:
            assert fields <= set(s["engine"]), fields - set(s["engine"])
