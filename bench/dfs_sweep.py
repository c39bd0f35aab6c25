"""DFS vs skip-only sweep: digits-trained ResNet-20, one DFS model per target CP and option
set, measured CP and accuracy of the fake-quant model and of the integer golden program with
the host gate. Writes build/bench/dfs_sweep.json (one row per configuration).

Target: at equal measured CP, DFS (skip/4/8) accuracy above skip-only (skip/8).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from dynacc.quant.train_dfs import DFS_DEFAULTS, run_dfs_sweep  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--targets", default="30,50,70")
    p.add_argument("--options", default="skip,4,8;skip,8",
                   help="option sets separated by ';' (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--beta", type=float, default=DFS_DEFAULTS["beta"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-golden", action="store_true")
    p.add_argument("--name", default="dfs_sweep.json")
    args = p.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    rows = []
    t0 = time.perf_counter()
    for opts in args.options.split(";"):
        rows += run_dfs_sweep(targets, opts.split(","), args.epochs, args.seed, args.model,
                              beta=args.beta, golden=not args.no_golden)
        write_result(args.name, {"model": args.model, "epochs": args.epochs,
                                 "beta": args.beta, "seed": args.seed, "rows": rows,
                                 "seconds": time.perf_counter() - t0})
    print(f"{'options':10} {'target':>6} {'CP':>6} {'acc':>6} {'gold CP':>7} {'gold acc':>8} {'s':>5}")
    for r in rows:
        print(f"{r['options']:10} {r['target_cp']:6.0f} {r['measured_cp']:6.1f} {r['acc']:6.2f} "
              f"{r.get('golden_cp', float('nan')):7.1f} {r.get('golden_acc', float('nan')):8.2f} "
              f"{r['seconds']:5.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
