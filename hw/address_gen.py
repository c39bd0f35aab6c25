"""Loop-nest sequencer of the conv engine: one reduction step (K×K MACs) per cycle."""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .config import HwConfig, bits_for
from .types import addr_width, desc_layout

__all__ = ["AddressGen", "token_layout", "SETUP_CYCLES"]

#: cycles between ``start`` and the first issued step: 6 registered stages (descriptor
#: products in two shift-add stages, their second-level products (and the steps of an output
#: word) in two more, the kernel origin and the word's loop limits, the loop registers
#: loaded from them), plus the registered step kind in front of the activation-address stage
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

    The setup registers run whenever the generator is idle (the descriptor is held from
    ``start`` on) and, while idle, the loop registers load from them; ``start`` only starts a
    one-hot shift register that sets ``run`` :data:`SETUP_CYCLES` - 1 cycles later, and the
    layer's last step sets a ``done`` flip-flop that clears ``run`` one cycle later (a cycle
    that issues no valid step; ``busy`` already drops in it). So no state decode reaches the
    step loop: each loop register's enable and select read ``run`` and at most four loop
    flags.

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

        # The setup pipeline runs whenever the generator is idle: every setup register below
        # follows the descriptor (held constant from ``start`` on), and while ``run`` is low
        # the loop registers follow the setup registers. ``start`` only times the first step
        # (a one-hot shift register of SETUP_CYCLES - 1 stages), so no FSM state decode
        # reaches the step loop's enables.
        # stage 1 -> 2: descriptor products (shift-add, two registered stages each)
        wcw_1, wcw_2, wcw = _shift_add(d.in_words, d.width,
                                       unsigned(bits_for(cfg.max_dim * cfg.max_in_words)), "wcw")
        kwcw_1, kwcw_2, kwcw = _shift_add(
            d.in_words, d.kernel_w, unsigned(bits_for(cfg.max_kernel * cfg.max_in_words)), "kwcw")
        pix_1, pix_2, pix_step = _shift_add(
            d.in_words, d.stride, unsigned(bits_for(cfg.max_stride * cfg.max_in_words)),
            "pix_step")
        pcw_1, pcw_2, pad_cw = _shift_add(
            d.in_words, d.pad, unsigned(bits_for(cfg.max_kernel * cfg.max_in_words)), "pad_cw")
        # stage 3 -> 4: second-level products
        pwcw_1, pwcw_2, pad_wcw = _shift_add(
            wcw, d.pad, unsigned(bits_for(cfg.max_kernel * cfg.max_dim * cfg.max_in_words)),
            "pad_wcw")
        rstep_1, rstep_2, row_step = _shift_add(
            wcw, d.stride, unsigned(bits_for(cfg.max_stride * cfg.max_dim * cfg.max_in_words)),
            "row_step")
        word_w = unsigned(bits_for(cfg.max_kernel * cfg.max_kernel * cfg.max_in_words))
        spw_1, spw_2, word_steps = _shift_add(kwcw, d.kernel_h, word_w, "word_steps")
        row_skip = Signal(aw)
        # "minus one" limits, registered once
        cw_max = Signal.like(d.in_words)
        kx_max = Signal.like(d.kernel_w)
        t_max = Signal.like(d.out_tiles)
        ox_max = Signal.like(d.out_width)
        oy_max = Signal.like(d.out_height)

        # loop state
        oy = Signal.like(d.out_height)
        ox = Signal.like(d.out_width)
        t = Signal.like(d.out_tiles)
        kx = Signal.like(d.kernel_w)
        cw = Signal.like(d.in_words)
        s = Signal(word_w)       # step within the output word: (ky*kw + kx)*CW + cw
        iy_row = Signal(pos_w)   # oy*stride - pad
        ix_pix = Signal(pos_w)   # ox*stride - pad
        iy_row_next = Signal(pos_w)  # iy_row + stride, kept one step ahead
        ix_pix_next = Signal(pos_w)  # ix_pix + stride, kept one step ahead
        neg_pad = Signal(pos_w)      # -pad (the first pixel's and row's origin)
        neg_pad_next = Signal(pos_w)  # stride - pad
        iy = Signal(pos_w)       # iy_row + ky
        ix = Signal(pos_w)       # ix_pix + kx
        a_addr = Signal(aw)      # (iy*W + ix)*CW + cw
        origin = Signal(aw)      # -(pad*W + pad)*CW: kernel origin of the first pixel
        pix_addr = Signal(aw)    # kernel origin of this pixel
        pix_next = Signal(aw)    # pix_addr + pix_step, kept one step ahead
        row_next = Signal(aw)    # kernel origin of the next row (ox = 0), kept one step ahead
        w_addr = Signal.like(self.wgt_addr)
        al_base = Signal.like(self.wgt_addr)   # t*CW
        al_addr = Signal.like(self.wgt_addr)   # t*CW + cw
        o_addr = Signal(unsigned(addr_width(cfg.out_depth)))
        first = Signal()         # first step of an output word
        run = Signal()           # issuing steps (and the cycle after the last one)
        done = Signal()          # the cycle after the layer's last step
        setup = Signal(SETUP_CYCLES - 1)   # one-hot: the setup stage after ``start``

        # Each loop counter c carries a registered flag last_c = (c == c_max), updated with
        # the counter from "c == c_max - 1" (on increment) or "c_max == 0" (on wrap), so the
        # loop decisions below are flip-flop outputs, not comparator chains. The kernel loops
        # (ky, kx, cw) are counted twice: ``s`` runs over the whole output word, so "last step
        # of the word" is its flag alone; ``cw`` and ``kx`` give the kernel-row structure of
        # the addresses, and they wrap at a word's end by themselves (its last step has
        # cw = CW - 1 and kx = kw - 1), so none of them needs the word-end decision.
        counters = {"s": (s, Signal(word_w, name="s_max")), "cw": (cw, cw_max),
                    "kx": (kx, kx_max), "t": (t, t_max), "ox": (ox, ox_max), "oy": (oy, oy_max)}
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

        def step(n, wrap_cond):
            """Counter ``n`` advances: back to 0 where ``wrap_cond`` (or while idle, which
            loads it for the next layer), else up by 1 (a 2:1 select of registers)."""
            c, _ = counters[n]
            w = wrap_cond | ~run
            return [c.eq(Mux(w, 0, c + 1)), down[n].eq(Mux(w, max_m3[n], down[n] - 1)),
                    last_f[n].eq(Mux(w, max_z[n], pen_f[n])),
                    pen_f[n].eq(Mux(w, max_one[n], down[n][-1]))]

        last_cw, last_kx = last_f["cw"], last_f["kx"]
        last_t, last_ox, last_oy = last_f["t"], last_f["ox"], last_f["oy"]
        last = last_f["s"]            # last step of an output word
        tile_end = last & last_t      # ... and of the pixel's last tile

        # setup pipeline (always running; see above)
        m.d.sync += [
            # stage 1
            *wcw_1, *kwcw_1, *pix_1, *pcw_1,
            neg_pad.eq(-d.pad), neg_pad_next.eq(d.stride - d.pad),
            cw_max.eq(d.in_words - 1), kx_max.eq(d.kernel_w - 1), t_max.eq(d.out_tiles - 1),
            ox_max.eq(d.out_width - 1), oy_max.eq(d.out_height - 1),
            # stage 2
            *wcw_2, *kwcw_2, *pix_2, *pcw_2,
            # stage 3
            *pwcw_1, *rstep_1, *spw_1, row_skip.eq(wcw - kwcw + 1),
            # stage 4
            *pwcw_2, *rstep_2, *spw_2,
            # stage 5
            origin.eq(-(pad_wcw + pad_cw)),
            counters["s"][1].eq(word_steps - 1),
            max_m3["s"].eq(word_steps - 4), max_z["s"].eq(word_steps == 1),
            max_one["s"].eq(word_steps == 2),
        ]
        for n, (_, cmax) in counters.items():
            if n != "s":     # stage 2 (the word's steps are known at stage 5, directly)
                m.d.sync += [max_m3[n].eq(cmax - 3),
                             max_z[n].eq(cmax == 0), max_one[n].eq(cmax == 1)]

        # start: the setup stages, then ``run`` (SETUP_CYCLES after ``start``)
        m.d.comb += self.busy.eq(setup.any() | (run & ~done))
        m.d.sync += setup.eq(Cat(self.start & ~self.busy, setup[:-1]))
        with m.If(setup[-1]):
            m.d.sync += run.eq(1)

        # stage 1: the loop counters and flags. Every decision reads flip-flops only (``run``
        # and the per-counter ``last_*`` flags, at most five of them); while idle they load
        # the next layer's starting values.
        m.d.sync += [*step("s", last), *step("cw", last_cw)]
        with m.If(last_cw | ~run):
            m.d.sync += step("kx", last_kx)
        with m.If(last | ~run):
            m.d.sync += step("t", last_t)
        with m.If(tile_end | ~run):
            m.d.sync += step("ox", last_ox)
        with m.If(tile_end & last_ox | ~run):
            m.d.sync += step("oy", last_oy)
        # the layer's last step sets ``done``, which clears ``run`` a cycle later (a flip-flop,
        # not the five-flag decode, on ``run``'s reset): the extra cycle issues no step (its
        # token is not valid), and every counter has wrapped to its idle value by then
        m.d.sync += done.eq(run & tile_end & last_ox & last_oy)
        with m.If(done):
            m.d.sync += run.eq(0)
        m.d.sync += first.eq(last | ~run)
        with m.If(~run):
            m.d.sync += [w_addr.eq(0), al_base.eq(0), al_addr.eq(0), o_addr.eq(0)]
        with m.Else():
            m.d.sync += w_addr.eq(Mux(tile_end, 0, w_addr + 1))
            with m.If(last):
                m.d.sync += o_addr.eq(o_addr + 1)
            with m.If(~last_cw):
                m.d.sync += al_addr.eq(al_addr + 1)
            with m.Elif(~last):
                m.d.sync += al_addr.eq(al_base)
            with m.Elif(~last_t):
                # the last step of a tile has cw = CW - 1, so the next tile's base
                # t*CW + CW is al_addr + 1: no descriptor operand on this adder
                m.d.sync += [al_base.eq(al_addr + 1), al_addr.eq(al_addr + 1)]
            with m.Else():
                m.d.sync += [al_base.eq(0), al_addr.eq(0)]

        # stage 2: the activation-address and input-coordinate registers follow the registered
        # step kind (one-hot: next word / next kx / next ky / next tile / next pixel / next row)
        # (plus "idle": the cycle after a cycle without a step, which loads the first pixel's
        # origin; one cycle late, so it never meets another kind)
        k_idle, k_inc, k_kx, k_ky, k_tile, k_ox, k_oy = (
            Signal(name=f"kind_{n}") for n in ("idle", "inc", "kx", "ky", "tile", "ox", "oy"))
        a_inc_r = Signal(aw)
        token = Signal.like(self.token)
        token_r = Signal.like(self.token)
        m.d.sync += [token_r.eq(token), self.wgt_addr.eq(w_addr),
                     # the next step's address increment: a kernel row's end skips to the
                     # next row (one LUT per bit: two flags and the row_skip bit)
                     a_inc_r.eq(Mux(last_cw & last_kx, row_skip, 1)),
                     k_idle.eq(~run),
                     k_inc.eq(run & ~last),
                     k_kx.eq(run & ~last & last_cw & ~last_kx),
                     k_ky.eq(run & ~last & last_cw & last_kx),
                     k_tile.eq(run & last & ~last_t),
                     k_ox.eq(run & tile_end & ~last_ox),
                     k_oy.eq(run & tile_end & last_ox & ~last_oy)]
        with m.If(k_idle):
            m.d.sync += [a_addr.eq(origin), pix_addr.eq(origin),
                         pix_next.eq(origin + pix_step), row_next.eq(origin + row_step),
                         iy_row.eq(neg_pad), ix_pix.eq(neg_pad), iy.eq(neg_pad), ix.eq(neg_pad),
                         iy_row_next.eq(neg_pad_next), ix_pix_next.eq(neg_pad_next)]
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
            token.valid.eq(run & ~done),
            token.tile.eq(t),
            token.align_addr.eq(al_addr),
            token.out_addr.eq(o_addr),
        ]
        return m
