"""Accumulator: ``bias + sum`` of each output's partial sums (the bias read with the last
step), held until the next output's last step; the running sum restarts at 0; exact at the
width bound."""

from __future__ import annotations

import random

from amaranth.sim import Simulator

from dynacc.hw.accumulator import Accumulator


def _run(dut, steps):
    """Drive ``steps`` (dicts of i / en / last / bias), one per cycle; return ``o`` seen in the
    cycle after each (the component's latency 1)."""
    seen = []

    async def bench(ctx):
        for s in steps:
            for name, v in s.items():
                ctx.set(getattr(dut, name), v)
            await ctx.tick()
            seen.append(ctx.get(dut.o))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return seen


def _model(steps):
    """``o`` after each step: the last finished sum plus the bias of its last step."""
    run, done, out = 0, None, []
    for s in steps:
        if s["last"]:
            done, run = run + s["i"] + s["bias"], 0
        elif s["en"]:
            run += s["i"]
        out.append(done)
    return out


def _random_steps(rng, n, in_bits, bias_bits):
    steps = []
    for _ in range(n):
        en = rng.random() < 0.85
        steps.append({"i": rng.randint(-(1 << (in_bits - 1)), (1 << (in_bits - 1)) - 1),
                      "en": int(en), "last": int(en and rng.random() < 0.25),
                      "bias": rng.randint(-(1 << bias_bits), 1 << bias_bits)})
    return steps


def test_random_outputs_equal_bias_plus_sum():
    rng = random.Random(2)
    dut = Accumulator(in_width=35, acc_bits=48)
    steps = _random_steps(rng, 600, 35, 40)
    got, exp = _run(dut, steps), _model(steps)
    assert sum(s["last"] for s in steps) > 50
    checked = [(g, e) for g, e in zip(got, exp) if e is not None]
    assert checked and all(g == e for g, e in checked)


def test_result_is_held_until_the_next_last_step_and_disabled_steps_are_skipped():
    dut = Accumulator(in_width=8, acc_bits=16)
    steps = [dict(i=5, en=1, last=0, bias=0), dict(i=100, en=0, last=0, bias=0),
             dict(i=7, en=1, last=1, bias=1000),          # 1000 + 12
             dict(i=3, en=1, last=0, bias=-2),            # still 1012: bias read at last
             dict(i=-9, en=0, last=0, bias=-2),           # 1012
             dict(i=-4, en=1, last=1, bias=-2),           # -2 + 3 - 4 = -3
             dict(i=0, en=0, last=0, bias=50)]
    assert _run(dut, steps)[2:] == [1012, 1012, 1012, -3, -3]


def test_single_step_outputs_and_worst_case_accumulation_at_the_width_bound():
    """A one-step output (first and last at once) starts from 0; sums and bias reaching
    ``±(2**(acc_bits-1) - 1)`` come out exact."""
    dut = Accumulator(in_width=8, acc_bits=12)
    lo, hi = -(1 << 7), (1 << 7) - 1
    top = (1 << 11) - 1
    steps = [dict(i=hi, en=1, last=1, bias=0), dict(i=0, en=0, last=0, bias=0)]
    steps += [dict(i=hi, en=1, last=0, bias=0)] * 8
    steps += [dict(i=hi, en=1, last=1, bias=top - 9 * hi)]          # 9*127 + 904 = 2047
    steps += [dict(i=lo, en=1, last=0, bias=0)] * 8
    steps += [dict(i=lo, en=1, last=1, bias=-top + 9 * 128)]         # -1152 - 895 = -2047
    steps += [dict(i=0, en=0, last=0, bias=0)]
    got = _run(dut, steps)
    assert got[0] == hi and got[1] == hi
    assert got[10] == top and got[19] == -top and got[20] == -top
