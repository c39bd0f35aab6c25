"""Precision Gating speed-up of the dual-precision engine, measured on the RTL.

Random 3×3 layers (C = 16 / 32, digits ResNet-20 map sizes) on the 4-lane ``dual`` engine,
each run twice in one Verilator simulation: mode ``full`` (dense: both passes for every
output) and mode ``gated`` with thresholds set for pass fractions 0.1 / 0.3 / 0.5. Both runs
are checked bit-exact (outputs and gate outcomes) and against the cycle model. Reported per
layer: the pass fraction, theoretical speed-up ``work(full) / work(gated) = 2 / (1 + f)``
(:func:`dynacc.hw.cycles.dual_conv_work`), measured speed-up ``cycles(full) / cycles(gated)``
and their ratio. Writes build/bench/dual_speedup.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from dynacc.hw.config import load_named  # noqa: E402
from dynacc.hw.cycles import dual_conv_work  # noqa: E402
from dynacc.sim.dual import check_dual_result, run_dual_layers  # noqa: E402
from dynacc.sim.dual_layers import random_dual_layer  # noqa: E402

#: (channels in = out, map size)
SHAPES = [(16, 16), (16, 8), (32, 8)]
FRACTIONS = [0.1, 0.3, 0.5]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="dual", help="hardware config (default: %(default)s)")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                   help="comma-separated target pass fractions (default: %(default)s)")
    args = p.parse_args()
    cfg = load_named(args.config)
    fractions = [float(f) for f in args.fractions.split(",")]
    t0 = time.perf_counter()
    pairs = []
    seed = 0
    for c, hw in SHAPES:
        for f in fractions:
            seed += 1
            gated = random_dual_layer(f"c{c}_{hw}x{hw}_f{f}", cfg.fmt, c=c, o=c, h=hw, w=hw,
                                      k=3, padding=1, mode="gated", pass_fraction=f, seed=seed)
            full = dataclasses.replace(gated, name=gated.name + "_full", mode="full")
            pairs.append((gated, full))
    layers = [layer for pair in pairs for layer in pair]
    results = run_dual_layers(layers, cfg)
    rows = []
    for i, (gated, full) in enumerate(pairs):
        rg, rf = results[2 * i], results[2 * i + 1]
        check_dual_result(gated, rg, cfg)
        check_dual_result(full, rf, cfg)
        o = gated.out_channels
        ho, wo = gated.out_size
        n_pass = int(rg.passed.sum())
        frac = n_pass / rg.passed.size
        theory = (dual_conv_work(out_channels=o, out_height=ho, out_width=wo, mode="full")
                  / dual_conv_work(out_channels=o, out_height=ho, out_width=wo, mode="gated",
                                   passed=n_pass))
        measured = rf.cycles / rg.cycles
        rows.append({"name": gated.name, "in_channels": gated.conv_layer().in_channels,
                     "out_channels": o, "out_size": [ho, wo], "pass_fraction": frac,
                     "cycles_full": rf.cycles, "cycles_gated": rg.cycles,
                     "theoretical_speedup": theory, "measured_speedup": measured,
                     "ratio": measured / theory, "bit_exact": True})
        print(f"{gated.name:18s} pass {frac:5.3f}  cycles full {rf.cycles:>7,d} gated "
              f"{rg.cycles:>7,d}  speed-up theoretical {theory:5.3f} measured {measured:5.3f}"
              f"  ratio {measured / theory:6.1%}  bit-exact", flush=True)
    out = {"config": cfg.to_dict(), "layers": rows,
           "min_ratio": min(r["ratio"] for r in rows),
           "mean_ratio": sum(r["ratio"] for r in rows) / len(rows),
           "wall_s": round(time.perf_counter() - t0, 1)}
    path = write_result("dual_speedup.json", out)
    print(f"measured / theoretical speed-up: min {out['min_ratio']:.1%}, mean "
          f"{out['mean_ratio']:.1%} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
