"""The dual-precision convolution engine (Precision Gating and the DFS precisions, rules
G0-G4; Channel Gating, rules CG1-CG3; FBS, rules FBS2-FBS3): a first pass over every
output, a second pass only over the outputs whose gate passed, with the cycles of the second
pass proportional to the number of passing outputs."""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory, ReadPort, WritePort
from amaranth.lib.wiring import In, Out

from .accumulator import Accumulator
from .activation import Activation
from .aligner import Aligner
from .config import HwConfig
from .dual_sequencer import (DualMode, DualSequencer, dual_desc_layout, item_layout,
                             mac_token_layout, max_pixels, out_token_layout)
from .item_queue import ItemQueue
from .lsb_buffer import LsbBuffer
from .mac_tree import MacTree, mac_tree_latency
from .requantizer import Requantizer
from .scaler import Scaler
from .types import (acc_shape, act_word_layout, addr_width, align_word_layout, aligned_shape,
                    bias_word_layout, quant_word_layout, tree_shape, weight_word_layout)

__all__ = ["DualEngine", "gate_word_layout", "passed_word_layout", "scale_word_layout",
           "scaled_shape"]


def _memories(lanes: int) -> dict[str, tuple[str, str, str]]:
    """Memory ports: name -> (kind, depth field of HwConfig or ``"tiles"``, memory name).
    ``act0`` .. ``act{K-1}`` are K read ports of one activation memory (one per MAC row)."""
    mems = {f"act{r}": ("read", "act_depth", "act") for r in range(lanes)}
    mems.update({
        "wgt": ("read", "wgt_depth", "wgt"),
        "align": ("read", "wgt_depth", "align"),
        "bias": ("read", "tiles", "bias"),
        "scale": ("read", "tiles", "scale"),
        "quant": ("read", "tiles", "quant"),
        "gate": ("read", "tiles", "gate"),
        "out": ("write", "out_depth", "out"),
        "passed": ("write", "out_depth", "passed"),
    })
    return mems


def gate_word_layout(cfg: HwConfig) -> data.ArrayLayout:
    """Gate word (address t): per output lane the threshold (accumulator LSB, signed
    ``acc_bits``) and ``neg`` (gate sign -1: the lane passes when ``-(acc_hb << L) > T``)."""
    return data.ArrayLayout(data.StructLayout({"threshold": acc_shape(cfg), "neg": 1}),
                            cfg.lanes)


def scale_word_layout(cfg: HwConfig) -> data.ArrayLayout:
    """Scale word (address t): per output lane the unsigned ``scale_bits`` runtime scale of
    mode ``FBS`` (rule FBS3; the other modes use 1 and ignore the memory)."""
    return data.ArrayLayout(unsigned(cfg.scale_bits), cfg.lanes)


def scaled_shape(cfg: HwConfig):
    """``signed(acc_bits + scale_bits)``: ``acc*scale + bias`` (``DualProgram`` proves every
    layer's worst case fits), the requantizer input."""
    return signed(cfg.acc_bits + cfg.scale_bits)


def passed_word_layout(cfg: HwConfig) -> data.ArrayLayout:
    """Gate outcome word (address ``pixel*T + t``, like ``out``): one bit per output lane."""
    return data.ArrayLayout(unsigned(1), cfg.lanes)


def _depth(cfg: HwConfig, field: str) -> int:
    return cfg.max_tiles if field == "tiles" else getattr(cfg, field)


