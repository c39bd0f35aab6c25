"""The simulation top of the conv engine: the Amaranth engine plus Verilog memories that load
and dump hex files, so whole layers run in Verilator without Python in the cycle loop.

The wrapper is generated from the engine's ``metadata.as_json()`` (no port name typed by
hand). Each read memory ``<m>`` of :data:`dynacc.hw.conv_engine.MEMORIES` gets
``reg [W-1:0] <m>_mem [0:2**AW-1]`` with a registered read (latency 1) and
``$readmemh("<m>.mem", ...)`` on the clock edge that samples bit i of ``load``; the output
memory is written by the engine and ``$writememh("out.mem", out_mem, 0, dump_words - 1)``
runs on the edge that samples ``dump``. File names are relative to the simulator's working
directory (the run directory).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from amaranth.back import verilog

from dynacc.hw.config import HwConfig
from dynacc.hw.conv_engine import MEMORIES, ConvEngine

__all__ = ["SimTop", "sim_top", "engine_sim_top"]

TOP_NAME = "conv_sim_top"


@dataclasses.dataclass(frozen=True)
class SimTop:
    """Generated sources and the facts the bench needs."""

    toplevel: str
    sources: dict[str, str]
    #: memory name -> bit of the ``load`` port (read memories)
    load_bits: dict[str, int]
    #: memory name -> (word width, address width)
    geometry: dict[str, tuple[int, int]]
    #: the engine's ComponentMetadata JSON
    metadata: dict[str, Any]


def _ports(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def walk(members: dict[str, Any]) -> None:
        for m in members.values():
            if m["type"] == "port":
                out[m["name"]] = m
            else:
                walk(m["members"])
    walk(meta["interface"]["members"])
    return out


def sim_top(cfg: HwConfig) -> SimTop:
    """Generate ``<engine>.v``, ``<engine>.component.json`` and the wrapper for ``cfg``."""
    return engine_sim_top(ConvEngine(cfg), f"conv_engine_{cfg.name}", TOP_NAME,
                          {n: (kind, n) for n, (kind, _) in MEMORIES.items()},
                          f"dynacc.sim.top for hardware config {cfg.name!r}")


def engine_sim_top(engine: Any, ename: str, top_name: str,
                   port_memories: dict[str, tuple[str, str]], generator: str) -> SimTop:
    """The wrapper of an engine component: one Verilog memory per memory name, shared by
    every engine port that names it (``port_memories``: port -> (``read``/``write``,
    memory)). Each read port gets its own registered read (latency 1) of its memory; read
    memories load ``<m>.mem`` on their bit of ``load`` (bits in order of first appearance),
    write memories dump to ``<m>.mem`` on ``dump``. ``generator`` names the generator in the
    file header."""
    meta = engine.metadata.as_json()
    ports = _ports(meta)
    members = meta["interface"]["members"]
    engine_v = verilog.convert(engine, name=ename, emit_src=False)

    def port(p: str, field: str) -> dict[str, Any]:
        return ports[members[p]["members"][field]["name"]]

    decls: list[str] = []
    lines: list[str] = []
    conns: list[str] = []
    load_bits: dict[str, int] = {}
    geometry: dict[str, tuple[int, int]] = {}
    writes: list[str] = []
    for p, (kind, mem) in port_memories.items():
        addr, data, en = port(p, "addr"), port(p, "data"), port(p, "en")
        dw, aw = data["width"], addr["width"]
        if mem not in geometry:
            geometry[mem] = (dw, aw)
            decls.append(f"  reg  [{dw - 1}:0] {mem}_mem [0:{(1 << aw) - 1}];")
            if kind == "read":
                load_bits[mem] = len(load_bits)
                lines.append(f"  always @(posedge clk) if (load[{load_bits[mem]}]) "
                             f"$readmemh(\"{mem}.mem\", {mem}_mem);")
            else:
                writes.append(mem)
                lines.append(f"  always @(posedge clk) if (dump) $writememh(\"{mem}.mem\", "
                             f"{mem}_mem, 0, dump_words - 1);")
        elif geometry[mem] != (dw, aw):
            raise ValueError(f"ports of memory {mem!r} disagree on geometry")
        decls += [f"  wire [{aw - 1}:0] {p}_addr;", f"  wire {p}_en;"]
        conns += [f"    .{addr['name']}({p}_addr),", f"    .{en['name']}({p}_en),"]
        if kind == "read":
            decls.append(f"  reg  [{dw - 1}:0] {p}_q;")
            conns.append(f"    .{data['name']}({p}_q),")
            lines.append(f"  always @(posedge clk) if ({p}_en) {p}_q <= {mem}_mem[{p}_addr];")
        else:
            decls.append(f"  wire [{dw - 1}:0] {p}_d;")
            conns.append(f"    .{data['name']}({p}_d),")
            lines.append(f"  always @(posedge clk) if ({p}_en) {mem}_mem[{p}_addr] <= {p}_d;")
    ow = max(geometry[w][1] for w in writes)
    ctrl = {k: ports[k] for k in ("desc", "start", "busy", "done", "cycles")}
    for k, p in ctrl.items():
        conns.append(f"    .{p['name']}({k}),")
    conns += ["    .clk(clk),", "    .rst(rst)"]
    top = "\n".join([
        f"// Generated by {generator}: do not edit.",
        f"module {top_name} (",
        "  input  clk,",
        "  input  rst,",
        "  input  start,",
        f"  input  [{ctrl['desc']['width'] - 1}:0] desc,",
        "  output busy,",
        "  output done,",
        f"  output [{ctrl['cycles']['width'] - 1}:0] cycles,",
        f"  input  [{len(load_bits) - 1}:0] load,",
        "  input  dump,",
        f"  input  [{ow}:0] dump_words",
        ");",
        *decls,
        *lines,
        f"  {ename} engine (",
        *conns,
        "  );",
        "endmodule",
        "",
    ])
    vlt = "\n".join([
        "`verilator_config",
        "// cocotb sees the wrapper's ports and memories only (the engine stays private)",
        f'public_flat_rw -module "{top_name}" -var "*"',
        "",
    ])
    sources = {
        f"{top_name}.vlt": vlt,
        f"{ename}.v": engine_v,
        f"{ename}.component.json": json.dumps(meta, indent=1, sort_keys=True),
        f"{top_name}.v": top,
    }
    return SimTop(top_name, sources, load_bits, geometry, meta)
