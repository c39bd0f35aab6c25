"""The whole dual-precision engine in Amaranth's Python simulator on tiny layers (no
Verilator): the engine plus memories initialised from the program's images (one activation
read port per row), every ``out`` / ``passed`` write captured; outputs and gate outcomes
``==`` the golden model, cycles ``==`` dual_conv_cycles."""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Elaboratable, Module, unsigned
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from dynacc.hw.config import HwConfig
from dynacc.hw.dual_engine import (DualEngine, gate_word_layout, passed_word_layout,
                                   scale_word_layout)
from dynacc.hw.dual_program import DualLayer, DualProgram
from dynacc.hw.dual_sequencer import dual_desc_layout
from dynacc.hw.types import (act_word_layout, align_word_layout, bias_word_layout,
                             quant_word_layout, weight_word_layout)
from dynacc.sim.memfile import pack_words, unpack_words

LAYOUTS = {"act": act_word_layout, "wgt": weight_word_layout, "align": align_word_layout,
           "bias": bias_word_layout, "quant": quant_word_layout, "gate": gate_word_layout,
           "scale": scale_word_layout}


def _words(values: np.ndarray, layout) -> list[int]:
    bits = pack_words(values, layout)
    weights = [1 << i for i in range(bits.shape[1])]
    return [sum(w for w, b in zip(weights, row) if b) for row in bits.tolist()]


class _Top(Elaboratable):
    def __init__(self, cfg: HwConfig, images: dict[str, np.ndarray]):
        self.cfg = cfg
        self.engine = DualEngine(cfg)
        self.images = images

    def elaborate(self, platform):
        m = Module()
        cfg, eng = self.cfg, self.engine
        m.submodules.engine = eng
        mems = DualEngine.memories(cfg)
        made: dict[str, Memory] = {}
        for port, (kind, _depth, mem) in mems.items():
            if kind != "read":
                continue
            if mem not in made:
                lay = LAYOUTS[mem](cfg)
                depth = DualEngine.memory_depth(cfg, port)
                init = _words(self.images[mem], lay) if mem in self.images else []
                made[mem] = Memory(shape=unsigned(_width(lay)), depth=depth, init=init)
                m.submodules[f"mem_{mem}"] = made[mem]
            rp = made[mem].read_port()
            p = getattr(eng, port)
            m.d.comb += [rp.addr.eq(p.addr), rp.en.eq(p.en), p.data.eq(rp.data)]
        return m


def _width(layout) -> int:
    from amaranth.hdl import Shape
    return Shape.cast(layout).width


