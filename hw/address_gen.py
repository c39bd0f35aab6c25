"""Loop-nest sequencer of the conv engine: one reduction step (K×K MACs) per cycle."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .config import HwConfig, bits_for
from .types import addr_width, desc_layout

__all__ = ["AddressGen", "token_layout", "SETUP_CYCLES"]

#: cycles between ``start`` and the first issued step: 6 registered stages (descriptor
#: products in two shift-add stages, their second-level products in two more with the
#: "minus one" limits, the kernel origin, the origin of the next pixel / row), plus the
#: registered step kind in front of the activation-address stage
SETUP_CYCLES = 7


def _shift_add(a, b, shape, name: str, group: int = 3):
    """``a * b`` (both unsigned, ``b`` the narrow one) as shift-adds in two registered
    stages, with no multiplier (no DSP block on the setup paths): partial sums of ``group``
    terms, then their sum. Returns (stage-1 statements, stage-2 statements, result)."""
    parts, s1 = [], []
    for j in range(0, len(b), group):
        p = Signal(shape, name=f"{name}_p{j // group}")
        s1.append(p.eq(sum(Mux(b[i], a << i, 0) for i in range(j, min(j + group, len(b))))))
        parts.append(p)
    r = Signal(shape, name=name)
    return s1, [r.eq(sum(parts))], r


def token_layout(cfg: HwConfig) -> data.StructLayout:
    """Control token travelling down the pipeline with each reduction step."""
    return data.StructLayout({
        "valid": 1,
        "pad": 1,            # the activation word is a zero-padding position
        "first": 1,          # first step of an output word: the accumulator starts at the bias
        "last": 1,           # last step of an output word: requantize and write it
        "final": 1,          # last step of the layer
        "tile": unsigned(bits_for(cfg.max_tiles)),                   # output tile t
        "align_addr": unsigned(addr_width(cfg.wgt_depth)),           # t*CW + cw
        "out_addr": unsigned(addr_width(cfg.out_depth)),             # (oy*Wo + ox)*T + t
    })


class AddressGen(wiring.Component):
    """Walks ``for oy, ox, t, ky, kx, cw`` and issues one step per cycle, with no bubble.

    Addresses are kept incrementally (no multiplier in the loop): within a kernel row the
    activation address advances by 1 (``kx*CW + cw`` is contiguous), a new kernel row adds
    ``(W - kw)*CW + 1``, a new tile restarts at the pixel origin, a new pixel adds
    ``stride*CW``, a new row ``stride*W*CW``. These steps are computed from the descriptor in
    :data:`SETUP_CYCLES` registered cycles after ``start``. For Fmax every per-step decision
    is a flip-flop: each loop counter carries a registered "is last" flag, and the origins of
    the next pixel and row (their addresses and their input coordinates ``ix``/``iy``) are kept
    one addition ahead, so a step only adds +1 or ``row_skip`` to the activation address, +1
    to a coordinate, or selects among registers. The weight address runs
    ``((t*kh + ky)*kw + kx)*CW + cw``, i.e. +1 per step, back to 0 at each new pixel.

    Two stages: the loop counters and their flags decide each step's kind (next word, next kx,
    next ky, next tile, next pixel, next row) into a one-hot register; one cycle later the
    activation-address and input-coordinate registers (``ix``, ``iy`` and the pixel / row
    origins) apply it (an addition or a select, controlled by those flip-flops only). The
    token and the weight address are registered once to stay aligned with them; the token's
    padding flag is decoded from the stage-2 coordinates.

    Parameters
    ----------
    cfg : HwConfig

    Members
    -------
    desc : In(desc_layout(cfg))
        Held constant while running.
    start : In(1)
        Starts a layer when idle.
    busy : Out(1)
        Setting up or issuing.
    act_addr : Out(addr_width(act_depth))
        Activation word read this cycle (meaningless when ``token.pad``).
    wgt_addr : Out(addr_width(wgt_depth))
        Weight word read this cycle.
    token : Out(token_layout(cfg))
        Describes the step issued this cycle (latency 0, same cycle as the addresses).
    """

    def __init__(self, cfg: HwConfig):
        if not isinstance(cfg, HwConfig):
            raise TypeError(f"cfg must be a HwConfig, not {cfg!r}")
        self._cfg = cfg
        super().__init__({
            "desc": In(desc_layout(cfg)),
            "start": In(1),
            "busy": Out(1),
            "act_addr": Out(addr_width(cfg.act_depth)),
            "wgt_addr": Out(addr_width(cfg.wgt_depth)),
            "token": Out(token_layout(cfg)),
        })

    @property
    def cfg(self) -> HwConfig:
        return self._cfg

    @property
    def latency(self) -> int:
        return 0

    @property
    def setup_cycles(self) -> int:
        return SETUP_CYCLES

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        d = self.desc
        kbits = bits_for(cfg.max_kernel)
        # Signed address arithmetic: the kernel origin of a padded pixel lies before word 0
        # (down to -pad*(W+1)*CW) and a bottom-padded row beyond the tensor end.
        span = max(cfg.act_depth, cfg.max_kernel * cfg.max_in_words, cfg.max_dim * cfg.max_in_words)
        aw = signed(bits_for(span) + kbits + bits_for(cfg.max_stride) + 2)
        pos_w = signed(bits_for(cfg.max_dim) + kbits + 2)

        # setup products (shift-add, two registered stages each)
        wcw_1, wcw_2, wcw = _shift_add(d.in_words, d.width,
                                       unsigned(bits_for(cfg.max_dim * cfg.max_in_words)), "wcw")
        kwcw_1, kwcw_2, kwcw = _shift_add(
            d.in_words, d.kernel_w, unsigned(bits_for(cfg.max_kernel * cfg.max_in_words)), "kwcw")
        pix_1, pix_2, pix_step = _shift_add(
            d.in_words, d.stride, unsigned(bits_for(cfg.max_stride * cfg.max_in_words)),
            "pix_step")
        pcw_1, pcw_2, pad_cw = _shift_add(
            d.in_words, d.pad, unsigned(bits_for(cfg.max_kernel * cfg.max_in_words)), "pad_cw")
        pwcw_1, pwcw_2, pad_wcw = _shift_add(
            wcw, d.pad, unsigned(bits_for(cfg.max_kernel * cfg.max_dim * cfg.max_in_words)),
            "pad_wcw")
        rstep_1, rstep_2, row_step = _shift_add(
            wcw, d.stride, unsigned(bits_for(cfg.max_stride * cfg.max_dim * cfg.max_in_words)),
            "row_step")
        row_skip = Signal(aw)
        # "minus one" limits, registered once
        cw_max = Signal.like(d.in_words)
        kx_max = Signal.like(d.kernel_w)
        ky_max = Signal.like(d.kernel_h)
        t_max = Signal.like(d.out_tiles)
        ox_max = Signal.like(d.out_width)
        oy_max = Signal.like(d.out_height)

        # loop state
        oy = Signal.like(d.out_height)
        ox = Signal.like(d.out_width)
        t = Signal.like(d.out_tiles)
        ky = Signal.like(d.kernel_h)
        kx = Signal.like(d.kernel_w)
        cw = Signal.like(d.in_words)
        iy_row = Signal(pos_w)   # oy*stride - pad
        ix_pix = Signal(pos_w)   # ox*stride - pad
        iy_row_next = Signal(pos_w)  # iy_row + stride, kept one step ahead
        ix_pix_next = Signal(pos_w)  # ix_pix + stride, kept one step ahead
        neg_pad = Signal(pos_w)      # -pad (the first pixel's and row's origin)
        neg_pad_next = Signal(pos_w)  # stride - pad
        iy = Signal(pos_w)       # iy_row + ky
        ix = Signal(pos_w)       # ix_pix + kx
        a_addr = Signal(aw)      # (iy*W + ix)*CW + cw
        row_inc = Signal()       # next step's a_addr increment is row_skip (last_cw & last_kx), else 1
        origin = Signal(aw)      # -(pad*W + pad)*CW: kernel origin of the first pixel
        pix_addr = Signal(aw)    # kernel origin of this pixel
        pix_next = Signal(aw)    # pix_addr + pix_step, kept one step ahead
        row_next = Signal(aw)    # kernel origin of the next row (ox = 0), kept one step ahead
        w_addr = Signal.like(self.wgt_addr)
        al_base = Signal.like(self.wgt_addr)   # t*CW
        al_addr = Signal.like(self.wgt_addr)   # t*CW + cw
        o_addr = Signal(unsigned(addr_width(cfg.out_depth)))
        first = Signal()         # cw == kx == ky == 0
        run = Signal()           # issuing steps (the FSM's RUN state, as one flip-flop)
        tile_end = Signal()      # last & last_t: this step ends the last tile of a pixel

        # Each loop counter c carries a registered flag last_c = (c == c_max), updated with
        # the counter from "c == c_max - 1" (on increment) or "c_max == 0" (on wrap), so the
        # loop decisions below are flip-flop outputs, not comparator chains.
        counters = {"cw": (cw, cw_max), "kx": (kx, kx_max), "ky": (ky, ky_max),
                    "t": (t, t_max), "ox": (ox, ox_max), "oy": (oy, oy_max)}
        # Likewise pen_c = (c == c_max - 1), so the "is last after this step" inputs of the flag
        # updates are flip-flops too. pen_c is updated from "c == c_max - 2" or "c_max == 1";
        # that comparison is a flip-flop as well: a down-counter down_c = c_max - 3 - c runs
        # beside c, and c == c_max - 2 is down_c < 0 (its sign bit) for every c < c_max - 1.
        # From c = c_max - 1 on the bit says 1 where pen_c should be 0, but pen_c is only read
        # while c < c_max (last_c clear), and the step after c = c_max wraps it.
        last_f = {n: Signal(name=f"last_{n}") for n in counters}
        pen_f = {n: Signal(name=f"pen_{n}") for n in counters}
        down = {n: Signal(signed(len(c) + 2), name=f"{n}_down") for n, (c, _) in counters.items()}
        max_m3 = {n: Signal(signed(len(c) + 2), name=f"{n}_max_m3") for n, (c, _) in counters.items()}
        max_z = {n: Signal(name=f"{n}_max_zero") for n in counters}
        max_one = {n: Signal(name=f"{n}_max_one") for n in counters}

        def incr(n):
            c, _ = counters[n]
            return [c.eq(c + 1), down[n].eq(down[n] - 1), last_f[n].eq(pen_f[n]),
                    pen_f[n].eq(down[n][-1])]

        def wrap(n):
            c, _ = counters[n]
            return [c.eq(0), down[n].eq(max_m3[n]), last_f[n].eq(max_z[n]),
                    pen_f[n].eq(max_one[n])]

        last_cw, last_kx, last_ky = last_f["cw"], last_f["kx"], last_f["ky"]
        last_t, last_ox, last_oy = last_f["t"], last_f["ox"], last_f["oy"]
        # last = last_cw & last_kx & last_ky, itself a flag updated with the three
        last = Signal()

        def inc_for(ky_step):
            """``row_inc`` for the flags last_cw & last_kx = ``ky_step`` after this cycle: one
            flip-flop (the step decode drives one bit, not an address-wide mux), turned into
            the increment by a 2:1 select of registers into ``a_inc_r``, so no flag decode
            sits in front of the address adder."""
            return row_inc.eq(ky_step)

        # stage 2: the activation-address and input-coordinate registers follow the registered
        # step kind (one-hot: next word / next kx / next ky / next tile / next pixel / next row)
        k_inc, k_kx, k_ky, k_tile, k_ox, k_oy = (
            Signal(name=f"kind_{n}") for n in ("inc", "kx", "ky", "tile", "ox", "oy"))
        a_inc_r = Signal(aw)
        token = Signal.like(self.token)
        token_r = Signal.like(self.token)
        m.d.sync += [token_r.eq(token), self.wgt_addr.eq(w_addr),
                     a_inc_r.eq(Mux(row_inc, row_skip, 1)),
                     k_inc.eq(run & ~last),
                     k_kx.eq(run & ~last & last_cw & ~last_kx),
                     k_ky.eq(run & ~last & last_cw & last_kx),
                     k_tile.eq(run & last & ~tile_end),
                     k_ox.eq(run & last & tile_end & ~last_ox),
                     k_oy.eq(run & last & tile_end & last_ox & ~last_oy)]
        with m.If(k_inc):
            m.d.sync += a_addr.eq(a_addr + a_inc_r)
        with m.If(k_kx):
            m.d.sync += ix.eq(ix + 1)
        with m.If(k_ky):
            m.d.sync += [ix.eq(ix_pix), iy.eq(iy + 1)]
        with m.If(k_tile):
            m.d.sync += [a_addr.eq(pix_addr), ix.eq(ix_pix), iy.eq(iy_row)]
        with m.If(k_ox):
            m.d.sync += [pix_addr.eq(pix_next), a_addr.eq(pix_next),
                         pix_next.eq(pix_next + pix_step),
                         ix_pix.eq(ix_pix_next), ix.eq(ix_pix_next),
                         ix_pix_next.eq(ix_pix_next + d.stride), iy.eq(iy_row)]
        with m.If(k_oy):
            m.d.sync += [pix_addr.eq(row_next), a_addr.eq(row_next),
                         row_next.eq(row_next + row_step), pix_next.eq(row_next + pix_step),
                         ix_pix.eq(neg_pad), ix.eq(neg_pad), ix_pix_next.eq(neg_pad_next),
                         iy_row.eq(iy_row_next), iy.eq(iy_row_next),
                         iy_row_next.eq(iy_row_next + d.stride)]

        # the token is registered once; its padding flag is decoded from the stage-2
        # coordinates, which describe the same step
        m.d.comb += [
            self.token.eq(token_r),
            self.token.pad.eq((iy < 0) | (iy >= d.height) | (ix < 0) | (ix >= d.width)),
            self.act_addr.eq(a_addr),
            token.first.eq(first),
            token.last.eq(last),
            token.final.eq(tile_end & last_ox & last_oy),
            token.valid.eq(run),
            token.tile.eq(t),
            token.align_addr.eq(al_addr),
            token.out_addr.eq(o_addr),
        ]

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.next = "SETUP1"
            with m.State("SETUP1"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [*wcw_1, *kwcw_1, *pix_1, *pcw_1]
                m.d.sync += [
                    neg_pad.eq(-d.pad), neg_pad_next.eq(d.stride - d.pad),
                    cw_max.eq(d.in_words - 1),
                    kx_max.eq(d.kernel_w - 1),
                    ky_max.eq(d.kernel_h - 1),
                    t_max.eq(d.out_tiles - 1),
                    ox_max.eq(d.out_width - 1),
                    oy_max.eq(d.out_height - 1),
                ]
                m.next = "SETUP2"
            with m.State("SETUP2"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [*wcw_2, *kwcw_2, *pix_2, *pcw_2]
                for n, (_, cmax) in counters.items():
                    m.d.sync += [max_m3[n].eq(cmax - 3),
                                 max_z[n].eq(cmax == 0), max_one[n].eq(cmax == 1)]
                m.next = "SETUP3"
            with m.State("SETUP3"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [*pwcw_1, *rstep_1, row_skip.eq(wcw - kwcw + 1)]
                m.next = "SETUP4"
            with m.State("SETUP4"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [*pwcw_2, *rstep_2]
                m.next = "SETUP5"
            with m.State("SETUP5"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [
                    origin.eq(-(pad_wcw + pad_cw)),
                    oy.eq(0), ox.eq(0), t.eq(0), ky.eq(0), kx.eq(0), cw.eq(0), first.eq(1),
                    iy_row.eq(neg_pad), ix_pix.eq(neg_pad), iy.eq(neg_pad), ix.eq(neg_pad),
                    iy_row_next.eq(neg_pad_next), ix_pix_next.eq(neg_pad_next),
                    w_addr.eq(0), al_base.eq(0), al_addr.eq(0), o_addr.eq(0),
                ]
                m.d.sync += [last_f[n].eq(max_z[n]) for n in counters]
                m.d.sync += [pen_f[n].eq(max_one[n]) for n in counters]
                m.d.sync += [down[n].eq(max_m3[n]) for n in counters]
                m.d.sync += inc_for(max_z["cw"] & max_z["kx"])
                m.d.sync += [last.eq(max_z["cw"] & max_z["kx"] & max_z["ky"]),
                             tile_end.eq(max_z["cw"] & max_z["kx"] & max_z["ky"] & max_z["t"])]
                m.next = "SETUP6"
            with m.State("SETUP6"):
                m.d.comb += self.busy.eq(1)
                # the origin is registered first: the address registers load a flip-flop,
                # not the two additions behind it
                m.d.sync += [a_addr.eq(origin), pix_addr.eq(origin),
                             pix_next.eq(origin + pix_step), row_next.eq(origin + row_step),
                             run.eq(1)]
                m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += self.busy.eq(1)
                with m.If(run & last & last_t & last_ox & last_oy):
                    m.next = "IDLE"

        # The step loop, outside the FSM: every decision below reads flip-flops only (``run``,
        # ``last``, ``tile_end`` and the per-counter ``last_*`` flags), so no state decoding
        # or flag AND-chain sits in front of the address registers' enables.
        with m.If(run):
            m.d.sync += [w_addr.eq(w_addr + 1), first.eq(0)]
            with m.If(~last):
                with m.If(~last_cw):
                    new_last = pen_f["cw"] & last_kx & last_ky
                    m.d.sync += [*incr("cw"), al_addr.eq(al_addr + 1),
                                 inc_for(pen_f["cw"] & last_kx),
                                 last.eq(new_last), tile_end.eq(new_last & last_t)]
                with m.Elif(~last_kx):
                    new_last = max_z["cw"] & pen_f["kx"] & last_ky
                    m.d.sync += [*wrap("cw"), *incr("kx"),
                                 al_addr.eq(al_base),
                                 inc_for(max_z["cw"] & pen_f["kx"]),
                                 last.eq(new_last), tile_end.eq(new_last & last_t)]
                with m.Else():
                    new_last = max_z["cw"] & max_z["kx"] & pen_f["ky"]
                    m.d.sync += [*wrap("cw"), *wrap("kx"), *incr("ky"), al_addr.eq(al_base),
                                 inc_for(max_z["cw"] & max_z["kx"]),
                                 last.eq(new_last), tile_end.eq(new_last & last_t)]
            with m.Else():
                kernel_z = max_z["cw"] & max_z["kx"] & max_z["ky"]
                m.d.sync += [*wrap("cw"), *wrap("kx"), *wrap("ky"), first.eq(1),
                             o_addr.eq(o_addr + 1), last.eq(kernel_z),
                             inc_for(max_z["cw"] & max_z["kx"])]
                with m.If(~tile_end):
                    # the last step of a tile has cw = CW - 1, so the next tile's base
                    # t*CW + CW is al_addr + 1: no descriptor operand on this adder
                    m.d.sync += [*incr("t"),
                                 al_base.eq(al_addr + 1),
                                 al_addr.eq(al_addr + 1),
                                 tile_end.eq(kernel_z & pen_f["t"])]
                with m.Else():
                    m.d.sync += [*wrap("t"), al_base.eq(0), al_addr.eq(0), w_addr.eq(0),
                                 tile_end.eq(kernel_z & max_z["t"])]
                    with m.If(~last_ox):
                        m.d.sync += incr("ox")
                    with m.Elif(~last_oy):
                        m.d.sync += [*wrap("ox"), *incr("oy")]
                    with m.Else():
                        m.d.sync += run.eq(0)
        return m
