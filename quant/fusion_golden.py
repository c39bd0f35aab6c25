"""Integer golden model of a predicted, fused bottleneck (rules F1-F9 of docs/arithmetic.md).

A :class:`FusedBlock` holds the integer constants of one
:class:`~dynacc.quant.fusion.PredictedUnit`: the ternary predictor with per-channel integer
thresholds, and the BN-folded BFP datapath ``W1 (l1), D (dl), W2 (l2)`` with biases on exact
LSBs. Everything is int64; no intermediate rounding inside the block:

* :func:`q4_from_mantissa` (F1), :func:`predictor_masks` (F2-F4): masks ``s1``, ``s2``;
* :func:`unfused_acc` (F5-F7): the exact layer-by-layer computation with the masks;
* :func:`fused_acc` (F8): ``y = Σ_k Σ_i x[i,p+k]·A[o,i,k,p] + c[o,p]`` with ``A``/``c`` formed
  from the precomputed products ``T``, ``U``, ``V`` and the masks (additions only); equal to
  :func:`unfused_acc` element by element (tests);
* :func:`fused_block`: one requantization (R3) of the block accumulator (F9);
* :func:`block_counts`: multiplications/additions of the dense, pruned and fused block.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import torch
import torch.nn.functional as F

from .formats import BFPFormat, WeightBlocking
from .functional import quantize_bias, quantize_weight, requantize
from .fusion import dw3x3

__all__ = ["FusedBlock", "mask_threshold", "level_thresholds", "q4_from_mantissa",
           "predictor_masks", "accumulator_bounds", "unfused_acc", "fused_acc", "fused_block", "fold_bn",
           "fold_predicted_unit", "block_counts", "LEVELS"]

#: ŷ1 levels above zero of the 4-bit quantizer after the ReLU (q ∈ 0..7).
LEVELS = 7
_PER_FILTER = WeightBlocking(group=-1, align_span=63)


@dataclasses.dataclass
class FusedBlock:
    """Integer constants of one fused block (shapes in brackets; ``G`` groups).

    Predictor: ``t1 [mid, cin/G]``, ``t2 [mid, 9]`` in {-1, 0, 1}; ``sign1``/``thr1`` (s1),
    ``lvl_thr [mid, 7]`` (ŷ1 levels, same ``sign1``), ``sign2``/``thr2`` (s2), all ``[mid]``.
    Datapath: ``w1 [mid, cin/G]`` LSB ``l1 [mid]``, bias ``b1`` on ``l1 + x_lsb``;
    ``d [mid, 9]`` LSB ``dl``, bias ``b2`` on ``dl + l1 + x_lsb``; ``w2 [out, mid/G]`` (rows in
    projection order, before the shuffle), ``shift [out, mid/G]`` its exact left shifts onto
    the accumulator LSB ``acc_lsb [out]``, bias ``b3 [out]`` on ``acc_lsb``; ``perm [out]``:
    output channel ``j`` is projection row ``perm[j]``; ``res_shift [out]`` (shuffled order)
    aligns the residual ``x`` onto ``acc_lsb[perm[j]]``. LSBs are exponents of 2."""

    in_ch: int
    mid: int
    out_ch: int
    groups: int
    stride: int
    use_res: bool
    x_lsb: int
    t1: torch.Tensor
    sign1: torch.Tensor
    thr1: torch.Tensor
    lvl_thr: torch.Tensor
    t2: torch.Tensor
    sign2: torch.Tensor
    thr2: torch.Tensor
    w1: torch.Tensor
    l1: torch.Tensor
    b1: torch.Tensor
    d: torch.Tensor
    dl: torch.Tensor
    b2: torch.Tensor
    w2: torch.Tensor
    l2: torch.Tensor
    shift: torch.Tensor
    acc_lsb: torch.Tensor
    b3: torch.Tensor
    perm: torch.Tensor
    res_shift: torch.Tensor

    def to_state(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, d: dict) -> "FusedBlock":
        return cls(**d)


# ----------------------------------------------------------------------------- thresholds
def _clamp_thr(t: int, bound: int) -> int:
    return max(-bound - 1, min(bound, t))


def mask_threshold(k: float, b: float, bound: int) -> tuple[int, int]:
    """Rule F3: ``[k·acc + b > 0] == [sign·acc > T]`` for every integer ``|acc| <= bound``.

    ``sign = +1`` if ``k >= 0`` else -1; ``T = floor(−b/|k|)`` computed exactly from the float64
    values of ``k`` and ``b`` (rationals), so a tie ``k·acc + b = 0`` gives mask 0 in both;
    ``k = 0``: always on (``T = −bound−1``) if ``b > 0``, else never (``T = bound``).
    ``T`` is clamped to ``[−bound−1, bound]`` (no decision changes)."""
    if not (math.isfinite(k) and math.isfinite(b)):
        raise ValueError(f"predictor affine is not finite (k={k}, b={b}): retrain the predictor")
    sign = 1 if k >= 0 else -1
    if k == 0:
        return sign, (-bound - 1 if b > 0 else bound)
    t = math.floor(Fraction(-b) / abs(Fraction(k)))
    return sign, _clamp_thr(t, bound)


def level_thresholds(k: float, b: float, bound: int) -> list[int]:
    """Rule F4: the ŷ1 level ``q = clamp(floor(ReLU(v)/0.8 + 1/2), 0, 7)`` of ``v = k·acc + b``
    is ``Σ_j [sign·acc > T_j]``, ``j = 1..7``: ``q >= j ⟺ v >= (4j − 2)/5 ⟺
    sign·acc >= r_j = ((4j−2)/5 − b)/|k| ⟺ sign·acc > ceil(r_j) − 1`` (exact rationals;
    ``v`` is dyadic and ``(4j−2)/5`` is not, so ``v`` never equals a level boundary)."""
    sign = 1 if k >= 0 else -1
    out = []
    for j in range(1, LEVELS + 1):
        edge = Fraction(4 * j - 2, 5)
        if k == 0:
            out.append(-bound - 1 if Fraction(b) >= edge else bound)
        else:
            r = (edge - Fraction(b)) / abs(Fraction(k))
            out.append(_clamp_thr(math.ceil(r) - 1, bound))
    return out


# ----------------------------------------------------------------------------- predictor
def q4_from_mantissa(m: torch.Tensor, x_lsb: int) -> torch.Tensor:
    """Rule F1: 4-bit predictor level of ``x = m·2^x_lsb``: ``clamp(floor(x/0.8 + 1/2), -8, 7)``
    = ``clamp(floor(5m·2^(x_lsb−2) + 1/2), -8, 7)``: ``5m = (m << 2) + m`` (one addition), then
    an exact left shift (``x_lsb >= 2``) or ``(5m + 2^(s−1)) >> s`` (arithmetic shift = floor,
    ``s = 2 − x_lsb``): round half up."""
    v = 5 * m.to(torch.int64)
    e = int(x_lsb) - 2
    if e >= 0:
        q = torch.bitwise_left_shift(v.clamp(-16, 16), min(e, 8))
    else:
        s = -e
        q = torch.bitwise_right_shift(v + (1 << (s - 1)), s)
    return q.clamp(-8, 7)


def _cmp(acc: torch.Tensor, sign: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    return sign[None, :, None, None] * acc > thr[None, :, None, None]


def predictor_masks(blk: FusedBlock, x: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rules F1-F4: ``(s1 [N, mid, H, W], level [N, mid, H, W], s2 [N, mid, Ho, Wo])``.

    ``acc1 = Σ_i t1[m, i]·q4(x[i])`` (additions/subtractions), ``s1 = [sign1·acc1 > thr1]``,
    ``level = Σ_j [sign1·acc1 > lvl_thr[:, j]]`` (0..7), ``acc2 = Σ_k t2[m, k]·level[m, p+k]``
    with zero padding (stride ``blk.stride``), ``s2 = [sign2·acc2 > thr2]``."""
    q = q4_from_mantissa(x, blk.x_lsb)
    acc1 = F.conv2d(q, blk.t1[:, :, None, None], None, 1, 0, 1, blk.groups)
    s1 = _cmp(acc1, blk.sign1, blk.thr1)
    sa = blk.sign1[None, :, None, None] * acc1
    level = (sa[:, :, None] > blk.lvl_thr[None, :, :, None, None]).sum(dim=2)
    acc2 = dw3x3(level, blk.t2, blk.stride)
    return s1, level, _cmp(acc2, blk.sign2, blk.thr2)