def run_dual_pysim(layer: DualLayer, cfg: HwConfig, max_cycles: int = 200_000
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(out [O, Ho, Wo], passed [O, Ho, Wo] bool, cycles)`` of ``layer`` on the engine."""
    prog = DualProgram(layer, cfg)
    top = _Top(cfg, prog.images())
    eng = top.engine
    desc = int(dual_desc_layout(cfg).const(prog.desc).as_bits())
    nw = prog.out_words
    k = cfg.lanes
    out_words = np.zeros((nw, k), dtype=np.int64)
    passed_words = np.zeros((nw, k), dtype=np.int64)
    result = {}

    async def bench(ctx):
        ctx.set(eng.desc.as_value(), desc)
        await ctx.tick()
        ctx.set(eng.start, 1)
        await ctx.tick()
        ctx.set(eng.start, 0)
        n = 0
        async for _clk, _rst, oen, oaddr, odata, pen, paddr, pdata, done, cyc in ctx.tick().sample(
                eng.out.en, eng.out.addr, eng.out.data.as_value(), eng.passed.en,
                eng.passed.addr, eng.passed.data.as_value(), eng.done, eng.cycles):
            if done:
                result["cycles"] = cyc
                return
            if oen:
                out_words[oaddr] = unpack_words(
                    _bits(odata, _width(act_word_layout(cfg))), act_word_layout(cfg))[0]
            if pen:
                passed_words[paddr] = unpack_words(
                    _bits(pdata, k), passed_word_layout(cfg))[0]
            n += 1
            if n > max_cycles:
                raise AssertionError(f"layer {layer.name!r}: no done after {max_cycles} cycles")

    sim = Simulator(top)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return prog.unpack_output(out_words), prog.unpack_passed(passed_words), result["cycles"]


def _bits(v: int, width: int) -> np.ndarray:
    return np.array([[(v >> i) & 1 for i in range(width)]], dtype=np.uint8)


# -- tests ------------------------------------------------------------------------------
import pytest  # noqa: E402

from dynacc.hw.config import load_named  # noqa: E402
from dynacc.sim.dual_layers import gate_values, random_dual_layer  # noqa: E402

CFG = load_named("dual")

CASES = {
    # 2 output tiles (O = 5), a padded input word (C = 6), ties at every threshold
    "gated_3x3": dict(c=6, o=5, h=4, w=5, k=3, padding=1, pass_fraction=0.4),
    "msb": dict(c=4, o=4, h=4, w=4, k=3, padding=1, mode="msb", act_bits=5, msb_bits=2),
    # one step per output (S = 1): items appended and groups issued back to back
    "full_1x1": dict(c=3, o=4, h=4, w=5, k=1, mode="full"),
    "stride2_tiny": dict(c=4, o=4, h=3, w=2, k=3, stride=2, padding=2, pass_fraction=0.9,
                         act_bits=5, msb_bits=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_pysim(case):
    layer = random_dual_layer(case, CFG.fmt, seed=len(case), **CASES[case])
    if layer.mode == "gated":
        thr = np.asarray(layer.threshold)[:, None, None]
        assert (gate_values(layer) == thr).any(), "needs an exact tie"
    out, passed, cycles = run_dual_pysim(layer, CFG)
    y, p = layer.golden(CFG.fmt)
    bad = np.argwhere(passed != p)
    assert not len(bad), f"gate outcome differs at (o, y, x) {tuple(bad[0])}"
    bad = np.argwhere(out != y)
    assert not len(bad), f"output differs at {tuple(bad[0])}: {out[tuple(bad[0])]} != {y[tuple(bad[0])]}"
    assert cycles == DualProgram(layer, CFG).cycles(p)


def test_engine_pysim_odd_config():
    """K = 3 lanes (not a power of two), M = 7, one adder level per pipeline stage."""
    import dataclasses

    cfg = dataclasses.replace(load_named("small"), name="dual_k3", lanes=3, mantissa_bits=7,
                              acc_bits=30, align_span=4, tree_levels_per_stage=1, max_dim=8,
                              max_kernel=3, max_in_channels=16, max_out_channels=16)
    layer = random_dual_layer("k3_gated", cfg.fmt, c=5, o=4, h=5, w=4, k=3, padding=1,
                              act_bits=6, msb_bits=2, pass_fraction=0.4, block=3, seed=0)
    out, passed, cycles = run_dual_pysim(layer, cfg)
    y, p = layer.golden(cfg.fmt)
    assert (passed == p).all() and (out == y).all()
    assert cycles == DualProgram(layer, cfg).cycles(p)


CG_FBS = {
    # CW = 2, one base word per tile, the second phase wraps to word 0 in partition 0
    "cg_p2": dict(c=8, o=8, h=4, w=3, k=3, padding=1, partitions=2, pass_fraction=0.4),
    # CW = 4, nb = 1, one tile per partition, stride 2
    "cg_p4_stride2": dict(c=16, o=16, h=3, w=3, k=3, stride=2, padding=1, partitions=4,
                          pass_fraction=0.5),
}


@pytest.mark.parametrize("case", list(CG_FBS) + ["fbs"])
def test_engine_pysim_cg_fbs(case):
    """Channel Gating (base words, then the other words of the passing outputs) and a
    compacted FBS layer (one pass, runtime scale)."""
    from dynacc.sim.dual_layers import random_cg_layer, random_fbs_layer

    if case == "fbs":
        layer = random_fbs_layer(case, CFG.fmt, c=10, o=9, h=4, w=3, k=3, padding=1,
                                 density_in=0.75, density_out=0.8, seed=3)
    else:
        layer = random_cg_layer(case, CFG.fmt, seed=len(case), **CG_FBS[case])
    out, passed, cycles = run_dual_pysim(layer, CFG)
    y, p = layer.golden(CFG.fmt)
    assert (passed == p).all() and (out == y).all()
    if layer.mode == "cg":
        assert p.any() and not p.all()
    assert cycles == DualProgram(layer, CFG).cycles(p)
