"""Random fused blocks for the fused-engine co-simulation: integer constants drawn directly
(ternary predictor weights, thresholds placed on the predictor sums so that a chosen fraction
of masks is on, with exact ties that must be off; BFP weights with per-term shifts, biases),
and the edge cases: all-zero input, saturated outputs, worst-case accumulation, masks all on
or all off."""

from __future__ import annotations

import numpy as np
import torch

from dynacc.hw.fused_program import FusedLayer
from dynacc.quant.fusion_golden import LEVELS, FusedBlock, predictor_masks
from dynacc.quant.models.fusionet import shuffle_permutation

__all__ = ["random_fused_block", "random_fused_layer", "place_thresholds"]


def _i64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.int64))


def random_fused_block(in_ch: int, out_ch: int, mid: int, groups: int, stride: int, *,
                       x_lsb: int = -3, seed: int = 0, wmax: int = 127, density: float = 0.5,
                       shift_max: int = 3, bias_scale: int = 1 << 12,
                       use_res: bool | None = None) -> FusedBlock:
    """A block with random integer constants (thresholds 0: call :func:`place_thresholds`).

    ``density``: fraction of nonzero weights in ``w1``, ``d``, ``w2``; ``wmax``: largest
    |weight| (127 for the worst case); ``shift_max``: largest exact shift of a projection
    term onto its accumulator LSB."""
    g = np.random.default_rng(seed)
    cin_g, mid_g = in_ch // groups, mid // groups

    def w(shape):
        v = g.integers(-wmax, wmax + 1, size=shape)
        return v * (g.random(shape) < density)
    if use_res is None:
        use_res = stride == 1 and in_ch == out_ch
    acc_lsb = g.integers(-16, -8, size=out_ch)
    return FusedBlock(
        in_ch=in_ch, mid=mid, out_ch=out_ch, groups=groups, stride=stride, use_res=use_res,
        x_lsb=x_lsb,
        t1=_i64(g.integers(-1, 2, size=(mid, cin_g))), sign1=_i64(g.choice([-1, 1], size=mid)),
        thr1=torch.zeros(mid, dtype=torch.int64), lvl_thr=torch.zeros(mid, LEVELS, dtype=torch.int64),
        t2=_i64(g.integers(-1, 2, size=(mid, 9))), sign2=_i64(g.choice([-1, 1], size=mid)),
        thr2=torch.zeros(mid, dtype=torch.int64),
        w1=_i64(w((mid, cin_g))), l1=torch.zeros(mid, dtype=torch.int64),
        b1=_i64(g.integers(-bias_scale, bias_scale + 1, size=mid)),
        d=_i64(w((mid, 9))), dl=torch.zeros(mid, dtype=torch.int64),
        b2=_i64(g.integers(-bias_scale, bias_scale + 1, size=mid) * 64),
        w2=_i64(w((out_ch, mid_g))), l2=torch.zeros(out_ch, dtype=torch.int64),
        shift=_i64(g.integers(0, shift_max + 1, size=(out_ch, mid_g))), acc_lsb=_i64(acc_lsb),
        b3=_i64(g.integers(-bias_scale, bias_scale + 1, size=out_ch) * 4096),
        perm=shuffle_permutation(out_ch, groups),
        res_shift=_i64(g.integers(0, 20, size=out_ch)) if use_res
        else torch.zeros(out_ch, dtype=torch.int64))


def place_thresholds(blk: FusedBlock, x: torch.Tensor, p1: float = 0.5, p2: float = 0.5,
                     seed: int = 0) -> FusedBlock:
    """Set ``thr1`` / ``lvl_thr`` / ``thr2`` from the predictor sums of ``x`` (``[N, C, H,
    W]``): each threshold is a value the sum actually takes (so some outputs tie and must be
    off), at quantile ``1 - p`` of its channel; the 7 level thresholds are spread above
    ``thr1``. ``thr2`` is placed on the sums of the resulting levels."""
    g = np.random.default_rng(seed)
    blk.thr1 = torch.zeros(blk.mid, dtype=torch.int64)
    blk.lvl_thr = torch.zeros(blk.mid, LEVELS, dtype=torch.int64)
    blk.thr2 = torch.zeros(blk.mid, dtype=torch.int64)
    import torch.nn.functional as F

    from dynacc.quant.fusion_golden import q4_from_mantissa
    from dynacc.quant.fusion import dw3x3
    q = q4_from_mantissa(x, blk.x_lsb)
    acc1 = F.conv2d(q, blk.t1[:, :, None, None], None, 1, 0, 1, blk.groups)
    sa = (blk.sign1[None, :, None, None] * acc1).transpose(0, 1).reshape(blk.mid, -1)
    bound1 = 8 * blk.t1.abs().sum(1)
    thr1, lvl = [], []
    for m in range(blk.mid):
        vals = np.sort(sa[m].numpy())
        t = int(vals[int((1 - p1) * (len(vals) - 1))])
        thr1.append(t)
        steps = np.sort(g.integers(0, 4, size=LEVELS)).cumsum()
        lvl.append([min(t + int(s), int(bound1[m])) for s in steps])
    blk.thr1, blk.lvl_thr = _i64(thr1), _i64(lvl)
    _, level, _ = predictor_masks(blk, x)
    acc2 = dw3x3(level, blk.t2, blk.stride)
    sa2 = (blk.sign2[None, :, None, None] * acc2).transpose(0, 1).reshape(blk.mid, -1)
    blk.thr2 = _i64([int(np.sort(sa2[m].numpy())[int((1 - p2) * (sa2.shape[1] - 1))])
                     for m in range(blk.mid)])
    return blk


def random_fused_layer(name: str, in_ch: int = 8, out_ch: int = 8, mid: int = 32,
                       groups: int = 2, stride: int = 1, hw: tuple[int, int] = (5, 6), *,
                       seed: int = 0, p1: float = 0.5, p2: float = 0.5, out_lsb: int | None = None,
                       x: np.ndarray | None = None, **kw) -> FusedLayer:
    """A random block with thresholds placed on its own input, and that input."""
    blk = random_fused_block(in_ch, out_ch, mid, groups, stride, seed=seed, **kw)
    g = np.random.default_rng(seed + 1000)
    if x is None:
        x = g.integers(-128, 128, size=(in_ch, *hw))
    xt = torch.as_tensor(np.asarray(x, dtype=np.int64))[None]
    place_thresholds(blk, xt, p1, p2, seed)
    if out_lsb is None:        # an LSB where most outputs are in range and some saturate
        from dynacc.quant.fusion_golden import unfused_acc
        s1, _, s2 = predictor_masks(blk, xt)
        acc, _, _ = unfused_acc(blk, xt, s1, s2)
        top = float(acc.abs().double().quantile(0.9)) if acc.numel() else 1.0
        out_lsb = int(np.ceil(np.log2(max(top, 1.0) / 127))) + int(blk.acc_lsb.min())
    return FusedLayer(name, blk, np.asarray(x), out_lsb)
