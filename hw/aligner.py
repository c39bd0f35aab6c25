"""Block alignment shifter (rule A2): a partial sum moves onto the accumulator LSB."""

from __future__ import annotations

from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ._params import check_int
from .config import bits_for

__all__ = ["Aligner"]


class Aligner(wiring.Component):
    """``o = i << d``, exact, registered.

    With ``stages = 2`` the shift is split for Fmax: the first register holds ``i`` shifted by
    the low half of ``d``'s bits, the second that word shifted by the high half (each stage a
    mux of half the depth: at 16×16 on an ECP5 a one-stage 4-bit shifter behind a long route
    from its MAC tree was the engine's critical path).

    Parameters
    ----------
    in_width : int
        Width of the signed partial sum.
    max_shift : int
        Largest d (``align_span``); the output is ``in_width + max_shift`` bits, so larger d
        would be truncated: the host guarantees ``d <= max_shift``.
    stages : int
        Pipeline registers, 1 or 2 (the latency).

    Members
    -------
    i : In(signed(in_width))
    d : In(unsigned(bits_for(max_shift)))
    o : Out(signed(in_width + max_shift)), latency ``stages``.
    """

    #: pipeline registers between input and output of the one-stage shifter
    LATENCY = 1

    def __init__(self, *, in_width: int, max_shift: int, stages: int = 1):
        self._in_width = check_int("in_width", in_width, 1)
        self._max_shift = check_int("max_shift", max_shift, 0)
        self._stages = check_int("stages", stages, 1, 2)
        super().__init__({
            "i": In(signed(self._in_width)),
            "d": In(unsigned(bits_for(self._max_shift))),
            "o": Out(signed(self._in_width + self._max_shift)),
        })

    @property
    def max_shift(self) -> int:
        return self._max_shift

    @property
    def latency(self) -> int:
        return self._stages

    def elaborate(self, platform):
        m = Module()
        if self._stages == 1:
            m.d.sync += self.o.eq(self.i << self.d)
            return m
        lo_bits = (len(self.d) + 1) // 2
        part = Signal(signed(self._in_width + (1 << lo_bits) - 1), name="part")
        d_hi = Signal(unsigned(len(self.d) - lo_bits), name="d_hi")
        m.d.sync += [part.eq(self.i << self.d[:lo_bits]), d_hi.eq(self.d[lo_bits:])]
        m.d.sync += self.o.eq(part << (d_hi << lo_bits))
        return m
