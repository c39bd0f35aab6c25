"""Throughput scaling with the PE array on an ECP5: yosys + nextpnr per array size.

For each hardware config (default: configs/hw/pe4.yaml, pe8.yaml, default.yaml = 4×4, 8×8,
16×16 lanes, everything else equal): LUTs, FFs, DSPs, block RAMs, Fmax and peak GMAC/s
(K² × Fmax), plus the tools' wall time. Smallest first, and the JSON is rewritten after every
size, so a long 16×16 run never loses the smaller results. Runs are cached in
build/cache/fpga (shared with ``python -m dynacc.gen.fpga``). Optionally (``--components``)
the engine's components one at a time between registers: where the critical paths are.
Then (``--datapaths``, default ``dual,fused``) the other datapaths ``make gen`` generates:
the dual-precision engine of configs/hw/dual.yaml and the fused-block engine, each with its
ports behind flip-flops (``gen.fpga.datapath_flow``); their rows carry ``engine`` and follow
the conv-engine rows.

Writes build/bench/fpga.json: a list of {datapath, pe, luts, ffs, dsps, brams, fmax_mhz,
peak_gmacs, ...}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from dynacc.gen.fpga import (DATAPATHS, DEVICES, MEMORY_MODES, FpgaOptions,  # noqa: E402
                             component_flow, datapath_flow, engine_components, run_flow)
from dynacc.hw.config import HwConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("datapath", "pe", "luts", "ffs", "dsps", "brams", "fmax_mhz", "peak_gmacs")


#: hardware config of each other datapath's row
DATAPATH_HW = {"dual": "configs/hw/dual.yaml", "fused": "configs/hw/default.yaml"}


def _row(cfg_path: str, r: dict) -> dict:
    row = {k: r.get(k) for k in KEYS}
    row.update({
        "engine": r.get("engine", "conv"),
        "config": cfg_path, "ok": r["ok"], "device": r["device"], "memories": r["memories"],
        "dsp_lanes": r.get("dsp_lanes"), "freq_target_mhz": r["freq_target_mhz"],
        "speed_grade": r.get("speed_grade"), "seed": r.get("seed"), "timing_met": r["timing_met"],
        "yosys_s": r["times_s"].get("yosys"), "nextpnr_s": r["times_s"].get("nextpnr-ecp5"),
        "cached": r.get("cached", False), "does_not_fit": r.get("does_not_fit", False),
        "critical_path": (r.get("critical_path") or {}).get("components"),
        "critical_path_ns": (r.get("critical_path") or {}).get("delay_ns"),
        "late_endpoints": (r.get("late_endpoints") or {}).get("endpoints"),
        "bram_need_full_depth": (r.get("memory_need") or {}).get("total_brams"),
        "errors": [x["stderr_tail"][-600:] for x in r["runs"] if x.get("stderr_tail")],
    })
    return row


def _fmt(v, spec: str = ",") -> str:
    return "–" if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'config':<26} {'array':>6} {'MAC/cyc':>7} {'LUT4':>8} {'FF':>8} {'DSP':>5} "
          f"{'BRAM':>5} {'Fmax MHz':>9} {'GMAC/s':>7} {'late':>5} {'synth s':>8} {'P&R s':>7}  "
          "critical path")
    for r in rows:
        name = Path(r["config"]).name if r["engine"] == "conv" else f"{r['engine']} engine"
        print(f"{name:<26} {r['datapath']:>6} {r['pe']:>7} {_fmt(r['luts']):>8} "
              f"{_fmt(r['ffs']):>8} {_fmt(r['dsps']):>5} {_fmt(r['brams']):>5} "
              f"{_fmt(r['fmax_mhz'], '.1f'):>9} {_fmt(r['peak_gmacs'], '.2f'):>7} "
              f"{_fmt(r.get('late_endpoints')):>5} {_fmt(r['yosys_s'], '.0f'):>8} "
              f"{_fmt(r['nextpnr_s'], '.0f'):>7}  "
              f"{' → '.join(r['critical_path'] or []) or ('FAILED' if not r['ok'] else '')}")
    ok = [r for r in rows if r["fmax_mhz"] and r["engine"] == "conv"]
    if len(ok) > 1:
        base = ok[0]
        print("\nratios vs " + base["datapath"] + ": " + ", ".join(
            f"{r['datapath']}: {r['pe'] / base['pe']:.0f}× PEs, {r['luts'] / base['luts']:.1f}× LUTs, "
            f"{r['fmax_mhz'] / base['fmax_mhz']:.2f}× Fmax, {r['peak_gmacs'] / base['peak_gmacs']:.1f}× GMAC/s"
            for r in ok[1:]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="configs/hw/pe4.yaml,configs/hw/pe8.yaml,configs/hw/default.yaml",
                   help="comma-separated hardware configs, smallest first (default: %(default)s)")
    p.add_argument("--device", default="ecp5-85k", choices=sorted(DEVICES))
    p.add_argument("--freq", type=float, default=150.0, help="target MHz (default: %(default)s)")
    p.add_argument("--speed", type=int, default=6, choices=[6, 7, 8])
    p.add_argument("--memories", default="auto", choices=MEMORY_MODES,
                   help="memories around the engine (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=7200.0, help="per tool run, s (default: %(default)s)")
    p.add_argument("--components", action="store_true",
                   help="also time each engine component of the last config between registers")
    p.add_argument("--datapaths", default=",".join(DATAPATHS),
                   help="other datapaths after the conv engine sizes, or 'none' (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1,
                   help="nextpnr placement seed (default: %(default)s); Fmax moves with it")
    p.add_argument("--timing-weight", type=int, default=FpgaOptions.timing_weight,
                   help="nextpnr placer timing weight (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true")
    args = p.parse_args()
    opts = FpgaOptions(device=args.device, freq_mhz=args.freq, memories=args.memories,
                       speed=args.speed, timeout_s=args.timeout, seed=args.seed,
                       timing_weight=args.timing_weight,
                       cache_dir=None if args.no_cache else ROOT / "build/cache/fpga")
    t0 = time.perf_counter()
    rows: list[dict] = []
    comps: list[dict] = []
    cfgs = [c for c in args.configs.split(",") if c]
    for c in cfgs:
        cfg = HwConfig.from_yaml(ROOT / c if not Path(c).is_absolute() else c)
        print(f"== {c}: {cfg.lanes}×{cfg.lanes} lanes ...", flush=True)
        r = run_flow(cfg, opts)
        rows.append(_row(c, r))
        print(f"   {'ok' if r['ok'] else 'FAILED'}: LUT {r['luts']}, FF {r['ffs']}, DSP {r['dsps']}, "
              f"BRAM {r['brams']}, Fmax {r['fmax_mhz']} MHz, peak {r['peak_gmacs']} GMAC/s "
              f"(yosys {r['times_s'].get('yosys')} s, nextpnr {r['times_s'].get('nextpnr-ecp5')} s"
              f"{', cached' if r.get('cached') else ''})", flush=True)
        write_result("fpga.json", rows)
    for name in [d for d in args.datapaths.split(",") if d and d != "none"]:
        cfg = HwConfig.from_yaml(ROOT / DATAPATH_HW[name])
        print(f"== {name} engine ...", flush=True)
        r = datapath_flow(name, cfg, opts)
        rows.append(_row(DATAPATH_HW[name], r))
        print(f"   {'ok' if r['ok'] else 'FAILED'}: LUT {r['luts']}, FF {r['ffs']}, DSP {r['dsps']}, "
              f"Fmax {r['fmax_mhz']} MHz{', cached' if r.get('cached') else ''}", flush=True)
        write_result("fpga.json", rows)
    if args.components and cfgs:
        cfg = HwConfig.from_yaml(ROOT / cfgs[-1])
        print(f"\n== components of {cfgs[-1]}, each between registers:")
        for name in engine_components(cfg):
            r = component_flow(cfg, name, opts)
            cp = r.get("critical_path") or {}
            comps.append({"component": name, "ok": r["ok"], "luts": r["luts"], "ffs": r["ffs"],
                          "dsps": r["dsps"], "fmax_mhz": r["fmax_mhz"],
                          "critical_path": [cp.get("start_cell"), cp.get("end_cell")],
                          "critical_path_ns": cp.get("delay_ns"), "notes": r.get("notes", [])})
            print(f"   {name:<8} Fmax {_fmt(r['fmax_mhz'], '.1f'):>6} MHz  LUT {_fmt(r['luts']):>6} "
                  f"DSP {_fmt(r['dsps']):>3}  {cp.get('start_cell')} → {cp.get('end_cell')}",
                  flush=True)
        write_result("fpga_components.json", {"config": cfgs[-1], "components": comps})
    print_table(rows)
    print(f"\nwall {time.perf_counter() - t0:.0f} s; build/bench/fpga.json")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
