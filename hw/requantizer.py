"""Requantizer (rule R3 = R1 round-half-even shift + S1 saturation)."""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from dynacc.quant.formats import BFPFormat

from ._params import check_int

__all__ = ["Requantizer"]


class Requantizer(wiring.Component):
    """``o = saturate(shift_round_half_even(i, shift))`` to ``±(2**(M-1) - 1)``.

    ``shift > 0``: arithmetic right shift; the dropped bits round half to even (guard bit
    ``i[shift-1]``, sticky = OR of the bits below it, round up when
    ``guard & (sticky | lsb)``). Any ``shift >= in_width`` gives 0, so the shifter only spans
    ``[1, in_width]``. ``shift <= 0``: exact left shift; any non-zero input shifted by
    ``M - 1`` or more saturates, so the left shifter only spans ``[0, M - 1]``.

    Six registered stages, each a few LUT levels deep: (1) the input and the decoded shift
    amount ``r1 = min(shift, in_width) - 1 = hi*G + lo`` (G = :attr:`GRANULE`); (2) the coarse
    right shift by ``hi*G`` with the sticky OR of the dropped whole chunks, and the left
    shift; (3) the fine right shift by ``lo``, the rest of the sticky bit and the round-up
    bit; (4) the rounding add (or the left-shifted value); (5) the saturation tests on 4-bit
    slices of the bits above the mantissa; (6) their reduction and the saturating select.
    Stage 6 was split off stage 5 because the full-width OR/AND trees plus the select were the
    critical path of the 16×16 engine on the ECP5 (133.5 MHz).

    Parameters
    ----------
    fmt : BFPFormat
        Output format (M bits).
    in_width : int
        Width of the signed input.
    shift_bits : int
        Width of the signed shift.

    Members
    -------
    i : In(signed(in_width))
    shift : In(signed(shift_bits))
    o : Out(signed(M)), latency 6.
    """

    #: pipeline registers between input and output
    LATENCY = 6
    #: bits per slice of the stage-5 saturation tests (one LUT4 each)
    SLICE = 4
    #: bits per step of the coarse right shift (a G:1 mux remains for the fine step)
    GRANULE = 8

    def __init__(self, fmt: BFPFormat, *, in_width: int, shift_bits: int):
        if not isinstance(fmt, BFPFormat):
            raise TypeError(f"fmt must be a BFPFormat, not {fmt!r}")
        self._fmt = fmt
        self._in_width = check_int("in_width", in_width, 2)
        self._shift_bits = check_int("shift_bits", shift_bits, 2, 16)
        super().__init__({
            "i": In(signed(self._in_width)),
            "shift": In(signed(self._shift_bits)),
            "o": Out(signed(fmt.mantissa_bits)),
        })

    @property
    def fmt(self) -> BFPFormat:
        return self._fmt

    @property
    def in_width(self) -> int:
        return self._in_width

    @property
    def latency(self) -> int:
        return self.LATENCY

    def elaborate(self, platform):
        m = Module()
        w = self._in_width
        mb = self._fmt.mantissa_bits
        max_m = self._fmt.max_mantissa
        max_left = mb - 1
        g = self.GRANULE
        n_chunks = -(-w // g)

        # stage 1: register the input and decode the shift
        # right path: r1 = min(shift, w) - 1 in [0, w - 1], split as r1 = hi*G + lo
        # left path: l = min(-shift, M - 1)
        pos = Signal()
        m.d.comb += pos.eq(self.shift > 0)
        r1 = Signal(range(w))
        with m.If(self.shift >= w):
            m.d.comb += r1.eq(w - 1)
        with m.Elif(pos):
            m.d.comb += r1.eq(self.shift - 1)
        left = Signal(range(max_left + 1))
        with m.If(self.shift <= -max_left):
            m.d.comb += left.eq(max_left)
        with m.Elif(~pos):
            m.d.comb += left.eq(-self.shift)
        i1 = Signal(signed(w))
        hi1 = Signal(range(n_chunks))
        lo1 = Signal(range(g))
        left1 = Signal.like(left)
        pos1 = Signal()
        m.d.sync += [i1.eq(self.i), hi1.eq(r1 // g), lo1.eq(r1 % g), left1.eq(left),
                     pos1.eq(pos)]

        # stage 2: coarse right shift by hi*G; sticky of the hi*G dropped bits (OR of whole
        # chunks); left shift
        chunk_or = Signal(n_chunks)
        m.d.comb += chunk_or.eq(Cat(*(i1[j * g:min((j + 1) * g, w)].any()
                                      for j in range(n_chunks))))
        keep_chunks = Signal(range(n_chunks + 1))
        m.d.comb += keep_chunks.eq(n_chunks - hi1)
        chunk_mask = Signal(n_chunks)    # the hi chunks below the coarse cut
        m.d.comb += chunk_mask.eq(Const((1 << n_chunks) - 1, unsigned(n_chunks)) >> keep_chunks)
        c2 = Signal(signed(w))
        sc2 = Signal()
        lo2 = Signal.like(lo1)
        shl2 = Signal(signed(w + max_left))
        pos2 = Signal()
        m.d.sync += [c2.eq(i1 >> (hi1 * g)), sc2.eq((chunk_or & chunk_mask).any()),
                     lo2.eq(lo1), shl2.eq(i1 << left1), pos2.eq(pos1)]

        # stage 3: fine right shift by lo (t = i >> (shift - 1), guard bit at the bottom),
        # sticky of the lo bits below the guard bit, round-up bit
        t = Signal(signed(w))
        m.d.comb += t.eq(c2 >> lo2)
        keep_low = Signal(range(g + 1))
        m.d.comb += keep_low.eq(g - lo2)
        low_mask = Signal(g)             # the lo bits below the guard bit
        m.d.comb += low_mask.eq(Const((1 << g) - 1, unsigned(g)) >> keep_low)
        sticky = Signal()
        m.d.comb += sticky.eq(sc2 | (c2.as_unsigned()[:g] & low_mask).any())
        q = t >> 1
        q3 = Signal(signed(w))
        up3 = Signal()
        shl3 = Signal.like(shl2)
        pos3 = Signal()
        m.d.sync += [q3.eq(q), up3.eq(t[0] & (sticky | q[0])), shl3.eq(shl2), pos3.eq(pos2)]

        # stage 4: round (or take the left-shifted value)
        v = Signal(signed(max(w + 1, w + max_left) + 1))
        m.d.sync += v.eq(Mux(pos3, q3 + up3, shl3))

        # stage 5: partial saturation tests, LUT4-sized: OR and AND of each 4-bit slice of the
        # bits above the mantissa (to fit they must all be copies of the sign bit), and the OR
        # of the bits below the mantissa's sign
        n = len(v)
        upper = v[mb - 1:n - 1]
        slices = [upper[j:j + self.SLICE] for j in range(0, len(upper), self.SLICE)]
        any5 = Signal(len(slices))
        all5 = Signal(len(slices))
        low5 = Signal()
        sign5 = Signal()
        v5 = Signal(signed(mb))
        m.d.sync += [any5.eq(Cat(*(sl.any() for sl in slices))),
                     all5.eq(Cat(*(sl.all() for sl in slices))),
                     low5.eq(v[:mb - 1].any()), sign5.eq(v[n - 1]), v5.eq(v[:mb])]

        # stage 6: saturate from the partial tests
        over = ~sign5 & any5.any()                        # v >= 2**(M-1)
        under = sign5 & ~(all5.all() & low5)              # v <= -2**(M-1)
        with m.If(over):
            m.d.sync += self.o.eq(max_m)
        with m.Elif(under):
            m.d.sync += self.o.eq(-max_m)
        with m.Else():
            m.d.sync += self.o.eq(v5)
        return m
