"""K-input signed dot product: one output lane of the PE array."""

from __future__ import annotations

from amaranth.hdl import Module, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ._params import check_int
from .config import clog2

__all__ = ["MacTree", "mac_tree_latency"]


def mac_tree_latency(lanes: int, levels_per_stage: int) -> int:
    """1 (operands) + 1 (products) + ``ceil(ceil(log2 lanes) / levels_per_stage)`` (tree
    registers)."""
    return 2 + -(-clog2(lanes) // levels_per_stage)


class MacTree(wiring.Component):
    """``o = sum_c x[c] * w[c]`` over K lanes, fully pipelined (one new input per cycle).

    The operands are registered in the tree (one copy per tree, named ``x_op`` / ``w_op``,
    so every multiplier, e.g. a DSP block, is fed by its own flip-flops and the shared
    activation word fans out register-to-register), the products are registered, then the
    adder tree is registered every ``levels_per_stage`` levels (and after its last level), so
    the combinational depth is one M×M multiplier or ``levels_per_stage`` adders.

    Parameters
    ----------
    lanes : int
        K, number of products summed.
    mantissa_bits : int
        M, width of the signed operands.
    levels_per_stage : int
        Adder-tree levels between two registers.

    Members
    -------
    x : In(ArrayLayout(signed(M), K))
        Activation mantissas (shared by every output lane of the array).
    w : In(ArrayLayout(signed(M), K))
        Weight mantissas of this output lane.
    o : Out(signed(2M + ceil(log2 K)))
        The exact sum, ``latency`` cycles after its inputs.
    """

    def __init__(self, lanes: int, *, mantissa_bits: int, levels_per_stage: int = 2):
        self._lanes = check_int("lanes", lanes, 1)
        self._mbits = check_int("mantissa_bits", mantissa_bits, 2, 32)
        self._lps = check_int("levels_per_stage", levels_per_stage, 1)
        word = data.ArrayLayout(signed(self._mbits), self._lanes)
        super().__init__({
            "x": In(word),
            "w": In(word),
            "o": Out(signed(2 * self._mbits + clog2(self._lanes))),
        })

    @property
    def lanes(self) -> int:
        return self._lanes

    @property
    def levels(self) -> int:
        """Adder-tree levels, ``ceil(log2 K)``."""
        return clog2(self._lanes)

    @property
    def latency(self) -> int:
        """1 (operands) + 1 (products) + ``ceil(levels / levels_per_stage)`` (tree
        registers)."""
        return mac_tree_latency(self._lanes, self._lps)

    def elaborate(self, platform):
        m = Module()
        x_op = Signal.like(self.x, name="x_op", reset_less=True)
        w_op = Signal.like(self.w, name="w_op", reset_less=True)
        m.d.sync += [x_op.eq(self.x), w_op.eq(self.w)]
        level = []
        for c in range(self._lanes):
            p = Signal(signed(2 * self._mbits), name=f"prod{c}", reset_less=True)
            m.d.sync += p.eq(x_op[c] * w_op[c])
            level.append(p)
        depth = 0
        while len(level) > 1:
            sums = [level[i] + level[i + 1] if i + 1 < len(level) else level[i]
                    for i in range(0, len(level), 2)]
            depth += 1
            if depth % self._lps == 0 or len(sums) == 1:
                regs = []
                for i, s in enumerate(sums):
                    r = Signal(s.shape(), name=f"sum{depth}_{i}")
                    m.d.sync += r.eq(s)
                    regs.append(r)
                sums = regs
            level = sums
        m.d.comb += self.o.eq(level[0])
        return m
