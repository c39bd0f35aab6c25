"""PNG plots of a gen report (``report.json``) and the "FPGA" / "Plots" sections of report.md.

* ``cycles.png``: per-layer ideal cycles (MACs / K²) next to the RTL's cycles (analytic model,
  equal to the RTL counter; a layer's ``measured_cycles`` is drawn too when a sim run added it).
* ``utilization.png``: per-layer utilization = ideal / RTL cycles.
* ``roofline.png``: the engine at its Fmax (flat roof K² × Fmax) and an assumed external-memory
  bandwidth (slanted roof), each layer a point at its operational intensity (MACs per byte of
  weights + input + output (+ residual) activations, mantissas of M bits) and the GMAC/s it
  attains on the engine (MACs / (cycles / Fmax)).

:func:`update_report_md` writes the PNGs next to report.md and appends (or replaces) the
sections, so it can run after every ``make gen`` / ``make fpga``.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_cycles", "plot_utilization", "plot_roofline", "layer_intensity", "write_plots",
           "plots_markdown", "append_sections", "update_report_md", "DEFAULT_BANDWIDTH_GBS",
           "plot_accuracy_vs_compute", "plot_speedups"]

#: external memory bandwidth of the roofline's slanted roof: a 16-bit DDR3 at 800 MT/s, the
#: kind ECP5 boards carry (an assumption, drawn as such)
DEFAULT_BANDWIDTH_GBS = 1.6
#: Fmax used for the roofline when no FPGA result is given (labelled "target, not measured")
NOMINAL_FMAX_MHZ = 150.0

_BEGIN = "<!-- dynacc:{name}:begin -->"
_END = "<!-- dynacc:{name}:end -->"


def _short(name: str) -> str:
    return (name.replace("layer", "L").replace(".downsample.0", ".ds").replace(".conv", ".c"))


def _kind(l: Mapping[str, Any]) -> str:
    if l.get("im2col"):
        return "stem (im2col)"
    if l.get("kind") == "linear":
        return "FC"
    return f"{l['kernel']}×{l['kernel']} conv"


_COLORS = {"stem (im2col)": "tab:red", "FC": "tab:purple", "1×1 conv": "tab:blue",
           "3×3 conv": "tab:green"}


def _color(kind: str) -> str:
    return _COLORS.get(kind, "tab:orange")


def _fig_width(n: int) -> float:
    return min(max(6.0, 0.28 * n + 2.0), 24.0)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})   # byte-identical reruns
    plt.close(fig)
    return path


def plot_cycles(rep: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars per layer: ideal cycles vs RTL cycles (log scale)."""
    layers = rep["layers"]
    n = len(layers)
    x = list(range(n))
    fig, ax = plt.subplots(figsize=(_fig_width(n), 4.8))
    measured = [l.get("measured_cycles") for l in layers]
    has_meas = any(m is not None for m in measured)
    w = 0.27 if has_meas else 0.4
    ax.bar([i - w / (1 if has_meas else 2) for i in x], [l["ideal_cycles"] for l in layers],
           width=w, label="ideal (MACs / K²)", color="tab:gray")
    ax.bar([i + (0 if has_meas else w / 2) for i in x], [l["cycles"] for l in layers], width=w,
           label="RTL (cycle model = RTL counter)", color="tab:blue")
    if has_meas:
        ax.bar([i + w for i in x], [m or 0 for m in measured], width=w,
               label="RTL measured (sim)", color="tab:orange")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([_short(l["name"]) for l in layers], rotation=90, fontsize=7)
    ax.set_ylabel("cycles per image")
    t = rep.get("totals", {})
    hw = rep.get("hw", {})
    ax.set_title(f"{rep.get('model', '?')} on {hw.get('lanes', '?')}×{hw.get('lanes', '?')} engine: "
                 f"{t.get('cycles', 0):,} cycles (ideal {t.get('ideal_cycles', 0):,})", loc="left")
    ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, frameon=False)
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.set_xlim(-0.7, n - 0.3)
    return _save(fig, Path(path))


