"""K-input signed dot product: one output lane of the PE array."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed
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

    With ``product_stages`` > 1 each product takes that many registered stages. With
    ``split`` (``product_stages=4``) it is a radix-4 Booth multiplier in LUTs: stage 1 registers
    the controls of the ``ceil(M/2)`` digits ``d_i = -2 w[2i+1] + w[2i] + w[2i-1]`` in {-2..2}
    (one LUT each; the operand flip-flops then drive only these), stage 2 the partial products
    ``x * d_i`` (a select between 0, x, 2x and a negation: one LUT level and an (M+2)-bit
    carry chain), stage 3 their pairwise sums ``pp_2j + 4 pp_2j+1``, stage 4 the rest of the
    sum (one adder for M <= 8). Without ``split`` it is one multiplier (a DSP block) followed by
    ``product_stages - 1`` fabric registers, so split and unsplit trees have the same latency;
    with ``product_stages >= 2`` the first of those stages is a second operand register right
    before the multiplier (the DSP block's input registers after ``gen/dsp_regs.py``), so the
    activation word reaches the DSP blocks in two register hops (shared word → per-tree copy
    in the fabric → block), not in one route across the die to every block.

    Parameters
    ----------
    lanes : int
        K, number of products summed.
    mantissa_bits : int
        M, width of the signed operands.
    levels_per_stage : int
        Adder-tree levels between two registers.
    product_stages : int
        Registered stages of each product, 1 to 4.
    split : bool
        With ``product_stages=4``: Booth radix-4 LUT multipliers.

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
        self._pst = check_int("product_stages", product_stages, 1, 4)
        if split and self._pst != 4:
            raise ValueError("split (Booth) products need product_stages=4")
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
        for c in range(self._lanes):
            p = Signal(signed(2 * self._mbits), name=f"prod{c}", reset_less=True)
            if self._split:
                self._booth(m, c, x_op[c], w_op[c], p)
            else:
                # reg_from: the product stage whose register first follows the multiplier
                xa, wa, reg_from = x_op[c], w_op[c], 1
                if self._pst >= 2:
                    # operands registered a second time right before the multiplier (the DSP
                    # block's input registers), taking one of the product stages: the per-tree
                    # copy x_op stays a fabric flip-flop between the shared word and the block
                    xa = Signal(signed(self._mbits), name=f"mul{c}_x", reset_less=True)
                    wa = Signal(signed(self._mbits), name=f"mul{c}_w", reset_less=True)
                    m.d.sync += [xa.eq(x_op[c]), wa.eq(w_op[c])]
                    reg_from = 2
                prev = xa * wa
                for s in range(reg_from, self._pst):
                    r = Signal(signed(2 * self._mbits), name=f"prod{c}_{s}", reset_less=True)
                    m.d.sync += r.eq(prev)
                    prev = r
                m.d.sync += p.eq(prev)
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

    def _booth(self, m: Module, c: int, x, w, p: Signal) -> None:
        """Four registered stages computing ``p = x * w`` (radix-4 Booth, see class doc)."""
        mb = self._mbits
        bit = lambda i: 0 if i < 0 else w[min(i, mb - 1)]  # noqa: E731 (sign extension)
        # stage 1: the Booth digits' controls (and x, delayed alongside), placed next to their
        # partial products so the operand registers only drive these few flip-flops
        xd = Signal(signed(mb), name=f"prod{c}_x", reset_less=True)
        m.d.sync += xd.eq(x)
        pps = []
        for i in range(-(-mb // 2)):
            b2, b1, b0 = bit(2 * i + 1), bit(2 * i), bit(2 * i - 1)
            one = Signal(name=f"prod{c}_one{i}", reset_less=True)
            two = Signal(name=f"prod{c}_two{i}", reset_less=True)
            neg = Signal(name=f"prod{c}_neg{i}", reset_less=True)
            m.d.sync += [one.eq(b1 ^ b0), two.eq((b2 & ~b1 & ~b0) | (~b2 & b1 & b0)),
                         neg.eq(b2)]
            # stage 2: the partial product x * d_i
            mag = Signal(signed(mb + 2), name=f"prod{c}_mag{i}")
            m.d.comb += mag.eq(Mux(two, xd << 1, Mux(one, xd, 0)))
            pp = Signal(signed(mb + 2), name=f"prod{c}_pp{i}", reset_less=True)
            m.d.sync += pp.eq(Mux(neg, -mag, mag))
            pps.append((pp, 2 * i))
        # stage 3: pairwise sums
        pairs = []
        for j in range(0, len(pps), 2):
            (a, sa), rest = pps[j], pps[j + 1:j + 2]
            q = Signal(signed(mb + 5), name=f"prod{c}_q{j // 2}", reset_less=True)
            m.d.sync += q.eq(a + (rest[0][0] << 2) if rest else a)
            pairs.append((q, sa))
        # stage 4: the rest of the sum
        total = pairs[0][0]
        for q, sh in pairs[1:]:
            total = total + (q << sh)
        m.d.sync += p.eq(total)