class DualEngine(wiring.Component):
    """One dual-precision conv layer from ``start`` to ``done``.

    Per output tile t (K output channels, loop tile-outer):

    1. MSB phase: every pixel, one ``(ky, kx, cw)`` step per cycle; the K MAC rows are the K
       output lanes of the tile and all read the pixel's activation word, fed with
       ``x >> L``. At each pixel's end the engine stores ``acc_hb << L`` of the K lanes and
       their gate outcomes (``passed = sign*(acc_hb << L) > T``, strict; ``msb`` and ``fbs``
       modes: none, ``full``: all) in the internal ``part_hb`` memory, writes them to the
       ``passed`` port and appends the passing (pixel, lane) items to the :class:`ItemQueue`
       (one pixel per cycle).
    2. LSB phase: the items in groups of K; MAC row r works on item ``g*K + r``: its own
       activation read port (``act<r>``), its own padding, its own lane's weight vector muxed
       out of the tile's K×K weight word, fed with ``x & (2**L - 1)``. After the group's
       ``kh*kw*n2`` steps the K sums go to the :class:`LsbBuffer` (one word per group).
       Modes ``msb`` and ``fbs`` (or a tile with no passing output) skip it.
    3. Output phase: one pixel per cycle, ``acc = ((acc_hb << L) + passed*acc_lb)*scale +
       bias`` (``scale`` = 1 except in mode ``fbs``), requantized (``shift.acc``), activated
       (``relu`` or the ``relu6`` clamp that also serves ``pact``) and written to ``out``
       (same port and layout as :class:`ConvEngine`).

    Mode ``cg`` (Channel Gating, L = 0): phase 1 walks only the tile's base input words (its
    partition's ``nb``), the gate compares ``sign*acc_base > T``, phase 2 walks the other
    ``CW - nb`` words with the whole activation as its digit, so ``acc = acc_base +
    passed*acc_rest + bias`` (rules CG1-CG3). Mode ``fbs`` (L = 0): phase 1 over all words is
    the whole conv, no phase 2, then ``acc*scale + bias`` (rule FBS3).

    Cycles: :func:`dynacc.hw.cycles.dual_conv_cycles` (exact; depends on the gate outcomes
    only through the number of passing outputs of each tile).

    Memories outside (read latency 1):

    ==========  ================================  ======================================
    port        address                           word
    ==========  ================================  ======================================
    ``act<r>``  ``(y*W + x)*CW + cw``             K unsigned input values (K ports, one
                                                  memory)
    ``wgt``     ``((t*kh + ky)*kw + kx)*CW + cw`` K×K weights ``[o][c]``
    ``align``   ``t*CW + cw``                     d of each output lane
    ``bias``    ``t``                             bias of each output lane (acc LSB;
                                                  ``fbs``: the scaled LSB)
    ``scale``   ``t``                             FBS scale of each output lane
    ``quant``   ``t``                             shifts per lane (only ``acc`` is used)
    ``gate``    ``t``                             threshold and sign per lane
    ``out``     ``(y*Wo + x)*T + t``              K output mantissas (write)
    ``passed``  ``(y*Wo + x)*T + t``              K gate outcomes (write)
    ==========  ================================  ======================================
    """

    def __init__(self, cfg: HwConfig):
        if not isinstance(cfg, HwConfig):
            raise TypeError(f"cfg must be a HwConfig, not {cfg!r}")
        if cfg.mantissa_bits < 3:
            raise ValueError(f"HwConfig {cfg.name!r}: the dual-precision engine needs "
                             f"mantissa_bits >= 3 (unsigned inputs of >= 2 bits), not "
                             f"{cfg.mantissa_bits}")
        self._cfg = cfg
        layouts = {
            "act": act_word_layout(cfg), "wgt": weight_word_layout(cfg),
            "align": align_word_layout(cfg), "bias": bias_word_layout(cfg),
            "quant": quant_word_layout(cfg), "gate": gate_word_layout(cfg),
            "scale": scale_word_layout(cfg),
            "out": act_word_layout(cfg), "passed": passed_word_layout(cfg),
        }
        members = {
            "desc": In(dual_desc_layout(cfg)),
            "start": In(1),
            "busy": Out(1),
            "done": Out(1),
            "cycles": Out(cfg.cycle_bits),
        }
        for name, (kind, depth, mem) in _memories(cfg.lanes).items():
            sig = ReadPort.Signature if kind == "read" else WritePort.Signature
            members[name] = In(sig(addr_width=addr_width(_depth(cfg, depth)),
                                   shape=layouts[mem]))
        super().__init__(members)

    @property
    def cfg(self) -> HwConfig:
        return self._cfg

    @staticmethod
    def memories(cfg: HwConfig) -> dict[str, tuple[str, str, str]]:
        """Port name -> (``"read"``/``"write"``, depth field, memory name)."""
        return _memories(cfg.lanes)

    @staticmethod
    def memory_depth(cfg: HwConfig, name: str) -> int:
        """Words of memory port ``name``."""
        return _depth(cfg, _memories(cfg.lanes)[name][1])

    @staticmethod
    def stages(cfg: HwConfig) -> dict[str, int]:
        """MAC pipeline: stage (cycles after the issue of a step) of each unit's input.

        ``mac``: memory data enters the MAC trees; ``align``, ``acc``: aligners and
        accumulators; ``res``: the accumulators hold a finished sum (LSB sums are written to
        the :class:`LsbBuffer`, MSB sums shifted by L and registered); ``gate``: the gate
        comparators; ``msb_wr``: ``part_hb``, ``passed`` and the item queue are written.
        """
        s = {"mac": 1}
        s["align"] = s["mac"] + mac_tree_latency(cfg.lanes, cfg.tree_levels_per_stage)
        s["acc"] = s["align"] + Aligner.LATENCY
        s["res"] = s["acc"] + Accumulator.LATENCY
        s["gate"] = s["res"] + 1
        s["msb_wr"] = s["gate"] + 1
        return s

    @staticmethod
    def out_stages(cfg: HwConfig) -> dict[str, int]:
        """Output pipeline: ``hb``: ``part_hb`` data (gate outcomes to the LsbBuffer);
        ``sum``: ``acc_lb``, the sum of both phases is formed; ``scale``: the
        :class:`Scaler` inputs (sum, scale and bias); ``rq``, ``act``: requantizer and
        activation inputs; ``write``: the output word is written."""
        s = {"hb": 1}
        s["sum"] = s["hb"] + LsbBuffer.LATENCY
        s["scale"] = s["sum"] + 1
        s["rq"] = s["scale"] + Scaler.LATENCY
        s["act"] = s["rq"] + Requantizer.LATENCY
        s["write"] = s["act"] + Activation.LATENCY
        return s

    @classmethod
    def drains(cls, cfg: HwConfig) -> dict[str, int]:
        """Idle cycles between phases: ``msb``: after the last MSB step until the item queue
        is complete and group 0 loaded (``msb_wr + 2``); ``lsb``: after the last LSB step
        until its sums can be read back (``res - 1``)."""
        s = cls.stages(cfg)
        return {"msb": s["msb_wr"] + 2, "lsb": s["res"] - 1}

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        k = cfg.lanes
        fmt = cfg.fmt
        mb = cfg.mantissa_bits
        st = self.stages(cfg)
        ost = self.out_stages(cfg)
        dr = self.drains(cfg)
        d = self.desc
        npix = max_pixels(cfg)
        accw = acc_shape(cfg).width

        m.submodules.seq = seq = DualSequencer(cfg, msb_drain=dr["msb"], lsb_drain=dr["lsb"])
        m.submodules.queue = queue = ItemQueue(k, npix, item_layout(cfg))
        m.submodules.lsbuf = lsbuf = LsbBuffer(k, npix, accw)
        part_shape = data.StructLayout({"hb": data.ArrayLayout(acc_shape(cfg), k),
                                        "passed": unsigned(k)})
        m.submodules.part_hb = part_hb = Memory(shape=part_shape, depth=npix, init=[])
        hb_wr = part_hb.write_port()
        hb_rd = part_hb.read_port()

        m.d.comb += [
            seq.desc.eq(d), seq.start.eq(self.start & ~self.busy),
            seq.q_count.eq(queue.count), queue.clear.eq(seq.q_clear),
            queue.raddr.eq(seq.q_raddr), seq.q_rdata.eq(queue.rdata),
        ]

        # phase-2 digit: x & (2**L - 1); mode cg: the whole x (L = 0 for its phase 1 too)
        lsb_bits = Signal.like(d.lsb_bits)
        lb_mask = Signal(unsigned(mb - 1))
        fbs = Signal()
        m.d.sync += [lsb_bits.eq(d.lsb_bits),
                     lb_mask.eq(Mux(d.mode == DualMode.CG, (1 << (mb - 1)) - 1,
                                    (Const(1, unsigned(mb)) << d.lsb_bits) - 1)),
                     fbs.eq(d.mode == DualMode.FBS)]

        # -- MAC pipeline ------------------------------------------------------------------
        tk = [seq.token]
        for n in range(1, st["msb_wr"] + 1):
            r = Signal(mac_token_layout(cfg), name=f"tk{n}")
            m.d.sync += r.eq(tk[n - 1])
            tk.append(r)

        for name in (("wgt", "align", "bias", "scale", "quant", "gate")
                     + tuple(f"act{r}" for r in range(k))):
            m.d.comb += getattr(self, name).en.eq(1)
        m.d.comb += [
            self.wgt.addr.eq(seq.wgt_addr),
            self.align.addr.eq(tk[st["align"] - 1].align_addr),
            self.gate.addr.eq(tk[st["gate"] - 1].tile),
        ]

        t_mac, t_al, t_acc, t_res, t_gate, t_wr = (tk[st[s]] for s in
                                                   ("mac", "align", "acc", "res", "gate",
                                                    "msb_wr"))
        hbl = [Signal(acc_shape(cfg), name=f"hbl{r}") for r in range(k)]      # at gate
        hbl2 = [Signal(acc_shape(cfg), name=f"hbl2_{r}") for r in range(k)]   # at msb_wr
        passed = Signal(k)                                                    # at msb_wr
        items = Signal(data.ArrayLayout(item_layout(cfg), k))
        for r in range(k):
            port = getattr(self, f"act{r}")
            m.d.comb += port.addr.eq(seq.act_addr[r])
            xin = Signal(act_word_layout(cfg), name=f"xin{r}")
            for c in range(k):
                v = port.data[c].as_unsigned()[:mb - 1]
                sel = Mux(t_mac.lsb, v & lb_mask, v >> lsb_bits)
                m.d.comb += xin[c].eq(Mux(t_mac.pad[r], 0, sel))
            mac = MacTree(k, mantissa_bits=mb, levels_per_stage=cfg.tree_levels_per_stage)
            aln = Aligner(in_width=tree_shape(cfg).width, max_shift=cfg.align_span)
            acc = Accumulator(in_width=aligned_shape(cfg).width, acc_bits=accw)
            m.submodules[f"mac{r}"] = mac
            m.submodules[f"aln{r}"] = aln
            m.submodules[f"acc{r}"] = acc
            m.d.comb += [
                mac.x.eq(xin),
                mac.w.eq(self.wgt.data[t_mac.lane[r]]),
                aln.i.eq(mac.o),
                aln.d.eq(self.align.data[t_al.lane[r]]),
                acc.i.eq(aln.o),
                acc.bias.eq(0),
                acc.first.eq(t_acc.first),
                acc.en.eq(t_acc.valid),
                lsbuf.wdata[r].eq(acc.o),
            ]
            # MSB: acc_hb << L at stage res, gate at stage gate, writes at stage msb_wr
            m.d.sync += hbl[r].eq(acc.o << lsb_bits)
            g = self.gate.data[r]
            val = Signal(signed(accw + 1), name=f"gate_val{r}")
            m.d.comb += val.eq(Mux(g.neg, -hbl[r], hbl[r]))
            with m.Switch(d.mode):
                with m.Case(DualMode.FULL):
                    m.d.sync += passed[r].eq(1)
                with m.Case(DualMode.GATED, DualMode.CG):
                    m.d.sync += passed[r].eq(val > g.threshold)
                with m.Default():
                    m.d.sync += passed[r].eq(0)
            m.d.sync += hbl2[r].eq(hbl[r])
            m.d.comb += [items[r].origin.eq(t_wr.origin), items[r].iy0.eq(t_wr.iy0),
                         items[r].ix0.eq(t_wr.ix0), items[r].lane.eq(r)]

        m.d.comb += [
            lsbuf.wen.eq(t_res.valid & t_res.last & t_res.lsb),
            lsbuf.waddr.eq(t_res.index),
        ]
        msb_done = t_wr.valid & t_wr.last & ~t_wr.lsb
        m.d.comb += [
            hb_wr.en.eq(msb_done),
            hb_wr.addr.eq(t_wr.index),
            hb_wr.data.passed.eq(passed),
            self.passed.en.eq(msb_done),
            self.passed.addr.eq(t_wr.out_addr),
            queue.push.eq(msb_done),
            queue.flags.eq(passed),
            queue.items.eq(items),
        ]
        for r in range(k):
            m.d.comb += [hb_wr.data.hb[r].eq(hbl2[r]), self.passed.data[r].eq(passed[r])]

        # -- output pipeline ---------------------------------------------------------------
        ot = [seq.out_token]
        for n in range(1, ost["write"] + 1):
            r = Signal(out_token_layout(cfg), name=f"ot{n}")
            m.d.sync += r.eq(ot[n - 1])
            ot.append(r)
        o_hb, o_sum = ot[ost["hb"]], ot[ost["sum"]]
        m.d.comb += [
            hb_rd.addr.eq(ot[0].index),
            lsbuf.ren.eq(o_hb.valid),
            lsbuf.first.eq(o_hb.first),
            lsbuf.flags.eq(hb_rd.data.passed),
            self.bias.addr.eq(ot[ost["scale"] - 1].tile),
            self.scale.addr.eq(ot[ost["scale"] - 1].tile),
            self.quant.addr.eq(ot[ost["rq"] - 1].tile),
        ]
        sw = scaled_shape(cfg).width
        for o in range(k):
            hb_s = Signal(acc_shape(cfg), name=f"out_hb{o}")
            total = Signal(acc_shape(cfg), name=f"out_sum{o}")
            m.d.sync += hb_s.eq(hb_rd.data.hb[o])
            m.d.sync += total.eq(hb_s + lsbuf.lb[o])
            sc = Scaler(in_width=accw, scale_bits=cfg.scale_bits, bias_width=accw, out_width=sw)
            rq = Requantizer(fmt, in_width=sw, shift_bits=cfg.shift_bits)
            act = Activation(fmt)
            m.submodules[f"sc{o}"] = sc
            m.submodules[f"rq{o}"] = rq
            m.submodules[f"act{o}"] = act
            m.d.comb += [
                sc.i.eq(total),
                sc.scale.eq(Mux(fbs, self.scale.data[o], 1)),
                sc.bias.eq(self.bias.data[o]),
                rq.i.eq(sc.o),
                rq.shift.eq(self.quant.data[o].acc),
                act.i.eq(rq.o),
                act.mode.eq(d.act),
                act.clamp_max.eq(d.clamp_max),
                self.out.data[o].eq(act.o),
            ]
        wr = ot[ost["write"]]
        m.d.comb += [self.out.addr.eq(wr.out_addr), self.out.en.eq(wr.valid)]

        with m.If(self.busy):
            m.d.sync += self.cycles.eq(self.cycles + 1)
            with m.If(wr.valid & wr.final):
                m.d.sync += [self.busy.eq(0), self.done.eq(1)]
        with m.Elif(self.start):
            m.d.sync += [self.busy.eq(1), self.done.eq(0), self.cycles.eq(0)]
        return m
