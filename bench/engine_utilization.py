"""Conv engine utilization on full-size ResNet-50 layers, measured on the RTL.

One 1×1 and one 3×3 conv of every stage (conv2_x..conv5_x), the 7×7 stem as a host-im2col
1×1 conv (C' = 147) and the FC layer run on the default engine (16×16 lanes) in one
Verilator simulation; for each: MACs, ideal cycles (MACs / 256), the RTL cycle counter, the
analytic model (asserted equal) and utilization = ideal / measured. Every output element is
checked against the golden model. Writes build/bench/engine_utilization.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from dynacc.hw.config import load_named  # noqa: E402
from dynacc.hw.cycles import conv_cycles, ideal_cycles  # noqa: E402
from dynacc.sim.conv import check_conv_output, run_conv_layers  # noqa: E402
from dynacc.sim.layers import RESNET50, resnet50_layer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="default", help="hardware config (default: %(default)s)")
    p.add_argument("--layers", default=",".join(RESNET50),
                   help="comma-separated ResNet-50 layer keys (default: all)")
    p.add_argument("--crop", type=int, default=None, help="crop inputs (quick runs)")
    args = p.parse_args()
    cfg = load_named(args.config)
    t0 = time.perf_counter()
    keys = args.layers.split(",")
    layers = [resnet50_layer(k, cfg.fmt, crop=args.crop, seed=i, acc_bits=cfg.acc_bits)
              for i, k in enumerate(keys)]
    t_prep = time.perf_counter() - t0
    results = run_conv_layers(layers, cfg)
    rows = []
    for layer, r in zip(layers, results):
        check_conv_output(layer.name, r.out, layer.golden(cfg.fmt))
        kw = layer.shape_kwargs()
        model = conv_cycles(cfg, **kw)
        if r.cycles != model:
            raise AssertionError(f"{layer.name}: RTL cycles {r.cycles} != model {model}")
        ideal = ideal_cycles(cfg, **kw)
        rows.append({"name": layer.name, "macs": layer.macs, "ideal_cycles": ideal,
                     "measured_cycles": r.cycles, "model_cycles": model,
                     "utilization": ideal / r.cycles, "bit_exact": True,
                     "sim_cycles_per_s": r.cycles / r.wall_s, **kw, "stride": layer.stride})
        print(f"{layer.name:20s} MACs {layer.macs:>12,d}  ideal {ideal:>10,.0f}  "
              f"measured {r.cycles:>9,d}  utilization {ideal / r.cycles:6.1%}  bit-exact",
              flush=True)
    mean = sum(r["utilization"] for r in rows) / len(rows)
    total = sum(r["ideal_cycles"] for r in rows) / sum(r["measured_cycles"] for r in rows)
    out = {"config": cfg.to_dict(), "layers": rows, "mean_utilization": mean,
           "total_utilization": total, "prep_s": round(t_prep, 1),
           "wall_s": round(time.perf_counter() - t0, 1)}
    path = write_result("engine_utilization.json", out)
    print(f"mean utilization {mean:.2%} (cycle-weighted {total:.2%}) over {len(rows)} layers "
          f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
