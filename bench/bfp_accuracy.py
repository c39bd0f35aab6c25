"""BFP accuracy sweep: digits-trained ResNet-20, FP vs integer-golden BFP accuracy for
M in {4..8} × {max, kl, kl-paper}. Writes build/bench/bfp_accuracy.json.

Targets: M = 8 with KL loses <= 0.3 points; KL >= max at M <= 6.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, write_result  # noqa: E402

from dynacc.quant.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from dynacc.quant.flow import calibrate_and_evaluate, load_data, prepare_float_model  # noqa: E402
from dynacc.quant.formats import QuantConfig  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--calib-images", type=int, default=100)
    p.add_argument("--mantissas", default="4,5,6,7,8")
    args = p.parse_args()
    t0 = time.perf_counter()
    splits = load_data(args.model, "digits")
    ck_path = BENCH_DIR / f"{args.model}-digits-float.pt"
    if ck_path.exists():
        model = load_checkpoint(ck_path, expect_model=args.model).model
    else:
        model, kwargs = prepare_float_model(args.model, splits, epochs=args.epochs)
        save_checkpoint(ck_path, args.model, kwargs, model, meta={"epochs": args.epochs})
    results = []
    fp_acc = None
    for m in [int(v) for v in args.mantissas.split(",")]:
        for method in ("max", "kl", "kl-paper"):
            cfg = QuantConfig.from_dict({"mantissa_bits": m, "method": method})
            _, acc = calibrate_and_evaluate(model, splits, cfg, args.calib_images, progress=False)
            fp_acc = acc["fp_acc"]
            results.append({"mantissa": m, "method": method, "acc": acc["bfp_acc"]})
            print(f"M={m} {method:3s}: BFP {acc['bfp_acc']:.2f} %  (FP {fp_acc:.2f} %)", flush=True)
    by = {(r["mantissa"], r["method"]): r["acc"] for r in results}
    out = {
        "model": args.model, "dataset": "digits", "fp_acc": fp_acc, "results": results,
        "test_images": len(splits.test.dataset), "calib_images": args.calib_images,
        "m8_kl_loss": fp_acc - by[(8, "kl")] if (8, "kl") in by else None,
        "kl_ge_max_at_m_le_6": all(by[(m, "kl")] >= by[(m, "max")]
                                   for m in range(4, 7) if (m, "kl") in by),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    path = write_result("bfp_accuracy.json", out)
    print(f"M=8 KL loss {out['m8_kl_loss']:.2f} points (target <= 0.3); KL >= max at M <= 6: "
          f"{out['kl_ge_max_at_m_le_6']} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
