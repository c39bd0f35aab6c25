"""Gate outcomes of a model's dual-precision layers on real images, and what they cost on the
dual-precision engine: the "Gates" section of ``report.md`` / ``report.json``.

For every Precision Gating layer (mode ``gated``) or Channel Gating layer (mode ``cg``) and
every image, the golden model's gate outcomes give the passing outputs per output tile, hence
the exact RTL cycles (:func:`~dynacc.hw.cycles.dual_conv_cycles`) and the theoretical work
(:func:`~dynacc.hw.cycles.dual_conv_work`; PG: 2 passes per output dense, 1 + passed fraction
gated; CG with p partitions: 1 dense, 1/p + (1 - 1/p) · passed fraction gated).
"""

from __future__ import annotations

from typing import Any

import torch

from dynacc.hw.config import HwConfig
from dynacc.hw.cycles import dual_conv_cycles, dual_conv_work
from dynacc.quant.program import BFPProgram

from .layer_program import LayerProgram

__all__ = ["gate_statistics", "gates_markdown", "dfs_statistics", "dfs_markdown"]


def gate_statistics(program: BFPProgram, lp: LayerProgram, images: torch.Tensor,
                    hw: HwConfig) -> dict[str, Any]:
    """Per gated layer over ``images`` ``[N, C, H, W]`` (float): technique (``pg`` | ``cg``),
    mean passed fraction, mean RTL cycles gated vs dense (every output passing), theoretical
    and cycle-model speed-ups; totals over the gated layers and the whole network."""
    env = program.run_golden(images)
    k = hw.lanes
    layers = []
    for l in lp.engine_layers:
        op = program.op(l.name)
        if l.engine != "dual" or op.dp_threshold is None:
            continue
        _, passed = program.dual_precision_acc(op, env[op.inputs[0]], mode="gated")
        shape = dict(in_channels=l.in_channels, out_channels=l.out_channels,
                     out_height=l.out_height, out_width=l.out_width, kernel_h=l.kernel,
                     kernel_w=l.kernel)
        # Channel Gating (mode cg): dense = one pass; bit-split gating: dense = two passes
        mode = "cg" if op.channel_gated else "gated"
        dense_work = 1.0 if op.channel_gated else 2.0
        cyc, work = [], []
        for p in passed:
            counts = [int(p[t * k:(t + 1) * k].sum()) for t in range(l.tiles)]
            cyc.append(dual_conv_cycles(hw, **shape, mode=mode, passed_counts=counts,
                                        partitions=l.partitions))
            work.append(dual_conv_work(out_channels=l.out_channels, out_height=l.out_height,
                                       out_width=l.out_width, mode=mode,
                                       passed=int(p.sum()), partitions=l.partitions))
        n = len(cyc)
        mean_cyc = sum(cyc) / n
        mean_work = sum(work) / n
        layers.append({
            "name": l.name, "technique": "cg" if op.channel_gated else "pg",
            "partitions": l.partitions, "passed_fraction": round(float(passed.double().mean()), 6),
            "cycles_dense": l.cycles, "cycles_gated_mean": round(mean_cyc, 1),
            "cycles_msb": l.cycles_msb,
            "theoretical_speedup": round(dense_work / mean_work, 4),
            "cycle_speedup": round(l.cycles / mean_cyc, 4),
        })
    dense = sum(x["cycles_dense"] for x in layers)
    gated = sum(x["cycles_gated_mean"] for x in layers)
    net_dense = sum(l.cycles for l in lp.engine_layers)
    net_gated = net_dense - dense + gated
    return {"images": int(images.shape[0]), "layers": layers,
            "totals": {"cycles_dense": dense, "cycles_gated_mean": round(gated, 1),
                       "cycle_speedup": round(dense / gated, 4) if gated else None,
                       "network_cycles_dense": net_dense,
                       "network_cycles_gated_mean": round(net_gated, 1),
                       "network_cycle_speedup": round(net_dense / net_gated, 4)
                       if net_gated else None}}


