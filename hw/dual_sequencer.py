"""Phase sequencer of the dual-precision engine: per output tile, the first phase over all
pixels, the second phase over the queued items in groups of K, and the output phase."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, wiring
from amaranth.lib.wiring import In, Out

from .config import HwConfig, bits_for
from .types import ActMode, addr_width

__all__ = ["DualMode", "DualSequencer", "dual_desc_layout", "item_layout", "mac_token_layout",
           "out_token_layout", "max_pixels", "SETUP_CYCLES"]

#: cycles between ``start`` and the first MSB step (descriptor products, 2 registered stages)
SETUP_CYCLES = 2


class DualMode(enum.Enum, shape=3):
    """Mode of a dual-precision layer (rules G3, CG2, FBS2)."""

    GATED = 0   # Precision Gating: an output gets its LSB pass when its gate passes
    MSB = 1     # DFS low precision: no output gets the LSB pass
    FULL = 2    # every output gets the LSB pass (= the plain conv)
    CG = 3      # Channel Gating: base input words, then the other words where the gate passes
    FBS = 4     # FBS: one pass over the (host-compacted) layer, then the runtime scale


def max_pixels(cfg: HwConfig) -> int:
    """Largest Ho*Wo: words of the per-tile partial-sum memories, items per queue bank."""
    return cfg.max_dim * cfg.max_dim


def _geometry(cfg: HwConfig):
    """Signed address and position shapes (as in :class:`~dynacc.hw.address_gen.AddressGen`)."""
    kbits = bits_for(cfg.max_kernel)
    span = max(cfg.act_depth, cfg.max_kernel * cfg.max_in_words, cfg.max_dim * cfg.max_in_words)
    aw = signed(bits_for(span) + kbits + bits_for(cfg.max_stride) + 2)
    pos_w = signed(bits_for(cfg.max_dim) + kbits + 2)
    return aw, pos_w


def dual_desc_layout(cfg: HwConfig) -> data.StructLayout:
    """Layer descriptor of the dual-precision engine: the conv descriptor's geometry and
    activation fields (no residual), ``lsb_bits`` L = act_bits - msb_bits (0 in modes ``CG``
    and ``FBS``: both phases see the whole activation), the mode and, in mode ``CG``,
    ``base_words`` (``nb = C/(p*K)`` input words per partition) and ``chunk_tiles``
    (``(O/p)/K`` output tiles per partition). Other modes leave the last two 0, so their
    packed descriptor is that of the descriptor without them."""
    dim = unsigned(bits_for(cfg.max_dim))
    k = unsigned(bits_for(cfg.max_kernel))
    return data.StructLayout({
        "height": dim,
        "width": dim,
        "out_height": dim,
        "out_width": dim,
        "in_words": unsigned(bits_for(cfg.max_in_words)),      # CW = ceil(C / K)
        "out_tiles": unsigned(bits_for(cfg.max_tiles)),        # T = ceil(O / K)
        "kernel_h": k,
        "kernel_w": k,
        "stride": unsigned(bits_for(cfg.max_stride)),
        "pad": k,
        "act": ActMode,
        "clamp_max": unsigned(cfg.mantissa_bits - 1),
        "lsb_bits": unsigned(bits_for(cfg.mantissa_bits - 2)),  # L in [0, M - 2]
        "mode": DualMode,
        "base_words": unsigned(bits_for(cfg.max_in_words)),    # CG: nb
        "chunk_tiles": unsigned(bits_for(cfg.max_tiles)),      # CG: tiles per partition
    })


def item_layout(cfg: HwConfig) -> data.StructLayout:
    """A queued (pixel, lane): the pixel's kernel origin address and position, and the lane."""
    aw, pos_w = _geometry(cfg)
    return data.StructLayout({
        "origin": aw,        # (iy0*W + ix0)*CW
        "iy0": pos_w,        # oy*stride - pad
        "ix0": pos_w,        # ox*stride - pad
        "lane": unsigned(bits_for(cfg.lanes - 1)),
    })


