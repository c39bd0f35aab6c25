"""Co-simulation speed of the default conv engine on a real ResNet-50 layer: the layer runs
with the memories preloaded while Python awaits only ``done`` (cocotb's C clock), side by side
with the same engine and layer driven cycle by cycle from Python (a cocotb coroutine that
awaits every rising edge). Cycles per wall second of the RTL run (start -> done); the
one-off costs (simulator launch, memory files, build) are reported separately.
Writes build/bench/sim_speed.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from dynacc.hw.config import load_named  # noqa: E402
from dynacc.sim.conv import build_engine, check_conv_output, run_conv_layers  # noqa: E402
from dynacc.sim.layers import resnet50_layer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="default", help="hardware config (default: %(default)s)")
    p.add_argument("--layer", default="conv2_3x3", help="ResNet-50 layer (default: %(default)s)")
    p.add_argument("--crop", type=int, default=None, help="crop the layer's input")
    p.add_argument("--repeats", type=int, default=3, help="fast runs (default: %(default)s)")
    args = p.parse_args()
    cfg = load_named(args.config)
    t0 = time.perf_counter()
    sim = build_engine(cfg)
    t_build = time.perf_counter() - t0
    layer = resnet50_layer(args.layer, cfg.fmt, crop=args.crop)
    expected = layer.golden(cfg.fmt)

    t0 = time.perf_counter()
    fast = run_conv_layers([layer] * args.repeats, cfg, clock="gpi")
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = run_conv_layers([layer], cfg, clock="edges")
    t_slow = time.perf_counter() - t0
    for r in fast + slow:
        check_conv_output(layer.name, r.out, expected)
    cycles = fast[0].cycles
    assert all(r.cycles == cycles for r in fast + slow)
    rate = statistics.median(cycles / r.wall_s for r in fast)
    base = slow[0].cycles / slow[0].wall_s
    out = {
        "config": cfg.name, "layer": layer.name, "cycles": cycles,
        "cycles_per_s": rate, "baseline_cycles_per_s": base, "speedup": rate / base,
        "fast_runs_cycles_per_s": [cycles / r.wall_s for r in fast],
        "fast_process_wall_s": round(t_fast, 2), "baseline_process_wall_s": round(t_slow, 2),
        "build_s": round(sim.build_seconds if not sim.cached else t_build, 2),
        "build_cached": sim.cached,
    }
    path = write_result("sim_speed.json", out)
    print(f"{layer.name}: {cycles:,d} cycles; preloaded + await done: {rate:,.0f} cycles/s, "
          f"per-edge Python: {base:,.0f} cycles/s, speedup {rate / base:.1f}x -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