def gates_markdown(g: dict[str, Any]) -> str:
    """The "Gates" section of report.md."""
    if not g["layers"]:
        return ""
    t = g["totals"]
    kinds = {x.get("technique", "pg") for x in g["layers"]}
    what, rule = [], []
    if "pg" in kinds:
        what.append("Precision Gating")
        rule.append("PG: 2 / (1 + passed fraction)")
    if "cg" in kinds:
        ps = sorted({x["partitions"] for x in g["layers"] if x.get("technique") == "cg"})
        what.append(f"Channel Gating (p = {', '.join(map(str, ps))})")
        rule.append("CG: 1 / (1/p + (1 - 1/p) · passed fraction), dense = every output passing, "
                    "the plain conv on this engine")
    lines = ["## Gates", "",
             f"{' and '.join(what)} outcomes of the golden model on {g['images']} digits test "
             "images, and the dual-precision engine's exact cycles for them (cycle model = RTL, "
             "asserted by the co-simulation). Theoretical speed-up: "
             + "; ".join(r if len(rule) > 1 else r.split(": ", 1)[1] for r in rule) + ".",
             "",
             f"**Gated layers: {t['cycles_gated_mean']:,.0f} cycles/image on average vs "
             f"{t['cycles_dense']:,} dense ({t['cycle_speedup']:.2f}×).**", ""]
    if t.get("network_cycles_dense"):
        lines += [f"**Whole network: {t['network_cycles_gated_mean']:,.0f} cycles/image on "
                  f"average vs {t['network_cycles_dense']:,} dense "
                  f"({t['network_cycle_speedup']:.2f}×).**", ""]
    lines += ["| layer | passed | dense cycles | gated cycles (mean) | no-pass cycles | "
              "theoretical | cycle model | ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in g["layers"]:
        lines.append(f"| {x['name']} | {100 * x['passed_fraction']:.1f} % | {x['cycles_dense']:,} | "
                     f"{x['cycles_gated_mean']:,.0f} | {x['cycles_msb']:,} | "
                     f"{x['theoretical_speedup']:.2f}× | {x['cycle_speedup']:.2f}× | "
                     f"{x['cycle_speedup'] / x['theoretical_speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def dfs_statistics(program: BFPProgram, gate: Any, lp: LayerProgram, images: torch.Tensor,
                   labels: torch.Tensor | None, hw: HwConfig) -> dict[str, Any]:
    """DFS decisions of the host gate on ``images`` (integer golden run) and the exact
    dual-precision engine cycles of the gated blocks they select, per image, against running
    every gated block at full precision. A skipped block costs nothing on the engine, except a
    transition block's 1x1 shortcut conv, which runs at full precision."""
    from dynacc.quant.dfs_program import run_dfs_golden

    logits, dec = run_dfs_golden(program, gate, images)
    layers = {l.name: l for l in lp.engine_layers}
    opts = gate.options
    b = opts.act_bits

    def cycles(name: str, mode: str) -> int:
        l = layers[name]
        return dual_conv_cycles(hw, in_channels=l.in_channels, out_channels=l.out_channels,
                                out_height=l.out_height, out_width=l.out_width,
                                kernel_h=l.kernel, kernel_w=l.kernel, mode=mode)

    blocks, per_image, dense = [], [0] * images.shape[0], 0
    for blk in (b_ for b_ in gate.layout if b_.gated):
        col = dec[:, blk.index - 1]
        full = sum(cycles(c, "full") for c in blk.convs)
        dense += full
        share = {}
        for j, choice in enumerate(opts.choices):
            share[str(choice)] = round(float((col == j).double().mean()), 4)
            if choice == "skip":
                cost = cycles(blk.shortcut, "full") if blk.shortcut else 0
            elif choice == b:
                cost = full
            else:
                cost = sum(cycles(c, "msb") for c in blk.convs)
            for i in (col == j).nonzero().flatten().tolist():
                per_image[i] += cost
        blocks.append({"block": blk.prefix, "share": share, "cycles_full": full})
    mean = sum(per_image) / len(per_image)
    costs = torch.as_tensor(opts.costs, dtype=torch.float64)
    out = {"images": int(images.shape[0]), "options": [str(c) for c in opts.choices],
           "blocks": blocks,
           "cp": round(100.0 * float(costs[dec].mean()), 2),
           "totals": {"cycles_dense": dense, "cycles_mean": round(mean, 1),
                      "cycles_min": min(per_image), "cycles_max": max(per_image),
                      "cycle_speedup": round(dense / mean, 4) if mean else None}}
    if labels is not None:
        out["golden_acc"] = round(100.0 * float((logits.argmax(1) == labels).double().mean()), 2)
    return out


def dfs_markdown(d: dict[str, Any]) -> str:
    """The "DFS decisions" section of report.md."""
    t = d["totals"]
    acc = f", golden accuracy {d['golden_acc']:.2f} %" if "golden_acc" in d else ""
    lines = ["## DFS decisions", "",
             f"Host-gate decisions of the integer golden model on {d['images']} digits test "
             f"images (options {', '.join(d['options'])}; computation {d['cp']:.1f} %{acc}) "
             "and the exact dual-precision engine cycles of the gated blocks they select.", "",
             f"**Gated blocks: {t['cycles_mean']:,.0f} cycles/image on average "
             f"(min {t['cycles_min']:,}, max {t['cycles_max']:,}) vs {t['cycles_dense']:,} "
             f"at full precision ({t['cycle_speedup']:.2f}×).**", "",
             "| block | " + " | ".join(d["options"]) + " | cycles at full precision |",
             "|---|" + "---:|" * (len(d["options"]) + 1)]
    for blk in d["blocks"]:
        lines.append(f"| {blk['block']} | " + " | ".join(f"{100 * blk['share'][o]:.0f} %"
                                                      for o in d["options"])
                     + f" | {blk['cycles_full']:,} |")
    return "\n".join(lines) + "\n"
