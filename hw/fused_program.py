"""Host side of the fused-block engine: a :class:`FusedLayer` (one integer fused block of
``quant/fusion_golden.py`` plus its input mantissas) becomes the engine's memory images and
descriptor (:class:`FusedProgram`), and the engine's dumps become tensors again.

Everything the engine computes is checked here before a run: geometry against the
:class:`FusedConfig`, and the worst-case magnitudes of ``T``/``U``/``V``, of the ``A``
accumulators and of the block accumulator (rule F7's bound) against their widths, so a block
that would overflow is refused with the field named instead of computing wrong numbers.
:func:`fused_cycles` is the exact cycle count of a run given its masks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dynacc.quant.formats import BFPFormat
from dynacc.quant.fusion_golden import (FusedBlock, accumulator_bounds, fused_block,
                                        predictor_masks)

from .fused_config import TAPS, FusedConfig
from .fused_engine import LEVELS, RES_SHIFT_BITS
from .requantizer import Requantizer

__all__ = ["FusedLayer", "FusedProgram", "FusedGolden", "fused_cycles", "fused_geometry",
           "fusion_network_cycles", "dense_block_cycles"]


@dataclasses.dataclass(frozen=True)
class FusedGolden:
    """Golden outcome of a fused block on one image (all int64 numpy)."""

    out: np.ndarray       # [out_ch, Ho, Wo] requantized block output (F9)
    s1: np.ndarray        # [mid, H, W] bool
    level: np.ndarray     # [mid, H, W] 0..7
    s2: np.ndarray        # [mid, Ho, Wo] bool


@dataclasses.dataclass
class FusedLayer:
    """One fused block on one image: ``x`` mantissas ``[in_ch, H, W]`` on LSB
    ``block.x_lsb``, output requantized onto ``out_lsb``."""

    name: str
    block: FusedBlock
    x: np.ndarray
    out_lsb: int

    def __post_init__(self):
        self.x = np.asarray(self.x, dtype=np.int64)
        if self.x.ndim != 3 or self.x.shape[0] != self.block.in_ch:
            raise ValueError(f"fused layer {self.name!r}: x must be [in_ch={self.block.in_ch}, "
                             f"H, W], not {list(self.x.shape)}")

    def golden(self, fmt: BFPFormat) -> FusedGolden:
        """Rules F1-F9 (``fusion_golden.fused_block``, the exact unfused reference)."""
        x = torch.as_tensor(self.x)[None]
        y, info = fused_block(self.block, x, self.out_lsb, fmt)
        _, level, _ = predictor_masks(self.block, x)
        return FusedGolden(y[0].numpy(), info["s1"][0].numpy(), level[0].numpy(),
                           info["s2"][0].numpy())


def fused_geometry(blk: FusedBlock, h: int, w: int, cfg: FusedConfig) -> dict[str, int]:
    """Loop bounds of a block on an ``h × w`` input: groups, per-group channels, chunks and
    tiles (mids padded to whole chunks per group, outputs to whole tiles per group)."""
    g = blk.groups
    mid_g = blk.mid // g
    chunks_g = -(-mid_g // cfg.chunk)
    og = blk.out_ch // g
    tiles_g = -(-og // cfg.lanes)
    ho = (h - 1) // blk.stride + 1
    wo = (w - 1) // blk.stride + 1
    return {"h": h, "w": w, "ho": ho, "wo": wo, "groups": g, "cin_g": blk.in_ch // g,
            "mid_g": mid_g, "chunks_g": chunks_g, "chunks": g * chunks_g, "og": og,
            "tiles_g": tiles_g, "tiles": g * tiles_g}


#: phase-3 cycles of a tile beside its taps: OUT, the requantizer's latency, STORE, next tile
TILE_CYCLES = 2 + Requantizer.LATENCY


def fused_cycles(geo: dict[str, int], stride: int, s1: np.ndarray, s2: np.ndarray,
                 chunk: int) -> int:
    """Exact engine cycles of one run (``s1 [mid, H, W]``, ``s2 [mid, Ho, Wo]`` as the
    engine computes them): phase 1 ``H·W·chunks + 1``, phase 2 ``Ho·Wo·chunks·9 + 1``, phase 3
    per output pixel ``1 +`` per tile ``TILE_CYCLES +`` per tap: 1 at a padding tap, else
    ``3 + Σ_chunks (1 + max(1, survivors))`` (survivors: ``s2[p] & s1[p+k]``, ``s2[p]`` at the
    V tap)."""
    h, w, ho, wo = geo["h"], geo["w"], geo["ho"], geo["wo"]
    g, mid_g, cg = geo["groups"], geo["mid_g"], geo["chunks_g"]
    pad = cg * chunk
    s1g = np.zeros((g, pad, h + 2, w + 2), dtype=np.int64)     # zero border = padding
    s1g[:, :mid_g, 1:h + 1, 1:w + 1] = np.asarray(s1, dtype=np.int64).reshape(g, mid_g, h, w)
    s2g = np.zeros((g, pad, ho, wo), dtype=np.int64)
    s2g[:, :mid_g] = np.asarray(s2, dtype=np.int64).reshape(g, mid_g, ho, wo)
    chunks = g * cg
    total = (h * w * chunks + 1) + (ho * wo * chunks * 9 + 1)
    ys = np.arange(ho) * stride
    xs = np.arange(wo) * stride
    per_group = np.zeros((g, ho, wo), dtype=np.int64)           # tap cycles of one tile
    for ky in range(3):
        for kx in range(3):
            iy, ix = ys + ky - 1, xs + kx - 1
            inside = ((iy >= 0) & (iy < h))[:, None] & ((ix >= 0) & (ix < w))[None, :]
            s1k = s1g[:, :, iy + 1][:, :, :, ix + 1]                # [g, pad, ho, wo]
            surv = (s2g & s1k).reshape(g, cg, chunk, ho, wo).sum(2)
            cost = 3 + (1 + np.maximum(surv, 1)).sum(1)
            per_group += np.where(inside[None], cost, 1)
    surv = s2g.reshape(g, cg, chunk, ho, wo).sum(2)
    per_group += 3 + (1 + np.maximum(surv, 1)).sum(1)            # the V tap
    total += ho * wo + int((per_group + TILE_CYCLES).sum()) * geo["tiles_g"]
    return int(total)


def _fits(v: int, bits: int) -> bool:
    return -(1 << (bits - 1)) <= v < (1 << (bits - 1))


class FusedProgram:
    """Memory images (``images()``), descriptor (``desc``) and output unpacking of one
    :class:`FusedLayer` on a :class:`FusedConfig`. Raises ``ValueError`` naming the layer and
    the field when the block does not fit."""

    def __init__(self, layer: FusedLayer, cfg: FusedConfig):
        self.layer, self.cfg = layer, cfg
        blk = layer.block
        name = layer.name
        _, h, w = layer.x.shape
        geo = fused_geometry(blk, h, w, cfg)
        self.geo = geo

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"fused layer {name!r} does not fit fused config "
                                 f"{cfg.name!r}: {what}")
        need(blk.stride in (1, 2), f"stride {blk.stride} (1 or 2)")
        need(blk.in_ch <= cfg.channels and blk.out_ch <= cfg.channels,
             f"channels in {blk.in_ch} / out {blk.out_ch} > channels {cfg.channels}")
        need(geo["cin_g"] <= cfg.group_in, f"C_in/G = {geo['cin_g']} > group_in {cfg.group_in}")
        need(h * w <= cfg.act_depth and h < (1 << 12), f"H·W = {h * w} > act_depth {cfg.act_depth}")
        need(geo["chunks"] <= cfg.max_chunks, f"chunks {geo['chunks']} > max_chunks "
             f"{cfg.max_chunks}")
        need(geo["tiles"] <= cfg.max_tiles, f"tiles {geo['tiles']} > max_tiles {cfg.max_tiles}")
        need(geo["tiles"] * TAPS * geo["chunks_g"] * cfg.chunk <= cfg.t_depth,
             f"fused-weight words {geo['tiles'] * TAPS * geo['chunks_g'] * cfg.chunk} > t_depth "
             f"{cfg.t_depth}")
        need(int(blk.res_shift.max()) < (1 << RES_SHIFT_BITS) if blk.use_res else True,
             f"residual shift {int(blk.res_shift.max())} > {(1 << RES_SHIFT_BITS) - 1}")
        x_lsb = blk.x_lsb
        e = x_lsb - 2
        self.q4_left, self.q4_right = (min(e, 8), 0) if e >= 0 else (0, -e)
        need(self.q4_right < 64, f"input LSB {x_lsb} (F1 right shift {self.q4_right} > 63)")

        t, lane, acc_bound, a_bound = self._weights()
        tmax = int(np.abs(t).max()) if t.size else 0
        need(_fits(tmax, cfg.t_bits) and _fits(-tmax, cfg.t_bits),
             f"|T|, |U|, |V| up to {tmax} need more than t_bits {cfg.t_bits}")
        need(_fits(a_bound, cfg.a_bits), f"A accumulator bound {a_bound} does not fit a_bits "
             f"{cfg.a_bits}")
        need(_fits(acc_bound, cfg.acc_bits), f"block accumulator bound {acc_bound} does not fit "
             f"acc_bits {cfg.acc_bits}")
        thr = torch.cat([blk.thr1, blk.thr2, blk.lvl_thr.reshape(-1)])
        need(bool((thr.abs() < (1 << (cfg.thr_bits - 1)) - 1).all()),
             f"predictor thresholds up to {int(thr.abs().max())} do not fit thr_bits "
             f"{cfg.thr_bits}")
        self._t, self._lane = t, lane

    # ------------------------------------------------------------------ images
    def _mid_index(self) -> np.ndarray:
        """Padded mid slot (group, chunk lane) -> real mid index or -1."""
        g, mid_g, cg = self.geo["groups"], self.geo["mid_g"], self.geo["chunks_g"]
        pad = cg * self.cfg.chunk
        idx = np.full((g, pad), -1, dtype=np.int64)
        idx[:, :mid_g] = np.arange(g * mid_g).reshape(g, mid_g)
        return idx.reshape(-1)

    def _weights(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        """T words ``[tiles·10·pad, K, group_in + 1]``, lane words ``[tiles, K, 6]``, and the
        worst-case bounds of the block accumulator and of one A accumulator."""
        blk, cfg, geo = self.layer.block, self.cfg, self.geo
        g, cin_g, mid_g, og = geo["groups"], geo["cin_g"], geo["mid_g"], geo["og"]
        K, CI, pad = cfg.lanes, cfg.group_in, geo["chunks_g"] * cfg.chunk
        w1 = blk.w1.numpy().astype(object)                          # [mid, cin_g]
        d = blk.d.numpy().astype(object)                            # [mid, 9]
        b1 = blk.b1.numpy().astype(object)
        b2 = blk.b2.numpy().astype(object)
        w2s = (blk.w2 * torch.bitwise_left_shift(torch.ones_like(blk.shift), blk.shift)).numpy()
        w2s = w2s.astype(object)                                    # [out, mid_g]
        tiles = geo["tiles"]
        t = np.zeros((tiles, TAPS, pad, K, CI + 1), dtype=object)
        lane = np.zeros((tiles, K, 6), dtype=np.int64)
        inv = torch.argsort(blk.perm).numpy()                       # projection row -> j
        x_lsb = blk.x_lsb
        for gi in range(g):
            mids = np.arange(gi * mid_g, (gi + 1) * mid_g)
            for ti in range(geo["tiles_g"]):
                tile = gi * geo["tiles_g"] + ti
                for ln in range(K):
                    r_local = ti * K + ln
                    if r_local >= og:
                        continue
                    r = gi * og + r_local
                    wr = w2s[r]                                     # [mid_g]
                    # T[k, m, i] = w2s[r, m]·d[m, k]·w1[m, i]; U[k, m] = w2s·d·b1; V = w2s·b2
                    dm = d[mids]                                    # [mid_g, 9]
                    tk = (wr[:, None, None] * dm[:, :, None] * w1[mids][:, None, :])
                    t[tile, :9, :mid_g, ln, :cin_g] = tk.transpose(1, 0, 2)
                    t[tile, :9, :mid_g, ln, CI] = (wr[:, None] * dm * b1[mids][:, None]).T
                    t[tile, 9, :mid_g, ln, CI] = wr * b2[mids]
                    j = int(inv[r])
                    shift = int(self.layer.out_lsb) - int(blk.acc_lsb[r])
                    shift = max(min(shift, 127), -(cfg.mantissa_bits - 1))
                    lane[tile, ln] = [int(blk.b3[r]), shift,
                                      int(blk.res_shift[j]) if blk.use_res else 0, j, j, 1]
        a_bound = int(np.abs(t).sum(axis=2).max()) if t.size else 0
        x_max = 1 << (cfg.mantissa_bits - 1)
        acc_bound = int(float(accumulator_bounds(blk, x_max).max())) + 1
        return t.reshape(-1, K, CI + 1).astype(np.int64), lane, acc_bound, a_bound

    @property
    def desc(self) -> dict[str, int]:
        geo = self.geo
        return {"h": geo["h"], "w": geo["w"], "ho": geo["ho"], "wo": geo["wo"],
                "stride2": int(self.layer.block.stride == 2), "groups": geo["groups"],
                "cin_g": geo["cin_g"], "chunks": geo["chunks"], "chunks_g": geo["chunks_g"],
                "tiles": geo["tiles"], "tiles_g": geo["tiles_g"],
                "use_res": int(self.layer.block.use_res), "q4_left": self.q4_left,
                "q4_right": self.q4_right}

    @property
    def out_words(self) -> int:
        """Words to dump from each write memory (the s1 memory is the largest)."""
        return self.geo["h"] * self.geo["w"] * self.geo["chunks"]

    def images(self) -> dict[str, np.ndarray]:
        """Memory name -> ``[words, leaves]`` int64 for ``sim.memfile.write_mem``."""
        blk, cfg, geo = self.layer.block, self.cfg, self.geo
        h, w = geo["h"], geo["w"]
        act = np.zeros((h * w, cfg.channels), dtype=np.int64)
        act[:, :blk.in_ch] = self.layer.x.reshape(blk.in_ch, -1).T
        midx = self._mid_index().reshape(geo["chunks"], cfg.chunk)
        CI = cfg.group_in
        # per lane: t1[CI], t2[9], neg1, thr1, lvl[7], neg2, thr2
        pred = np.zeros((geo["chunks"], cfg.chunk, CI + 9 + 2 + LEVELS + 2), dtype=np.int64)
        real = midx >= 0
        mi = midx[real]
        row = np.zeros((len(mi), pred.shape[2]), dtype=np.int64)
        row[:, :geo["cin_g"]] = blk.t1.numpy()[mi]
        row[:, CI:CI + 9] = blk.t2.numpy()[mi]
        row[:, CI + 9] = (blk.sign1.numpy()[mi] < 0)
        row[:, CI + 10] = blk.thr1.numpy()[mi]
        row[:, CI + 11:CI + 11 + LEVELS] = blk.lvl_thr.numpy()[mi]
        row[:, CI + 11 + LEVELS] = (blk.sign2.numpy()[mi] < 0)
        row[:, CI + 12 + LEVELS] = blk.thr2.numpy()[mi]
        pred[real] = row          # padded mids: t = 0, thresholds 0: never on, level 0
        return {"act": act, "pred": pred.reshape(geo["chunks"], -1),
                "t": self._t.reshape(self._t.shape[0], -1),
                "lane": self._lane.reshape(self._lane.shape[0], -1)}

    # ------------------------------------------------------------------ results
    def unpack(self, out: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> FusedGolden:
        """Dumped words (``[words, leaves]``) -> the engine's output and masks, shaped as
        :class:`FusedGolden`."""
        blk, cfg, geo = self.layer.block, self.cfg, self.geo
        h, w, ho, wo, ch = geo["h"], geo["w"], geo["ho"], geo["wo"], geo["chunks"]
        y = out[:ho * wo, :blk.out_ch].T.reshape(blk.out_ch, ho, wo)
        midx = self._mid_index()
        real = midx >= 0
        m1 = s1[:h * w * ch].reshape(h * w, ch * cfg.chunk, 2)[:, real]   # [q, mid, (s1, lvl)]
        m2 = s2[:ho * wo * ch].reshape(ho * wo, ch * cfg.chunk)[:, real]
        return FusedGolden(y, m1[..., 0].T.reshape(blk.mid, h, w).astype(bool),
                           m1[..., 1].T.reshape(blk.mid, h, w),
                           m2.T.reshape(blk.mid, ho, wo).astype(bool))

    def cycles(self, s1: np.ndarray, s2: np.ndarray) -> int:
        """:func:`fused_cycles` of this run."""
        return fused_cycles(self.geo, self.layer.block.stride, s1, s2, self.cfg.chunk)



def fusion_network_cycles(program, batches, cfg: FusedConfig) -> dict:
    """Fused-engine cycles per image of every block of a ``quant.fusion_program.FusionProgram``
    over ``batches`` (an iterable of float image batches, e.g. a test loader's ``x``), from
    the exact model of the golden masks (equal to the RTL: ``sim/test_fused_blocks.py``).

    Returns ``{"images", "cycles" (mean per image, all blocks), "blocks": [{"name",
    "cycles", "s1_density", "s2_density", "geometry"}]}``."""
    n = 0
    tot = [0] * len(program.blocks)
    d1 = [0.0] * len(program.blocks)
    d2 = [0.0] * len(program.blocks)
    geos: list[dict] = [{} for _ in program.blocks]
    for x in batches:
        _, infos = program.run(x)
        for b, blk in enumerate(program.blocks):
            xin = infos[b]["x"]
            geos[b] = fused_geometry(blk, int(xin.shape[2]), int(xin.shape[3]), cfg)
            s1 = infos[b]["s1"].numpy()
            s2 = infos[b]["s2"].numpy()
            for i in range(xin.shape[0]):
                tot[b] += fused_cycles(geos[b], blk.stride, s1[i], s2[i], cfg.chunk)
            d1[b] += float(s1.mean()) * xin.shape[0]
            d2[b] += float(s2.mean()) * xin.shape[0]
        n += int(x.shape[0])
    n = max(n, 1)
    blocks = [{"name": f"units.{b}", "cycles": tot[b] / n, "s1_density": d1[b] / n,
               "s2_density": d2[b] / n, "geometry": geos[b]} for b in range(len(tot))]
    return {"images": n, "cycles": sum(tot) / n, "blocks": blocks}


def dense_block_cycles(hw, units, in_size: int) -> dict:
    """Cycles per image of FusioNet ``units`` run unfused on the plain BFP conv engine of
    :class:`~dynacc.hw.config.HwConfig` ``hw`` (input ``in_size × in_size``): every 1×1
    expand, 3×3 depthwise and 1×1 project as the layer mapper runs it (a grouped / depthwise
    conv is a dense conv with block-diagonal zero weights, so its reduction runs over all
    ``C`` input channels), ``hw.cycles.conv_cycles``. Returns ``{"hw", "lanes", "cycles",
    "useful_cycles", "layers": [...]}``."""
    from .cycles import conv_cycles, conv_steps, ideal_cycles

    h = in_size
    rows = []
    for i, u in enumerate(units):
        ho = (h - 1) // u.stride + 1
        for name, conv, hi, hout in (("expand", u.expand, h, h), ("dw", u.dw, h, ho),
                                     ("project", u.project, ho, ho)):
            k = conv.kernel_size[0]
            shape = dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                         out_height=hout, out_width=hout, kernel_h=k, kernel_w=k)
            tiles = -(-conv.out_channels // hw.lanes)
            words = tiles * k * k * -(-conv.in_channels // hw.lanes)
            useful = ideal_cycles(hw, **shape) / conv.groups
            rows.append({"layer": f"units.{i}.{name}", "in": conv.in_channels,
                         "out": conv.out_channels, "groups": conv.groups, "kernel": k,
                         "in_size": hi, "out_size": hout, "steps": conv_steps(hw, **shape),
                         "cycles": conv_cycles(hw, **shape), "useful_cycles": useful,
                         "weight_words": words, "fits_weight_memory": words <= hw.wgt_depth})
        h = ho
    return {"hw": hw.name, "lanes": hw.lanes, "cycles": sum(r["cycles"] for r in rows),
            "useful_cycles": sum(r["useful_cycles"] for r in rows), "layers": rows}
