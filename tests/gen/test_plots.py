"""gen/plots.py: PNGs written and non-empty, report.md sections appended idempotently."""

from pathlib import Path

import pytest

from dynacc.gen.plots import (append_sections, layer_intensity, plots_markdown, update_report_md,
                              write_plots)

PNG = b"\x89PNG\r\n\x1a\n"


def _rep():
    hw = {"name": "default", "lanes": 16, "mantissa_bits": 8}
    layers = [
        {"name": "conv1", "kind": "conv", "in_channels": 147, "out_channels": 64,
         "in_hw": [112, 112], "out_hw": [112, 112], "kernel": 1, "stride": 1, "im2col": True,
         "residual": None, "macs": 118013952, "ideal_cycles": 460992, "cycles": 501773},
        {"name": "layer1.0.conv2", "kind": "conv", "in_channels": 64, "out_channels": 64,
         "in_hw": [56, 56], "out_hw": [56, 56], "kernel": 3, "stride": 1, "im2col": False,
         "residual": None, "macs": 115605504, "ideal_cycles": 451584, "cycles": 451597,
         "measured_cycles": 451597},
        {"name": "layer1.0.conv3", "kind": "conv", "in_channels": 64, "out_channels": 256,
         "in_hw": [56, 56], "out_hw": [56, 56], "kernel": 1, "stride": 1, "im2col": False,
         "residual": "layer1.0.downsample.0", "macs": 51380224, "ideal_cycles": 200704,
         "cycles": 200717},
        {"name": "fc", "kind": "linear", "in_channels": 2048, "out_channels": 1000,
         "in_hw": [1, 1], "out_hw": [1, 1], "kernel": 1, "stride": 1, "im2col": False,
         "residual": None, "macs": 2048000, "ideal_cycles": 8000, "cycles": 8077},
    ]
    return {"model": "resnet50", "hw": hw, "layers": layers,
            "totals": {"cycles": sum(l["cycles"] for l in layers),
                       "ideal_cycles": sum(l["ideal_cycles"] for l in layers),
                       "utilization": 0.95}}


def test_write_plots_creates_pngs(tmp_path):
    paths = write_plots(_rep(), tmp_path, fmax_mhz=120.0)
    assert [p.name for p in paths] == ["cycles.png", "utilization.png", "roofline.png"]
    for p in paths:
        assert p.parent == tmp_path and p.stat().st_size > 5000
        assert p.read_bytes()[:8] == PNG


def test_plots_are_byte_identical_on_rerun(tmp_path):
    a = write_plots(_rep(), tmp_path / "a", fmax_mhz=120.0)
    b = write_plots(_rep(), tmp_path / "b", fmax_mhz=120.0)
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()


def test_roofline_without_fmax(tmp_path):
    paths = write_plots(_rep(), tmp_path)
    assert (tmp_path / "roofline.png").stat().st_size > 0
    assert "target; no FPGA result" in plots_markdown(paths)


def test_layer_intensity():
    rep = _rep()
    fc = rep["layers"][3]
    macs, byts = layer_intensity(fc, 8)
    assert macs == 2048000 and byts == 2048000 + 2048 + 1000     # weights + in + out
    conv3 = rep["layers"][2]
    _, b = layer_intensity(conv3, 8)
    assert b == 64 * 256 + 64 * 56 * 56 + 2 * 256 * 56 * 56     # + the residual read
    _, b4 = layer_intensity(conv3, 4)
    assert b4 == pytest.approx(b / 2)


def test_append_sections_is_idempotent():
    md = "# report\n\ntext\n"
    once = append_sections(md, {"fpga": "## FPGA\n\nA", "plots": "## Plots\n\nB"})
    twice = append_sections(once, {"fpga": "## FPGA\n\nA2", "plots": "## Plots\n\nB"})
    assert twice.count("## FPGA") == 1 and twice.count("## Plots") == 1
    assert "A2" in twice and "\nA\n" not in twice
    assert twice.startswith("# report\n\ntext\n")


def test_update_report_md(tmp_path):
    rep = _rep()
    paths = update_report_md(tmp_path, rep)              # no report.md yet: made from rep
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# resnet50") and "## Plots" in md and "## FPGA" not in md
    for p in paths:
        assert f"]({Path(p).name})" in md
    fpga = {"ok": True, "device": "ecp5-85k", "datapath": "16x16", "pe": 256,
            "freq_target_mhz": 150.0, "seed": 1, "memories": "shallow", "dsp_lanes": 8,
            "hw": {"lanes": 16}, "luts": 1000, "ffs": 2000, "dsps": 134, "brams": 104,
            "available": {"luts": 83640, "ffs": 83640, "dsps": 156, "brams": 208},
            "fmax_mhz": 100.0, "peak_gmacs": 25.6, "timing_met": False, "critical_path": None,
            "memory_need": None, "performance": None, "times_s": {}, "runs": []}
    update_report_md(tmp_path, rep, fpga)
    md2 = (tmp_path / "report.md").read_text()
    assert md2.count("## Plots") == 1 and md2.count("## FPGA") == 1
    assert "100.0 MHz" in md2 and "misses" in md2