def mac_token_layout(cfg: HwConfig) -> data.StructLayout:
    """Control token of one MSB or LSB step, travelling down the MAC pipeline."""
    aw, pos_w = _geometry(cfg)
    k = cfg.lanes
    return data.StructLayout({
        "valid": 1,
        "lsb": 1,            # LSB phase (x & mask, rows on their own items) vs MSB (x >> L)
        "first": 1,          # first step of a reduction: the accumulator starts at 0
        "last": 1,           # last step: the K sums are complete
        "tile": unsigned(bits_for(cfg.max_tiles)),
        "align_addr": unsigned(addr_width(cfg.wgt_depth)),            # t*CW + cw
        "index": unsigned(bits_for(max_pixels(cfg))),                # MSB: pixel, LSB: group
        "out_addr": unsigned(addr_width(cfg.out_depth)),             # MSB: pixel*T + t
        "origin": aw, "iy0": pos_w, "ix0": pos_w,                    # MSB: the pixel's item
        "pad": unsigned(k),                                           # per row
        "lane": data.ArrayLayout(unsigned(bits_for(k - 1)), k),       # per row
    })


def out_token_layout(cfg: HwConfig) -> data.StructLayout:
    """Control token of one output-phase pixel."""
    return data.StructLayout({
        "valid": 1,
        "first": 1,          # first pixel of the tile
        "final": 1,          # last pixel of the layer
        "tile": unsigned(bits_for(cfg.max_tiles)),
        "index": unsigned(bits_for(max_pixels(cfg))),                # pixel
        "out_addr": unsigned(addr_width(cfg.out_depth)),             # pixel*T + t
    })


