"""Gate outcomes of a model's dual-precision layers on real images, and what they cost on the
dual-precision engine: the "Gates" section of ``report.md`` / ``report.json``.

For every Precision Gating layer (mode ``gated``) and every image, the golden model's gate
outcomes give the passing outputs per output tile, hence the exact RTL cycles
(:func:`~dynacc.hw.cycles.dual_conv_cycles`) and the theoretical work
(:func:`~dynacc.hw.cycles.dual_conv_work`: 2 passes per output dense, 1 + passed fraction
gated).
"""

from __future__ import annotations

from typing import Any

import torch

from dynacc.hw.config import HwConfig
from dynacc.hw.cycles import dual_conv_cycles, dual_conv_work
from dynacc.quant.program import BFPProgram

from .layer_program import LayerProgram

__all__ = ["gate_statistics", "gates_markdown"]


def gate_statistics(program: BFPProgram, lp: LayerProgram, images: torch.Tensor,
                    hw: HwConfig) -> dict[str, Any]:
    """Per gated layer over ``images`` ``[N, C, H, W]`` (float): mean passed fraction, mean
    RTL cycles gated vs dense (``full``), theoretical and cycle-model speed-ups."""
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
        cyc, work = [], []
        for p in passed:
            counts = [int(p[t * k:(t + 1) * k].sum()) for t in range(l.tiles)]
            cyc.append(dual_conv_cycles(hw, **shape, mode="gated", passed_counts=counts))
            work.append(dual_conv_work(out_channels=l.out_channels, out_height=l.out_height,
                                       out_width=l.out_width, mode="gated",
                                       passed=int(p.sum())))
        n = len(cyc)
        mean_cyc = sum(cyc) / n
        mean_work = sum(work) / n
        layers.append({
            "name": l.name, "passed_fraction": round(float(passed.double().mean()), 6),
            "cycles_dense": l.cycles, "cycles_gated_mean": round(mean_cyc, 1),
            "cycles_msb": l.cycles_msb,
            "theoretical_speedup": round(2.0 / mean_work, 4),
            "cycle_speedup": round(l.cycles / mean_cyc, 4),
        })
    dense = sum(x["cycles_dense"] for x in layers)
    gated = sum(x["cycles_gated_mean"] for x in layers)
    return {"images": int(images.shape[0]), "layers": layers,
            "totals": {"cycles_dense": dense, "cycles_gated_mean": round(gated, 1),
                       "cycle_speedup": round(dense / gated, 4) if gated else None}}


def gates_markdown(g: dict[str, Any]) -> str:
    """The "Gates" section of report.md."""
    if not g["layers"]:
        return ""
    t = g["totals"]
    lines = ["## Gates", "",
             f"Precision Gating outcomes of the golden model on {g['images']} digits test images, "
             "and the dual-precision engine's exact cycles for them (cycle model = RTL, "
             "asserted by the co-simulation). Theoretical speed-up = 2 / (1 + passed fraction).",
             "",
             f"**Gated layers: {t['cycles_gated_mean']:,.0f} cycles/image on average vs "
             f"{t['cycles_dense']:,} dense ({t['cycle_speedup']:.2f}×).**", "",
             "| layer | passed | dense cycles | gated cycles (mean) | no-pass cycles | "
             "theoretical | cycle model | ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in g["layers"]:
        lines.append(f"| {x['name']} | {100 * x['passed_fraction']:.1f} % | {x['cycles_dense']:,} | "
                     f"{x['cycles_gated_mean']:,.0f} | {x['cycles_msb']:,} | "
                     f"{x['theoretical_speedup']:.2f}× | {x['cycle_speedup']:.2f}× | "
                     f"{x['cycle_speedup'] / x['theoretical_speedup']:.2f} |")
    return "\n".join(lines) + "\n"
