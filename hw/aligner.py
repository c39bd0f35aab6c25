"""Block alignment shifter (rule A2): a partial sum moves onto the accumulator LSB."""

from __future__ import annotations

from amaranth.hdl import Module, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ._params import check_int
from .config import bits_for

__all__ = ["Aligner"]


class Aligner(wiring.Component):
    """``o = i << d``, exact, registered.

    Parameters
    ----------
    in_width : int
        Width of the signed partial sum.
    max_shift : int
        Largest d (``align_span``); the output is ``in_width + max_shift`` bits, so larger d
        would be truncated: the host guarantees ``d <= max_shift``.

    Members
    -------
    i : In(signed(in_width))
    d : In(unsigned(bits_for(max_shift)))
    o : Out(signed(in_width + max_shift)), latency 1.
    """

    #: pipeline registers between input and output
    LATENCY = 1

    def __init__(self, *, in_width: int, max_shift: int):
        self._in_width = check_int("in_width", in_width, 1)
        self._max_shift = check_int("max_shift", max_shift, 0)
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
        return self.LATENCY

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.o.eq(self.i << self.d)
        return m
