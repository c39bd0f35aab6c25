"""Per-output-lane accumulator; the bias is added to the finished sum (rules A4, B1)."""

from __future__ import annotations

from amaranth.hdl import Module, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ._params import check_int

__all__ = ["Accumulator"]


class Accumulator(wiring.Component):
    """Sums the partial sums ``i`` of one output; ``o = bias + sum`` after its last one.

    Three registers of ``acc_bits``: the running sum ``run``, the finished sum ``done`` and
    its bias ``bias_q``. On an enabled step ``run + i`` goes back into ``run``; on the
    output's ``last`` step it goes into ``done`` instead (and ``bias`` into ``bias_q``) and
    ``run`` is cleared. The adder's inputs are therefore a
    flip-flop and ``i`` only: the step controls reach the flip-flops' enable and
    synchronous-reset pins (no mux in front of the carry chain, no high-fanout select),
    which is what the engine's Fmax on the ECP5 asked for. The bias (integer, LSB of the
    accumulator) is added to ``done`` on the way out, so ``o = bias + sum`` equals the
    bias-preloaded sum bit for bit. The bias is sampled with the last step, so the engine reads
    it with the step's other operands (one memory address register, as before).

    The host proves ``|bias| + sum |x * w << d| < 2**(acc_bits-1)`` for every layer
    (``golden.accumulator_bound``), so neither register nor the output add wraps.

    Parameters
    ----------
    in_width : int
        Width of the signed aligned partial sum.
    acc_bits : int
        Accumulator (and bias) width.

    Members
    -------
    i : In(signed(in_width))
    en : In(1)
        ``i`` is a partial sum (a step of the output being summed).
    last : In(1)
        An enabled step that carries the output's last partial sum (implies ``en``: it
        drives the registers' reset and enable pins directly).
    bias : In(signed(acc_bits))
        The output's bias, read with its ``last`` step.
    o : Out(signed(acc_bits))
        ``bias_q + done``: from the cycle after a ``last`` step (latency 1) until the next
        ``last`` step, the finished output.
    """

    #: pipeline registers between input and output
    LATENCY = 1

    def __init__(self, *, in_width: int, acc_bits: int):
        self._in_width = check_int("in_width", in_width, 1)
        self._acc_bits = check_int("acc_bits", acc_bits, self._in_width)
        super().__init__({
            "i": In(signed(self._in_width)),
            "en": In(1),
            "last": In(1),
            "bias": In(signed(self._acc_bits)),
            "o": Out(signed(self._acc_bits)),
        })

    @property
    def latency(self) -> int:
        return self.LATENCY

    def elaborate(self, platform):
        m = Module()
        run = Signal(signed(self._acc_bits))                    # reset 0: a step starts at 0
        done = Signal(signed(self._acc_bits), reset_less=True)  # read only after a last step
        bias_q = Signal(signed(self._acc_bits), reset_less=True)
        total = run + self.i
        with m.If(self.last):
            m.d.sync += [done.eq(total), bias_q.eq(self.bias), run.eq(0)]
        with m.Elif(self.en):
            m.d.sync += run.eq(total)
        m.d.comb += self.o.eq(done + bias_q)
        return m