class DualSequencer(wiring.Component):
    """Walks ``for t: [MSB: for pixel, ky, kx, cw] [LSB: for group, ky, kx, cw] [out: for
    pixel]`` and issues one step (or output pixel) per cycle.

    * MSB phase: ``Ho*Wo*S1`` steps, ``S1 = kh*kw*n1``; every row reads the same pixel.
    * MSB drain: ``msb_drain`` cycles until the last pixel's items are in the queue (its
      ``count`` is final and its first group readable); the last of them loads group 0.
    * LSB phase (only when ``count > 0``): ``ceil(count / K) * S2`` steps, ``S2 =
      kh*kw*n2``; row r works on item ``g*K + r`` (its kernel origin, padding and lane). The
      next group's items are read from the queue while a group runs and loaded at its last
      step: no bubble between groups.
    * LSB drain: ``lsb_drain`` cycles until the last group's sums are written.
    * Output phase: ``Ho*Wo`` pixels; then the next tile's MSB phase starts at once (the output
      pipeline drains meanwhile).

    Input words of a phase: ``n`` words from a start word ``s``, circularly (``s, s+1, ...,
    CW-1, 0, 1, ...``). Modes other than ``CG``: both phases ``s = 0``, ``n = CW``. Mode
    ``CG`` (p partitions): tile t of partition ``j = t // chunk_tiles`` walks its base words
    ``[j*nb, (j+1)*nb)`` in the first phase (``n1 = nb``) and the other ``n2 = CW - nb``
    words from ``(j+1)*nb mod CW`` in the second.

    Activation, weight and alignment addresses stay incremental as in
    :class:`~dynacc.hw.address_gen.AddressGen`: +1 per word (``-(CW-1)`` where the walk wraps
    to word 0), a run of ``n`` words per kernel position starts ``CW`` words after the
    previous run (``(W - kw + 1)*CW`` at a new kernel row).

    Members
    -------
    desc : In(dual_desc_layout(cfg))
    start : In(1)
    busy : Out(1)
    act_addr : Out(ArrayLayout(addr, K))
        Activation word of each row this cycle.
    wgt_addr : Out(addr_width(wgt_depth))
    token : Out(mac_token_layout(cfg))
    out_token : Out(out_token_layout(cfg))
    q_count : In(...)
        Items in the queue (from :class:`~dynacc.hw.item_queue.ItemQueue`).
    q_clear : Out(1)
    q_raddr : Out(addr_width(max_pixels))
    q_rdata : In(ArrayLayout(item_layout(cfg), K))
    """

    def __init__(self, cfg: HwConfig, *, msb_drain: int, lsb_drain: int):
        if not isinstance(cfg, HwConfig):
            raise TypeError(f"cfg must be a HwConfig, not {cfg!r}")
        if msb_drain < 1 or lsb_drain < 1:
            raise ValueError(f"drains must be >= 1 cycle, got {msb_drain}, {lsb_drain}")
        self._cfg = cfg
        self.msb_drain = msb_drain
        self.lsb_drain = lsb_drain
        k = cfg.lanes
        aw = addr_width(cfg.act_depth)
        super().__init__({
            "desc": In(dual_desc_layout(cfg)),
            "start": In(1),
            "busy": Out(1),
            "act_addr": Out(data.ArrayLayout(unsigned(aw), k)),
            "wgt_addr": Out(addr_width(cfg.wgt_depth)),
            "token": Out(mac_token_layout(cfg)),
            "out_token": Out(out_token_layout(cfg)),
            "q_count": In(unsigned(bits_for(k * max_pixels(cfg)))),
            "q_clear": Out(1),
            "q_raddr": Out(addr_width(max_pixels(cfg))),
            "q_rdata": In(data.ArrayLayout(item_layout(cfg), k)),
        })

    @property
    def cfg(self) -> HwConfig:
        return self._cfg

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        k = cfg.lanes
        d = self.desc
        aw, pos_w = _geometry(cfg)
        npix = max_pixels(cfg)

        # setup products
        wcw = Signal(unsigned(bits_for(cfg.max_dim * cfg.max_in_words)))
        kwcw = Signal(unsigned(bits_for(cfg.max_kernel * cfg.max_in_words)))
        khkw = Signal(unsigned(bits_for(cfg.max_kernel * cfg.max_kernel)))
        steps = Signal(unsigned(bits_for(cfg.max_kernel ** 2 * cfg.max_in_words)))   # S
        pix_step = Signal(unsigned(bits_for(cfg.max_stride * cfg.max_in_words)))
        pad_cw = Signal(unsigned(bits_for(cfg.max_kernel * cfg.max_in_words)))
        row_adv = Signal(aw)                   # (W - kw + 1)*CW: run start at a new kernel row
        row_step = Signal(aw)
        origin0 = Signal(aw)
        cw_max = Signal.like(d.in_words)
        kx_max = Signal.like(d.kernel_w)
        ky_max = Signal.like(d.kernel_h)
        t_max = Signal.like(d.out_tiles)
        ox_max = Signal.like(d.out_width)
        oy_max = Signal.like(d.out_height)
        cg = Signal()
        n1_max = Signal.like(d.in_words)       # words per run - 1, first phase
        n2_max = Signal.like(d.in_words)       # second phase
        chunk_max = Signal.like(d.chunk_tiles)

        # tile state
        t = Signal.like(d.out_tiles)
        wbase = Signal.like(self.wgt_addr)     # t*S
        abase = Signal.like(self.wgt_addr)     # t*CW
        b1 = Signal.like(d.in_words)           # first-phase start word of the tile
        b2 = Signal.like(d.in_words)           # second-phase start word
        tc = Signal.like(d.chunk_tiles)        # tile within its CG partition
        # kernel walk (shared by both phases); a run = the n words of one kernel position
        ky = Signal.like(d.kernel_h)
        kx = Signal.like(d.kernel_w)
        i = Signal.like(d.in_words)            # word within the run
        cwv = Signal.like(d.in_words)          # input word
        i_max = Signal.like(d.in_words)        # n - 1 of this phase
        cs = Signal.like(d.in_words)           # start word of this phase
        offset = Signal(aw)
        run_off = Signal(aw)                   # offset at the run start
        w_addr = Signal.like(self.wgt_addr)
        w_run = Signal.like(self.wgt_addr)
        w_first = Signal.like(self.wgt_addr)   # wbase + cs
        al_addr = Signal.like(self.wgt_addr)
        al_first = Signal.like(self.wgt_addr)  # abase + cs
        # pixel walk (MSB and output phases)
        oy = Signal.like(d.out_height)
        ox = Signal.like(d.out_width)
        iy_row = Signal(pos_w)
        ix_pix = Signal(pos_w)
        pix_origin = Signal(aw)
        row_origin = Signal(aw)
        pix = Signal(unsigned(bits_for(npix)))
        o_addr = Signal(unsigned(addr_width(cfg.out_depth)))
        # LSB phase: groups and the rows' items
        group = Signal(unsigned(bits_for(npix)))
        qnext = Signal(unsigned(bits_for(npix)))   # next group to load
        taken = Signal.like(self.q_count)          # items loaded so far
        rows = [Signal(item_layout(cfg), name=f"row{r}") for r in range(k)]
        drain = Signal(range(max(self.msb_drain, self.lsb_drain) + 1))
        load = Signal()                            # rows <- q_rdata this cycle

        last_i = i == i_max
        last_kx = kx == kx_max
        last_ky = ky == ky_max
        seq_end = last_i & last_kx & last_ky
        last_ox = ox == ox_max
        last_oy = oy == oy_max
        last_pix = last_ox & last_oy
        last_t = t == t_max

        lsb = Signal()
        tok = self.token
        m.d.comb += [
            self.wgt_addr.eq(w_addr),
            tok.lsb.eq(lsb),
            tok.first.eq((i == 0) & (kx == 0) & (ky == 0)),
            tok.last.eq(seq_end),
            tok.tile.eq(t),
            tok.align_addr.eq(al_addr),
            tok.index.eq(Mux(lsb, group, pix)),
            tok.out_addr.eq(o_addr),
            tok.origin.eq(pix_origin), tok.iy0.eq(iy_row), tok.ix0.eq(ix_pix),
            self.q_raddr.eq(Mux(load, qnext + 1, qnext)),
        ]
        for r in range(k):
            org = Mux(lsb, rows[r].origin, pix_origin)
            iy = Signal(pos_w, name=f"iy{r}")
            ix = Signal(pos_w, name=f"ix{r}")
            m.d.comb += [
                iy.eq(Mux(lsb, rows[r].iy0, iy_row) + ky),
                ix.eq(Mux(lsb, rows[r].ix0, ix_pix) + kx),
                self.act_addr[r].eq(org + offset),
                tok.pad[r].eq((iy < 0) | (iy >= d.height) | (ix < 0) | (ix >= d.width)),
                tok.lane[r].eq(Mux(lsb, rows[r].lane, r)),
            ]

        def walk_start(start, w0, al0, n_max):
            """A phase's walk from word ``start`` (``w0 = wbase + start``, ``al0 = abase +
            start``), runs of ``n_max + 1`` words."""
            m.d.sync += [ky.eq(0), kx.eq(0), i.eq(0), cwv.eq(start), cs.eq(start),
                         offset.eq(start), run_off.eq(start), w_addr.eq(w0), w_run.eq(w0),
                         w_first.eq(w0), al_addr.eq(al0), al_first.eq(al0), i_max.eq(n_max)]

        def kernel_step():
            """One step of the kernel walk; at its end back to the start of the same phase."""
            with m.If(~last_i):
                m.d.sync += i.eq(i + 1)
                with m.If(cwv == cw_max):     # wrap to word 0 (CG second phase only)
                    m.d.sync += [cwv.eq(0), offset.eq(offset - cw_max),
                                 w_addr.eq(w_addr - cw_max), al_addr.eq(abase)]
                with m.Else():
                    m.d.sync += [cwv.eq(cwv + 1), offset.eq(offset + 1),
                                 w_addr.eq(w_addr + 1), al_addr.eq(al_addr + 1)]
            with m.Else():
                m.d.sync += [i.eq(0), cwv.eq(cs), al_addr.eq(al_first)]
                with m.If(~last_kx):
                    m.d.sync += [kx.eq(kx + 1), run_off.eq(run_off + d.in_words),
                                 offset.eq(run_off + d.in_words),
                                 w_run.eq(w_run + d.in_words), w_addr.eq(w_run + d.in_words)]
                with m.Elif(~last_ky):
                    m.d.sync += [kx.eq(0), ky.eq(ky + 1), run_off.eq(run_off + row_adv),
                                 offset.eq(run_off + row_adv),
                                 w_run.eq(w_run + d.in_words), w_addr.eq(w_run + d.in_words)]
                with m.Else():
                    m.d.sync += [kx.eq(0), ky.eq(0), run_off.eq(cs), offset.eq(cs),
                                 w_run.eq(w_first), w_addr.eq(w_first)]

        def pixel_reset(tile, origin):
            m.d.sync += [oy.eq(0), ox.eq(0), iy_row.eq(-d.pad), ix_pix.eq(-d.pad),
                         pix_origin.eq(origin), row_origin.eq(origin), pix.eq(0),
                         o_addr.eq(tile)]

        def pixel_step():
            m.d.sync += [pix.eq(pix + 1), o_addr.eq(o_addr + d.out_tiles)]
            with m.If(~last_ox):
                m.d.sync += [ox.eq(ox + 1), ix_pix.eq(ix_pix + d.stride),
                             pix_origin.eq(pix_origin + pix_step)]
            with m.Else():
                m.d.sync += [ox.eq(0), oy.eq(oy + 1), ix_pix.eq(-d.pad),
                             iy_row.eq(iy_row + d.stride), row_origin.eq(row_origin + row_step),
                             pix_origin.eq(row_origin + row_step)]

        def tile_start(tile, origin):
            """The MSB phase of a tile (``wbase``, ``abase``, ``b1`` are the tile's)."""
            m.d.sync += [t.eq(tile), qnext.eq(0), group.eq(0)]
            m.d.comb += self.q_clear.eq(1)
            walk_start(b1, wbase + b1, abase + b1, n1_max)
            pixel_reset(tile, origin)

        def next_tile():
            """Bases and CG start words of the next tile (on entering the output phase)."""
            m.d.sync += [wbase.eq(wbase + steps), abase.eq(abase + d.in_words)]
            with m.If(cg):
                with m.If(tc == chunk_max):
                    nxt = b2 + d.base_words
                    m.d.sync += [tc.eq(0), b1.eq(b2), b2.eq(Mux(nxt == d.in_words, 0, nxt))]
                with m.Else():
                    m.d.sync += tc.eq(tc + 1)

        def load_rows():
            m.d.comb += load.eq(1)
            m.d.sync += [rows[r].eq(self.q_rdata[r]) for r in range(k)]
            m.d.sync += qnext.eq(qnext + 1)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.next = "SETUP1"
            with m.State("SETUP1"):
                m.d.comb += self.busy.eq(1)
                is_cg = d.mode == DualMode.CG
                m.d.sync += [
                    wcw.eq(d.width * d.in_words),
                    kwcw.eq(d.kernel_w * d.in_words),
                    khkw.eq(d.kernel_h * d.kernel_w),
                    pix_step.eq(d.stride * d.in_words),
                    pad_cw.eq(d.pad * d.in_words),
                    cw_max.eq(d.in_words - 1),
                    kx_max.eq(d.kernel_w - 1),
                    ky_max.eq(d.kernel_h - 1),
                    t_max.eq(d.out_tiles - 1),
                    ox_max.eq(d.out_width - 1),
                    oy_max.eq(d.out_height - 1),
                    cg.eq(is_cg),
                    n1_max.eq(Mux(is_cg, d.base_words, d.in_words) - 1),
                    n2_max.eq(Mux(is_cg, d.in_words - d.base_words, d.in_words) - 1),
                    chunk_max.eq(d.chunk_tiles - 1),
                    b1.eq(0),
                    b2.eq(Mux(is_cg, d.base_words, 0)),
                    tc.eq(0),
                    wbase.eq(0),
                    abase.eq(0),
                ]
                m.next = "SETUP2"
            with m.State("SETUP2"):
                m.d.comb += self.busy.eq(1)
                origin = -(d.pad * wcw + pad_cw)
                m.d.sync += [
                    row_adv.eq(wcw - kwcw + d.in_words),
                    row_step.eq(d.stride * wcw),
                    origin0.eq(origin),
                    steps.eq(khkw * d.in_words),
                ]
                tile_start(0, origin)
                m.next = "MSB"
            with m.State("MSB"):
                m.d.comb += [self.busy.eq(1), tok.valid.eq(1)]
                kernel_step()
                with m.If(seq_end):
                    pixel_step()
                    with m.If(last_pix):
                        m.d.sync += drain.eq(self.msb_drain - 1)
                        m.next = "MSB_DRAIN"
            with m.State("MSB_DRAIN"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += drain.eq(drain - 1)
                walk_start(b2, wbase + b2, abase + b2, n2_max)
                with m.If(drain == 0):
                    with m.If(self.q_count == 0):
                        pixel_reset(t, origin0)
                        next_tile()
                        m.next = "OUT"
                    with m.Else():
                        load_rows()
                        m.d.sync += taken.eq(k)
                        m.next = "LSB"
            with m.State("LSB"):
                m.d.comb += [self.busy.eq(1), tok.valid.eq(1), lsb.eq(1)]
                kernel_step()
                with m.If(seq_end):
                    with m.If(taken < self.q_count):
                        load_rows()
                        m.d.sync += [taken.eq(taken + k), group.eq(group + 1)]
                    with m.Else():
                        m.d.sync += drain.eq(self.lsb_drain - 1)
                        m.next = "LSB_DRAIN"
            with m.State("LSB_DRAIN"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += drain.eq(drain - 1)
                with m.If(drain == 0):
                    pixel_reset(t, origin0)
                    next_tile()
                    m.next = "OUT"
            with m.State("OUT"):
                ot = self.out_token
                m.d.comb += [self.busy.eq(1), ot.valid.eq(1), ot.first.eq(pix == 0),
                             ot.final.eq(last_pix & last_t), ot.tile.eq(t), ot.index.eq(pix),
                             ot.out_addr.eq(o_addr)]
                pixel_step()
                with m.If(last_pix):
                    with m.If(last_t):
                        m.next = "IDLE"
                    with m.Else():
                        tile_start(t + 1, origin0)
                        m.next = "MSB"
        return m