# ----------------------------------------------------------------------------- datapath
def _chk(bound: float, what: str) -> None:
    if bound >= 2.0 ** 62:
        raise OverflowError(f"fused block: {what} bound {bound:.3g} does not fit int64")


def _w2_shifted(blk: FusedBlock) -> torch.Tensor:
    return blk.w2 * torch.bitwise_left_shift(torch.ones_like(blk.shift), blk.shift)


def accumulator_bounds(blk: FusedBlock, x_max: int) -> torch.Tensor:
    """Worst-case ``|y|`` per output (projection order, float64) for ``|x| <= x_max``, per
    channel: ``H1[m] = |b1| + x_max·Σ|w1|``, ``H2[m] = |b2| + H1·Σ|d|``,
    ``Y[o] = |b3| + Σ_m |w2 << shift|·H2[m]`` (+ ``x_max << res_shift``). The same bound
    holds for the fused form (same integers) and for ``h1``/``h2`` (rule F7)."""
    g, og = blk.groups, blk.out_ch // blk.groups
    h1 = blk.b1.abs().double() + x_max * blk.w1.abs().double().sum(1)
    h2 = blk.b2.abs().double() + h1 * blk.d.abs().double().sum(1)
    h2g = h2.reshape(g, -1).repeat_interleave(og, dim=0)            # [out, mid/G]
    y = blk.b3.abs().double() + (_w2_shifted(blk).abs().double() * h2g).sum(1)
    if blk.use_res:
        y = y + x_max * torch.pow(2.0, blk.res_shift[torch.argsort(blk.perm)].double())
    return y


