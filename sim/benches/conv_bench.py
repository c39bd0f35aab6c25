"""cocotb bench of the conv engine sim top (:mod:`dynacc.sim.top`).

The test runs a list of layers from a JSON manifest (``$DYNACC_CONV_MANIFEST``) written by
:func:`dynacc.sim.conv.run_conv_layers`. Python touches the design only around a layer:
load the memories (``$readmemh`` on a ``load`` pulse), set the descriptor, pulse ``start``,
await ``done`` (the RTL runs the whole layer meanwhile), read the RTL cycle counter and
dump the output memory. Comparison against the golden model happens in the caller, which
owns the golden inputs.

Manifest: ``{"clock": "gpi" | "py" | "edges", "layers": [{"dir": ..., "desc": int,
"load": {mem: file}, "dump_words": int}, ...]}``. ``"edges"`` awaits every rising edge
from Python until done (the per-cycle baseline of ``bench/sim_speed.py``).
Results go to ``<dir>/result.json`` (``cycles``, ``wall_s``) and ``<dir>/out.mem``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge

CLOCK_PERIOD_NS = 10


class TB:
    """Owns the clock, reset and the load / run / dump sequence of the sim top."""

    def __init__(self, dut: Any, clock_impl: str = "gpi"):
        self.dut = dut
        self.clock = Clock(dut.clk, CLOCK_PERIOD_NS, unit="ns",
                           impl="py" if clock_impl == "py" else "gpi")
        self.clock.start()
        self.cwd = Path.cwd()

    async def reset(self) -> None:
        d = self.dut
        d.rst.value = 1
        d.start.value = 0
        d.load.value = 0
        d.dump.value = 0
        d.dump_words.value = 0
        d.desc.value = 0
        for _ in range(2):
            await RisingEdge(d.clk)
        d.rst.value = 0
        await RisingEdge(d.clk)

    async def load(self, files: dict[str, str], load_bits: dict[str, int]) -> None:
        mask = 0
        for mem, src in files.items():
            link = self.cwd / f"{mem}.mem"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(src).resolve())
            mask |= 1 << load_bits[mem]
        self.dut.load.value = mask
        await RisingEdge(self.dut.clk)
        self.dut.load.value = 0

    async def run(self, desc: int, per_edge: bool = False) -> int:
        d = self.dut
        d.desc.value = desc
        await RisingEdge(d.clk)
        d.start.value = 1
        await RisingEdge(d.clk)
        d.start.value = 0
        if per_edge:   # the baseline: Python wakes up on every rising edge
            while not d.done.value:
                await RisingEdge(d.clk)
        else:
            await RisingEdge(d.done)
        await ReadOnly()
        return int(d.cycles.value)

    async def dump(self, words: int, dest: Path) -> None:
        await RisingEdge(self.dut.clk)
        self.dut.dump_words.value = words
        self.dut.dump.value = 1
        await RisingEdge(self.dut.clk)
        self.dut.dump.value = 0
        await RisingEdge(self.dut.clk)
        os.replace(self.cwd / "out.mem", dest)


@cocotb.test()
async def conv_layers(dut: Any) -> None:
    """Run every layer of the manifest."""
    manifest = json.loads(Path(os.environ["DYNACC_CONV_MANIFEST"]).read_text())
    clock = manifest.get("clock", "gpi")
    tb = TB(dut, clock)
    await tb.reset()
    for case in manifest["layers"]:
        out_dir = Path(case["dir"])
        await tb.load(case["load"], manifest["load_bits"])
        t0 = time.perf_counter()
        cycles = await tb.run(case["desc"], per_edge=clock == "edges")
        wall = time.perf_counter() - t0
        await tb.dump(case["dump_words"], out_dir / "out.mem")
        (out_dir / "result.json").write_text(json.dumps({"cycles": cycles, "wall_s": wall}))
