"""Channel Gating and Feature Boosting & Suppression on digits: accuracy vs compute, and the
RTL speed-up of trained layers. Writes build/bench/cg_fbs.json (+ PNG plots).

* ``cg``: the digits ResNet-20 fine-tuned with Channel Gating for p = 2 and 4 partitions,
  ``{partitions, acc, fp_acc, flop_reduction, sparsity}`` (``acc``: integer golden model on
  the test split; sparsity and FLOP reduction of the whole network from its gate outcomes).
* ``fbs``: the digits ``fbs_cnn`` fine-tuned with FBS down a density schedule,
  ``{density, acc, fp_acc, mac_reduction, predictor_macs}`` (integer golden model with the
  host predictor; MACs at the realised decisions).
* ``rtl_speedup``: a list with one row per method, ``{method, theoretical, measured, ratio}``.
  ``cg``: every CG layer of ``make gen MODEL=cg_resnet20``'s model on real test images, on the
  dual-precision RTL in mode ``cg`` and with every output passing (the dense conv on the same
  engine), both bit-exact; ``theoretical`` = dense work / CG work from the measured gate
  outcomes (``1/p + (1 - 1/p) * passed fraction``), ``measured`` = RTL cycles dense / CG.
  ``fbs``: every FBS conv of ``fbs_cnn`` at the sweep's middle density on real test images,
  host-compacted (active input and output channels only) vs the whole layer, both on the RTL and
  bit-exact; ``theoretical`` = dense MACs / active MACs. Target: ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, write_result  # noqa: E402

CG_PARTITIONS = [2, 4]
FBS_DENSITIES = [1.0, 0.75, 0.5, 0.375]


def cg_section(seed: int) -> list[dict]:
    from dynacc.quant.train_cg import run_cg_sweep

    rows = run_cg_sweep(CG_PARTITIONS, seed=seed, progress=True, details=True)
    for r in rows:
        print(f"CG p={r['partitions']}: acc {r['acc']:.2f} (FP {r['fp_acc']:.2f}), sparsity "
              f"{r['sparsity']:.3f}, FLOP reduction {r['flop_reduction']:.2f}x", flush=True)
    return rows


def fbs_section(seed: int) -> list[dict]:
    from dynacc.quant.train_fbs import run_fbs_sweep

    rows = run_fbs_sweep(FBS_DENSITIES, seed=seed, progress=True, details=True)
    for r in rows:
        print(f"FBS d={r['density']:.3f}: acc {r['acc']:.2f} (FP {r['fp_acc']:.2f}), MAC "
              f"reduction {r['mac_reduction']:.2f}x", flush=True)
    return rows


def _test_images(model: str, images: int):
    import torch

    from dynacc.quant.flow import load_data

    splits = load_data(model, "digits", seed=0)
    return torch.stack([splits.test.dataset[i][0] for i in range(images)])


def _all_pass(layer):
    """The same CG layer with a threshold every output passes: the dense conv (each MAC once)
    on the same engine."""
    import numpy as np

    from dynacc.sim.dual_layers import gate_values

    v = gate_values(layer)                      # sign * acc_base, [O, Ho, Wo]
    thr = v.reshape(v.shape[0], -1).min(axis=1) - 1
    return dataclasses.replace(layer, name=layer.name + "/dense", threshold=thr,
                               sign=np.ones_like(thr))


def cg_rtl(images: int) -> dict:
    from dynacc.gen.engine_layers import dual_layer
    from dynacc.gen.gated_models import gated_checkpoint
    from dynacc.gen.layer_program import build_layer_program
    from dynacc.hw.config import load_named
    from dynacc.hw.cycles import dual_conv_work
    from dynacc.quant.checkpoint import load_checkpoint
    from dynacc.sim.dual import check_dual_result, run_dual_layers

    hw = load_named("dual")
    program = load_checkpoint(gated_checkpoint("cg_resnet20")).program
    x = _test_images("resnet20", images)
    env = program.run_golden(x)
    shapes = {n: tuple(t.shape[1:]) for n, t in env.items()}
    lp = build_layer_program("cg_resnet20", program, shapes, hw)
    cg = [l for l in lp.engine_layers if l.engine == "dual"]
    pairs = []
    for i in range(images):
        acts = {n: t[i] for n, t in env.items()}
        for l in cg:
            g = dataclasses.replace(dual_layer(program, l, acts), name=f"img{i}/{l.name}")
            pairs.append((g, _all_pass(g)))
    t0 = time.perf_counter()
    results = run_dual_layers([layer for p in pairs for layer in p], hw)
    rows, work_dense, work_cg, cyc_dense, cyc_cg = [], 0.0, 0.0, 0, 0
    for j, (g, d) in enumerate(pairs):
        rg, rd = results[2 * j], results[2 * j + 1]
        check_dual_result(g, rg, hw)
        check_dual_result(d, rd, hw)
        ho, wo = g.out_size
        outputs = g.out_channels * ho * wo
        n_pass = int(rg.passed.sum())
        wg = dual_conv_work(out_channels=g.out_channels, out_height=ho, out_width=wo, mode="cg",
                            passed=n_pass, partitions=g.partitions)
        work_dense += outputs
        work_cg += wg * outputs
        cyc_dense += rd.cycles
        cyc_cg += rg.cycles
        rows.append({"layer": g.name, "passed_fraction": n_pass / outputs,
                     "cycles_dense": rd.cycles, "cycles_gated": rg.cycles,
                     "theoretical": 1.0 / wg, "measured": rd.cycles / rg.cycles,
                     "ratio": (rd.cycles / rg.cycles) * wg})
        print(f"CG  {g.name:26s} passed {n_pass / outputs:6.3f}  theoretical {1 / wg:5.3f}  "
              f"measured {rd.cycles / rg.cycles:5.3f}  bit-exact", flush=True)
    theoretical, measured = work_dense / work_cg, cyc_dense / cyc_cg
    return {"method": "cg", "theoretical": theoretical, "measured": measured,
            "ratio": measured / theoretical, "min_layer_ratio": min(r["ratio"] for r in rows),
            "images": images, "partitions": pairs[0][0].partitions, "layers": rows,
            "sim_wall_s": round(time.perf_counter() - t0, 1)}


def fbs_rtl(images: int, density: float) -> dict:
    import numpy as np

    from dynacc.gen.gated_models import gated_checkpoint
    from dynacc.hw.config import load_named
    from dynacc.quant.fbs_program import fbs_layer_cases, fbs_model_from_checkpoint
    from dynacc.sim.dual import run_fbs_cases

    hw = load_named("dual")
    _, fp, _ = fbs_model_from_checkpoint(gated_checkpoint("fbs_net"))
    fp = fp.with_density(density)
    x = _test_images("fbs_cnn", images)
    cases, dense = [], []
    for i in range(images):
        for c in fbs_layer_cases(fp, x[i]):
            c = {**c, "name": f"img{i}/{c['name']}"}
            cases.append(c)
            # the whole layer: every channel read and computed (inactive inputs are zeros)
            d = {k: v for k, v in c.items() if k != "expected"}
            d["name"] = c["name"] + "/dense"
            d["active_in"] = np.ones(len(c["active_in"]), dtype=bool)
            d["active_out"] = np.ones(len(c["active_out"]), dtype=bool)
            dense.append(d)
    t0 = time.perf_counter()
    runs = run_fbs_cases(cases + dense, hw)
    gated, full = runs[:len(cases)], runs[len(cases):]
    rows, mac_dense, mac_fbs, cyc_dense, cyc_fbs = [], 0.0, 0.0, 0, 0
    for c, rg, rd in zip(cases, gated, full):
        o, cin = len(c["active_out"]), len(c["active_in"])
        a_in, a_out = int(np.asarray(c["active_in"]).sum()), int(np.asarray(c["active_out"]).sum())
        ho, wo = rd.out.shape[1:]
        taps = int(np.prod(np.shape(c["w"])[2:])) * ho * wo
        md, mf = cin * o * taps, a_in * a_out * taps    # MACs of the layer, dense / active
        fbs_cycles = rg.result.cycles if rg.result is not None else 0
        mac_dense += md
        mac_fbs += mf
        cyc_dense += rd.result.cycles
        cyc_fbs += fbs_cycles
        rows.append({"layer": c["name"], "active_in": a_in, "active_out": a_out,
                     "cycles_dense": rd.result.cycles, "cycles_gated": fbs_cycles,
                     "theoretical": md / max(mf, 1), "measured": rd.result.cycles / max(fbs_cycles, 1)})
        print(f"FBS {c['name']:26s} in {a_in:2d}/{cin:2d} out {a_out:2d}/{o:2d}  theoretical "
              f"{md / max(mf, 1):5.2f}  measured {rd.result.cycles / max(fbs_cycles, 1):5.2f}  "
              "bit-exact", flush=True)
    theoretical, measured = mac_dense / mac_fbs, cyc_dense / cyc_fbs
    return {"method": "fbs", "theoretical": theoretical, "measured": measured,
            "ratio": measured / theoretical, "density": density, "images": images,
            "layers": rows, "sim_wall_s": round(time.perf_counter() - t0, 1)}


def plots(res: dict, out_dir: Path) -> list[str]:
    """Per-layer theoretical vs measured speed-ups on the RTL (gen/plots.py)."""
    from dynacc.gen.plots import plot_speedups

    paths = []
    for r in res.get("rtl_speedup", []):
        if r["method"] == "cg":
            paths.append(str(plot_speedups(
                r["layers"], out_dir / "cg_rtl_speedup.png",
                f"CG layers on the dual-precision RTL: measured / theoretical = {r['ratio']:.3f}")))
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="cg,fbs,rtl_speedup",
                   help="comma-separated sections to run (default: %(default)s)")
    p.add_argument("--images", type=int, default=2, help="test images for rtl_speedup")
    p.add_argument("--fbs-density", type=float, default=0.5, help="FBS density of rtl_speedup")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--update", action="store_true",
                   help="keep the other sections of an existing build/bench/cg_fbs.json")
    args = p.parse_args()
    wanted = set(args.sections.split(","))
    t0 = time.perf_counter()
    old = BENCH_DIR / "cg_fbs.json"
    res: dict = json.loads(old.read_text()) if args.update and old.exists() else {}
    if "cg" in wanted:
        res["cg"] = cg_section(args.seed)
    if "fbs" in wanted:
        res["fbs"] = fbs_section(args.seed)
    if "rtl_speedup" in wanted:
        res["rtl_speedup"] = [cg_rtl(args.images), fbs_rtl(args.images, args.fbs_density)]
        for r in res["rtl_speedup"]:
            print(f"rtl_speedup {r['method']}: theoretical {r['theoretical']:.3f}, measured "
                  f"{r['measured']:.3f}, ratio {r['ratio']:.3f} (target >= 0.9)")
    out_dir = BENCH_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    res["plots"] = plots(res, out_dir)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"-> {write_result('cg_fbs.json', res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
