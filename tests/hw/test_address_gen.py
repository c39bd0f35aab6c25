"""AddressGen: the issued step sequence equals a Python model of the loop nest."""

from __future__ import annotations

import pytest
from amaranth.sim import Simulator

from dynacc.hw.address_gen import SETUP_CYCLES, AddressGen
from dynacc.hw.config import HwConfig
from dynacc.hw.types import desc_layout

CFG = HwConfig(name="agen", lanes=4, mantissa_bits=6, acc_bits=30, align_span=6, shift_bits=6,
               act_depth=4096, out_depth=4096, wgt_depth=4096, max_out_channels=64,
               max_in_channels=64, max_dim=32, max_kernel=7, max_stride=2)


def model(h, w, cw, t, kh, kw, stride, pad):
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (w + 2 * pad - kw) // stride + 1
    steps = []
    o_addr = 0
    for oy in range(ho):
        for ox in range(wo):
            w_addr = 0
            for tt in range(t):
                for ky in range(kh):
                    for kx in range(kw):
                        for c in range(cw):
                            iy, ix = oy * stride - pad + ky, ox * stride - pad + kx
                            padded = not (0 <= iy < h and 0 <= ix < w)
                            steps.append(dict(
                                act=None if padded else (iy * w + ix) * cw + c, pad=int(padded),
                                wgt=w_addr, first=int(ky == kx == c == 0),
                                last=int(ky == kh - 1 and kx == kw - 1 and c == cw - 1),
                                tile=tt, align=tt * cw + c, out=o_addr))
                            w_addr += 1
                o_addr += 1
    steps[-1]["final"] = 1
    return ho, wo, steps


def layer_desc(h, w, cw, t, kh, kw, stride, pad, ho, wo):
    """The layer descriptor of one conv (no activation, no residual)."""
    return desc_layout(CFG).const({
        "height": h, "width": w, "out_height": ho, "out_width": wo, "in_words": cw,
        "out_tiles": t, "kernel_h": kh, "kernel_w": kw, "stride": stride, "pad": pad,
        "act": 0, "clamp_max": 0, "residual": 0})


async def issue_layer(ctx, dut, desc, n_steps):
    """Start ``desc`` and record its issued steps (in :func:`model`'s format) until the token
    goes invalid again, or, for a sequencer that never stops, well past ``n_steps``.
    Returns (steps, cycle of the first step after start, busy after the last step)."""
    ctx.set(dut.desc, desc)
    ctx.set(dut.start, 1)
    await ctx.tick()
    ctx.set(dut.start, 0)
    got, first_cycle, cyc = [], None, 0
    while True:
        tok = dut.token
        if ctx.get(tok.valid):
            if not got:
                first_cycle = cyc
            pad_ = ctx.get(tok.pad)
            got.append(dict(
                act=None if pad_ else ctx.get(dut.act_addr), pad=pad_,
                wgt=ctx.get(dut.wgt_addr), first=ctx.get(tok.first), last=ctx.get(tok.last),
                tile=ctx.get(tok.tile), align=ctx.get(tok.align_addr), out=ctx.get(tok.out_addr)))
            if ctx.get(tok.final):
                got[-1]["final"] = 1
        elif got:
            break
        if cyc > SETUP_CYCLES + 2 * n_steps + 10:     # a sequencer that never stops
            break
        await ctx.tick()
        cyc += 1
    return got, first_cycle, ctx.get(dut.busy)


@pytest.mark.parametrize("h, w, cw, t, kh, kw, stride, pad", [
    (5, 6, 2, 2, 3, 3, 1, 1),
    (7, 5, 1, 3, 3, 3, 2, 1),
    (4, 4, 3, 1, 1, 1, 1, 0),
    (2, 3, 2, 2, 3, 3, 1, 2),    # image smaller than the kernel, heavy padding
    (9, 9, 1, 1, 7, 7, 2, 3),
    (6, 6, 2, 1, 1, 1, 2, 0),
    (3, 4, 2, 3, 2, 2, 2, 1),    # every loop limit 1 or 2 (the "one before last" flags)
    (4, 5, 3, 2, 2, 3, 1, 0),
    (1, 1, 1, 1, 1, 1, 1, 0),    # a single step: the layer's first step is its last
])
def test_sequence(h, w, cw, t, kh, kw, stride, pad):
    ho, wo, exp = model(h, w, cw, t, kh, kw, stride, pad)
    dut = AddressGen(CFG)
    result = {}

    async def bench(ctx):
        result["run"] = await issue_layer(
            ctx, dut, layer_desc(h, w, cw, t, kh, kw, stride, pad, ho, wo), len(exp))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    got, first_cycle, busy_after = result["run"]
    assert first_cycle == SETUP_CYCLES
    for i, (g, e) in enumerate(zip(got, exp)):
        assert g == e, f"step {i}: {g} != {e}"
    assert len(got) == len(exp)
    assert busy_after == 0


def test_back_to_back_layers():
    """A layer started right after another (a 1x1 conv with 3 words per pixel, a padded
    strided 2x2 with 3 tiles, a 1x1 of one step per output, the first again) issues exactly
    its own sequence: nothing of the previous layer's loop state leaks into the next."""
    layers = [(4, 4, 3, 1, 1, 1, 1, 0), (3, 4, 2, 3, 2, 2, 2, 1), (2, 2, 1, 1, 1, 1, 1, 0),
              (4, 4, 3, 1, 1, 1, 1, 0)]
    dut = AddressGen(CFG)
    runs = []

    async def bench(ctx):
        for shape in layers:
            ho, wo, exp = model(*shape)
            runs.append((await issue_layer(ctx, dut, layer_desc(*shape, ho, wo), len(exp)),
                         exp))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    for n, ((got, first_cycle, busy_after), exp) in enumerate(runs):
        assert first_cycle == SETUP_CYCLES, f"layer {n}"
        assert got == exp, f"layer {n}"
        assert busy_after == 0, f"layer {n}"
