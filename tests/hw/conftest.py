"""Fixtures of the Amaranth-simulator unit tests (async testbenches only)."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import pytest
from amaranth.sim import Simulator


def run_pipeline(dut: Any, inputs: Sequence[dict[str, Any]], outputs: Sequence[str],
                 latency: int, vcd: str | None = None) -> list[dict[str, int]]:
    """Drive one input set per cycle into ``dut`` (attribute name -> value) and return the
    ``outputs`` seen ``latency`` cycles later, one dict per input, in order."""
    results: list[dict[str, int]] = []

    async def bench(ctx):
        n = len(inputs)
        for j in range(n + latency):
            if j < n:
                for name, v in inputs[j].items():
                    ctx.set(getattr(dut, name), v)
            await ctx.tick()
            # after edge j the outputs reflect the inputs applied before edge j - latency + 1
            if j >= latency - 1 and len(results) < n:
                results.append({o: ctx.get(getattr(dut, o)) for o in outputs})

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    path = vcd or (os.environ.get("VCD_DIR") and os.path.join(os.environ["VCD_DIR"], "unit.vcd"))
    if path:
        with sim.write_vcd(path):
            sim.run()
    else:
        sim.run()
    return results


@pytest.fixture(scope="session")
def pipeline() -> Callable[..., list[dict[str, int]]]:
    """:func:`run_pipeline` as a fixture."""
    return run_pipeline