def plot_utilization(rep: Mapping[str, Any], path: Path) -> Path:
    """Bars per layer: utilization = ideal / RTL cycles, coloured by layer kind."""
    layers = rep["layers"]
    n = len(layers)
    util = [100 * l["ideal_cycles"] / l["cycles"] if l["cycles"] else 0 for l in layers]
    kinds = [_kind(l) for l in layers]
    fig, ax = plt.subplots(figsize=(_fig_width(n), 4.2))
    ax.bar(range(n), util, color=[_color(k) for k in kinds])
    for i, u in enumerate(util):
        if u < 99.0:
            ax.annotate(f"{u:.1f}", (i, u), ha="center", va="bottom", fontsize=7)
    tot = rep.get("totals", {}).get("utilization")
    if tot is not None:
        ax.axhline(100 * tot, color="black", lw=0.8, ls="--")
        ax.text(n - 0.5, 100 * tot, f"network {100 * tot:.1f} %", ha="right", va="bottom", fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_xticks(range(n))
    ax.set_xticklabels([_short(l["name"]) for l in layers], rotation=90, fontsize=7)
    ax.set_ylabel("utilization (%)")
    ax.set_title(f"{rep.get('model', '?')}: PE-array utilization per layer (ideal / RTL cycles)",
                 loc="left")
    handles = [plt.Rectangle((0, 0), 1, 1, color=_color(k)) for k in dict.fromkeys(kinds)]
    ax.legend(handles, list(dict.fromkeys(kinds)), fontsize=8, loc="lower right",
              bbox_to_anchor=(1.0, 1.0), ncol=len(handles), frameon=False)
    ax.set_xlim(-0.7, n - 0.3)
    return _save(fig, Path(path))


def layer_intensity(l: Mapping[str, Any], mantissa_bits: int) -> tuple[float, float]:
    """(MACs, bytes) of one layer: weights (``macs / (Ho·Wo)`` of them) + engine input
    activations + outputs (+ the residual read) at ``mantissa_bits`` per element."""
    b = mantissa_bits / 8
    ho, wo = l["out_hw"]
    weights = l["macs"] / (ho * wo)
    acts_in = l["in_channels"] * l["in_hw"][0] * l["in_hw"][1]
    acts_out = l["out_channels"] * ho * wo
    res = acts_out if l.get("residual") else 0
    return float(l["macs"]), b * (weights + acts_in + acts_out + res)


def plot_roofline(rep: Mapping[str, Any], path: Path, fmax_mhz: float | None = None,
                  bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS) -> Path:
    """Roofline of the engine at ``fmax_mhz`` with each layer as a point."""
    hw = rep.get("hw", {})
    k2 = hw.get("lanes", 16) ** 2
    mbits = hw.get("mantissa_bits", 8)
    measured_f = fmax_mhz is not None
    f = fmax_mhz if measured_f else NOMINAL_FMAX_MHZ
    peak = k2 * f * 1e6 / 1e9
    pts = []
    for l in rep["layers"]:
        macs, byts = layer_intensity(l, mbits)
        oi = macs / byts if byts else 0
        attained = macs / (l["cycles"] / (f * 1e6)) / 1e9 if l["cycles"] else 0
        pts.append((oi, attained, _kind(l), l["name"]))
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    lo = min(p[0] for p in pts) / 3
    hi = max(p[0] for p in pts) * 3
    ridge = peak / bandwidth_gbs
    lo, hi = min(lo, ridge / 10), max(hi, ridge * 3)
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(peak, bandwidth_gbs * x) for x in xs], color="black", lw=1.5)
    ax.axhline(peak, color="black", lw=0.6, ls=":")
    ax.text(hi, peak * 1.08, f"peak {peak:.1f} GMAC/s = {k2} × {f:.0f} MHz"
            + ("" if measured_f else " (target, not measured)"), ha="right", fontsize=8)
    ax.text(ridge / 1.5, bandwidth_gbs * ridge / 1.5 / 1.9,
            f"{bandwidth_gbs:g} GB/s (assumed DRAM)", rotation=35, ha="right", fontsize=8)
    for kind in dict.fromkeys(p[2] for p in pts):
        sel = [p for p in pts if p[2] == kind]
        ax.scatter([p[0] for p in sel], [p[1] for p in sel], color=_color(kind), label=kind,
                   s=22, zorder=3, edgecolor="white", linewidth=0.4)
    for p in [p for p in pts if p[2] in ("stem (im2col)", "FC")][:4]:
        ax.annotate(_short(p[3]), (p[0], p[1]), textcoords="offset points", xytext=(4, -10),
                    fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(min(min(p[1] for p in pts), bandwidth_gbs * lo) / 2, peak * 2)
    ax.set_xlabel(f"operational intensity (MAC / byte of weights + activations, {mbits}-bit mantissas)")
    ax.set_ylabel("GMAC/s")
    ax.set_title(f"{rep.get('model', '?')}: roofline of the {hw.get('lanes', '?')}×{hw.get('lanes', '?')} "
                 f"engine at {f:.1f} MHz")
    ax.grid(which="both", alpha=0.2)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, Path(path))


