"""Per-output-lane runtime scale of the dual-precision engine (rule FBS3):
``o = i * scale + bias``."""

from __future__ import annotations

from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ._params import check_int

__all__ = ["Scaler"]


class Scaler(wiring.Component):
    """``o = i * scale + bias``: the FBS scale of an output (its quantized saliency) and the
    bias on the scaled accumulator LSB. The other dual-precision modes feed ``scale = 1``,
    so ``o = i + bias`` (rule G4 / CG3).

    Two registered stages: (1) the signed × unsigned product (``in_width + scale_bits`` bits
    hold it exactly) and the bias; (2) their sum. ``o`` has ``out_width`` bits: the caller
    proves ``|i*scale + bias| <= 2**(out_width-1) - 1`` (``DualProgram``, as rule A4 does for
    the accumulator), so nothing wraps.

    Parameters
    ----------
    in_width : int
        Width of the signed input (the accumulator).
    scale_bits : int
        Width of the unsigned scale.
    bias_width : int
        Width of the signed bias.
    out_width : int
        Width of the signed result (at least ``in_width + scale_bits``).

    Members
    -------
    i : In(signed(in_width))
    scale : In(unsigned(scale_bits))
    bias : In(signed(bias_width))
    o : Out(signed(out_width)), latency 2.
    """

    #: pipeline registers between the inputs and ``o``
    LATENCY = 2

    def __init__(self, *, in_width: int, scale_bits: int, bias_width: int, out_width: int):
        self._in_width = check_int("in_width", in_width, 2)
        self._scale_bits = check_int("scale_bits", scale_bits, 1, 32)
        self._bias_width = check_int("bias_width", bias_width, 1)
        self._out_width = check_int("out_width", out_width, in_width + scale_bits)
        super().__init__({
            "i": In(signed(self._in_width)),
            "scale": In(unsigned(self._scale_bits)),
            "bias": In(signed(self._bias_width)),
            "o": Out(signed(self._out_width)),
        })

    @property
    def latency(self) -> int:
        return self.LATENCY

    def elaborate(self, platform):
        m = Module()
        prod = Signal(signed(self._in_width + self._scale_bits))
        bias = Signal(signed(self._bias_width))
        m.d.sync += [prod.eq(self.i * self.scale), bias.eq(self.bias)]
        m.d.sync += self.o.eq(prod + bias)
        return m
