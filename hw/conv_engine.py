"""The static-BFP convolution engine: K×K MAC array, alignment, accumulation, requantization,
fused residual add and activation, fed from preloaded memories."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.memory import ReadPort, WritePort
from amaranth.lib.wiring import In, Out

from .accumulator import Accumulator
from .activation import Activation
from .address_gen import AddressGen, token_layout
from .aligner import Aligner
from .config import HwConfig
from .mac_tree import MacTree, mac_tree_latency
from .requantizer import Requantizer
from .types import (acc_shape, act_word_layout, addr_width, align_word_layout, aligned_shape,
                    bias_word_layout, desc_layout, quant_word_layout, shift_shape, tree_shape,
                    weight_word_layout)

__all__ = ["ConvEngine", "MEMORIES"]

#: memory ports of the engine: name -> (kind, depth field of HwConfig or "tiles")
MEMORIES = {
    "act": ("read", "act_depth"),
    "wgt": ("read", "wgt_depth"),
    "align": ("read", "wgt_depth"),
    "bias": ("read", "tiles"),
    "quant": ("read", "tiles"),
    "res": ("read", "out_depth"),
    "out": ("write", "out_depth"),
}


#: cycles from a memory address to its word at the engine's units: the memory's read latency
#: (1) plus two registers (the first has the block RAM as its only driver and the second as
#: its only load; the activation word's padding zeroes the second), so no block-RAM output
#: drives logic and ``gen/bram_outreg.py`` can move the first into the RAM's output register.
READ_DELAY = 3


#: registered stages of each lane's aligner (the shift split in two halves of d's bits, for
#: Fmax: :class:`Aligner`)
ALIGN_STAGES = 2


def _depth(cfg: HwConfig, field: str) -> int:
    return cfg.max_tiles if field == "tiles" else getattr(cfg, field)


class ConvEngine(wiring.Component):
    """One conv layer from ``start`` to ``done``, one K×K reduction step per cycle.

    Per output pixel and output tile t (K output channels) the engine walks ky, kx, cw; each
    cycle every output lane o sums its K products (:class:`MacTree`), shifts the sum left by
    ``d[o, cw]`` (:class:`Aligner`) and accumulates (:class:`Accumulator`, starting from the
    bias). After the last step the accumulator is requantized (``shift.acc``), the residual
    word (if enabled) is requantized (``shift.res``) and added, the sum is requantized
    (``shift.out``, 0 without residual: an exact no-op) and activated, and the output word is
    written. Cycles = ``SETUP_CYCLES + Ho*Wo*T*kh*kw*CW + latency``
    (:func:`dynacc.hw.cycles.conv_cycles`).

    Memories are outside (ports named after :data:`MEMORIES`), read latency 1; every read word
    is registered in the engine before any logic uses it (:data:`READ_DELAY`):

    ==========  ================================  ======================================
    port        address                           word
    ==========  ================================  ======================================
    ``act``     ``(y*W + x)*CW + cw``             K input mantissas
    ``wgt``     ``((t*kh + ky)*kw + kx)*CW + cw`` K×K weights ``[o][c]``
    ``align``   ``t*CW + cw``                     d of each output lane
    ``bias``    ``t``                             bias of each output lane (acc LSB)
    ``quant``   ``t``                             shifts ``acc``/``res``/``out`` per lane
    ``res``     ``(y*Wo + x)*T + t``              K residual mantissas
    ``out``     ``(y*Wo + x)*T + t``              K output mantissas (write)
    ==========  ================================  ======================================

    Parameters
    ----------
    cfg : HwConfig

    Members
    -------
    desc : In(desc_layout(cfg))
        Layer descriptor, held while ``busy``.
    start : In(1)
        Pulse while idle to run a layer.
    busy : Out(1)
    done : Out(1)
        Set when the last output word is written, cleared by ``start``.
    cycles : Out(cycle_bits)
        Cycles spent busy in the last run (from the cycle after ``start`` to ``done``).
    act, wgt, align, bias, quant, res : In(ReadPort.Signature(...))
    out : In(WritePort.Signature(...))
    """

    def __init__(self, cfg: HwConfig):
        if not isinstance(cfg, HwConfig):
            raise TypeError(f"cfg must be a HwConfig, not {cfg!r}")
        self._cfg = cfg
        layouts = {
            "act": act_word_layout(cfg), "wgt": weight_word_layout(cfg),
            "align": align_word_layout(cfg), "bias": bias_word_layout(cfg),
            "quant": quant_word_layout(cfg), "res": act_word_layout(cfg),
            "out": act_word_layout(cfg),
        }
        members = {
            "desc": In(desc_layout(cfg)),
            "start": In(1),
            "busy": Out(1),
            "done": Out(1),
            "cycles": Out(cfg.cycle_bits),
        }
        for name, (kind, depth) in MEMORIES.items():
            sig = ReadPort.Signature if kind == "read" else WritePort.Signature
            members[name] = In(sig(addr_width=addr_width(_depth(cfg, depth)), shape=layouts[name]))
        super().__init__(members)

    @property
    def cfg(self) -> HwConfig:
        return self._cfg

    @staticmethod
    def memory_depth(cfg: HwConfig, name: str) -> int:
        """Words of memory port ``name``."""
        return _depth(cfg, MEMORIES[name][1])

    @staticmethod
    def stages(cfg: HwConfig) -> dict[str, int]:
        """Pipeline stage (cycles after the issue of a step) of each unit's input.

        ``mac``: memory data (read latency 1, then the engine's input register:
        :data:`READ_DELAY`) enters the MAC trees; ``align``: tree sums
        enter the aligners; ``acc``: the accumulators; ``rq``: the accumulator / residual
        requantizers; ``sum``: the joint-sum requantizer; ``act``: the activation;
        ``write``: the output word is written.
        """
        s = {"mac": READ_DELAY}
        s["align"] = s["mac"] + mac_tree_latency(cfg.lanes, cfg.tree_levels_per_stage,
                                                 cfg.product_stages)
        s["acc"] = s["align"] + ALIGN_STAGES
        s["rq"] = s["acc"] + Accumulator.LATENCY
        s["sum"] = s["rq"] + Requantizer.LATENCY
        s["act"] = s["sum"] + Requantizer.LATENCY
        s["write"] = s["act"] + Activation.LATENCY
        return s

    @property
    def latency(self) -> int:
        """Cycles from the issue of the last step to the cycle that writes its output."""
        return self.stages(self._cfg)["write"]

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        k = cfg.lanes
        fmt = cfg.fmt
        st = self.stages(cfg)

        m.submodules.agen = agen = AddressGen(cfg)
        m.d.comb += [agen.desc.eq(self.desc), agen.start.eq(self.start & ~self.busy)]

        # token pipeline: tk[n] describes the step issued n cycles ago
        tk = [agen.token]
        for n in range(1, st["write"] + 1):
            r = Signal(token_layout(cfg), name=f"tk{n}")
            m.d.sync += r.eq(tk[n - 1])
            tk.append(r)

        for name in ("act", "wgt", "align", "bias", "quant", "res"):
            m.d.comb += getattr(self, name).en.eq(1)
        rd = READ_DELAY
        m.d.comb += [
            self.act.addr.eq(agen.act_addr),
            self.wgt.addr.eq(agen.wgt_addr),
            self.align.addr.eq(tk[st["align"] - rd].align_addr),
            self.bias.addr.eq(tk[st["acc"] - rd].tile),
            self.quant.addr.eq(tk[st["rq"] - rd].tile),
            self.res.addr.eq(tk[st["rq"] - rd].out_addr),
        ]

        # input registers of the read words (data-path only: no reset, no logic between the
        # block RAM and the first register); a padded activation word is zeroed on its way
        # into the second register (a flip-flop reset, local to the word), so the register
        # that fans out to every MAC tree's operand copy drives them directly; a disabled
        # residual is zeroed after its registers
        def rd_reg(name, zero=None):
            prev = getattr(self, name).data
            for n in range(READ_DELAY - 1):
                r = Signal.like(prev, name=f"{name}_r{n}", reset_less=True)
                last = n == READ_DELAY - 2
                m.d.sync += r.eq(Mux(zero, 0, prev) if last and zero is not None else prev)
                prev = r
            return prev

        x = rd_reg("act", zero=tk[st["mac"] - 1].pad)
        wgt_r, align_r, bias_r, quant_r, res_r = (
            rd_reg(n) for n in ("wgt", "align", "bias", "quant", "res"))

        # residual requantizer shifts arrive at stage rq; the output shift is used at stage sum
        out_shift = [Signal(shift_shape(cfg), name=f"out_shift{o}") for o in range(k)]
        out_shift_d = [Signal(shift_shape(cfg), name=f"out_shift_d{o}") for o in range(k)]

        # each lane registers its own copy of the accumulator controls (kept apart in synthesis,
        # gen/fpga.py): one shared flag would fan out to K x acc_bits mux and enable inputs.
        # The copies have no reset (the token register behind them has one), so each is fed by
        # that flip-flop directly, not through a shared reset gate the placer packs a copy with.
        acc_first = [Signal(name=f"lane_first{o}", reset_less=True) for o in range(k)]
        acc_en = [Signal(name=f"lane_en{o}", reset_less=True) for o in range(k)]
        for o in range(k):
            m.d.sync += [acc_first[o].eq(tk[st["acc"] - 1].first),
                         acc_en[o].eq(tk[st["acc"] - 1].valid)]

        for o in range(k):
            mac = MacTree(k, mantissa_bits=cfg.mantissa_bits,
                          levels_per_stage=cfg.tree_levels_per_stage,
                          product_stages=cfg.product_stages, split=cfg.lane_split(o))
            aln = Aligner(in_width=tree_shape(cfg).width, max_shift=cfg.align_span,
                          stages=ALIGN_STAGES)
            acc = Accumulator(in_width=aligned_shape(cfg).width, acc_bits=acc_shape(cfg).width)
            rq_acc = Requantizer(fmt, in_width=cfg.acc_bits, shift_bits=cfg.shift_bits)
            rq_res = Requantizer(fmt, in_width=cfg.mantissa_bits, shift_bits=cfg.shift_bits)
            rq_out = Requantizer(fmt, in_width=cfg.mantissa_bits + 1, shift_bits=cfg.shift_bits)
            act = Activation(fmt)
            for nm, sub in (("mac", mac), ("aln", aln), ("acc", acc), ("rqa", rq_acc),
                            ("rqr", rq_res), ("rqo", rq_out), ("act", act)):
                m.submodules[f"{nm}{o}"] = sub
            m.d.comb += [
                mac.x.eq(x),
                mac.w.eq(wgt_r[o]),
                aln.i.eq(mac.o),
                aln.d.eq(align_r[o]),
                acc.i.eq(aln.o),
                acc.bias.eq(bias_r[o]),
                acc.first.eq(acc_first[o]),
                acc.en.eq(acc_en[o]),
                rq_acc.i.eq(acc.o),
                rq_acc.shift.eq(quant_r[o].acc),
                rq_res.i.eq(Mux(self.desc.residual, res_r[o], 0)),
                rq_res.shift.eq(quant_r[o].res),
                out_shift[o].eq(quant_r[o].out),
                rq_out.i.eq(rq_acc.o + rq_res.o),
                rq_out.shift.eq(out_shift_d[o]),
                act.i.eq(rq_out.o),
                act.mode.eq(self.desc.act),
                act.clamp_max.eq(self.desc.clamp_max),
                self.out.data[o].eq(act.o),
            ]
            # the output shift is read with the others at stage rq and used at stage sum
            prev = out_shift[o]
            for n in range(st["sum"] - st["rq"] - 1):
                r = Signal(shift_shape(cfg), name=f"out_shift{o}_p{n}")
                m.d.sync += r.eq(prev)
                prev = r
            m.d.sync += out_shift_d[o].eq(prev)

        wr = tk[st["write"]]
        m.d.comb += [
            self.out.addr.eq(wr.out_addr),
            self.out.en.eq(wr.valid & wr.last),
        ]

        # control: busy from start to the write of the final word
        with m.If(self.busy):
            m.d.sync += self.cycles.eq(self.cycles + 1)
            with m.If(wr.valid & wr.final):
                m.d.sync += [self.busy.eq(0), self.done.eq(1)]
        with m.Elif(self.start):
            m.d.sync += [self.busy.eq(1), self.done.eq(0), self.cycles.eq(0)]
        return m
