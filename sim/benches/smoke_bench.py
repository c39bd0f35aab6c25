"""cocotb bench of the toolchain smoke test: a registered adder driven from Python."""

from __future__ import annotations

import random
from typing import Any

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge


@cocotb.test()
async def registered_adder(dut: Any) -> None:
    """``o`` equals ``a + b`` of the previous edge, for random inputs."""
    Clock(dut.clk, 10, unit="ns").start()
    width = len(dut.a)
    rng = random.Random(0)
    dut.rst.value = 0
    for _ in range(200):
        a, b = rng.randrange(1 << width), rng.randrange(1 << width)
        await RisingEdge(dut.clk)
        dut.a.value = a
        dut.b.value = b
        await RisingEdge(dut.clk)
        await ReadOnly()
        assert int(dut.o.value) == a + b, (a, b, int(dut.o.value))
