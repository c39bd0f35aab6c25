"""Toolchain smoke test: Amaranth component -> Verilog -> Verilator via the cocotb runner."""

from __future__ import annotations

from amaranth.back import verilog
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from dynacc.sim import runner


class RegisteredAdder(wiring.Component):
    """``o <= a + b`` (latency 1)."""

    def __init__(self, width: int):
        self._width = width
        super().__init__({"a": In(width), "b": In(width), "o": Out(width + 1)})

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.o.eq(self.a + self.b)
        return m


def test_amaranth_verilator_cocotb_chain(tmp_path):
    text = verilog.convert(RegisteredAdder(12), name="smoke_adder", emit_src=False)
    sim = runner.build("smoke", {"smoke_adder.v": text}, "smoke_adder")
    runner.run(sim, "dynacc.sim.benches.smoke_bench", run_dir=tmp_path)
