"""The integer golden model: the single source of truth for what the hardware computes.

Every function takes integer mantissas (``torch.int64``), integer LSB exponents and integer
constants, and returns integers. Nothing here is float except the exact float64 path of
:func:`conv2d_acc`, taken only when every partial sum is provably below 2**53 (so float64
addition is exact in any order); otherwise the reduction runs in int64.

The RTL (``hw/``) is compared to these functions with ``==`` on every element; the rules are
named in ``docs/arithmetic.md``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .formats import BFPFormat
from .functional import div_round_half_even, requantize

__all__ = [
    "conv_alignment",
    "conv2d_acc",
    "conv2d",
    "linear",
    "add",
    "concat",
    "max_pool2d",
    "global_avg_pool",
    "apply_activation",
    "accumulator_bound",
    "DP_MODES",
    "split_msb_lsb",
    "dual_precision_conv2d",
    "cg_base_mask",
    "channel_gated_conv2d",
    "fbs_active",
    "fbs_conv2d",
]

_EXACT_F64 = 1 << 53


def _per_input_channel(x_lsb: torch.Tensor | int, c_in: int) -> torch.Tensor:
    t = torch.as_tensor(x_lsb, dtype=torch.int64).reshape(-1)
    return t.expand(c_in).clone() if t.numel() == 1 else t


def conv_alignment(x_lsb: torch.Tensor | int, w_lsb: torch.Tensor, groups: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rule A1/A2: accumulator LSB and alignment shifts of a conv.

    ``x_lsb`` is per input channel ``[C]`` (or a scalar), ``w_lsb`` per (filter, input channel of
    the filter's group) ``[O, C/groups]``. The product of channel c for filter o has LSB
    ``x_lsb[c] + w_lsb[o, c]``; the accumulator of filter o is anchored at the smallest of those
    (``acc_lsb[o]``) and every channel's partial sum is shifted left by
    ``shift[o, c] = x_lsb[c] + w_lsb[o, c] - acc_lsb[o] >= 0`` (exact, no rounding).
    Returns ``(acc_lsb [O], shift [O, C/groups])``.
    """
    o, cg = w_lsb.shape
    x_c = _per_input_channel(x_lsb, cg * groups)
    # input channel index seen by filter o at position j: (o // (O/groups)) * cg + j
    og = o // groups
    idx = (torch.arange(o)[:, None] // og) * cg + torch.arange(cg)[None, :]
    prod_lsb = x_c[idx] + w_lsb
    acc_lsb = prod_lsb.amin(dim=1)
    return acc_lsb, prod_lsb - acc_lsb[:, None]


def accumulator_bound(w: torch.Tensor, shift: torch.Tensor, bias: torch.Tensor | None,
                      x_max: int) -> torch.Tensor:
    """Largest |accumulator| any input with |x| <= x_max can produce, per filter ``[O]``:
    ``|bias| + x_max * sum |w << shift|`` (worst-case accumulation, rule A4)."""
    w4 = w.reshape(w.shape[0], w.shape[1], -1).abs()
    b = bias.abs().to(torch.int64) if bias is not None else torch.zeros(w.shape[0], dtype=torch.int64)
    approx = ((w4.double() * torch.pow(2.0, shift.double())[:, :, None]).sum(dim=(1, 2)) * x_max
              + b.double())
    if w.numel() and float(approx.max()) >= 2.0 ** 62:
        raise OverflowError(f"accumulator bound {float(approx.max()):.3g} does not fit 63 bits; "
                            "reduce the weight align_span")
    s = (w4.to(torch.int64) * torch.bitwise_left_shift(torch.ones_like(shift), shift)[:, :, None]
         ).sum(dim=(1, 2))
    return b + s * x_max


def conv2d_acc(x: torch.Tensor, x_lsb: torch.Tensor | int, w: torch.Tensor, w_lsb: torch.Tensor,
               bias: torch.Tensor | None = None, stride: int | Sequence[int] = 1,
               padding: int | Sequence[int] = 0, groups: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer conv accumulator (rules A1-A4, B1).

    ``x``: ``[N, C, H, W]`` mantissas; ``w``: ``[O, C/groups, kh, kw]`` mantissas; ``bias``:
    ``[O]`` already on the accumulator LSB (see :func:`conv_alignment`). Zero padding.
    Returns ``(acc [N, O, Ho, Wo], acc_lsb [O])``; ``acc`` is exact (no wrap, no rounding).
    """
    acc_lsb, shift = conv_alignment(x_lsb, w_lsb, groups)
    w_al = w.to(torch.int64) * torch.bitwise_left_shift(
        torch.ones_like(shift), shift).reshape(shift.shape + (1,) * (w.dim() - 2))
    x_max = int(x.abs().max()) if x.numel() else 0
    bound = int(accumulator_bound(w, shift, bias, x_max).max()) if w.numel() else 0
    if bound < _EXACT_F64:
        acc = F.conv2d(x.to(torch.float64), w_al.to(torch.float64), None, stride, padding, 1, groups)
        acc = acc.to(torch.int64)
    else:  # exact but slower
        acc = F.conv2d(x.to(torch.int64), w_al, None, stride, padding, 1, groups)
    if bias is not None:
        acc = acc + bias.to(torch.int64)[None, :, None, None]
    return acc, acc_lsb


def apply_activation(m: torch.Tensor, activation: str | None,
                     clamp_max: int | torch.Tensor | None = None) -> torch.Tensor:
    """Rule R4: activations act on requantized mantissas. ``"relu"``: ``max(m, 0)``;
    ``"relu6"``: ``min(max(m, 0), clamp_max)`` with ``clamp_max`` = 6 quantized on the output
    LSB (rule R5); ``"pact"``: the same clamp with ``clamp_max = 2**b - 1``, the saturation of
    the unsigned b-bit input of a dual-precision layer (rule G0). ``None``: identity."""
    if activation is None:
        return m
    if activation == "relu":
        return m.clamp(min=0)
    if activation in ("relu6", "pact"):
        if clamp_max is None:
            raise ValueError(f"{activation} needs clamp_max (its bound on the output LSB)")
        return torch.minimum(m.clamp(min=0), torch.as_tensor(clamp_max, dtype=torch.int64))
    raise ValueError(f"unknown activation {activation!r}")


def conv2d(x: torch.Tensor, x_lsb: torch.Tensor | int, w: torch.Tensor, w_lsb: torch.Tensor,
           bias: torch.Tensor | None, out_lsb: torch.Tensor | int, fmt: BFPFormat,
           stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0, groups: int = 1,
           activation: str | None = None, clamp_max: int | torch.Tensor | None = None
           ) -> torch.Tensor:
    """Integer BFP conv: accumulate (A1-A4, B1), requantize each filter to ``out_lsb`` (R3),
    then the activation (R4). ``out_lsb`` is a scalar or per output channel ``[O]``."""
    acc, acc_lsb = conv2d_acc(x, x_lsb, w, w_lsb, bias, stride, padding, groups)
    out_l = torch.as_tensor(out_lsb, dtype=torch.int64).reshape(-1).expand(w.shape[0])
    shift = (out_l - acc_lsb)[None, :, None, None]
    return apply_activation(requantize(acc, shift, fmt), activation, clamp_max)


def linear(x: torch.Tensor, x_lsb: torch.Tensor | int, w: torch.Tensor, w_lsb: torch.Tensor,
           bias: torch.Tensor | None, out_lsb: torch.Tensor | int | None, fmt: BFPFormat,
           activation: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer FC layer = a 1×1 conv on a 1×1 image. ``x``: ``[N, I]``, ``w``: ``[O, I]``.

    With ``out_lsb=None`` the output is the raw accumulator (rule R6, classifier logits).
    Returns ``(y [N, O], y_lsb [O])``.
    """
    acc, acc_lsb = conv2d_acc(x[:, :, None, None], x_lsb, w[:, :, None, None], w_lsb, bias)
    acc = acc[:, :, 0, 0]
    if out_lsb is None:
        return apply_activation(acc, activation), acc_lsb
    out_l = torch.as_tensor(out_lsb, dtype=torch.int64).reshape(-1).expand(w.shape[0])
    y = apply_activation(requantize(acc, (out_l - acc_lsb)[None, :], fmt), activation)
    return y, out_l.clone()


def _chan(t: torch.Tensor | int, ndim: int) -> torch.Tensor:
    v = torch.as_tensor(t, dtype=torch.int64).reshape(-1)
    return v.reshape((1, -1) + (1,) * (ndim - 2)) if v.numel() > 1 else v.reshape(())


def add(a: torch.Tensor, a_lsb: torch.Tensor | int, b: torch.Tensor, b_lsb: torch.Tensor | int,
        joint_lsb: torch.Tensor | int, out_lsb: torch.Tensor | int, fmt: BFPFormat,
        activation: str | None = None, clamp_max: int | torch.Tensor | None = None
           ) -> torch.Tensor:
    """Rule E1, residual add: both operands are requantized onto the jointly calibrated
    ``joint_lsb`` (a no-op for an operand already there, the usual case), added exactly
    (one carry bit), requantized to ``out_lsb`` and activated."""
    ja = requantize(a, _chan(joint_lsb, a.dim()) - _chan(a_lsb, a.dim()), fmt)
    jb = requantize(b, _chan(joint_lsb, b.dim()) - _chan(b_lsb, b.dim()), fmt)
    s = ja + jb
    return apply_activation(requantize(s, _chan(out_lsb, s.dim()) - _chan(joint_lsb, s.dim()), fmt),
                            activation, clamp_max)


def concat(xs: Sequence[torch.Tensor], lsbs: Sequence[torch.Tensor | int],
           out_lsb: torch.Tensor | int, fmt: BFPFormat) -> torch.Tensor:
    """Rule E2, concat along channels: every branch is requantized onto the one output
    exponent (calibrated on the concatenated tensor), then concatenated. ``out_lsb`` is a
    scalar or per output channel."""
    out_l = torch.as_tensor(out_lsb, dtype=torch.int64).reshape(-1)
    total = sum(x.shape[1] for x in xs)
    out_l = out_l.expand(total) if out_l.numel() == 1 else out_l
    parts, start = [], 0
    for x, l in zip(xs, lsbs):
        c = x.shape[1]
        parts.append(requantize(x, _chan(out_l[start:start + c], x.dim()) - _chan(l, x.dim()), fmt))
        start += c
    return torch.cat(parts, dim=1)


def max_pool2d(x: torch.Tensor, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
    """Rule P1: max pooling on mantissas of one exponent; padded positions never win."""
    y = F.max_pool2d(x.to(torch.float64), kernel_size, stride, padding)
    return y.to(torch.int64)


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Rule P2: global average = sum over H×W divided by H·W, rounded half to even; the LSB
    exponent is unchanged. ``[N, C, H, W] -> [N, C]`` (a host step)."""
    n, c, h, w = x.shape
    return div_round_half_even(x.to(torch.int64).sum(dim=(2, 3)), h * w)


#: modes of a dual-precision conv (rules G1-G4): ``gated`` = Precision Gating (the LSB phase
#: runs where the MSB partial sum passes the threshold), ``msb`` = the low precision of DFS
#: (no LSB phase), ``full`` = every output gets its LSB phase (DFS full precision).
DP_MODES = ("gated", "msb", "full")


def split_msb_lsb(x: torch.Tensor, act_bits: int, msb_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rule G1: split unsigned ``act_bits``-bit activations into their top ``msb_bits`` bits
    ``x >> L`` and the rest ``x & (2**L - 1)``, ``L = act_bits - msb_bits``. Refuses values
    outside ``[0, 2**act_bits - 1]`` (the producer must clamp them, rule G0)."""
    if not 1 <= msb_bits < act_bits:
        raise ValueError(f"need 1 <= msb_bits < act_bits, got msb_bits={msb_bits}, act_bits={act_bits}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= (1 << act_bits)):
        raise ValueError(f"dual-precision input outside [0, {(1 << act_bits) - 1}] "
                         f"(min {int(x.min())}, max {int(x.max())})")
    lsb_bits = act_bits - msb_bits
    x = x.to(torch.int64)
    return torch.bitwise_right_shift(x, lsb_bits), torch.bitwise_and(x, (1 << lsb_bits) - 1)


def _gate(value: torch.Tensor, threshold: torch.Tensor | None, sign: torch.Tensor | None,
          mode: str) -> torch.Tensor:
    """Rules G3 / CG2: ``passed = sign[o] * value > threshold[o]`` (strict, integers) in mode
    ``gated``; everything passes in ``full``, nothing in ``msb``. ``value``: ``[N, O, H, W]``."""
    if mode != "gated":
        return torch.full_like(value, mode == "full", dtype=torch.bool)
    if threshold is None:
        raise ValueError("mode 'gated' needs a threshold per filter")
    o = value.shape[1]
    t = torch.as_tensor(threshold, dtype=torch.int64).reshape(-1).expand(o)
    s = (torch.ones(o, dtype=torch.int64) if sign is None
         else torch.as_tensor(sign, dtype=torch.int64).reshape(-1).expand(o))
    if bool(((s != 1) & (s != -1)).any()):
        raise ValueError("gate sign must be +1 or -1 per filter")
    return s[None, :, None, None] * value > t[None, :, None, None]


def dual_precision_conv2d(x: torch.Tensor, x_lsb: torch.Tensor | int, w: torch.Tensor,
                          w_lsb: torch.Tensor, bias: torch.Tensor | None, *, act_bits: int,
                          msb_bits: int, threshold: torch.Tensor | None = None,
                          sign: torch.Tensor | None = None, mode: str = "gated",
                          stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                          groups: int = 1
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer dual-precision conv (rules G1-G4): Precision Gating and DFS precisions.

    ``x``: unsigned ``act_bits``-bit activations ``[N, C, H, W]`` with LSB ``x_lsb``;
    ``w``/``w_lsb``/``bias`` as in :func:`conv2d_acc`. With ``L = act_bits - msb_bits``:

    * G2 MSB phase: ``acc_hb = conv(x >> L, w)`` (aligned, exact, no bias);
    * G3 gate: ``passed = sign[o] * (acc_hb << L) > threshold[o]``, strict, both integers in
      accumulator units (``sign`` is +1 or -1 per filter, default +1); mode ``msb``: nothing
      passes, ``full``: everything passes;
    * G4 result: ``acc = (acc_hb << L) + passed * acc_lb + bias`` with
      ``acc_lb = conv(x & (2**L - 1), w)``, so a passing output equals the plain conv.

    Returns ``(acc [N, O, Ho, Wo], passed (bool, same shape), acc_lsb [O])``.
    """
    if mode not in DP_MODES:
        raise ValueError(f"dual-precision mode must be one of {DP_MODES}, not {mode!r}")
    x_hb, x_lb = split_msb_lsb(x, act_bits, msb_bits)
    lsb_bits = act_bits - msb_bits
    acc_hb, acc_lsb = conv2d_acc(x_hb, x_lsb, w, w_lsb, None, stride, padding, groups)
    acc_lb, _ = conv2d_acc(x_lb, x_lsb, w, w_lsb, None, stride, padding, groups)
    hb = torch.bitwise_left_shift(acc_hb, lsb_bits)
    passed = _gate(hb, threshold, sign, mode)
    acc = hb + torch.where(passed, acc_lb, torch.zeros_like(acc_lb))
    if bias is not None:
        acc = acc + bias.to(torch.int64)[None, :, None, None]
    return acc, passed, acc_lsb


def cg_base_mask(out_channels: int, in_channels: int, partitions: int) -> torch.Tensor:
    """Rule CG1: the block-diagonal base path of Channel Gating, ``[O, C]`` bool.

    Output chunk ``j = o // (O/p)`` sees input chunk ``j``: ``mask[o, c] = (o // (O/p)) ==
    (c // (C/p))``. ``p`` must divide both ``O`` and ``C``."""
    p = int(partitions)
    if p < 1 or out_channels % p or in_channels % p:
        raise ValueError(f"Channel Gating needs partitions p >= 1 dividing O={out_channels} and "
                         f"C={in_channels}, got p={partitions}")
    o_chunk = torch.arange(out_channels) // (out_channels // p)
    c_chunk = torch.arange(in_channels) // (in_channels // p)
    return o_chunk[:, None] == c_chunk[None, :]


def channel_gated_conv2d(x: torch.Tensor, x_lsb: torch.Tensor | int, w: torch.Tensor,
                         w_lsb: torch.Tensor, bias: torch.Tensor | None, *, partitions: int,
                         threshold: torch.Tensor, sign: torch.Tensor | None = None,
                         mode: str = "gated", stride: int | Sequence[int] = 1,
                         padding: int | Sequence[int] = 0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer Channel Gating conv (rules CG1-CG3), dense groups only.

    * CG1 base phase: ``acc_base = conv(x, w * mask)`` over the block-diagonal base channels
      (:func:`cg_base_mask`), aligned as the full conv (anchored at the full filter's
      ``acc_lsb``), exact, no bias;
    * CG2 gate: ``passed = sign[o] * acc_base > threshold[o]``, strict, integers in accumulator
      units; mode ``full``: everything passes (the plain conv), ``msb``: nothing passes;
    * CG3 result: ``acc = acc_base + passed * acc_rest + bias``, ``acc_rest = conv(x, w * ~mask)``;
      a gated-off output keeps the base partial sum, not zero.

    ``x`` holds any integer mantissas (the dual engine needs them unsigned, rule G0).
    Returns ``(acc [N, O, Ho, Wo], passed (bool, same shape), acc_lsb [O])``.
    """
    if mode not in DP_MODES:
        raise ValueError(f"channel-gating mode must be one of {DP_MODES}, not {mode!r}")
    o, c = w.shape[0], w.shape[1]
    mask = cg_base_mask(o, c, partitions).reshape(o, c, 1, 1)
    w64 = w.to(torch.int64)
    acc_base, acc_lsb = conv2d_acc(x, x_lsb, w64 * mask, w_lsb, None, stride, padding)
    acc_rest, _ = conv2d_acc(x, x_lsb, w64 * ~mask, w_lsb, None, stride, padding)
    passed = _gate(acc_base, threshold, sign, mode)
    acc = acc_base + torch.where(passed, acc_rest, torch.zeros_like(acc_rest))
    if bias is not None:
        acc = acc + bias.to(torch.int64)[None, :, None, None]
    return acc, passed, acc_lsb


def fbs_active(saliency: torch.Tensor, density: float) -> torch.Tensor:
    """Rule FBS1, k-winners-take-all: ``k = ceil(d*C)``; with ``k = C`` every channel is
    active, else channel c is active iff ``g_c > tau`` (strict), ``tau`` the (k+1)-th largest
    saliency of the sample. Ties at ``tau`` are all inactive and a zero saliency is never
    active when ``k < C``, so at most ``k`` channels are active (d is an upper bound, as in
    FBS). ``saliency``: ``[N, C]`` (float or integer); returns bool ``[N, C]``."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"FBS density must be in (0, 1], got {density}")
    n, c = saliency.shape
    k = math.ceil(density * c - 1e-9)
    if k >= c:
        return torch.ones(n, c, dtype=torch.bool)
    tau = saliency.topk(k + 1, dim=1).values[:, k:k + 1]
    return (saliency > tau) & (saliency > 0)


def fbs_conv2d(x: torch.Tensor, x_lsb: torch.Tensor | int, w: torch.Tensor, w_lsb: torch.Tensor,
               bias: torch.Tensor | None, *, active: torch.Tensor, scale: torch.Tensor,
               stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer FBS conv accumulator (rules FBS2-FBS3), per sample.

    * FBS2: ``acc = conv(x, w)`` (aligned, exact, no bias); only the input channels that are
      nonzero matter, so an inactive input channel (exactly zero) may be skipped;
    * FBS3: ``acc_s = acc * scale[n, o] + bias[n, o]`` for an active output channel, 0 for an
      inactive one. ``scale`` is the quantized saliency ``g`` (unsigned integer, LSB
      ``scale_lsb``), ``bias`` (``[O]`` or per sample ``[N, O]``) is on the scaled accumulator
      LSB ``acc_lsb + scale_lsb``.

    Returns ``(acc_s [N, O, Ho, Wo], acc_lsb [O])``: requantize with
    ``out_lsb - acc_lsb - scale_lsb`` (rule R3), then the activation.
    """
    acc, acc_lsb = conv2d_acc(x, x_lsb, w, w_lsb, None, stride, padding)
    n, o = acc.shape[:2]
    act = torch.as_tensor(active, dtype=torch.bool).reshape(n, o)
    g = torch.as_tensor(scale, dtype=torch.int64).reshape(n, o)
    if bool((g < 0).any()):
        raise ValueError("FBS scale (quantized saliency) must be unsigned")
    b = (torch.zeros(n, o, dtype=torch.int64) if bias is None
         else torch.as_tensor(bias, dtype=torch.int64).reshape(-1, o).expand(n, o))
    acc_s = acc * g[:, :, None, None] + b[:, :, None, None]
    return torch.where(act[:, :, None, None], acc_s, torch.zeros_like(acc_s)), acc_lsb
