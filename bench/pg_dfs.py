"""Precision Gating and Dynamic Fractional Skipping on digits: accuracy vs compute, and the
RTL speed-up of trained PG layers. Writes build/bench/pg_dfs.json (+ PNG plots).

* ``pg``: the digits ResNet-20 fine-tuned with PG for several (act_bits, msb_bits), each row
  ``{act_bits, msb_bits, acc, fp_acc, update_sparsity, avg_bits}`` (``acc``: integer golden
  model on the test split; sparsity and average bits from its gate outcomes).
* ``dfs``: DFS (options skip / 4 / 8 bits) trained to several target computation percentages,
  ``{target_cp, measured_cp, acc}`` of the integer golden model with the host gate, and
  ``skip_only`` (SkipNet-style skip / 8) for the same
  targets. ``dfs_vs_skip`` compares them at equal measured CP (linear interpolation of the
  skip-only curve at each DFS point). Target: DFS above skip-only.
* ``rtl_speedup``: every PG layer of the trained PG ResNet-20 (``make gen MODEL=pg_resnet20``'s
  model) on real test images, run on the dual-precision RTL in mode ``gated`` and ``full``
  (dense), both checked bit-exact (outputs, gate outcomes, cycles). ``theoretical`` = the work
  reduction from the measured gate outcomes (2 passes per output dense, 1 + passed fraction
  gated), ``measured`` = RTL cycles dense / gated. Target: ratio >= 0.9. The engine spends
  one pass per activation digit whatever its width, hence work in passes; the reduction in
  activation bit-operations (dense b bits, gated msb + (b - msb) x passed fraction) is
  reported next to it as ``theoretical_bitops``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

PG_CONFIGS = [(3, 2), (4, 2), (8, 4)]
DFS_TARGETS = [30.0, 50.0, 70.0]


def pg_section(epochs: int, seed: int) -> list[dict]:
    from dynacc.quant.train_pg import run_pg_sweep

    rows = run_pg_sweep(PG_CONFIGS, epochs=epochs, seed=seed, progress=True)
    for r in rows:
        print(f"PG a{r['act_bits']}/{r['msb_bits']}: acc {r['acc']:.2f} (FP {r['fp_acc']:.2f}), "
              f"update sparsity {r['update_sparsity']:.3f}, avg bits {r['avg_bits']:.2f}", flush=True)
    return rows


def _interp(points: list[tuple[float, float]], x: float, reach: float = 1.0) -> float | None:
    """Linear interpolation of ``points`` at ``x``; up to ``reach`` CP points beyond either end
    the end value is used, further out there is no comparison (None)."""
    pts = sorted(points)
    if not pts or x < pts[0][0] - reach or x > pts[-1][0] + reach:
        return None
    x = min(max(x, pts[0][0]), pts[-1][0])
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def dfs_section(epochs: int, seed: int) -> dict:
    from dynacc.quant.train_dfs import run_dfs_sweep

    out = {}
    for key, options in (("dfs", ("skip", 4, 8)), ("skip_only", ("skip", 8))):
        rows = run_dfs_sweep(DFS_TARGETS, options=options, epochs=epochs, seed=seed, golden=True)
        # acc / measured_cp: the integer golden model with the host gate (the deployable
        # network); the fake-quant training model's numbers are kept next to them
        out[key] = [{"target_cp": r["target_cp"], "measured_cp": r["golden_cp"],
                     "acc": r["golden_acc"], "fake_quant_cp": r["measured_cp"],
                     "fake_quant_acc": r["acc"], "cp_per_block": r.get("cp_per_block"),
                     "decision_agreement": r.get("decision_agreement")} for r in rows]
        for r in out[key]:
            print(f"{key:9s} target CP {r['target_cp']:5.1f}: measured CP {r['measured_cp']:5.1f}, "
                  f"acc {r['acc']:.2f}", flush=True)
    skip_pts = [(r["measured_cp"], r["acc"]) for r in out["skip_only"]]
    cmp = []
    for r in out["dfs"]:
        ref = _interp(skip_pts, r["measured_cp"])
        cmp.append({"measured_cp": r["measured_cp"], "dfs_acc": r["acc"], "skip_only_acc": ref,
                    "dfs_above": None if ref is None else r["acc"] >= ref})
    out["dfs_vs_skip"] = cmp
    judged = [c["dfs_above"] for c in cmp if c["dfs_above"] is not None]
    out["dfs_above_skip_only"] = bool(judged) and all(judged)
    return out


def rtl_speedup_section(images: int) -> dict:
    from dynacc.gen.engine_layers import dual_layer
    from dynacc.gen.gated_models import gated_checkpoint
    from dynacc.gen.layer_program import build_layer_program
    from dynacc.hw.config import load_named
    from dynacc.hw.cycles import dual_conv_work
    from dynacc.quant.checkpoint import load_checkpoint
    from dynacc.quant.flow import load_data
    from dynacc.sim.dual import check_dual_result, run_dual_layers

    import torch

    hw = load_named("dual")
    program = load_checkpoint(gated_checkpoint("pg_resnet20")).program
    splits = load_data("resnet20", "digits", seed=0)
    x = torch.stack([splits.test.dataset[i][0] for i in range(images)])
    env = program.run_golden(x)
    shapes = {n: tuple(t.shape[1:]) for n, t in env.items()}
    lp = build_layer_program("pg_resnet20", program, shapes, hw)
    dual = [l for l in lp.engine_layers if l.engine == "dual"]
    pairs = []
    for i in range(images):
        acts = {n: t[i] for n, t in env.items()}
        for l in dual:
            g = dual_layer(program, l, acts)
            g = dataclasses.replace(g, name=f"img{i}/{l.name}")
            pairs.append((g, dataclasses.replace(g, name=g.name + "/full", mode="full")))
    t0 = time.perf_counter()
    results = run_dual_layers([layer for p in pairs for layer in p], hw)
    rows = []
    work_dense = work_gated = cyc_dense = cyc_gated = bits_dense = bits_gated = 0.0
    for j, (g, f) in enumerate(pairs):
        rg, rf = results[2 * j], results[2 * j + 1]
        check_dual_result(g, rg, hw)
        check_dual_result(f, rf, hw)
        o = g.out_channels
        ho, wo = g.out_size
        n_pass = int(rg.passed.sum())
        wd = dual_conv_work(out_channels=o, out_height=ho, out_width=wo, mode="full")
        wg = dual_conv_work(out_channels=o, out_height=ho, out_width=wo, mode="gated", passed=n_pass)
        outputs = o * ho * wo
        work_dense += wd * outputs
        work_gated += wg * outputs
        bits_dense += g.act_bits * outputs
        bits_gated += (g.msb_bits + g.lsb_bits * n_pass / outputs) * outputs
        cyc_dense += rf.cycles
        cyc_gated += rg.cycles
        rows.append({"layer": g.name, "passed_fraction": n_pass / outputs,
                     "cycles_dense": rf.cycles, "cycles_gated": rg.cycles,
                     "theoretical": wd / wg, "measured": rf.cycles / rg.cycles,
                     "ratio": (rf.cycles / rg.cycles) / (wd / wg)})
        print(f"{g.name:28s} passed {n_pass / outputs:6.3f}  theoretical {wd / wg:5.3f}  "
              f"measured {rf.cycles / rg.cycles:5.3f}  bit-exact", flush=True)
    theoretical = work_dense / work_gated
    measured = cyc_dense / cyc_gated
    return {"images": images, "layers": rows, "theoretical": theoretical, "measured": measured,
            "theoretical_bitops": bits_dense / bits_gated,
            "act_bits": dual[0].act_bits, "msb_bits": dual[0].msb_bits,
            "ratio": measured / theoretical, "min_layer_ratio": min(r["ratio"] for r in rows),
            "sim_wall_s": round(time.perf_counter() - t0, 1)}


def plots(res: dict, out_dir: Path) -> list[str]:
    """accuracy-vs-compute and theoretical-vs-measured speed-up per PG layer (gen/plots.py)."""
    from dynacc.gen.plots import plot_accuracy_vs_compute, plot_speedups

    paths = []
    if res.get("pg") or res.get("dfs"):
        paths.append(str(plot_accuracy_vs_compute(res, out_dir / "pg_dfs_accuracy_vs_compute.png")))
    if res.get("rtl_speedup"):
        r = res["rtl_speedup"]
        paths.append(str(plot_speedups(
            r["layers"], out_dir / "pg_rtl_speedup.png",
            f"PG layers on the dual-precision RTL: measured / theoretical = {r['ratio']:.3f}")))
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="pg,dfs,rtl_speedup",
                   help="comma-separated sections to run (default: %(default)s)")
    p.add_argument("--pg-epochs", type=int, default=3)
    p.add_argument("--dfs-epochs", type=int, default=4)
    p.add_argument("--images", type=int, default=2, help="test images for rtl_speedup")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    wanted = set(args.sections.split(","))
    t0 = time.perf_counter()
    res: dict = {}
    if "pg" in wanted:
        res["pg"] = pg_section(args.pg_epochs, args.seed)
    if "dfs" in wanted:
        res["dfs"] = dfs_section(args.dfs_epochs, args.seed)
    if "rtl_speedup" in wanted:
        res["rtl_speedup"] = rtl_speedup_section(args.images)
        r = res["rtl_speedup"]
        print(f"rtl_speedup: theoretical {r['theoretical']:.3f}, measured {r['measured']:.3f}, "
              f"ratio {r['ratio']:.3f} (target >= 0.9)")
    out_dir = Path("build/bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    res["plots"] = plots(res, out_dir)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    path = write_result("pg_dfs.json", res)
    if "dfs" in res:
        print(f"DFS above skip-only at equal CP: {res['dfs']['dfs_above_skip_only']}")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
