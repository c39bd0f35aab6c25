"""Precision Gating, Channel Gating and FBS speed-ups of the dual-precision engine, measured
on the RTL.

PG (``--techniques pg``): random 3×3 layers (C = 16 / 32, digits ResNet-20 map sizes) on the
4-lane ``dual`` engine, each run twice in one Verilator simulation: mode ``full`` (dense: both
passes for every output) and mode ``gated`` with thresholds set for pass fractions 0.1 / 0.3 /
0.5. Theoretical speed-up ``work(full) / work(gated) = 2 / (1 + f)``.

CG (``cg``): the same shapes with p = 2 / 4 partitions at pass fractions 0.1 / 0.3 / 0.5
against the dense single-pass conv of the same tensors (mode ``fbs``, every channel active,
scale 1); theoretical speed-up ``1 / (1/p + (1 - 1/p) f)``.

FBS (``fbs``): dense layers (C = O = 32 / 64) compacted at densities 0.25 / 0.5 / 0.75 of the
input and output channels, against the dense layer (every channel active); theoretical
speed-up = dense MACs / compacted MACs.

Every run is checked bit-exact (outputs and gate outcomes) and against the cycle model.
Reported per layer: theoretical (:func:`dynacc.hw.cycles.dual_conv_work`) and measured
(cycles) speed-ups and their ratio. Writes build/bench/dual_speedup.json (PG rows under
``layers``, CG and FBS under ``cg`` / ``fbs``).
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
from dynacc.sim.dual import check_dual_result, run_dual_layers, run_fbs_cases  # noqa: E402
from dynacc.sim.dual_layers import (random_cg_layer, random_dual_layer,  # noqa: E402
                                    random_fbs_dense)

#: (channels in = out, map size)
SHAPES = [(16, 16), (16, 8), (32, 8)]
FRACTIONS = [0.1, 0.3, 0.5]
#: Channel Gating partitions
PARTITIONS = [2, 4]
#: FBS: (channels in = out, map size) and densities (inputs and outputs)
FBS_SHAPES = [(32, 16), (32, 8), (64, 8)]
DENSITIES = [0.25, 0.5, 0.75]
TECHNIQUES = ("pg", "cg", "fbs")


def _summary(rows: list[dict]) -> dict:
    return {"layers": rows, "min_ratio": min(r["ratio"] for r in rows),
            "mean_ratio": sum(r["ratio"] for r in rows) / len(rows)}


def _print(name: str, what: str, base: int, run: int, theory: float, measured: float) -> None:
    print(f"{name:22s} {what}  cycles dense {base:>7,d} run {run:>7,d}  speed-up theoretical "
          f"{theory:5.3f} measured {measured:5.3f}  ratio {measured / theory:6.1%}  bit-exact",
          flush=True)


def pg_summary(cfg, fractions: list[float]) -> dict:
    """Precision Gating: ``gated`` vs ``full`` of the same layer."""
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
    return _summary(rows)


def cg_rows(cfg, fractions: list[float]) -> list[dict]:
    """CG layers vs the dense single-pass conv of the same tensors."""
    layers, dense = [], []
    for i, (c, hw) in enumerate(SHAPES):
        for p in PARTITIONS:
            for f in fractions:
                layers.append(random_cg_layer(f"cg_c{c}_{hw}x{hw}_p{p}_f{f}", cfg.fmt, c=c, o=c,
                                              h=hw, w=hw, k=3, padding=1, partitions=p,
                                              pass_fraction=f, seed=100 + i))
        d = dataclasses.replace(layers[-1], name=f"dense_c{c}_{hw}x{hw}", mode="fbs",
                                threshold=None, sign=None, partitions=None, scale=1,
                                scale_lsb=0)
        assert (d.golden(cfg.fmt)[0] == d.conv_layer().golden(cfg.fmt)).all()
        dense.append(d)
    results = run_dual_layers(layers + dense, cfg)
    base = {}
    for layer, r in zip(layers + dense, results):
        check_dual_result(layer, r, cfg)
        if layer.mode == "fbs":
            base[layer.conv_layer().shape_kwargs()["in_channels"],
                 layer.out_size] = r.cycles
    rows = []
    for layer, r in zip(layers, results):
        o = layer.out_channels
        ho, wo = layer.out_size
        n_pass = int(r.passed.sum())
        c = layer.conv_layer().in_channels
        dense_cycles = base[c, (ho, wo)]
        theory = 1.0 / dual_conv_work(out_channels=o, out_height=ho, out_width=wo, mode="cg",
                                      passed=n_pass, partitions=layer.partitions)
        measured = dense_cycles / r.cycles
        rows.append({"name": layer.name, "in_channels": c, "out_channels": o,
                     "out_size": [ho, wo], "partitions": layer.partitions,
                     "pass_fraction": n_pass / r.passed.size, "cycles_dense": dense_cycles,
                     "cycles_cg": r.cycles, "theoretical_speedup": theory,
                     "measured_speedup": measured, "ratio": measured / theory,
                     "bit_exact": True})
        _print(layer.name, f"pass {n_pass / r.passed.size:5.3f}", dense_cycles, r.cycles,
               theory, measured)
    return rows


def fbs_rows(cfg, densities: list[float]) -> list[dict]:
    """Compacted FBS layers vs the dense layer (every channel active)."""
    cases, dense_names = [], {}
    seed = 200
    for c, hw in FBS_SHAPES:
        for d in [1.0] + densities:
            seed += 1
            name = f"fbs_c{c}_{hw}x{hw}_d{d}"
            cases.append(random_fbs_dense(name, cfg.fmt, c=c, o=c, h=hw, w=hw, k=3, padding=1,
                                          density_in=d, density_out=d, seed=seed))
            if d == 1.0:
                dense_names[c, hw] = name
    runs = {r.name: r for r in run_fbs_cases([d.case(cfg.fmt) for d in cases], cfg)}
    rows = []
    for d in cases:
        c, hw = d.x.shape[0], d.x.shape[1]
        if d.name == dense_names[c, hw]:
            continue
        r, base = runs[d.name].result, runs[dense_names[c, hw]].result.cycles
        ci, co = int(d.active_in.sum()), int(d.active_out.sum())
        theory = 1.0 / dual_conv_work(out_channels=co, out_height=hw, out_width=hw,
                                      mode="fbs", in_channels=ci, dense_in_channels=c,
                                      dense_out_channels=c)
        measured = base / r.cycles
        rows.append({"name": d.name, "in_channels": c, "out_channels": c, "out_size": [hw, hw],
                     "active_in": ci, "active_out": co, "cycles_dense": base,
                     "cycles_fbs": r.cycles, "theoretical_speedup": theory,
                     "measured_speedup": measured, "ratio": measured / theory,
                     "bit_exact": True})
        _print(d.name, f"{ci:2d}/{c} in {co:2d}/{c} out", base, r.cycles, theory, measured)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="dual", help="hardware config (default: %(default)s)")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                   help="comma-separated target pass fractions (default: %(default)s)")
    p.add_argument("--densities", default=",".join(map(str, DENSITIES)),
                   help="comma-separated FBS channel densities (default: %(default)s)")
    p.add_argument("--techniques", default=",".join(TECHNIQUES),
                   help="comma-separated subset of pg,cg,fbs (default: %(default)s)")
    args = p.parse_args()
    cfg = load_named(args.config)
    fractions = [float(f) for f in args.fractions.split(",")]
    techniques = args.techniques.split(",")
    bad = sorted(set(techniques) - set(TECHNIQUES))
    if bad:
        p.error(f"unknown technique(s) {bad}: choose from {TECHNIQUES}")
    t0 = time.perf_counter()
    out = {"config": cfg.to_dict()}
    if "pg" in techniques:
        out.update(pg_summary(cfg, fractions))
    if "cg" in techniques:
        out["cg"] = _summary(cg_rows(cfg, fractions))
    if "fbs" in techniques:
        out["fbs"] = _summary(fbs_rows(cfg, [float(d) for d in args.densities.split(",")]))
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    path = write_result("dual_speedup.json", out)
    for t, sec in (("PG", out), ("CG", out.get("cg")), ("FBS", out.get("fbs"))):
        if sec and "min_ratio" in sec:
            print(f"{t}: measured / theoretical speed-up: min {sec['min_ratio']:.1%}, mean "
                  f"{sec['mean_ratio']:.1%}")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
