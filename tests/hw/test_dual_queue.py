"""ItemQueue and LsbBuffer (the packed item storage of the dual-precision engine) in the
Amaranth simulator against a Python list model of the packed sequence."""

from __future__ import annotations

import random

from amaranth.hdl import unsigned
from amaranth.sim import Simulator

from dynacc.hw.item_queue import ItemQueue
from dynacc.hw.lsb_buffer import LsbBuffer


def _run(dut, bench):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()


def _flags_pattern(rng: random.Random, k: int, n: int) -> list[list[int]]:
    """Random flag sets including the all-off and all-on ones."""
    pats = [[0] * k, [1] * k]
    pats += [[int(rng.random() < p) for _ in range(k)] for p in (0.2, 0.5, 0.8) for _ in range(n)]
    rng.shuffle(pats)
    return pats


def test_item_queue_packs_in_lane_order():
    for k in (4, 3):
        rng = random.Random(k)
        depth = 40
        dut = ItemQueue(k, depth, unsigned(16))
        tiles = [_flags_pattern(rng, k, 8), _flags_pattern(rng, k, 5)]

        async def bench(ctx):
            for pats in tiles:
                ctx.set(dut.clear, 1)
                await ctx.tick()
                ctx.set(dut.clear, 0)
                expected = []
                for p, flags in enumerate(pats):
                    items = [1000 * (p + 1) + o for o in range(k)]
                    ctx.set(dut.push, 1)
                    ctx.set(dut.flags, sum(f << o for o, f in enumerate(flags)))
                    ctx.set(dut.items, items)
                    expected += [it for it, f in zip(items, flags) if f]
                    await ctx.tick()
                    assert ctx.get(dut.count) == len(expected)
                ctx.set(dut.push, 0)
                for g in range(-(-len(expected) // k)):
                    ctx.set(dut.raddr, g)
                    await ctx.tick()
                    got = list(ctx.get(dut.rdata))
                    want = expected[g * k:(g + 1) * k]
                    assert got[:len(want)] == want, f"K={k} group {g}: {got} != {want}"

        _run(dut, bench)


def test_item_queue_clear_wins_over_push():
    dut = ItemQueue(4, 8, unsigned(8))

    async def bench(ctx):
        ctx.set(dut.push, 1)
        ctx.set(dut.flags, 0b1011)
        await ctx.tick()
        assert ctx.get(dut.count) == 3
        ctx.set(dut.clear, 1)
        await ctx.tick()
        assert ctx.get(dut.count) == 0

    _run(dut, bench)


def test_lsb_buffer_reads_back_by_pixel():
    """Groups written by item position, read back per pixel (lane o's value or 0), across
    two tiles (``first`` restarts at item 0), one pixel per cycle."""
    for k in (4, 2, 5):
        rng = random.Random(10 + k)
        depth = 64
        dut = LsbBuffer(k, depth, 20)
        tiles = [_flags_pattern(rng, k, 10), _flags_pattern(rng, k, 4)]

        async def bench(ctx):
            for pats in tiles:
                items = [(p, o) for p, flags in enumerate(pats) for o in range(k) if flags[o]]
                value = {it: rng.randrange(-(1 << 19), 1 << 19) for it in items}
                groups = -(-len(items) // k)
                for g in range(groups):
                    row = [value[items[n]] if n < len(items) else rng.randrange(-9, 9)
                           for n in range(g * k, g * k + k)]
                    ctx.set(dut.wen, 1)
                    ctx.set(dut.waddr, g)
                    ctx.set(dut.wdata, row)
                    await ctx.tick()
                ctx.set(dut.wen, 0)
                await ctx.tick()
                for p, flags in enumerate(pats):
                    ctx.set(dut.ren, 1)
                    ctx.set(dut.first, int(p == 0))
                    ctx.set(dut.flags, sum(f << o for o, f in enumerate(flags)))
                    await ctx.tick()   # latency 1: lb now belongs to pixel p
                    got = list(ctx.get(dut.lb))
                    want = [value[(p, o)] if flags[o] else 0 for o in range(k)]
                    assert got == want, f"K={k} pixel {p}: {got} != {want}"
                ctx.set(dut.ren, 0)

        _run(dut, bench)
