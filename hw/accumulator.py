"""Per-output-lane accumulator with bias preload (rules A4, B1)."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ._params import check_int

__all__ = ["Accumulator"]


class Accumulator(wiring.Component):
    """``acc <= (first ? bias : acc) + i`` when ``en``; no wrap by construction.

    The host proves ``|bias| + sum |x * w << d| < 2**(acc_bits-1)`` for every layer
    (``golden.accumulator_bound``), so the ``acc_bits``-wide register never wraps.

    Parameters
    ----------
    in_width : int
        Width of the signed aligned partial sum.
    acc_bits : int
        Accumulator (and bias) width.

    Members
    -------
    i : In(signed(in_width))
    bias : In(signed(acc_bits))
    first : In(1)
        The first partial sum of an output: start from the bias.
    en : In(1)
    o : Out(signed(acc_bits))
        The register; after the cycle that added the last partial sum it holds the result
        (latency 1).
    """

    #: pipeline registers between input and output
    LATENCY = 1

    def __init__(self, *, in_width: int, acc_bits: int):
        self._in_width = check_int("in_width", in_width, 1)
        self._acc_bits = check_int("acc_bits", acc_bits, self._in_width)
        super().__init__({
            "i": In(signed(self._in_width)),
            "bias": In(signed(self._acc_bits)),
            "first": In(1),
            "en": In(1),
            "o": Out(signed(self._acc_bits)),
        })

    @property
    def latency(self) -> int:
        return self.LATENCY

    def elaborate(self, platform):
        m = Module()
        with m.If(self.en):
            m.d.sync += self.o.eq(Mux(self.first, self.bias, self.o) + self.i)
        return m
