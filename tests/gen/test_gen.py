"""The generator: layer-program mapping, clear mapping errors, deterministic atomic output."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dynacc.gen.cli import main as gen_main
from dynacc.gen.layer_program import MappingError, build_layer_program
from dynacc.gen.pipeline import GenOptions, run
from dynacc.hw.config import HwConfig, load_named
from dynacc.hw.cycles import conv_cycles
from dynacc.quant.calibrate import calibrate
from dynacc.quant.data import random_images
from dynacc.quant.formats import QuantConfig
from dynacc.quant.models import build_model

HW = load_named("default")


def _calibrated(name, shape, num_classes=10, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes, in_channels=shape[0])
    model.train()
    with torch.no_grad():
        model(random_images(4, shape, seed=1))
    shapes = {}
    prog = calibrate(model.eval(), [random_images(2, shape, seed=2)], QuantConfig(method="max"),
                     progress=False, shapes=shapes)
    return prog, shapes


@pytest.fixture(scope="module")
def resnet50_small():
    # ResNet-50 at 64×64: every layer type of the 224 network, much cheaper to calibrate
    return _calibrated("resnet50", (3, 64, 64), num_classes=1000)


def test_resnet50_maps_with_stem_im2col_and_fused_adds(resnet50_small):
    prog, shapes = resnet50_small
    lp = build_layer_program("resnet50", prog, shapes, HW)
    eng = lp.engine_layers
    assert len(eng) == 54
    stem = eng[0]
    assert stem.im2col and stem.in_channels == 147 and stem.kernel == 1
    assert sum(1 for l in eng if l.residual) == 16
    assert [s.kind for s in lp.steps if not hasattr(s, "macs")] == [
        "quantize_input", "maxpool", "avgpool", "flatten"]
    for l in eng:
        assert l.cycles == conv_cycles(HW, in_channels=l.in_channels, out_channels=l.out_channels,
                                       out_height=l.out_height, out_width=l.out_width,
                                       kernel_h=l.kernel, kernel_w=l.kernel)
        assert l.ideal_cycles <= l.cycles
    body = [l for l in eng if not l.im2col and l.kind == "conv"]
    assert min(l.utilization for l in body) > 0.95


def test_mapping_error_names_the_layer(resnet50_small):
    prog, shapes = resnet50_small
    narrow = dataclasses.replace(HW, name="narrow", max_in_channels=512)
    with pytest.raises(MappingError, match=r"layer 'layer3\.1\.conv1'.*in_channels = 1024"):
        build_layer_program("resnet50", prog, shapes, narrow)
    m6 = dataclasses.replace(HW, name="m6", mantissa_bits=6)
    with pytest.raises(MappingError, match="M=8.*mantissa_bits=6"):
        build_layer_program("resnet50", prog, shapes, m6)


def test_depthwise_runs_as_block_diagonal_dense():
    prog, shapes = _calibrated("mobilenet_v2", (3, 32, 32))
    hw = dataclasses.replace(HW, name="big", wgt_depth=1 << 16)
    lp = build_layer_program("mobilenet_v2", prog, shapes, hw)
    dw = [l for l in lp.engine_layers if l.groups > 1]
    assert dw and all(l.groups == l.in_channels for l in dw)
    assert all(l.utilization < 0.1 for l in dw)  # honest: depthwise wastes the lanes
    with pytest.raises(MappingError, match="weight words"):
        build_layer_program("mobilenet_v2", prog, shapes, HW)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_pipeline_is_deterministic_and_atomic(tmp_path):
    opts = GenOptions(model="digits_net", hw=HW, out_dir=tmp_path / "a", calib_images=2)
    run(opts)
    run(dataclasses.replace(opts, out_dir=tmp_path / "b"))
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert set(a) >= {"program.json", "report.json", "report.md", "rtl/conv_engine.v",
                      "rtl/conv_engine.component.json", "calibrated.pt", "hw.yaml",
                      "cycles.png", "utilization.png", "roofline.png"}
    assert a["cycles.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert b"![roofline](roofline.png)" in a["report.md"]
    assert a == b
    rep = json.loads(a["report.json"])
    assert rep["totals"]["engine_layers"] == 4 and rep["layers"][0]["macs"] > 0
    # a failing step is raised, and recorded in the report next to the earlier steps'
    # outputs; the folder is replaced in one move and no temporary folder stays behind
    bad = dataclasses.replace(opts, hw=dataclasses.replace(HW, name="narrow", max_in_channels=8))
    with pytest.raises(MappingError):
        run(bad)
    failed = _tree_bytes(tmp_path / "a")
    assert set(failed) == {"calibrated.pt", "report.json", "report.md"}
    rep = json.loads(failed["report.json"])
    assert rep["failed"]["step"] == "layer_program"
    assert "max_in_channels" in rep["failed"]["error"] or "8" in rep["failed"]["error"]
    assert rep["failed"]["completed_steps"] == ["model", "calibrate"]
    assert b"Step **layer_program** failed" in failed["report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_cli_errors_are_clear(tmp_path, capsys):
    assert gen_main(["--model", "resnet51", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model 'resnet51'" in capsys.readouterr().err
    assert gen_main(["--model", "digits_net", "--hw", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_roofline_uses_the_fmax_of_an_earlier_fpga_run_of_the_same_hw(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    fd = {"hw": HW.to_dict(), "fmax_mhz": 77.7, "ok": True, "datapath": "4x4", "pe": 16,
          "device": "ecp5-85k", "freq_target_mhz": 150.0, "speed_grade": 6, "seed": 1,
          "dsp_lanes": 4, "memories": "shallow", "timing_met": False, "peak_gmacs": 1.24,
          "luts": 1000, "ffs": 500, "dsps": 16, "brams": 8, "available": {}, "runs": []}
    (out / "fpga.json").write_text(json.dumps(fd))
    run(GenOptions(model="digits_net", hw=HW, out_dir=out, calib_images=1))
    md = (out / "report.md").read_text()
    assert "77.7 MHz (nextpnr Fmax)" in md
    assert json.loads((out / "fpga.json").read_text())["fmax_mhz"] == 77.7
    # another hardware config's result is not used
    other = dataclasses.replace(HW, name="other", lanes=HW.lanes * 2)
    (out / "fpga.json").write_text(json.dumps(dict(fd, hw=other.to_dict())))
    run(GenOptions(model="digits_net", hw=HW, out_dir=out, calib_images=1))
    assert "(target; no FPGA result)" in (out / "report.md").read_text()
