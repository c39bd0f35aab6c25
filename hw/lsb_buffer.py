"""LSB partial-sum buffer of the dual-precision engine: written by item (K results of one
LSB group per cycle), read back by pixel (the passing lanes of one pixel per cycle)."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ._params import check_int
from .config import bits_for
from .item_queue import packed_slots
from .types import addr_width

__all__ = ["LsbBuffer"]


class LsbBuffer(wiring.Component):
    """``acc_lb`` of every queued item, stored at the item's queue position.

    Item n (the n-th passing (pixel, lane) of the tile, see
    :class:`~dynacc.hw.item_queue.ItemQueue`) is held in bank ``n % K``, word ``n // K``: the
    K rows of LSB group g write word g of every bank in one cycle (``wen``, ``waddr = g``,
    ``wdata[r]``), so rows that share a lane never conflict.

    The output phase walks the pixels in queue order and presents each pixel's gate outcomes
    (``ren``, ``flags``; ``first`` on the tile's first pixel restarts at item 0). The pixel's
    items are the next ``popcount(flags)`` items, at most one per bank, so every bank reads one
    word; ``lb[o]`` is lane o's ``acc_lb`` one cycle later, and 0 for lanes that did not pass.

    Parameters
    ----------
    lanes : int
        K.
    depth : int
        Words per bank.
    width : int
        Width of a signed partial sum.

    Members
    -------
    wen : In(1)
    waddr : In(addr_width(depth))
    wdata : In(ArrayLayout(signed(width), K))
    ren, first : In(1)
    flags : In(K)
    lb : Out(ArrayLayout(signed(width), K)), latency 1.
    """

    #: cycles from ``flags`` to ``lb``
    LATENCY = 1

    def __init__(self, lanes: int, depth: int, width: int):
        self._lanes = check_int("lanes", lanes, 1, 64)
        self._depth = check_int("depth", depth, 1)
        self._width = check_int("width", width, 1)
        arr = data.ArrayLayout(signed(self._width), self._lanes)
        super().__init__({
            "wen": In(1),
            "waddr": In(addr_width(self._depth)),
            "wdata": In(arr),
            "ren": In(1),
            "first": In(1),
            "flags": In(self._lanes),
            "lb": Out(arr),
        })

    @property
    def latency(self) -> int:
        return self.LATENCY

    def elaborate(self, platform):
        m = Module()
        k = self._lanes
        kb = bits_for(k - 1)
        rot = Signal(unsigned(kb))
        word = Signal(addr_width(self._depth) + 1)
        rot_e = Signal(unsigned(kb))
        word_e = Signal.like(word)
        m.d.comb += [rot_e.eq(Mux(self.first, 0, rot)), word_e.eq(Mux(self.first, 0, word))]
        banks, _wraps, _pop, rot_next, wrap_next = packed_slots(m, rot_e, self.flags, k, "lb")
        with m.If(self.ren):
            m.d.sync += [rot.eq(rot_next), word.eq(word_e + wrap_next)]
        sel = [Signal(unsigned(kb), name=f"sel{o}") for o in range(k)]
        hit = Signal(k)
        m.d.sync += [s.eq(b) for s, b in zip(sel, banks)]
        m.d.sync += hit.eq(self.flags)
        qs = []
        for b in range(k):
            mem = Memory(shape=signed(self._width), depth=self._depth, init=[])
            m.submodules[f"bank{b}"] = mem
            wp = mem.write_port()
            rp = mem.read_port()
            # bank b holds this pixel's item at word (word_e + 1) when b precedes the rotation
            m.d.comb += [wp.en.eq(self.wen), wp.addr.eq(self.waddr), wp.data.eq(self.wdata[b]),
                         rp.addr.eq(word_e + (b < rot_e))]
            qs.append(rp.data)
        for o in range(k):
            v = Signal(signed(self._width), name=f"lb_sel{o}")
            with m.Switch(sel[o]):
                for b in range(k):
                    with m.Case(b):
                        m.d.comb += v.eq(qs[b])
            m.d.comb += self.lb[o].eq(Mux(hit[o], v, 0))
        return m
