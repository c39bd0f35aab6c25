"""``make bench``: run every benchmark script in turn; results land in build/bench/*.json.

Each script prints its own ratios; this runner prints a summary table at the end and exits
non-zero if any script failed (the others still run).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "bfp_accuracy.py",
    "calibration_speed.py",
    "engine_utilization.py",
    "sim_speed.py",
    "e2e_digits.py",
    "resnet50_rtl.py",
    "dual_speedup.py",
    "pg_dfs.py",
    "cg_fbs.py",
    "fusion.py",
]


def main() -> int:
    names = sys.argv[1:] or [n for n in ORDER if (HERE / n).exists()]
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / name)])
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    print("\nresults in build/bench/:")
    for p in sorted(Path("build/bench").glob("*.json")):
        d = json.loads(p.read_text())
        keys = {k: v for k, v in d.items() if isinstance(v, (int, float, bool)) and k != "wall_s"}
        print(f"  {p.name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in list(keys.items())[:6]))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