def write_plots(rep: Mapping[str, Any], out_dir: Path, fmax_mhz: float | None = None,
                bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS) -> list[Path]:
    """Write cycles.png, utilization.png and roofline.png into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    return [plot_cycles(rep, out_dir / "cycles.png"),
            plot_utilization(rep, out_dir / "utilization.png"),
            plot_roofline(rep, out_dir / "roofline.png", fmax_mhz, bandwidth_gbs)]


def plots_markdown(paths: Sequence[Path], fmax_mhz: float | None = None,
                   bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS) -> str:
    """The "Plots" section (image links relative to report.md)."""
    f = (f"{fmax_mhz:.1f} MHz (nextpnr Fmax)" if fmax_mhz is not None
         else f"{NOMINAL_FMAX_MHZ:g} MHz (target; no FPGA result)")
    lines = ["## Plots", ""]
    caption = {
        "cycles": "Per-layer cycles: ideal (MACs / K²) vs the RTL.",
        "utilization": "Per-layer PE-array utilization (ideal / RTL cycles).",
        "roofline": (f"Roofline at {f}; each layer's GMAC/s is what the engine attains from "
                     "its preloaded on-chip memories (cycle model); the slanted roof is an "
                     f"assumed {bandwidth_gbs:g} GB/s external memory: layers left of the ridge "
                     "(e.g. the FC layer) would be memory-bound if their weights and "
                     "activations streamed from it."),
    }
    for p in paths:
        stem = Path(p).stem
        lines += [f"![{stem}]({Path(p).name})", "", caption.get(stem, ""), ""]
    return "\n".join(lines)


def append_sections(md: str, sections: Mapping[str, str]) -> str:
    """Append each ``name -> text`` section to report.md text between markers, replacing a
    previous copy of the same section (idempotent)."""
    out = md
    for name, text in sections.items():
        b, e = _BEGIN.format(name=name), _END.format(name=name)
        out = re.sub(re.escape(b) + r".*?" + re.escape(e) + r"\n?", "", out, flags=re.S)
        out = out.rstrip("\n") + "\n\n" + b + "\n" + text.rstrip("\n") + "\n" + e + "\n"
    return out


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def update_report_md(out_dir: Path, rep: Mapping[str, Any], fpga: Mapping[str, Any] | None = None,
                     bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS) -> list[Path]:
    """Write the PNGs into ``out_dir`` and append the "FPGA" (when ``fpga`` is given) and
    "Plots" sections to ``out_dir/report.md`` (created from ``rep`` when missing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fmax = fpga.get("fmax_mhz") if fpga else None
    paths = write_plots(rep, out_dir, fmax, bandwidth_gbs)
    md_path = out_dir / "report.md"
    if md_path.exists():
        md = md_path.read_text()
    else:
        from .report import report_markdown
        try:
            md = report_markdown(dict(rep))
        except (KeyError, TypeError, ValueError):   # a partial report: just a title
            md = f"# {rep.get('model', 'model')}\n"
    sections = {}
    if fpga is not None:
        from .fpga import fpga_markdown
        sections["fpga"] = fpga_markdown(fpga)
    sections["plots"] = plots_markdown(paths, fmax, bandwidth_gbs)
    _write_atomic(md_path, append_sections(md, sections))
    return paths


# -- gated models (Precision Gating / DFS) ------------------------------------------------------
def plot_accuracy_vs_compute(res: Mapping[str, Any], path: Path) -> Path:
    """Accuracy vs compute from a ``pg_dfs`` bench result: PG (integer model) against average
    activation bits of the PG layers, DFS and skip-only against the computation percentage."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    for r in res.get("pg") or []:
        ax.scatter(r["avg_bits"], r["acc"], color="tab:blue")
        ax.annotate(f"{r['act_bits']}/{r['msb_bits']} bits", (r["avg_bits"], r["acc"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    if res.get("pg"):
        ax.axhline(res["pg"][0]["fp_acc"], color="gray", ls=":", label="float")
        ax.legend(fontsize=8)
    ax.set_xlabel("average activation bits of PG layers")
    ax.set_ylabel("top-1 accuracy (%), integer model")
    ax.set_title("Precision Gating")
    ax = axes[1]
    for key, color, label in (("dfs", "tab:green", "DFS skip/4/8"),
                              ("skip_only", "tab:red", "skip-only skip/8")):
        pts = sorted((r["measured_cp"], r["acc"]) for r in (res.get("dfs") or {}).get(key, []))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=label)
    if res.get("dfs"):
        ax.legend(fontsize=8)
    ax.set_xlabel("computation percentage (%)")
    ax.set_ylabel("top-1 accuracy (%), integer model")
    ax.set_title("DFS vs skip-only")
    return _save(fig, Path(path))


def plot_speedups(rows: Sequence[Mapping[str, Any]], path: Path, title: str,
                  measured_key: str = "measured", measured_label: str = "measured (RTL)") -> Path:
    """Per-layer bars: theoretical speed-up over dense next to the measured one."""
    fig, ax = plt.subplots(figsize=(_fig_width(len(rows)), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["theoretical"] for r in rows], 0.4, label="theoretical")
    ax.bar([x + 0.2 for x in xs], [r[measured_key] for r in rows], 0.4, label=measured_label)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([_short(r["layer"]) for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("speed-up over dense (×)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))
