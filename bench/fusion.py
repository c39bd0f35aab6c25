"""Predictive layer fusion (FusioNet) on digits: accuracy, mask errors, multiplications and
engine cycles. Writes build/bench/fusion.json.

* accuracies (percent, digits test split): ``vanilla_acc`` (float), ``pruned_acc`` (float,
  80 % / 70 % sparsity), ``predicted_acc`` (the **integer golden model** of the fused,
  predicted network, rules F1-F9), from ``run_fusion_bench`` (``quant/train_fusion.py``);
* ``mask_error_rate`` ``{s1, s2, mean}``: predicted masks vs the real integer ReLU outcomes;
* ``mults_dense`` / ``mults_fused`` per image over the fused blocks, ``mult_reduction``;
* ``cycles_dense``: the plain BFP conv engine (``configs/hw/default.yaml``) running the same
  blocks unfused, per image: every 1×1 expand, 3×3 depthwise and 1×1 project as the layer
  mapper runs it (``gen/layer_program.py``: a grouped / depthwise conv is a dense conv with
  block-diagonal zero weights, so its reduction runs over all ``C`` input channels), cycles of
  ``hw.cycles.conv_cycles``; ``layers`` lists them;
* ``cycles_fused``: null until the fused datapath exists;
* ``targets``: ``mult_reduction_ge_6``, ``predicted_within_1pt_of_pruned``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402


def dense_block_cycles(hw_name: str = "default", image: int = 16) -> dict:
    """Engine cycles per image of the unfused blocks of ``fusionet_digits`` (see module doc)."""
    from dynacc.hw.config import load_named
    from dynacc.hw.cycles import conv_cycles, conv_steps, ideal_cycles
    from dynacc.quant.models.fusionet import fusionet_digits

    hw = load_named(hw_name)
    net = fusionet_digits()
    h = (image + 2 * net.stem.padding[0] - 3) // net.stem.stride[0] + 1
    rows = []
    for i, u in enumerate(net.units):
        ho = (h - 1) // u.stride + 1
        for name, conv, hi, hout in (("expand", u.expand, h, h), ("dw", u.dw, h, ho),
                                     ("project", u.project, ho, ho)):
            k = conv.kernel_size[0]
            shape = dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                         out_height=hout, out_width=hout, kernel_h=k, kernel_w=k)
            tiles = -(-conv.out_channels // hw.lanes)
            words = tiles * k * k * -(-conv.in_channels // hw.lanes)
            useful = ideal_cycles(hw, **shape) / conv.groups
            rows.append({"layer": f"units.{i}.{name}", "in": conv.in_channels,
                         "out": conv.out_channels, "groups": conv.groups, "kernel": k,
                         "in_size": hi, "out_size": hout, "steps": conv_steps(hw, **shape),
                         "cycles": conv_cycles(hw, **shape), "useful_cycles": useful,
                         "weight_words": words, "fits_weight_memory": words <= hw.wgt_depth})
        h = ho
    total = sum(r["cycles"] for r in rows)
    return {"hw": hw.name, "lanes": hw.lanes, "cycles": total,
            "useful_cycles": sum(r["useful_cycles"] for r in rows), "layers": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hw", default="default", help="hw config of the dense engine (default: %(default)s)")
    args = p.parse_args()
    t0 = time.perf_counter()
    from dynacc.quant.train_fusion import run_fusion_bench

    r = run_fusion_bench(seed=args.seed, progress=False)
    cyc = dense_block_cycles(args.hw)
    res = {k: r[k] for k in ("vanilla_acc", "pruned_acc", "predicted_acc", "mask_error_rate",
                             "mults_dense", "mults_fused", "mult_reduction")}
    res.update({
        "predicted_float_acc": r["predicted_float_acc"],
        "mask_error_rate_float": r["mask_error_rate_float"],
        "mults_pruned": r["mults_pruned"], "mult_reduction_vs_pruned": r["mult_reduction_vs_pruned"],
        "mult_reduction_network": r["mult_reduction_network"],
        "adds_dense": r["adds_dense"], "adds_fused": r["adds_fused"],
        "cycles_dense": cyc["cycles"], "cycles_dense_useful": cyc["useful_cycles"],
        "cycles_dense_layers": cyc["layers"], "hw": cyc["hw"], "cycles_fused": None,
        "targets": {"mult_reduction_ge_6": r["mult_reduction"] >= 6.0,
                    "predicted_within_1pt_of_pruned":
                        abs(r["predicted_acc"] - r["pruned_acc"]) <= 1.0},
        "train_seconds": round(r["seconds"], 1),
    })
    e = r["mask_error_rate"]
    print(f"vanilla {r['vanilla_acc']:.2f} %  pruned {r['pruned_acc']:.2f} %  predicted (integer "
          f"golden, fused) {r['predicted_acc']:.2f} %  (float {r['predicted_float_acc']:.2f} %)")
    print(f"mask errors: s1 {100 * e['s1']:.2f} %  s2 {100 * e['s2']:.2f} %")
    print(f"mults/image over the blocks: dense {r['mults_dense']:.0f}  fused {r['mults_fused']:.0f}"
          f"  reduction {r['mult_reduction']:.2f}x")
    print(f"dense engine ({cyc['hw']}, {cyc['lanes']}x{cyc['lanes']} lanes): {cyc['cycles']} "
          f"cycles/image over the unfused blocks ({cyc['useful_cycles']:.0f} if every MAC "
          f"were useful)")
    print("cycles_fused: pending (no fused datapath yet)")
    print(f"targets: {res['targets']}")
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    path = write_result("fusion.json", res)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
