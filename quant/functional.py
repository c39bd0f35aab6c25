"""Stateless integer rules of the BFP arithmetic, shared by the golden model and fake-quant.

Every function here implements one named rule of ``docs/arithmetic.md``; the RTL implements
the same rule and is compared to :mod:`dynacc.quant.golden`, which is built from these.

Integer tensors are ``torch.int64``. Exponents are LSB exponents unless a name says
``shared``: a mantissa ``m`` with LSB exponent ``lsb`` stands for ``m * 2**lsb``.
"""

from __future__ import annotations

import torch

from .formats import BFPFormat, WeightBlocking

__all__ = [
    "element_exponent",
    "shift_round_half_even",
    "div_round_half_even",
    "saturate",
    "requantize",
    "quantize",
    "dequantize",
    "fake_quantize",
    "tensor_shared_exponent",
    "weight_block_exponents",
    "quantize_weight",
    "quantize_bias",
]


def element_exponent(x: torch.Tensor) -> torch.Tensor:
    """Rule Q1: ``floor(log2|x|)`` read from the float exponent field (``frexp``), never
    from a float ``log2`` (which rounds up just below powers of two). ``x == 0`` gives a very
    small sentinel (-(2**30)) so that a max over a block ignores zeros."""
    mant, exp = torch.frexp(x)
    e = exp.to(torch.int64) - 1
    return torch.where(mant == 0, torch.full_like(e, -(1 << 30)), e)


def shift_round_half_even(v: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """Rule R1: ``v * 2**-shift`` rounded half to even, exactly, in integers.

    ``shift > 0`` divides (arithmetic right shift plus a round-half-even correction from the
    discarded bits), ``shift <= 0`` multiplies exactly (left shift). ``shift`` broadcasts.
    Right shifts are capped at 62: exact for ``|v| < 2**61`` (the result is then 0).
    """
    v = v.to(torch.int64)
    s = torch.as_tensor(shift, dtype=torch.int64).expand_as(v) if not isinstance(shift, int) \
        else torch.full_like(v, shift)
    s = s.clamp(max=62)
    pos = s > 0
    sr = torch.where(pos, s, torch.zeros_like(s))
    q = torch.bitwise_right_shift(v, sr)  # floor division by 2**sr for negatives too
    rem = v - torch.bitwise_left_shift(q, sr)
    half = torch.where(pos, torch.bitwise_left_shift(torch.ones_like(sr), (sr - 1).clamp(min=0)),
                       torch.zeros_like(sr))
    up = pos & ((rem > half) | ((rem == half) & (q & 1 == 1)))
    q = q + up.to(torch.int64)
    sl = torch.where(pos, torch.zeros_like(s), -s)
    return torch.where(pos, q, torch.bitwise_left_shift(v, sl))


def div_round_half_even(v: torch.Tensor, n: int) -> torch.Tensor:
    """Rule R2: ``v / n`` rounded half to even in integers (average pooling, n > 0)."""
    if n <= 0:
        raise ValueError(f"divisor must be positive, not {n!r}")
    v = v.to(torch.int64)
    q = torch.div(v, n, rounding_mode="floor")
    r = v - q * n
    up = (2 * r > n) | ((2 * r == n) & (q % 2 == 1))
    return q + up.to(torch.int64)


def saturate(m: torch.Tensor, fmt: BFPFormat) -> torch.Tensor:
    """Rule S1: clamp to the symmetric mantissa range ``±(2**(M-1) - 1)``."""
    return m.clamp(-fmt.max_mantissa, fmt.max_mantissa)


def requantize(v: torch.Tensor, shift: torch.Tensor | int, fmt: BFPFormat) -> torch.Tensor:
    """Rule R3: round (R1) then saturate (S1). Moves an integer from LSB exponent ``L`` to
    ``L + shift``. Used for every output, residual alignment and concat realignment.

    Left shifts are capped at ``M - 1``: any non-zero value shifted that far saturates anyway,
    so the result is unchanged and int64 never wraps (the RTL does the same)."""
    s = torch.as_tensor(shift, dtype=torch.int64).clamp(min=-(fmt.mantissa_bits - 1))
    return saturate(shift_round_half_even(v, s), fmt)


def quantize(x: torch.Tensor, lsb: torch.Tensor | int, fmt: BFPFormat) -> torch.Tensor:
    """Rule Q2: float -> mantissa at LSB exponent ``lsb``: ``round_half_even(x * 2**-lsb)``
    then saturate. The scaling is exact (``ldexp`` in float64)."""
    lsb_t = torch.as_tensor(lsb, dtype=torch.int64)
    scaled = torch.ldexp(x.to(torch.float64), (-lsb_t).to(torch.float64))
    return saturate(torch.round(scaled).to(torch.int64), fmt)


def dequantize(m: torch.Tensor, lsb: torch.Tensor | int) -> torch.Tensor:
    """``m * 2**lsb`` as float32 (exact for |m| < 2**24)."""
    lsb_t = torch.as_tensor(lsb, dtype=torch.int64)
    return torch.ldexp(m.to(torch.float64), lsb_t.to(torch.float64)).to(torch.float32)


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lsb: torch.Tensor, fmt: BFPFormat) -> torch.Tensor:  # type: ignore[override]
        return dequantize(quantize(x, lsb, fmt), lsb).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None


