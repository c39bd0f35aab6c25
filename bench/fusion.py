"""Predictive layer fusion (FusioNet) on digits: accuracy, mask errors, multiplications and
engine cycles. Writes build/bench/fusion.json: the keys below for ``fusionet_digits`` at the
top level, and the same for ``mbv2_fusion_digits`` (MobileNetV2-style inverted residuals) under
``others``.

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
* ``cycles_fused``: the fused-block engine (``hw/fused_engine.py``, ``FusedConfig()``) per
  image over the digits test split, from the exact cycle model of the golden masks
  (``hw.fused_program.fusion_network_cycles``); ``cycles_fused_rtl``: the three blocks of
  :data:`RTL_IMAGES` run on the RTL (Verilator), bit-exact and with cycles equal to the
  model (checked); ``cycle_reduction`` = dense / fused (note the engines differ in size:
  ``dense_engine_macs`` vs ``fused_engine``);
* ``targets``: ``mult_reduction_ge_6``, ``predicted_within_1pt_of_pruned``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402


#: digits test images whose three blocks also run on the RTL (bit-exact, cycles == model)
RTL_IMAGES = (0, 7)


def dense_block_cycles(hw_name: str = "default", image: int = 16, units=None) -> dict:
    """Engine cycles per image of the unfused blocks (``units``, default those of
    ``fusionet_digits``; see module doc)."""
    from dynacc.hw.config import load_named
    from dynacc.hw.fused_program import dense_block_cycles as cycles
    from dynacc.quant.models.fusionet import fusionet_digits

    net = fusionet_digits()
    h = (image + 2 * net.stem.padding[0] - 3) // net.stem.stride[0] + 1
    return cycles(load_named(hw_name), net.units if units is None else units, h)


def fused_block_cycles(program, splits) -> dict:
    """Fused-engine cycles per image over the digits test split (exact model of the golden
    masks) and an RTL run of every block on :data:`RTL_IMAGES` (bit-exact outputs and masks,
    RTL cycles == model, else ``AssertionError``)."""
    import torch

    from dynacc.hw.fused_config import FusedConfig
    from dynacc.hw.fused_program import fusion_network_cycles
    from dynacc.sim.fused import network_block_layers, verify_fused_layers

    cfg = FusedConfig()
    model = fusion_network_cycles(program, (x for x, _ in splits.test), cfg)
    images = torch.stack([splits.test.dataset[i][0] for i in RTL_IMAGES])
    _, infos = program.run(images)
    cases = network_block_layers(program, infos, [f"digit{i}" for i in RTL_IMAGES])
    results = verify_fused_layers([c[0] for c in cases], cfg)
    rtl = [{"layer": c[0].name, "cycles": r.cycles, "wall_s": round(r.wall_s, 2)}
           for c, r in zip(cases, results)]
    return {**model, "rtl": rtl, "config": {"name": cfg.name, "lanes": cfg.lanes,
                                            "group_in": cfg.group_in, "chunk": cfg.chunk,
                                            "multipliers": cfg.lanes * cfg.group_in,
                                            "a_adders": cfg.lanes * (cfg.group_in + 1)}}


def measure(model: str, seed: int, hw: str) -> dict:
    """Train, fuse and measure one fusion model; prints its lines. Returns its result dict."""
    from dynacc.quant.train_fusion import run_fusion_bench

    out = run_fusion_bench(seed=seed, progress=False, return_all=True, model=model)
    r = out["results"]
    net = out["pruned"]
    cyc = dense_block_cycles(hw, units=net.units)
    fused = fused_block_cycles(out["program"], out["splits"])
    res = {k: r[k] for k in ("vanilla_acc", "pruned_acc", "predicted_acc", "mask_error_rate",
                             "mults_dense", "mults_fused", "mult_reduction")}
    res.update({
        "model": model,
        "predicted_float_acc": r["predicted_float_acc"],
        "mask_error_rate_float": r["mask_error_rate_float"],
        "mults_pruned": r["mults_pruned"], "mult_reduction_vs_pruned": r["mult_reduction_vs_pruned"],
        "mult_reduction_network": r["mult_reduction_network"],
        "adds_dense": r["adds_dense"], "adds_fused": r["adds_fused"],
        "cycles_dense": cyc["cycles"], "cycles_dense_useful": cyc["useful_cycles"],
        "cycles_dense_layers": cyc["layers"], "hw": cyc["hw"], "cycles_fused": fused["cycles"],
        "cycles_fused_blocks": fused["blocks"], "cycles_fused_rtl": fused["rtl"],
        "fused_engine": fused["config"], "dense_engine_macs": cyc["lanes"] ** 2,
        "cycle_reduction": cyc["cycles"] / fused["cycles"],
        "targets": {"mult_reduction_ge_6": r["mult_reduction"] >= 6.0,
                    "predicted_within_1pt_of_pruned":
                        abs(r["predicted_acc"] - r["pruned_acc"]) <= 1.0},
        "train_seconds": round(r["seconds"], 1),
    })
    e = r["mask_error_rate"]
    print(f"== {model}")
    print(f"vanilla {r['vanilla_acc']:.2f} %  pruned {r['pruned_acc']:.2f} %  predicted (integer "
          f"golden, fused) {r['predicted_acc']:.2f} %  (float {r['predicted_float_acc']:.2f} %)")
    print(f"mask errors: s1 {100 * e['s1']:.2f} %  s2 {100 * e['s2']:.2f} %")
    print(f"mults/image over the blocks: dense {r['mults_dense']:.0f}  fused {r['mults_fused']:.0f}"
          f"  reduction {r['mult_reduction']:.2f}x")
    print(f"dense engine ({cyc['hw']}, {cyc['lanes']}x{cyc['lanes']} lanes): {cyc['cycles']} "
          f"cycles/image over the unfused blocks ({cyc['useful_cycles']:.0f} if every MAC "
          f"were useful)")
    fc = fused["config"]
    print(f"fused engine ({fc['lanes']} lanes, {fc['multipliers']} multipliers, "
          f"{fc['a_adders']} A adders): {fused['cycles']:.0f} cycles/image over the blocks "
          f"(mean of {fused['images']} test images; {cyc['cycles'] / fused['cycles']:.2f}x fewer "
          f"than the dense engine); RTL == model on {len(fused['rtl'])} block runs")
    print(f"targets: {res['targets']}")
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hw", default="default", help="hw config of the dense engine (default: %(default)s)")
    p.add_argument("--models", default="fusionet_digits,mbv2_fusion_digits",
                   help="fusion models, the first one's results at the top level "
                        "(default: %(default)s)")
    args = p.parse_args()
    t0 = time.perf_counter()
    models = [m for m in args.models.split(",") if m]
    res = measure(models[0], args.seed, args.hw)
    res["others"] = {m: measure(m, args.seed, args.hw) for m in models[1:]}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    path = write_result("fusion.json", res)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
