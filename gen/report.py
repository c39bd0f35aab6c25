"""Generator reports: ``report.json`` (machine-readable) and ``report.md`` (for people).

Per engine layer: MACs, ideal cycles (MACs / K²), analytic cycles of this RTL, utilization,
memory words; totals for the network. Measured RTL cycles are added by ``sim`` runs.
"""

from __future__ import annotations

from typing import Any

from .layer_program import EngineLayer, HostStep, LayerProgram

__all__ = ["report_dict", "report_markdown"]


def _memory(layer: EngineLayer, k: int) -> dict[str, int]:
    return {
        "act_in_words": layer.height * layer.width * layer.in_words,
        "act_out_words": layer.out_height * layer.out_width * layer.tiles,
        "weight_words": layer.tiles * layer.kernel * layer.kernel * layer.in_words,
        "weight_bits": layer.tiles * layer.kernel * layer.kernel * layer.in_words * k * k,
    }


def report_dict(lp: LayerProgram) -> dict[str, Any]:
    k = lp.hw.lanes
    fmt_bits = lp.hw.mantissa_bits
    layers = []
    for s in lp.engine_layers:
        mem = _memory(s, k)
        mem["weight_bits"] *= fmt_bits
        layers.append({
            "name": s.name, "kind": s.kind, "in_channels": s.in_channels,
            "out_channels": s.out_channels, "in_hw": [s.height, s.width],
            "out_hw": [s.out_height, s.out_width], "kernel": s.kernel, "stride": s.stride,
            "groups": s.groups, "im2col": s.im2col, "residual": s.residual,
            "macs": s.macs, "ideal_cycles": s.ideal_cycles, "cycles": s.cycles,
            "utilization": round(s.utilization, 4), "acc_bits_needed": s.acc_bits_needed,
            "memory": mem, "engine": s.engine,
        })
        if s.engine == "dual":
            layers[-1].update(act_bits=s.act_bits, msb_bits=s.msb_bits, dp_mode=s.dp_mode,
                              cycles_msb=s.cycles_msb, partitions=s.partitions)
    host = [s.to_dict() for s in lp.steps if isinstance(s, HostStep)]
    macs = sum(l["macs"] for l in layers)
    ideal = sum(l["ideal_cycles"] for l in layers)
    cycles = sum(l["cycles"] for l in layers)
    return {
        "model": lp.model,
        "hw": lp.hw.to_dict(),
        "layers": layers,
        "host_steps": host,
        "totals": {
            "engine_layers": len(layers), "host_steps": len(host), "macs": macs,
            "ideal_cycles": ideal, "cycles": cycles,
            "utilization": round(ideal / cycles, 4) if cycles else 0.0,
            "acc_bits_needed": max((l["acc_bits_needed"] for l in layers), default=0),
            "max_act_words": max((max(l["memory"]["act_in_words"], l["memory"]["act_out_words"])
                                  for l in layers), default=0),
            "max_weight_words": max((l["memory"]["weight_words"] for l in layers), default=0),
        },
    }


def report_markdown(rep: dict[str, Any]) -> str:
    t = rep["totals"]
    hw = rep["hw"]
    lines = [
        f"# {rep['model']} on the BFP engine `{hw['name']}`",
        "",
        f"{hw['lanes']}×{hw['lanes']} lanes ({hw['lanes'] ** 2} MACs/cycle), "
        f"M = {hw['mantissa_bits']} bits, accumulator {hw['acc_bits']} bits "
        f"(worst case needed: {t['acc_bits_needed']}).",
        "",
        f"**{t['engine_layers']} engine layers, {t['host_steps']} host steps, "
        f"{t['macs'] / 1e9:.3f} GMAC, {t['cycles']:,} cycles "
        f"(ideal {t['ideal_cycles']:,}), utilization {100 * t['utilization']:.1f} %.**",
        "",
        "| layer | C→O | in | k/s | MACs | ideal cycles | RTL cycles (analytic) | util. | acc bits |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for l in rep["layers"]:
        note = " (im2col)" if l["im2col"] else ""
        if l.get("engine") == "dual" and l["dp_mode"] == "cg":
            note += (f" (Channel Gating p={l['partitions']}, {l['act_bits']}-bit input; "
                     f"{l['cycles_msb']:,} cycles if no output passes)")
        elif l.get("engine") == "dual":
            note += (f" (dual {l['act_bits']}/{l['msb_bits']} bits, {l['dp_mode']}; "
                     f"{l['cycles_msb']:,} cycles if no output passes)")
        note += f" (+{l['residual']})" if l["residual"] else ""
        note += f" (groups {l['groups']})" if l["groups"] > 1 else ""
        lines.append(
            f"| {l['name']}{note} | {l['in_channels']}→{l['out_channels']} | "
            f"{l['in_hw'][0]}×{l['in_hw'][1]} | {l['kernel']}/{l['stride']} | {l['macs']:,} | "
            f"{l['ideal_cycles']:,} | {l['cycles']:,} | {100 * l['utilization']:.1f} % | "
            f"{l['acc_bits_needed']} |")
    lines += ["", "Host steps: " + ", ".join(f"{h['name']} ({h['kind']})" for h in rep["host_steps"]),
              ""]
    duals = [l for l in rep["layers"] if l.get("engine") == "dual"]
    if any(l["dp_mode"] == "cg" for l in duals):
        lines += ["Channel Gating layers run on the dual-precision engine (`rtl/dual_engine.v`, "
                  "mode cg): a base phase over the 1/p of the input channels that belong to "
                  "each output's partition, then the other input channels only for outputs "
                  "whose gate passes (rules CG1-CG3). Their RTL cycles above are for every "
                  "output passing (the plain conv, ideal = MACs / K²); the gated cycles depend "
                  "on the input (see \"Gates\" below when present).", ""]
    if any(l["dp_mode"] != "cg" for l in duals):
        lines += ["Dual-precision layers run on the dual-precision engine (`rtl/dual_engine.v`): "
                  "an MSB pass over every output, then an LSB pass only over outputs whose gate "
                  "passes (rules G0-G4). Their RTL cycles above are for every output passing "
                  "(ideal = 2 passes × MACs / K²); the gated cycles depend on the input (see "
                  "\"Gates\" below when present).", ""]
    return "\n".join(lines)
