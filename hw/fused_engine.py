"""The fused-block engine: one predicted FusioNet bottleneck (1×1 expand → 3×3 depthwise →
1×1 project, channel shuffle, residual) from its input feature map to its requantized output,
with the ternary ReLU predictor in hardware (rules F1-F9 of ``docs/arithmetic.md``).

Three phases, each a counter walk (memories outside, read latency 1):

1. **s1 / levels** (F1-F4): per input pixel q and mid chunk c (``chunk`` mid channels of one
   group), one cycle: the group's ``C_in/G`` mantissas become 4-bit levels (``5m`` then a
   rounding shift), every chunk lane sums them with its ternary weights (additions and
   subtractions only) and compares the sum with its 8 thresholds: ``s1`` and the predicted
   level ``ŷ1`` (0..7) are written to the ``s1`` memory.
2. **s2** (F2-F3): per output pixel p, chunk c and depthwise tap, one cycle: every lane adds
   ``t2·ŷ1[p+k]`` (0 at padding taps); after the 9th tap ``s2`` is written.
3. **fused compute** (F8, F9): per output pixel and tile (``lanes`` projection rows of one
   group), for each of the 10 taps (9 depthwise taps and one for the ``V`` terms) the
   scanner reads the chunk masks ``s2[p] & s1[p+k]`` (``s2[p]`` for the V tap) and issues
   one fused-weight word per surviving mid, lowest index first; each lane adds it into its
   ``A`` accumulators (``C_in/G`` columns of ``T`` and one of ``U`` or ``V``: additions
   only). Then ``y += Σ_i x[i, p+k]·A[i] + A[bias]`` (the bias column's input is 1), and
   at the centre tap the residual ``x[j] << res_shift``. After the last tap
   ``y + b3`` is requantized (R3, :class:`Requantizer`) onto the output LSB and stored in
   the output word at the shuffled channel; the word is written after the last tile.

Padding taps of phase 3 cost one cycle; a chunk costs ``1 + max(1, survivors)`` cycles; cycle
counts are exact and modelled by :func:`dynacc.hw.fused_program.fused_cycles`.

==========  =================================  ==========================================
port        address                            word
==========  =================================  ==========================================
``act``     ``q = y*W + x``                    ``channels`` input mantissas of a pixel
``pred``    chunk ``c``                        per lane: t1, t2, thresholds (F2-F4)
``s1w/s1r`` ``q*chunks + c``                   per lane: s1, level (written in phase 1)
``s2w/s2r`` ``p*chunks + c``                   per lane: s2 (written in phase 2)
``tw``      ``((t*10 + k)*chunks_g + cl)*chunk + b``  per lane: T[C_in/G], U or V
``lane``    tile ``t``                         per lane: b3, shift, res_shift, channels
``out``     ``p = y*Wo + x``                   ``channels`` output mantissas (write)
==========  =================================  ==========================================
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import ReadPort, WritePort
from amaranth.lib.wiring import In, Out

from .config import clog2
from .fused_config import TAPS, FusedConfig
from .requantizer import Requantizer

__all__ = ["FusedEngine", "fused_desc_layout", "act_layout", "pred_layout", "mask1_layout",
           "mask2_layout", "t_layout", "lane_layout", "LEVELS", "RES_SHIFT_BITS"]

#: predicted ŷ1 levels above zero (rule F4)
LEVELS = 7
#: width of the residual left shift
RES_SHIFT_BITS = 6


def _addr_bits(depth: int) -> int:
    return max(1, clog2(depth))


def _dim_bits(cfg: FusedConfig) -> int:
    return clog2(cfg.act_depth) + 1


def fused_desc_layout(cfg: FusedConfig) -> data.StructLayout:
    """Run-time geometry of one block: input ``h × w``, output ``ho × wo``, stride 2 flag,
    ``groups``, ``cin_g`` inputs per group, ``chunks`` (all) and ``chunks_g`` (per group) mid
    chunks, ``tiles`` and ``tiles_g``, residual flag, the F1 shift (``q4_left`` or
    ``q4_right``)."""
    d = unsigned(_dim_bits(cfg))
    ch = unsigned(clog2(cfg.max_chunks) + 1)
    tl = unsigned(clog2(cfg.max_tiles) + 1)
    return data.StructLayout({
        "h": d, "w": d, "ho": d, "wo": d, "stride2": 1,
        "groups": unsigned(clog2(cfg.channels) + 1), "cin_g": unsigned(clog2(cfg.group_in) + 1),
        "chunks": ch, "chunks_g": ch, "tiles": tl, "tiles_g": tl, "use_res": 1,
        "q4_left": unsigned(4), "q4_right": unsigned(6),
    })


def act_layout(cfg: FusedConfig) -> data.ArrayLayout:
    """One pixel: ``channels`` signed mantissas (input and output words)."""
    return data.ArrayLayout(signed(cfg.mantissa_bits), cfg.channels)


def pred_layout(cfg: FusedConfig) -> data.ArrayLayout:
    """Predictor constants of one chunk, per lane: ternary ``t1`` (``group_in``) and ``t2``
    (9), compare directions ``neg1``/``neg2`` (1: ``−acc``), thresholds ``thr1``, ``lvl``
    (7 level thresholds), ``thr2``."""
    thr = signed(cfg.thr_bits)
    return data.ArrayLayout(data.StructLayout({
        "t1": data.ArrayLayout(signed(2), cfg.group_in), "t2": data.ArrayLayout(signed(2), 9),
        "neg1": 1, "thr1": thr, "lvl": data.ArrayLayout(thr, LEVELS), "neg2": 1, "thr2": thr,
    }), cfg.chunk)


def mask1_layout(cfg: FusedConfig) -> data.ArrayLayout:
    """Phase-1 result of one (pixel, chunk), per lane: ``s1`` and the level ``ŷ1``."""
    return data.ArrayLayout(data.StructLayout({"s1": 1, "level": unsigned(3)}), cfg.chunk)


def mask2_layout(cfg: FusedConfig) -> data.ArrayLayout:
    """Phase-2 result of one (output pixel, chunk): ``s2`` per lane."""
    return data.ArrayLayout(unsigned(1), cfg.chunk)


def t_layout(cfg: FusedConfig) -> data.ArrayLayout:
    """Fused weights of one (tile, tap, mid), per lane: ``group_in`` columns of ``T`` then
    the bias column (``U`` at a depthwise tap, ``V`` at the tenth)."""
    return data.ArrayLayout(data.ArrayLayout(signed(cfg.t_bits), cfg.group_in + 1), cfg.lanes)


def lane_layout(cfg: FusedConfig) -> data.ArrayLayout:
    """Per lane of a tile: ``b3`` (accumulator LSB), output ``shift`` (F9), residual channel
    and shift, the shuffled output channel, ``valid``."""
    return data.ArrayLayout(data.StructLayout({
        "b3": signed(cfg.acc_bits), "shift": signed(cfg.shift_bits),
        "res_shift": unsigned(RES_SHIFT_BITS), "res_ch": unsigned(cfg.chan_bits),
        "out_ch": unsigned(cfg.chan_bits), "valid": 1,
    }), cfg.lanes)


def _memories(cfg: FusedConfig) -> dict[str, tuple[str, int, str, data.Layout]]:
    mask = _addr_bits(cfg.mask_depth)
    return {
        "act": ("read", _addr_bits(cfg.act_depth), "act", act_layout(cfg)),
        "pred": ("read", _addr_bits(cfg.max_chunks), "pred", pred_layout(cfg)),
        "tw": ("read", _addr_bits(cfg.t_depth), "t", t_layout(cfg)),
        "lane": ("read", _addr_bits(cfg.max_tiles), "lane", lane_layout(cfg)),
        "s1w": ("write", mask, "s1", mask1_layout(cfg)),
        "s1r": ("read", mask, "s1", mask1_layout(cfg)),
        "s2w": ("write", mask, "s2", mask2_layout(cfg)),
        "s2r": ("read", mask, "s2", mask2_layout(cfg)),
        # the same address width as the masks, so one dump count fits every write memory
        "out": ("write", mask, "out", act_layout(cfg)),
    }


class FusedEngine(wiring.Component):
    """One fused block from ``start`` to ``done`` (see the module text for the phases).

    Members
    -------
    desc : In(fused_desc_layout(cfg)), held while ``busy``.
    start : In(1), pulse while idle.
    busy, done : Out(1); ``done`` is set after the last output word, cleared by ``start``.
    cycles : Out(cycle_bits), cycles spent busy in the last run.
    act, pred, tw, lane, s1r, s2r : In(ReadPort.Signature); s1w, s2w, out : In(WritePort...).
    """

    def __init__(self, cfg: FusedConfig):
        if not isinstance(cfg, FusedConfig):
            raise TypeError(f"cfg must be a FusedConfig, not {cfg!r}")
        self._cfg = cfg
        members = {
            "desc": In(fused_desc_layout(cfg)),
            "start": In(1),
            "busy": Out(1),
            "done": Out(1),
            "cycles": Out(cfg.cycle_bits),
        }
        for name, (kind, aw, _mem, lay) in _memories(cfg).items():
            sig = ReadPort.Signature if kind == "read" else WritePort.Signature
            members[name] = In(sig(addr_width=aw, shape=lay))
        super().__init__(members)

    @property
    def cfg(self) -> FusedConfig:
        return self._cfg

    @staticmethod
    def memories(cfg: FusedConfig) -> dict[str, tuple[str, str]]:
        """Port name -> (``"read"``/``"write"``, memory name); writes of a memory come first."""
        return {p: (kind, mem) for p, (kind, _aw, mem, _l) in _memories(cfg).items()}

    @staticmethod
    def layouts(cfg: FusedConfig) -> dict[str, data.Layout]:
        """Memory name -> word layout."""
        return {mem: lay for _p, (_k, _aw, mem, lay) in _memories(cfg).items()}

    def elaborate(self, platform):  # noqa: C901 - one FSM, kept in one place
        m = Module()
        cfg = self._cfg
        d = self.desc
        K, W, CI, M = cfg.lanes, cfg.chunk, cfg.group_in, cfg.mantissa_bits
        db = _dim_bits(cfg)

        # a read port's enable resets to 1: every read here is explicit, so a word read once
        # (lane constants, the tap's activation) stays on the port until the next read
        for port in (self.act, self.pred, self.tw, self.lane, self.s1r, self.s2r):
            m.d.comb += port.en.eq(0)

        # ------------------------------------------------------------- loop counters
        py = Signal(db)                 # pixel row / column (input in phase 1, output after)
        px = Signal(db)
        c = Signal(clog2(cfg.max_chunks) + 1)      # chunk (global)
        cg = Signal(clog2(cfg.channels) + 1)       # its group
        cl = Signal(clog2(cfg.max_chunks) + 1)     # chunk within the group
        ky = Signal(2)
        kx = Signal(2)
        k = Signal(4)                   # phase-3 tap, 0..9
        t = Signal(clog2(cfg.max_tiles) + 1)       # tile (global), its group, tile in group
        tg = Signal(clog2(cfg.channels) + 1)
        ti = Signal(clog2(cfg.max_tiles) + 1)
        cnt = Signal(3)
        qreg = Signal(2 * db)           # input pixel of the current phase-3 tap
        first = Signal()
        rem = Signal(W)

        def chunk_step(on_wrap):
            """Advance (cl, cg, c) over every chunk; ``on_wrap`` after the last."""
            with m.If(cl == d.chunks_g - 1):
                m.d.sync += cl.eq(0)
                with m.If(cg == d.groups - 1):
                    m.d.sync += [cg.eq(0), c.eq(0)]
                    on_wrap()
                with m.Else():
                    m.d.sync += [cg.eq(cg + 1), c.eq(c + 1)]
            with m.Else():
                m.d.sync += [cl.eq(cl + 1), c.eq(c + 1)]

        def pixel_step(hh, ww, on_last, on_next=lambda: None):
            with m.If(px == ww - 1):
                m.d.sync += px.eq(0)
                with m.If(py == hh - 1):
                    on_last()
                with m.Else():
                    m.d.sync += py.eq(py + 1)
                    on_next()
            with m.Else():
                m.d.sync += px.eq(px + 1)
                on_next()

        # tap position (phases 2 and 3): input pixel of output (py, px) at tap (ky, kx)
        yy = Signal(signed(db + 3))
        xx = Signal(signed(db + 3))
        m.d.comb += [
            yy.eq(Mux(d.stride2, py << 1, py) + ky - 1),
            xx.eq(Mux(d.stride2, px << 1, px) + kx - 1),
        ]
        inimg = Signal()
        m.d.comb += inimg.eq((yy >= 0) & (yy < d.h) & (xx >= 0) & (xx < d.w))
        q_in = Signal(2 * db)           # input pixel index of the walk
        m.d.comb += q_in.eq(yy[:db] * d.w + xx[:db])
        p_out = Signal(2 * db)          # output pixel index
        m.d.comb += p_out.eq(py * d.wo + px)

        # ------------------------------------------------------------- phase 1 data stage
        v1 = Signal()
        a1 = Signal(len(self.s1w.addr))
        g1 = Signal.like(cg)
        x_raw = self.act.data.as_value()

        def group_x(g):
            """The group's ``group_in`` input mantissas (0 beyond ``cin_g``)."""
            base = g * d.cin_g
            return [Mux(i < d.cin_g, x_raw.word_select(base + i, M).as_signed(), 0)
                    for i in range(CI)]

        def q4(xm):
            """Rule F1 on a mantissa: ``5m`` then a rounding right or an exact left shift."""
            v = Signal(signed(M + 4))
            m.d.comb += v.eq((xm << 2) + xm)
            right = Signal(signed(M + 4 + 64))
            half = (Const(1, 1) << d.q4_right) >> 1           # 2^(s-1), 0 when s = 0
            m.d.comb += right.eq((v + half) >> d.q4_right)
            vc = Mux(v > 16, 16, Mux(v < -16, -16, v))
            left = Signal(signed(6 + 16))
            m.d.comb += left.eq(vc << d.q4_left)
            raw = Mux(d.q4_right != 0, right, left)
            return Mux(raw > 7, 7, Mux(raw < -8, -8, raw))

        def ternary(tv, v):
            return Mux(tv == 1, v, Mux(tv == -1, -v, 0))

        xg1 = group_x(g1)
        q4s = [Signal(signed(5), name=f"q4_{i}") for i in range(CI)]
        for i in range(CI):
            m.d.comb += q4s[i].eq(q4(xg1[i]))
        pw = self.pred.data
        for lane in range(W):
            acc1 = Signal(signed(cfg.thr_bits + 2), name=f"acc1_{lane}")
            m.d.comb += acc1.eq(sum(ternary(pw[lane].t1[i], q4s[i]) for i in range(CI)))
            sa = Signal(signed(cfg.thr_bits + 3), name=f"sa1_{lane}")
            m.d.comb += sa.eq(Mux(pw[lane].neg1, -acc1, acc1))
            m.d.comb += [
                self.s1w.data[lane].s1.eq(sa > pw[lane].thr1),
                self.s1w.data[lane].level.eq(sum((sa > pw[lane].lvl[j]).as_unsigned()
                                                 for j in range(LEVELS))),
            ]
        m.d.comb += [self.s1w.addr.eq(a1), self.s1w.en.eq(v1)]

        # ------------------------------------------------------------- phase 2 data stage
        v2 = Signal()
        in2 = Signal()
        k2 = Signal(4)
        last2 = Signal()
        a2 = Signal(len(self.s2w.addr))
        acc2 = [Signal(signed(cfg.thr_bits + 2), name=f"acc2_{lane}") for lane in range(W)]
        for lane in range(W):
            t2 = pw[lane].t2.as_value().word_select(k2, 2).as_signed()
            lvl = self.s1r.data[lane].level
            term = Mux(in2, ternary(t2, Cat(lvl, Const(0, 1)).as_signed()), 0)
            nxt = Signal(signed(cfg.thr_bits + 2), name=f"acc2n_{lane}")
            m.d.comb += nxt.eq(Mux(k2 == 0, 0, acc2[lane]) + term)
            with m.If(v2):
                m.d.sync += acc2[lane].eq(nxt)
            sa2 = Mux(pw[lane].neg2, -nxt, nxt)
            m.d.comb += self.s2w.data[lane].eq(sa2 > pw[lane].thr2)
        m.d.comb += [self.s2w.addr.eq(a2), self.s2w.en.eq(v2 & last2)]

        # ------------------------------------------------------------- phase 3 datapath
        tv = Signal()                   # a T word arrives this cycle
        a_acc = [[Signal(signed(cfg.a_bits), name=f"A{lane}_{i}") for i in range(CI + 1)]
                 for lane in range(K)]
        y = [Signal(signed(cfg.acc_bits), name=f"y{lane}") for lane in range(K)]
        clear_a = Signal()
        for lane in range(K):
            for i in range(CI + 1):
                with m.If(clear_a):
                    m.d.sync += a_acc[lane][i].eq(0)
                with m.Elif(tv):
                    m.d.sync += a_acc[lane][i].eq(a_acc[lane][i] + self.tw.data[lane][i])

        is_v = Signal()                 # the tenth (V) tap
        m.d.comb += is_v.eq(k == TAPS - 1)
        xg3 = group_x(tg)
        xext = [Mux(is_v, 0, xg3[i]) for i in range(CI)]
        lw = self.lane.data
        mac = []
        for lane in range(K):
            s = Signal(signed(cfg.acc_bits + 4), name=f"mac{lane}")
            res = (x_raw.word_select(lw[lane].res_ch, M).as_signed() << lw[lane].res_shift)
            m.d.comb += s.eq(sum(xext[i] * a_acc[lane][i] for i in range(CI))
                             + a_acc[lane][CI]
                             + Mux(d.use_res & (k == 4), res, 0))
            mac.append(s)

        rqs = []
        for lane in range(K):
            rq = Requantizer(cfg.fmt, in_width=cfg.acc_bits + 1, shift_bits=cfg.shift_bits)
            m.submodules[f"rq{lane}"] = rq
            m.d.comb += [rq.i.eq(y[lane] + lw[lane].b3), rq.shift.eq(lw[lane].shift)]
            rqs.append(rq)
        out_bits = Signal(cfg.channels * M)
        m.d.comb += self.out.data.eq(out_bits)

        # scanner: lowest surviving mid of the chunk
        s1bits = Cat(*[self.s1r.data[i].s1 for i in range(W)])
        s2bits = self.s2r.data.as_value()
        cur = Signal(W)
        m.d.comb += cur.eq(Mux(first, s2bits & Mux(is_v, Const((1 << W) - 1, W), s1bits), rem))
        low = Signal(range(W))
        for i in reversed(range(W)):
            with m.If(cur[i]):
                m.d.comb += low.eq(i)
        rem_next = Signal(W)
        m.d.comb += rem_next.eq(cur & (cur - 1))
        mid_gp = Signal(clog2(cfg.max_chunks) + 1 + clog2(W) + 1)
        m.d.comb += mid_gp.eq(d.chunks_g * W)
        t_addr = Signal(len(self.tw.addr) + 8)
        m.d.comb += t_addr.eq((t * TAPS + k) * mid_gp + cl * W + low)
        gbase = Signal(clog2(cfg.max_chunks) + 1)
        m.d.comb += gbase.eq(tg * d.chunks_g + cl)

        def tap_step():
            """Next phase-3 tap (the V tap after the ninth)."""
            m.d.sync += k.eq(k + 1)
            with m.If(kx == 2):
                m.d.sync += [kx.eq(0), ky.eq(ky + 1)]
            with m.Else():
                m.d.sync += kx.eq(kx + 1)

        def start_tile():
            m.d.sync += [k.eq(0), ky.eq(0), kx.eq(0)]
            for lane in range(K):
                m.d.sync += y[lane].eq(0)

        # ------------------------------------------------------------- control
        m.d.sync += [v1.eq(0), v2.eq(0), tv.eq(0)]
        with m.If(self.busy):
            m.d.sync += self.cycles.eq(self.cycles + 1)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [self.busy.eq(1), self.done.eq(0), self.cycles.eq(0),
                                 py.eq(0), px.eq(0), c.eq(0), cg.eq(0), cl.eq(0)]
                    m.next = "P1"

            with m.State("P1"):
                m.d.comb += [
                    self.act.addr.eq(py * d.w + px), self.act.en.eq(1),
                    self.pred.addr.eq(c), self.pred.en.eq(1),
                ]
                m.d.sync += [v1.eq(1), a1.eq((py * d.w + px) * d.chunks + c), g1.eq(cg)]

                def p1_last():
                    m.next = "P1_DRAIN"
                chunk_step(lambda: pixel_step(d.h, d.w, p1_last))

            with m.State("P1_DRAIN"):
                m.d.sync += [py.eq(0), px.eq(0), ky.eq(0), kx.eq(0)]
                m.next = "P2"

            with m.State("P2"):
                m.d.comb += [
                    self.s1r.addr.eq(q_in * d.chunks + c), self.s1r.en.eq(inimg),
                    self.pred.addr.eq(c), self.pred.en.eq(1),
                ]
                m.d.sync += [v2.eq(1), in2.eq(inimg), k2.eq(ky * 3 + kx),
                             last2.eq((ky == 2) & (kx == 2)), a2.eq(p_out * d.chunks + c)]
                with m.If(kx == 2):
                    m.d.sync += kx.eq(0)
                    with m.If(ky == 2):
                        m.d.sync += ky.eq(0)

                        def p2_last():
                            m.next = "P2_DRAIN"
                        chunk_step(lambda: pixel_step(d.ho, d.wo, p2_last))
                    with m.Else():
                        m.d.sync += ky.eq(ky + 1)
                with m.Else():
                    m.d.sync += kx.eq(kx + 1)

            with m.State("P2_DRAIN"):
                m.d.sync += [py.eq(0), px.eq(0), t.eq(0), tg.eq(0), ti.eq(0), out_bits.eq(0)]
                m.next = "TILE"

            with m.State("TILE"):
                m.d.comb += [self.lane.addr.eq(t), self.lane.en.eq(1)]
                start_tile()
                m.next = "TAP"

            with m.State("TAP"):
                m.d.sync += [cl.eq(0), qreg.eq(q_in)]
                with m.If(is_v):
                    m.next = "CHLOAD"
                with m.Elif(inimg):
                    m.d.comb += [self.act.addr.eq(q_in), self.act.en.eq(1)]
                    m.next = "CHLOAD"
                with m.Else():
                    tap_step()

            with m.State("CHLOAD"):
                m.d.comb += [
                    self.s2r.addr.eq(p_out * d.chunks + gbase), self.s2r.en.eq(1),
                    self.s1r.addr.eq(qreg * d.chunks + gbase), self.s1r.en.eq(~is_v),
                ]
                m.d.sync += first.eq(1)
                m.next = "SCAN"

            with m.State("SCAN"):
                m.d.sync += first.eq(0)

                def next_chunk():
                    with m.If(cl == d.chunks_g - 1):
                        m.next = "DRAIN"
                    with m.Else():
                        m.d.sync += cl.eq(cl + 1)
                        m.next = "CHLOAD"
                with m.If(cur == 0):
                    next_chunk()
                with m.Else():
                    m.d.comb += [self.tw.addr.eq(t_addr), self.tw.en.eq(1)]
                    m.d.sync += [tv.eq(1), rem.eq(rem_next)]
                    with m.If(rem_next == 0):
                        next_chunk()

            with m.State("DRAIN"):
                m.next = "MAC"

            with m.State("MAC"):
                m.d.comb += clear_a.eq(1)
                for lane in range(K):
                    m.d.sync += y[lane].eq(y[lane] + mac[lane])
                with m.If(is_v):
                    m.next = "OUT"
                with m.Else():
                    tap_step()
                    m.next = "TAP"

            with m.State("OUT"):
                m.d.sync += cnt.eq(Requantizer.LATENCY - 2)
                m.next = "WAIT"

            with m.State("WAIT"):
                m.d.sync += cnt.eq(cnt - 1)
                with m.If(cnt == 0):
                    m.next = "STORE"

            with m.State("STORE"):
                for lane in range(K):
                    with m.If(lw[lane].valid):
                        m.d.sync += out_bits.word_select(lw[lane].out_ch, M).eq(rqs[lane].o)
                with m.If(t == d.tiles - 1):
                    m.next = "PIXW"
                with m.Else():
                    m.d.sync += t.eq(t + 1)
                    with m.If(ti == d.tiles_g - 1):
                        m.d.sync += [ti.eq(0), tg.eq(tg + 1)]
                    with m.Else():
                        m.d.sync += ti.eq(ti + 1)
                    m.next = "TILE"

            with m.State("PIXW"):
                m.d.comb += [self.out.addr.eq(p_out), self.out.en.eq(1)]
                m.d.sync += [out_bits.eq(0), t.eq(0), tg.eq(0), ti.eq(0)]

                def p3_last():
                    m.d.sync += [self.busy.eq(0), self.done.eq(1)]
                    m.next = "IDLE"

                def p3_next():
                    m.next = "TILE"
                pixel_step(d.ho, d.wo, p3_last, p3_next)
        return m
