"""``make gen MODEL=fusion_net``: the digits-trained predicted FusioNet (cached in build/cache,
trained on first use) on the fused-block engine: program.json with the three fused blocks and
their exact cycles, the constants a board loads, both engines' Verilog, a deterministic report,
and clean errors for a bad checkpoint. The evaluation runs on a few test images
(``fused_gen.TEST_IMAGES``; ``make gen`` runs the whole split)."""

import json
from pathlib import Path

import numpy as np
import pytest

from dynacc.gen import fused_gen
from dynacc.gen.cli import main as gen_main
from dynacc.hw.config import load_named
from dynacc.hw.cycles import conv_cycles
from dynacc.hw.fused_config import FusedConfig
from dynacc.hw.fused_engine import FusedEngine, fused_desc_layout
from dynacc.hw.fused_program import FusedLayer, FusedProgram, fusion_network_cycles
from dynacc.sim.memfile import read_mem

IMAGES = 40
CFG = FusedConfig()
NO_RTL = "model,calibrate,evaluate,layer_program,report"
MEMS = ("pred", "t", "lane")


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_fused")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_gen, "TEST_IMAGES", IMAGES)
        st = fused_gen.run(fused_gen.FusedGenOptions(model="fusion_net", hw=load_named("default"),
                                                     out_dir=root / "fusion_net"))
    return root, st


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _program(out: Path) -> dict:
    return json.loads((out / "program.json").read_text())


def _units(prog: dict) -> list[dict]:
    return [s["engine"] for s in prog["steps"]
            if "engine" in s and s["engine"]["engine"] == "fused"]


def test_output_files(fused):
    root, st = fused
    out = root / "fusion_net"
    files = set(_tree_bytes(out))
    assert {"program.json", "report.json", "report.md", "hw.yaml", "block_cycles.png",
            "rtl/fused_engine.v", "rtl/fused_engine.component.json", "rtl/conv_engine.v",
            "rtl/conv_engine.component.json"} <= files
    for b in range(3):
        assert {f"blocks/units.{b}/{m}" for m in ("pred.mem", "t.mem", "lane.mem", "desc.json")
                } <= files
    assert "module fused_engine" in (out / "rtl/fused_engine.v").read_text()
    assert "module conv_engine" in (out / "rtl/conv_engine.v").read_text()
    assert [p.name for p in root.iterdir()] == ["fusion_net"]    # no temporary folder left
    assert list(st.timings) == [n for n, _ in fused_gen.STEPS]


def test_program_lists_the_fused_blocks_with_their_exact_cycles(fused):
    root, st = fused
    prog = _program(root / "fusion_net")
    kinds = [(next(iter(s)), next(iter(s.values()))["name"]) for s in prog["steps"]]
    assert kinds == [("host", "input"), ("engine", "stem"), ("host", "stem.repack"),
                     ("engine", "units.0"), ("engine", "units.1"), ("engine", "units.2"),
                     ("host", "units.2.repack"), ("engine", "head"), ("host", "avgpool"),
                     ("host", "fc")]
    assert prog["fused"]["lanes"] == CFG.lanes and prog["hw"]["name"] == "default"
    x = next(iter(st.splits.test))[0][:IMAGES]
    ref = fusion_network_cycles(st.program, [x], CFG)
    units = _units(prog)
    assert len(units) == 3
    for b, (u, r) in enumerate(zip(units, ref["blocks"])):
        blk = st.program.blocks[b]
        assert u["name"] == r["name"] == f"units.{b}"
        assert u["cycles"] == r["cycles"] and u["cycles_images"] == IMAGES
        assert u["geometry"] == r["geometry"]
        assert (u["in_lsb"], u["out_lsb"]) == (blk.x_lsb, st.program.block_lsb[b])
        assert u["desc_packed"] == int(fused_desc_layout(CFG).const(u["desc"]).as_bits())
        assert u["cycles_dense"] > u["cycles"] > 0
    assert sum(u["cycles"] for u in units) == pytest.approx(ref["cycles"])
    eng = {s["engine"]["name"]: s["engine"] for s in prog["steps"] if "engine" in s}
    stem, head = eng["stem"], eng["head"]
    assert stem["im2col"] and stem["in_channels"] == 9 and stem["kernel"] == 1
    assert head["groups"] == 4 and head["engine"] == "conv"
    for l in (stem, head):
        assert l["cycles"] == conv_cycles(load_named("default"), in_channels=l["in_channels"],
                                          out_channels=l["out_channels"],
                                          out_height=l["out_height"], out_width=l["out_width"],
                                          kernel_h=l["kernel"], kernel_w=l["kernel"])