def fake_quantize(x: torch.Tensor, lsb: torch.Tensor | int, fmt: BFPFormat) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (training and float checks)."""
    return _FakeQuantizeSTE.apply(x, torch.as_tensor(lsb, dtype=torch.int64), fmt)


def tensor_shared_exponent(x: torch.Tensor, fmt: BFPFormat) -> int:
    """Rule Q3: max element exponent over the whole tensor, clamped to the E-bit range; an
    all-zero tensor takes the minimum exponent."""
    e = int(element_exponent(x.detach().reshape(-1)).max()) if x.numel() else fmt.min_exponent
    return max(fmt.min_exponent, min(fmt.max_exponent, e))


def weight_block_exponents(w: torch.Tensor, fmt: BFPFormat, blocking: WeightBlocking
                           ) -> torch.Tensor:
    """Rules W1-W3: shared exponent of every weight block, shape ``[O, n_blocks]``.

    ``w`` is ``[O, C, kh, kw]`` (or ``[O, C]``). W1: a block is one filter × ``group`` input
    channels × kh × kw, the last block of a filter may be shorter (tail block). W2: its
    exponent is the max element exponent, clamped to the E-bit range; an all-zero block
    takes the minimum exponent. W3: exponents below ``filter max - align_span`` are raised to
    it; an all-zero filter takes the largest exponent of the layer, so its bias keeps a
    useful LSB.
    """
    w4 = w.detach().reshape(w.shape[0], w.shape[1], -1)
    o, c, _ = w4.shape
    g = c if blocking.group == -1 else blocking.group
    n_blocks = -(-c // g)
    el = element_exponent(w4.to(torch.float64))  # [O, C, K]
    pad = n_blocks * g - c
    if pad:
        el = torch.cat([el, torch.full((o, pad, el.shape[2]), -(1 << 30), dtype=torch.int64)], 1)
    blk = el.reshape(o, n_blocks, -1).amax(dim=2)
    zero = blk < fmt.min_exponent - (1 << 20)
    blk = blk.clamp(fmt.min_exponent, fmt.max_exponent)
    blk = torch.where(zero, torch.full_like(blk, fmt.min_exponent), blk)
    filt_zero = zero.all(dim=1)
    filt_max = blk.amax(dim=1)
    layer_max = int(filt_max[~filt_zero].max()) if (~filt_zero).any() else 0
    filt_max = torch.where(filt_zero, torch.full_like(filt_max, layer_max), filt_max)
    floor = (filt_max - blocking.align_span).clamp(min=fmt.min_exponent)
    blk = torch.maximum(blk, floor[:, None])
    blk = torch.where(filt_zero[:, None], filt_max[:, None].expand_as(blk), blk)
    return blk


def quantize_weight(w: torch.Tensor, fmt: BFPFormat, blocking: WeightBlocking
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a weight tensor to BFP.

    Returns ``(mantissas, block_exponents, lsb)``: int64 mantissas shaped like ``w``, shared
    exponents ``[O, n_blocks]`` and the per-(filter, input channel) LSB exponent ``[O, C]``
    that the golden conv consumes.
    """
    blk = weight_block_exponents(w, fmt, blocking)
    c = w.shape[1]
    g = c if blocking.group == -1 else blocking.group
    per_c = blk.repeat_interleave(g, dim=1)[:, :c] - fmt.lsb_offset  # [O, C]
    shape = (w.shape[0], c) + (1,) * (w.dim() - 2)
    m = quantize(w.detach(), per_c.reshape(shape), fmt)
    return m, blk, per_c


def quantize_bias(b: torch.Tensor, acc_lsb: torch.Tensor, acc_bits: int = 48) -> torch.Tensor:
    """Rule B1: the bias is rounded half to even onto the accumulator LSB of its output
    channel (``acc_lsb[o]``) and saturated to a signed ``acc_bits`` container."""
    v = torch.round(torch.ldexp(b.detach().to(torch.float64), (-acc_lsb).to(torch.float64)))
    lim = float((1 << (acc_bits - 1)) - 1)
    return v.clamp(-lim, lim).to(torch.int64)
