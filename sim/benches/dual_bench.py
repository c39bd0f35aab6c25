"""cocotb bench of the dual-precision engine sim top (:mod:`dynacc.sim.dual_top`).

Runs the layers of the JSON manifest ``$DYNACC_DUAL_MANIFEST`` written by
:func:`dynacc.sim.dual.run_dual_layers`, with the load / run sequence of the conv bench
(:class:`dynacc.sim.benches.conv_bench.TB`): load the memories, set the descriptor, pulse
``start``, await ``done``, read the RTL cycle counter; then dump both write memories
(``out.mem`` and ``passed.mem``) into the layer's directory with ``result.json``
(``cycles``, ``wall_s``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import cocotb
from cocotb.triggers import RisingEdge

from dynacc.sim.benches.conv_bench import TB


class DualTB(TB):
    """The conv bench's sequence; the dump moves every dumped memory file."""

    async def dump_all(self, words: int, dest_dir: Path, names: list[str]) -> None:
        await RisingEdge(self.dut.clk)
        self.dut.dump_words.value = words
        self.dut.dump.value = 1
        await RisingEdge(self.dut.clk)
        self.dut.dump.value = 0
        await RisingEdge(self.dut.clk)
        for n in names:
            os.replace(self.cwd / f"{n}.mem", dest_dir / f"{n}.mem")


@cocotb.test()
async def dual_layers(dut: Any) -> None:
    """Run every layer of the manifest."""
    manifest = json.loads(Path(os.environ["DYNACC_DUAL_MANIFEST"]).read_text())
    tb = DualTB(dut, manifest.get("clock", "gpi"))
    await tb.reset()
    for case in manifest["layers"]:
        out_dir = Path(case["dir"])
        await tb.load(case["load"], manifest["load_bits"])
        t0 = time.perf_counter()
        cycles = await tb.run(case["desc"])
        wall = time.perf_counter() - t0
        await tb.dump_all(case["dump_words"], out_dir, manifest["dumps"])
        (out_dir / "result.json").write_text(json.dumps({"cycles": cycles, "wall_s": wall}))
