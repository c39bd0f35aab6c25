"""Activation on requantized mantissas (rule R4)."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from dynacc.quant.formats import BFPFormat

from .types import ActMode

__all__ = ["Activation"]


class Activation(wiring.Component):
    """``none``: identity, ``relu``: ``max(i, 0)``, ``relu6``: ``min(max(i, 0), clamp_max)``.

    Parameters
    ----------
    fmt : BFPFormat
        Mantissa format (M bits).

    Members
    -------
    i : In(signed(M))
    mode : In(ActMode)
    clamp_max : In(unsigned(M - 1))
        relu6 upper bound (6 on the output LSB, rule R5).
    o : Out(signed(M)), latency 1.
    """

    #: pipeline registers between input and output
    LATENCY = 1

    def __init__(self, fmt: BFPFormat):
        if not isinstance(fmt, BFPFormat):
            raise TypeError(f"fmt must be a BFPFormat, not {fmt!r}")
        self._fmt = fmt
        m_bits = fmt.mantissa_bits
        super().__init__({
            "i": In(signed(m_bits)),
            "mode": In(ActMode),
            "clamp_max": In(unsigned(m_bits - 1)),
            "o": Out(signed(m_bits)),
        })

    @property
    def fmt(self) -> BFPFormat:
        return self._fmt

    @property
    def latency(self) -> int:
        return self.LATENCY

    def elaborate(self, platform):
        m = Module()
        neg = self.i < 0
        with m.Switch(self.mode):
            with m.Case(ActMode.RELU):
                m.d.sync += self.o.eq(Mux(neg, 0, self.i))
            with m.Case(ActMode.RELU6):
                with m.If(neg):
                    m.d.sync += self.o.eq(0)
                with m.Elif(self.i > self.clamp_max):
                    m.d.sync += self.o.eq(self.clamp_max)
                with m.Else():
                    m.d.sync += self.o.eq(self.i)
            with m.Default():
                m.d.sync += self.o.eq(self.i)
        return m