def test_block_constants_reread_equal_the_host_program(fused):
    root, st = fused
    out = root / "fusion_net"
    layouts = FusedEngine.layouts(CFG)
    for b, u in enumerate(_units(_program(out))):
        blk = st.program.blocks[b]
        x = np.zeros((blk.in_ch, u["height"], u["width"]), dtype=np.int64)
        fp = FusedProgram(FusedLayer(u["name"], blk, x, st.program.block_lsb[b]), CFG)
        imgs = fp.images()
        for mem in MEMS:
            path = out / u["files"][mem]
            assert len(path.read_text().splitlines()) == u["words"][mem] == len(imgs[mem])
            assert np.array_equal(read_mem(path, layouts[mem]), imgs[mem])
        desc = json.loads((out / u["files"]["desc"]).read_text())
        assert desc["desc"] == fp.desc == u["desc"] and desc["packed"] == u["desc_packed"]


def test_report_compares_fused_and_unfused(fused):
    root, _ = fused
    out = root / "fusion_net"
    md = (out / "report.md").read_text()
    rep = json.loads((out / "report.json").read_text())
    assert "| units.0 | fused |" in md and "| head | conv (groups 4) |" in md
    assert "![block_cycles](block_cycles.png)" in md
    assert "256 MACs/cycle" in md and "72 A adders" in md and "64 multipliers" in md
    assert f"the first {IMAGES} of the 450" in md
    assert (out / "block_cycles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    t = rep["totals"]
    assert t["cycles_fused_network"] == pytest.approx(sum(l["cycles"] for l in rep["layers"]))
    assert t["cycles_dense_network"] > t["cycles_fused_network"]
    assert t["block_mult_reduction"] > 6 and 50 < rep["accuracy"] <= 100
    assert len(rep["masks"]) == 3 and all(0 < m["s1_density"] < 1 for m in rep["masks"])


def test_rerun_from_the_command_line_is_byte_identical(fused, tmp_path, capsys, monkeypatch):
    root, _ = fused
    monkeypatch.setattr(fused_gen, "TEST_IMAGES", IMAGES)
    again = tmp_path / "fusion_net"
    assert gen_main(["--model", "fusion_net", "--out", str(again), "--steps", NO_RTL]) == 0
    assert "fusion_net: 3 fused blocks + 2 conv layers" in capsys.readouterr().out
    a, b = _tree_bytes(root / "fusion_net"), _tree_bytes(again)
    assert set(b) == {k for k in a if not k.startswith("rtl/")}
    assert all(a[k] == b[k] for k in b)


def test_bad_checkpoint_is_a_clean_error(tmp_path, capsys):
    import torch

    from dynacc.quant.checkpoint import save_checkpoint
    from dynacc.quant.models import build_model

    plain = tmp_path / "plain.pt"
    kw = {"num_classes": 10, "in_channels": 1}
    torch.manual_seed(0)
    save_checkpoint(plain, "digits_net", kw, build_model("digits_net", **kw))
    for ck, why in ((plain, "not a fusion checkpoint"),
                    (tmp_path / "missing.pt", "does not exist")):
        out = tmp_path / "out" / "fusion_net"
        assert gen_main(["--model", "fusion_net", "--checkpoint", str(ck), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(ck) in err and why in err
        # the failure is recorded; the folder was replaced in one move, nothing half-written
        assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
        rep = json.loads((out / "report.json").read_text())
        assert rep["failed"]["step"] == "model" and str(ck) in rep["failed"]["error"]
        assert [p.name for p in out.parent.iterdir()] == ["fusion_net"]


def test_cli_lists_fusion_net_and_refuses_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gen_main(["--help"])
    assert "fusion_net" in capsys.readouterr().out
    assert gen_main(["--model", "fusion_nett", "--out", str(tmp_path / "x")]) == 2
    assert "fusion_net" in capsys.readouterr().err
    assert gen_main(["--model", "fusion_net", "--method", "kl", "--out", str(tmp_path / "x")]) == 2
    assert "max rule" in capsys.readouterr().err
    assert gen_main(["--model", "fusion_net", "--steps", "report",
                     "--out", str(tmp_path / "x")]) == 2
    assert "needs step 'layer_program'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