def unfused_acc(blk: FusedBlock, x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rules F5-F7, the exact masked block, layer by layer (no rounding):
    ``h1 = conv1x1(x, w1) + b1``; ``h2 = dw3x3(s1·h1, d) + b2``;
    ``y[j] = (Σ_m (w2 << shift)·s2·h2 + b3)[perm[j]] + (x[j] << res_shift[j])``.
    Returns ``(y [N, out, Ho, Wo] on acc_lsb[perm], h1, h2)`` (h1/h2 unmasked, for the real
    ReLU outcomes)."""
    x = x.to(torch.int64)
    xm = int(x.abs().max()) if x.numel() else 0
    w2s = _w2_shifted(blk)
    _chk(float(accumulator_bounds(blk, xm).max()), "accumulator")
    h1 = F.conv2d(x, blk.w1[:, :, None, None], None, 1, 0, 1, blk.groups) + blk.b1[None, :, None, None]
    h1m = torch.where(s1, h1, torch.zeros_like(h1))
    h2 = dw3x3(h1m, blk.d, blk.stride) + blk.b2[None, :, None, None]
    h2m = torch.where(s2, h2, torch.zeros_like(h2))
    yu = F.conv2d(h2m, w2s[:, :, None, None], None, 1, 0, 1, blk.groups) + blk.b3[None, :, None, None]
    y = yu[:, blk.perm]
    if blk.use_res:
        y = y + torch.bitwise_left_shift(x, blk.res_shift[None, :, None, None])
    return y, h1, h2


def _dense_groups(w: torch.Tensor, in_total: int, groups: int) -> torch.Tensor:
    """``[O, C/G]`` grouped weights -> dense ``[O, C]`` (zeros outside the group)."""
    o, cg = w.shape
    out = torch.zeros(o, in_total, dtype=w.dtype)
    og = o // groups
    for g in range(groups):
        out[g * og:(g + 1) * og, g * cg:(g + 1) * cg] = w[g * og:(g + 1) * og]
    return out


def fused_tensors(blk: FusedBlock) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offline products (rule F8), shuffled output order: ``T [out, in, 9, mid] =
    (w2 << shift)[o, m]·d[m, k]·w1[m, i]``, ``U [out, mid, 9] = (w2 << shift)·d·b1``,
    ``V [out, mid] = (w2 << shift)·b2``, ``B3 [out]``."""
    w1 = _dense_groups(blk.w1, blk.in_ch, blk.groups)            # [mid, in]
    w2 = _dense_groups(_w2_shifted(blk), blk.mid, blk.groups)[blk.perm]  # [out, mid]
    t = w2[:, None, None, :] * blk.d.t()[None, None, :, :] * w1.t()[None, :, None, :]
    u = w2[:, :, None] * (blk.d * blk.b1[:, None])[None]
    v = w2 * blk.b2[None, :]
    return t, u, v, blk.b3[blk.perm]


def _unfold(t: torch.Tensor, stride: int) -> torch.Tensor:
    """``[N, C, H, W]`` integer/bool -> ``[N, C, 9, P]`` 3×3 neighbourhoods, zero padding."""
    n, c = t.shape[:2]
    u = F.unfold(t.to(torch.float64), 3, padding=1, stride=stride)
    return u.reshape(n, c, 9, -1).to(torch.int64)


def fused_acc(blk: FusedBlock, x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Rule F8, the fused form: ``A[o,i,k,p] = Σ_m s2[m,p]·s1[m,p+k]·T[o,i,k,m]``,
    ``c[o,p] = Σ_m s2[m,p]·(Σ_k s1[m,p+k]·U[o,m,k] + V[o,m]) + B3[o]`` (masked sums of
    precomputed integers: additions only), ``y[o,p] = Σ_k Σ_i x[i,p+k]·A[o,i,k,p] + c[o,p]``
    (+ ``x[o,p] << res_shift[o]``). Padding taps have ``x = 0`` and ``s1 = 0``. Exact int64;
    meant for checks (memory ``N·out·in·9·P``)."""
    t, u, v, b3 = fused_tensors(blk)
    n = x.shape[0]
    ho = s2.shape[2]
    wo = s2.shape[3]
    xu = _unfold(x, blk.stride)                                   # [N, in, 9, P]
    s1u = _unfold(s1, blk.stride)                                 # [N, mid, 9, P]
    s2f = s2.reshape(n, blk.mid, -1).to(torch.int64)              # [N, mid, P]
    gate = s1u * s2f[:, :, None, :]                               # [N, mid, 9, P]
    a = torch.einsum("oikm,nmkp->noikp", t, gate)
    y = torch.einsum("nikp,noikp->nop", xu, a)
    c = torch.einsum("omk,nmkp->nop", u, gate) + torch.einsum("om,nmp->nop", v, s2f) + b3[None, :, None]
    y = (y + c).reshape(n, blk.out_ch, ho, wo)
    if blk.use_res:
        y = y + torch.bitwise_left_shift(x.to(torch.int64), blk.res_shift[None, :, None, None])
    return y


def fused_block(blk: FusedBlock, x: torch.Tensor, out_lsb: int, fmt: BFPFormat,
                method: str = "unfused") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One fused block on BFP mantissas ``x`` (LSB ``blk.x_lsb``): predictor masks (F1-F4),
    exact accumulator (``method`` ``"unfused"``: F5-F7, ``"fused"``: F8; identical integers),
    one requantization (R3) onto ``out_lsb`` (rule F9). Returns ``(y, info)`` with ``info``
    holding ``s1``, ``s2``, ``h1``, ``h2`` (``h*`` only for ``"unfused"``)."""
    s1, _, s2 = predictor_masks(blk, x)
    if method == "unfused":
        acc, h1, h2 = unfused_acc(blk, x, s1, s2)
        info = {"s1": s1, "s2": s2, "h1": h1, "h2": h2}
    elif method == "fused":
        acc = fused_acc(blk, x, s1, s2)
        info = {"s1": s1, "s2": s2}
    else:
        raise ValueError(f"fused_block method must be 'unfused' or 'fused', not {method!r}")
    shift = (int(out_lsb) - blk.acc_lsb[blk.perm])[None, :, None, None]
    return requantize(acc, shift, fmt), info


# ----------------------------------------------------------------------------- folding
def _bias(b: torch.Tensor, lsb: torch.Tensor, what: str) -> torch.Tensor:
    """Rule B1 rounding onto an exact product LSB, in a 62-bit container; refuses to saturate."""
    v = quantize_bias(b, lsb, acc_bits=62)
    if bool((v.abs() >= (1 << 61) - 1).any()):
        raise OverflowError(f"fused block: bias {what} does not fit 62 bits on its LSB")
    return v


def fold_bn(w: torch.Tensor, bn) -> tuple[torch.Tensor, torch.Tensor]:
    """Rule B0 in float64: ``W' = W·γ/√(σ²+ε)``, ``b' = β − μ·γ/√(σ²+ε)``."""
    inv = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return (w.detach().double() * inv.reshape((-1,) + (1,) * (w.dim() - 1)),
            bn.bias.detach().double() - bn.running_mean.double() * inv)


def fold_predicted_unit(pu, x_lsb: int, fmt: BFPFormat) -> FusedBlock:
    """Integer constants of a :class:`~dynacc.quant.fusion.PredictedUnit` whose input has LSB
    ``x_lsb`` (rules F2-F7): per-filter BFP weights (one block per filter), biases on the exact
    product LSBs (B1 rounding), predictor thresholds from :meth:`PredictedUnit.affine`."""
    from .models.fusionet import shuffle_permutation

    u = pu.unit
    g, mid, cin, cout = u.groups, u.mid, u.in_channels, u.out_channels
    (t1, _), (t2, _) = pu.ternary()
    (k1, c1), (k2, c2) = pu.affine()
    t1 = t1.reshape(mid, -1)
    t2 = t2.reshape(mid, 9)
    bound1 = 8 * t1.abs().sum(1)
    bound2 = LEVELS * t2.abs().sum(1)
    th1 = [mask_threshold(float(k1[m]), float(c1[m]), int(bound1[m])) for m in range(mid)]
    th2 = [mask_threshold(float(k2[m]), float(c2[m]), int(bound2[m])) for m in range(mid)]
    lv = [level_thresholds(float(k1[m]), float(c1[m]), int(bound1[m])) for m in range(mid)]
    w1f, b1f = fold_bn(u.expand.weight, u.bn1)
    df, b2f = fold_bn(u.dw.weight, u.bn2)
    w2f, b3f = fold_bn(u.project.weight, u.bn3)
    w1, _, l1c = quantize_weight(w1f, fmt, _PER_FILTER)
    d, _, dlc = quantize_weight(df, fmt, _PER_FILTER)
    w2, _, l2c = quantize_weight(w2f, fmt, _PER_FILTER)
    l1, dl, l2 = l1c[:, 0], dlc[:, 0], l2c[:, 0]
    b1 = _bias(b1f, l1 + x_lsb, 'b1')
    b2 = _bias(b2f, dl + l1 + x_lsb, 'b2')
    mid_lsb = (dl + l1 + x_lsb).reshape(g, mid // g)               # [G, mid/G]
    og = cout // g
    prod = l2[:, None] + mid_lsb.repeat_interleave(og, dim=0)      # [out, mid/G]
    acc_lsb = prod.amin(dim=1)
    perm = shuffle_permutation(cout, g)
    use_res = bool(u.use_res)
    if use_res:
        acc_lsb = torch.minimum(acc_lsb, torch.full_like(acc_lsb, int(x_lsb)))
    shift = prod - acc_lsb[:, None]
    res_shift = (int(x_lsb) - acc_lsb[perm]) if use_res else torch.zeros(cout, dtype=torch.int64)
    b3 = _bias(b3f, acc_lsb, 'b3')
    i64 = lambda v: torch.as_tensor(v, dtype=torch.int64)  # noqa: E731
    return FusedBlock(
        in_ch=cin, mid=mid, out_ch=cout, groups=g, stride=u.stride, use_res=use_res,
        x_lsb=int(x_lsb), t1=t1, sign1=i64([s for s, _ in th1]), thr1=i64([t for _, t in th1]),
        lvl_thr=i64(lv), t2=t2, sign2=i64([s for s, _ in th2]), thr2=i64([t for _, t in th2]),
        w1=w1.reshape(mid, -1), l1=l1, b1=b1, d=d.reshape(mid, 9), dl=dl, b2=b2,
        w2=w2.reshape(cout, -1), l2=l2, shift=shift, acc_lsb=acc_lsb, b3=b3, perm=perm,
        res_shift=res_shift)


# ----------------------------------------------------------------------------- counts
def block_counts(blk: FusedBlock, s1: torch.Tensor, s2: torch.Tensor) -> dict[str, float]:
    """Multiplications/additions per image (averaged over the batch of masks) of one block.

    A MAC counts one multiplication and one addition; every tap of a 3×3 conv counts, padding
    included (as the dense engine computes them). ``dense``: the unpruned unfused block;
    ``pruned``: only nonzero weights; ``fused``: ``9·(in/G)·out`` MACs per output pixel, plus
    additions of ``A`` (one per nonzero ``T`` term whose masks are 1), of ``c``, the residual,
    and the predictor (``5m`` of F1, one per nonzero ternary weight); ``compares``: the
    predictor's threshold compares (8 per expansion output, 1 per depthwise output)."""
    n, _, hi, wi = s1.shape
    ho, wo = s2.shape[2:]
    pi, po = hi * wi, ho * wo
    g = blk.groups
    cin_g, mid_g = blk.in_ch // g, blk.mid // g
    dense_m = blk.mid * cin_g * pi + 9 * blk.mid * po + blk.out_ch * mid_g * po
    bias_adds = blk.mid * pi + blk.mid * po + blk.out_ch * po
    res = blk.out_ch * po if blk.use_res else 0
    nz1, nzd, nz2 = int((blk.w1 != 0).sum()), int((blk.d != 0).sum()), int((blk.w2 != 0).sum())
    pruned_m = nz1 * pi + nzd * po + nz2 * po
    fused_m = 9 * cin_g * blk.out_ch * po
    # A formation: Σ s2[m,p]·s1[m,p+k]·[d[m,k]≠0]·nnzcol(w2)[m]·nnzrow(w1)[m]
    col2 = torch.zeros(blk.mid, dtype=torch.int64)
    og = blk.out_ch // g
    for gi in range(g):
        col2[gi * mid_g:(gi + 1) * mid_g] = (blk.w2[gi * og:(gi + 1) * og] != 0).sum(0)
    row1 = (blk.w1 != 0).sum(1)
    e = dw3x3(s1.to(torch.float64), (blk.d != 0).to(torch.float64), blk.stride)  # [N, mid, Ho, Wo]
    s2f = s2.to(torch.float64)
    a_adds = float((s2f * e * (col2 * row1).double()[None, :, None, None]).sum()) / n
    c_terms = e * (blk.b1 != 0).double()[None, :, None, None] + (blk.b2 != 0).double()[None, :, None, None]
    c_adds = float((s2f * c_terms * col2.double()[None, :, None, None]).sum()) / n + blk.out_ch * po
    pred_adds = (blk.in_ch * pi + int((blk.t1 != 0).sum()) * pi + int((blk.t2 != 0).sum()) * po)
    return {
        "mults_dense": float(dense_m), "adds_dense": float(dense_m + bias_adds + res),
        "mults_pruned": float(pruned_m), "adds_pruned": float(pruned_m + bias_adds + res),
        "mults_fused": float(fused_m),
        "adds_fused": float(fused_m) + a_adds + c_adds + res + pred_adds,
        "adds_fused_A": a_adds, "adds_fused_c": c_adds, "adds_predictor": float(pred_adds),
        "compares": float((LEVELS + 1) * blk.mid * pi + blk.mid * po),
    }
