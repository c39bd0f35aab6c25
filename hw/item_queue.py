"""Packed item queue of the dual-precision engine: the (pixel, lane) outputs whose MSB partial
sum passed the gate, appended a whole pixel (up to K items) per cycle, read K per cycle."""

from __future__ import annotations

from amaranth.hdl import Module, Signal, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ._params import check_int
from .config import bits_for
from .types import addr_width

__all__ = ["ItemQueue", "packed_slots"]


def packed_slots(m: Module, rot, flags, lanes: int, prefix: str):
    """Where lane o's item lands when the set ``flags`` is packed after ``rot`` items.

    Item n of a packed sequence lives in bank ``n % K``, word ``n // K``. Appending the lanes
    with ``flags[o] = 1`` in lane order after a sequence whose length is ``q*K + rot``
    (``0 <= rot < K``) puts lane o at index ``q*K + rot + prefix[o]`` with
    ``prefix[o] = popcount(flags[:o])``: bank ``(rot + prefix[o]) mod K`` and word
    ``q + wrap[o]``. The ``<= K`` appended items land in distinct banks, so one write per bank.

    Returns ``(bank[K], wrap[K], pop, rot_next, wrap_next)`` as combinational signals:
    ``pop = popcount(flags)``, the new length is ``(q + wrap_next)*K + rot_next``.
    """
    kb = bits_for(lanes)
    banks, wraps = [], []
    pre = Signal(unsigned(kb), name=f"{prefix}_pre0")
    m.d.comb += pre.eq(0)
    for o in range(lanes):
        slot = Signal(unsigned(kb + 1), name=f"{prefix}_slot{o}")
        bank = Signal(unsigned(bits_for(lanes - 1)), name=f"{prefix}_bank{o}")
        wrap = Signal(name=f"{prefix}_wrap{o}")
        m.d.comb += [slot.eq(rot + pre), wrap.eq(slot >= lanes),
                     bank.eq(slot - lanes * wrap)]
        banks.append(bank)
        wraps.append(wrap)
        nxt = Signal(unsigned(kb), name=f"{prefix}_pre{o + 1}")
        m.d.comb += nxt.eq(pre + flags[o])
        pre = nxt
    total = Signal(unsigned(kb + 1), name=f"{prefix}_total")
    rot_next = Signal(unsigned(bits_for(lanes - 1)), name=f"{prefix}_rot_next")
    wrap_next = Signal(name=f"{prefix}_wrap_next")
    m.d.comb += [total.eq(rot + pre), wrap_next.eq(total >= lanes),
                 rot_next.eq(total - lanes * wrap_next)]
    return banks, wraps, pre, rot_next, wrap_next


class ItemQueue(wiring.Component):
    """K memory banks of ``depth`` words holding a packed sequence of items.

    Write side: with ``push``, the items of the lanes whose ``flags`` bit is set are appended in
    lane order (all in this cycle, see :func:`packed_slots`); ``clear`` empties the queue
    (``push`` is ignored in that cycle). ``count`` is the number of items held.

    Read side: group g (items ``g*K .. g*K + K - 1``) is read with ``raddr = g``; ``rdata[r]``
    is item ``g*K + r`` one cycle later (read latency 1). A write and a read of the same word in
    one cycle returns the old item.

    Parameters
    ----------
    lanes : int
        K: banks, and items appended / read per cycle.
    depth : int
        Words per bank (the queue holds ``K * depth`` items; the caller never pushes more).
    item_shape : Shape or Layout
        One item.

    Members
    -------
    clear, push : In(1)
    flags : In(K)
    items : In(ArrayLayout(item_shape, K))
        ``items[o]`` is appended when ``flags[o]``.
    count : Out(range(K * depth + 1))
    raddr : In(addr_width(depth))
    rdata : Out(ArrayLayout(item_shape, K))
    """

    def __init__(self, lanes: int, depth: int, item_shape):
        self._lanes = check_int("lanes", lanes, 1, 64)
        self._depth = check_int("depth", depth, 1)
        self._item = item_shape
        arr = data.ArrayLayout(item_shape, self._lanes)
        super().__init__({
            "clear": In(1),
            "push": In(1),
            "flags": In(self._lanes),
            "items": In(arr),
            "count": Out(unsigned(bits_for(self._lanes * self._depth))),
            "raddr": In(addr_width(self._depth)),
            "rdata": Out(arr),
        })

    @property
    def lanes(self) -> int:
        return self._lanes

    @property
    def depth(self) -> int:
        return self._depth

    def elaborate(self, platform):
        m = Module()
        k = self._lanes
        rot = Signal(unsigned(bits_for(k - 1)))
        word = Signal(addr_width(self._depth) + 1)
        banks, wraps, pop, rot_next, wrap_next = packed_slots(m, rot, self.flags, k, "q")
        with m.If(self.clear):
            m.d.sync += [rot.eq(0), word.eq(0), self.count.eq(0)]
        with m.Elif(self.push):
            m.d.sync += [rot.eq(rot_next), word.eq(word + wrap_next),
                         self.count.eq(self.count + pop)]
        for b in range(k):
            mem = Memory(shape=self._item, depth=self._depth, init=[])
            m.submodules[f"bank{b}"] = mem
            wp = mem.write_port()
            rp = mem.read_port()
            m.d.comb += [rp.addr.eq(self.raddr), self.rdata[b].eq(rp.data)]
            for o in range(k):  # at most one flagged lane lands in bank b
                with m.If(self.flags[o] & (banks[o] == b)):
                    m.d.comb += [wp.addr.eq(word + wraps[o]), wp.data.eq(self.items[o]),
                                 wp.en.eq(self.push & ~self.clear)]
        return m
