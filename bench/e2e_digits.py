"""End to end on the RTL: the digits-trained ResNet-20, KL-calibrated, saved as a calibrated
checkpoint, exported with ``sw/deploy.py``'s flow, and the whole digits test split run through
the RTL engine from the deploy folder (one simulator launch; weights from the folder's
``.mem`` files, host steps between layers, each layer fed by the previous RTL outputs).
Every layer of every image is compared with the integer golden model (``==``), the RTL
cycle counter with ``conv_cycles``. Writes build/bench/e2e_digits.json.

Targets: all layers bit-exact on every image; rtl_acc == golden_acc.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, write_result  # noqa: E402

import torch  # noqa: E402

from dynacc.hw.config import HwConfig  # noqa: E402
from dynacc.quant.calibrate import calibrate  # noqa: E402
from dynacc.quant.checkpoint import save_checkpoint  # noqa: E402
from dynacc.quant.flow import cached_digits_model, calibration_batches  # noqa: E402
from dynacc.quant.formats import QuantConfig  # noqa: E402
from dynacc.sim.network import check_network, run_network  # noqa: E402
from dynacc.sw.export import deploy_model  # noqa: E402
from dynacc.sw.reader import load_deploy  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--hw", default="configs/hw/default.yaml")
    p.add_argument("--images", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--calib-images", type=int, default=100)
    p.add_argument("--method", default="kl", choices=["kl", "max"])
    p.add_argument("--deploy", default=None, help="deploy folder (default: build/deploy/<model>-digits)")
    args = p.parse_args()
    t_start = time.perf_counter()
    hw = HwConfig.from_yaml(args.hw)

    model, splits = cached_digits_model(args.model)
    kwargs = {"num_classes": splits.num_classes, "in_channels": splits.shape[0]}
    cfg = QuantConfig(method=args.method)
    program = calibrate(model, calibration_batches(splits.train, args.calib_images), cfg,
                        progress=False)
    ckpt = BENCH_DIR / "e2e_digits" / f"{args.model}-digits-m8-{args.method}.pt"
    save_checkpoint(ckpt, args.model, kwargs, model, program,
                    meta={"dataset": "digits", "quant": cfg.to_dict(),
                          "calib_images": args.calib_images})
    out = Path(args.deploy or f"build/deploy/{args.model}-digits")
    t0 = time.perf_counter()
    res = deploy_model(args.model, out, hw, checkpoint=ckpt)
    t_export = time.perf_counter() - t0
    dep = load_deploy(out, hw)
    program = res.program   # the checkpoint's program, exactly what was exported

    xs, ys = zip(*[(x, y) for x, y in splits.test])
    x, y = torch.cat(xs), torch.cat(ys)
    if args.images is not None:
        x, y = x[:args.images], y[:args.images]
    n = len(x)
    print(f"{args.model} digits: {len(dep.layers)} engine layers, {n} images through the RTL "
          f"from {out}", flush=True)
    run = run_network(dep, x, progress=True)
    t0 = time.perf_counter()
    chk = check_network(program, run, x)
    t_check = time.perf_counter() - t0
    per_image = run.cycles_per_image
    rtl_acc = 100.0 * float((torch.from_numpy(chk.rtl_pred) == y).double().mean())
    golden_acc = 100.0 * float((torch.from_numpy(chk.golden_pred) == y).double().mean())
    result = {
        "model": args.model, "dataset": "digits", "hw": hw.name, "method": args.method,
        "deploy": str(out), "images": n,
        "bit_exact_layers": chk.bit_exact_layers, "total_layers": chk.total_layers,
        "host_steps_bit_exact": all(h.exact for h in chk.host),
        "cycles_match_model": all(l.cycles_ok for l in chk.layers),
        "rtl_acc": rtl_acc, "golden_acc": golden_acc,
        "predictions_equal": bool((chk.rtl_pred == chk.golden_pred).all()),
        "cycles_per_image": int(per_image[0]) if (per_image == per_image[0]).all()
        else float(per_image.mean()),
        "ideal_cycles_per_image": sum(l.ideal_cycles for l in dep.layers),
        "layers": [{"name": l.name, "exact": l.exact, "bad_images": l.bad_images,
                    "cycles": l.cycles, "model_cycles": l.model_cycles,
                    "mismatch": l.mismatch} for l in chk.layers],
        "failures": chk.failures()[:10],
        "export_s": round(t_export, 2), "sim_process_wall_s": round(run.sim_wall_s, 1),
        "rtl_wall_s": round(sum(run.rtl_wall_s.values()), 1), "check_s": round(t_check, 1),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    path = write_result("e2e_digits.json", result)
    print(f"{n} images: {chk.bit_exact_layers}/{chk.total_layers} layers bit-exact on every "
          f"image; RTL acc {rtl_acc:.2f} % vs golden {golden_acc:.2f} %; "
          f"{result['cycles_per_image']:,} cycles/image; simulator {run.sim_wall_s:.0f} s "
          f"-> {path}")
    ok = (chk.bit_exact_layers == chk.total_layers and rtl_acc == golden_acc
          and not chk.failures())
    if not ok:
        print("FAILED: " + "; ".join(chk.failures()[:3]), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
