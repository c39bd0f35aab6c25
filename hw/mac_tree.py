"""K-input signed dot product: one output lane of the PE array."""

from __future__ import annotations

from amaranth.hdl import Module, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ._params import check_int
from .config import clog2

__all__ = ["MacTree", "mac_tree_latency"]


def mac_tree_latency(lanes: int, levels_per_stage: int, product_stages: int = 1) -> int:
    """1 (operands) + ``product_stages`` + ``ceil(ceil(log2 lanes) / levels_per_stage)``
    (tree registers)."""
    return 1 + product_stages + -(-clog2(lanes) // levels_per_stage)


class MacTree(wiring.Component):
    """``o = sum_c x[c] * w[c]`` over K lanes, fully pipelined (one new input per cycle).

    The operands are registered in the tree (one copy per tree, named ``x_op`` / ``w_op``,
    so every multiplier, e.g. a DSP block, is fed by its own flip-flops and the shared
    activation word fans out register-to-register), the products are registered, then the
    adder tree is registered every ``levels_per_stage`` levels (and after its last level), so
    the combinational depth is one M×M multiplier or ``levels_per_stage`` adders.

    With ``product_stages=2`` each product takes two registered stages: with ``split`` as
    ``x*w_hi`` and ``x*w_lo`` (``w = w_hi * 2**h + w_lo``, ``h = M // 2``, ``w_lo`` unsigned),
    two M×h multipliers whose sum ``(x*w_hi << h) + x*w_lo`` is the second stage (LUT
    multipliers at high Fmax); without ``split`` as one multiplier (a DSP block) followed by a
    second register, so split and unsplit trees have the same latency.

    Parameters
    ----------
    lanes : int
        K, number of products summed.
    mantissa_bits : int
        M, width of the signed operands.
    levels_per_stage : int
        Adder-tree levels between two registers.
    product_stages : int
        Registered stages of each product, 1 or 2.
    split : bool
        With ``product_stages=2``: two half-width multipliers per product.

    Members
    -------
    x : In(ArrayLayout(signed(M), K))
        Activation mantissas (shared by every output lane of the array).
    w : In(ArrayLayout(signed(M), K))
        Weight mantissas of this output lane.
    o : Out(signed(2M + ceil(log2 K)))
        The exact sum, ``latency`` cycles after its inputs.
    """

    def __init__(self, lanes: int, *, mantissa_bits: int, levels_per_stage: int = 2,
                 product_stages: int = 1, split: bool = False):
        self._lanes = check_int("lanes", lanes, 1)
        self._mbits = check_int("mantissa_bits", mantissa_bits, 2, 32)
        self._lps = check_int("levels_per_stage", levels_per_stage, 1)
        self._pst = check_int("product_stages", product_stages, 1, 2)
        if split and self._pst != 2:
            raise ValueError("split products need product_stages=2")
        self._split = bool(split)
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
        """1 (operands) + ``product_stages`` + ``ceil(levels / levels_per_stage)`` (tree
        registers)."""
        return mac_tree_latency(self._lanes, self._lps, self._pst)

    def elaborate(self, platform):
        m = Module()
        x_op = Signal.like(self.x, name="x_op", reset_less=True)
        w_op = Signal.like(self.w, name="w_op", reset_less=True)
        m.d.sync += [x_op.eq(self.x), w_op.eq(self.w)]
        level = []
        h = self._mbits // 2
        for c in range(self._lanes):
            p = Signal(signed(2 * self._mbits), name=f"prod{c}", reset_less=True)
            if self._pst == 1:
                m.d.sync += p.eq(x_op[c] * w_op[c])
            elif self._split:
                lo = Signal(signed(self._mbits + h + 1), name=f"prod{c}_lo", reset_less=True)
                hi = Signal(signed(2 * self._mbits - h), name=f"prod{c}_hi", reset_less=True)
                m.d.sync += [lo.eq(x_op[c] * w_op[c][:h].as_unsigned()),
                             hi.eq(x_op[c] * w_op[c][h:].as_signed()),
                             p.eq((hi << h) + lo)]
            else:
                p1 = Signal(signed(2 * self._mbits), name=f"prod{c}_1", reset_less=True)
                m.d.sync += [p1.eq(x_op[c] * w_op[c]), p.eq(p1)]
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
