"""One full ResNet-50 inference (224x224, every conv and the FC) through the RTL engine from a
deploy folder, bit-exact at every layer.

The weights are seeded RANDOM (BN settled on random images, KL-calibrated on random images,
exactly as ``make gen``): accuracy means nothing here, bit-exactness and cycles are real.
The model is exported with ``sw/deploy.py``'s flow, then one random image runs in one
simulator launch: weights from the folder's ``.mem`` files, host steps (input quantization,
im2col of the stem, max pool, average pool, flatten) between layers, every layer fed by the
previous RTL outputs. Writes build/bench/resnet50_rtl.json.

Target: all layers bit-exact; wall < 30 min on the 2-core dev machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from dynacc.hw.config import HwConfig  # noqa: E402
from dynacc.quant.data import random_images  # noqa: E402
from dynacc.sim.network import check_network, run_network  # noqa: E402
from dynacc.sw.export import deploy_model  # noqa: E402
from dynacc.sw.reader import load_deploy  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--hw", default="configs/hw/default.yaml")
    p.add_argument("--deploy", default=None, help="deploy folder (default: build/deploy/<model>)")
    p.add_argument("--calib-images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="weights and calibration seed")
    p.add_argument("--image-seed", type=int, default=12345)
    args = p.parse_args()
    t_start = time.perf_counter()
    hw = HwConfig.from_yaml(args.hw)
    out = Path(args.deploy or f"build/deploy/{args.model}")

    t0 = time.perf_counter()
    res = deploy_model(args.model, out, hw, calib_images=args.calib_images, seed=args.seed)
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    dep = load_deploy(out, hw, images=False)
    t_load = time.perf_counter() - t0
    x = random_images(1, dep.input_shape, seed=args.image_seed)
    ideal = sum(l.ideal_cycles for l in dep.layers)
    model_cycles = sum(l.cycles for l in dep.layers)
    print(f"{args.model}: {len(dep.layers)} engine layers, {model_cycles:,} cycles "
          f"(ideal {ideal:,}); export {t_export:.0f} s -> {out}", flush=True)

    run = run_network(dep, x, progress=True)
    t0 = time.perf_counter()
    chk = check_network(res.program, run, x)
    t_check = time.perf_counter() - t0
    cycles = int(run.cycles_per_image[0])
    wall = time.perf_counter() - t_start
    result = {
        "model": args.model, "hw": hw.name, "random_weights": True, "deploy": str(out),
        "input_shape": list(dep.input_shape), "images": 1,
        "bit_exact_layers": chk.bit_exact_layers, "total_layers": chk.total_layers,
        "host_steps_bit_exact": all(h.exact for h in chk.host),
        "cycles_match_model": all(l.cycles_ok for l in chk.layers),
        "cycles": cycles, "model_cycles": model_cycles, "ideal_cycles": ideal,
        "utilization": round(ideal / cycles, 4),
        "layers": [{"name": l.name, "exact": l.exact, "cycles": l.cycles,
                    "model_cycles": l.model_cycles, "rtl_wall_s": round(run.rtl_wall_s[l.name], 2),
                    "mismatch": l.mismatch} for l in chk.layers],
        "failures": chk.failures()[:10],
        "export_s": round(t_export, 1), "load_s": round(t_load, 1),
        "sim_process_wall_s": round(run.sim_wall_s, 1),
        "rtl_wall_s": round(sum(run.rtl_wall_s.values()), 1),
        "rtl_cycles_per_s": round(cycles / max(sum(run.rtl_wall_s.values()), 1e-9)),
        "check_s": round(t_check, 1), "wall_s": round(wall, 1),
    }
    path = write_result("resnet50_rtl.json", result)
    print(f"{chk.bit_exact_layers}/{chk.total_layers} layers bit-exact; {cycles:,} RTL cycles "
          f"(ideal {ideal:,}, utilization {100 * ideal / cycles:.1f} %); wall {wall / 60:.1f} min "
          f"(simulator {run.sim_wall_s:.0f} s, RTL {result['rtl_wall_s']:.0f} s) -> {path}")
    ok = chk.bit_exact_layers == chk.total_layers and not chk.failures()
    if not ok:
        print("FAILED: " + "; ".join(chk.failures()[:3]), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
