"""Requantizer (rule R3 = R1 round-half-even shift + S1 saturation)."""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
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

    Stage 1 registers the shifted value and the round-up bit, stage 2 adds and saturates.

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
    o : Out(signed(M)), latency 2.
    """

    #: pipeline registers between input and output
    LATENCY = 2

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

        pos = Signal()
        m.d.comb += pos.eq(self.shift > 0)

        # right path: r1 = min(shift, w) - 1 in [0, w - 1]
        r1 = Signal(range(w))
        with m.If(self.shift >= w):
            m.d.comb += r1.eq(w - 1)
        with m.Elif(pos):
            m.d.comb += r1.eq(self.shift - 1)
        t = Signal(signed(w))            # i >> (s - 1): guard bit at the bottom
        m.d.comb += t.eq(self.i >> r1)
        drop = Signal(range(w + 1))
        m.d.comb += drop.eq(w - r1)
        low_mask = Signal(unsigned(w))   # the r1 bits below the guard bit
        m.d.comb += low_mask.eq(Const((1 << w) - 1, unsigned(w)) >> drop)
        sticky = Signal()
        m.d.comb += sticky.eq((self.i.as_unsigned() & low_mask).any())
        q = t >> 1
        up = t[0] & (sticky | q[0])

        # left path: l = min(-shift, M - 1)
        left = Signal(range(max_left + 1))
        with m.If(self.shift <= -max_left):
            m.d.comb += left.eq(max_left)
        with m.Elif(~pos):
            m.d.comb += left.eq(-self.shift)
        shl = self.i << left

        q_r = Signal(signed(w))
        up_r = Signal()
        shl_r = Signal(signed(w + max_left))
        pos_r = Signal()
        m.d.sync += [q_r.eq(q), up_r.eq(up), shl_r.eq(shl), pos_r.eq(pos)]

        v = Signal(signed(max(w + 1, w + max_left) + 1))
        m.d.comb += v.eq(Mux(pos_r, q_r + up_r, shl_r))
        with m.If(v > max_m):
            m.d.sync += self.o.eq(max_m)
        with m.Elif(v < -max_m):
            m.d.sync += self.o.eq(-max_m)
        with m.Else():
            m.d.sync += self.o.eq(v)
        return m
