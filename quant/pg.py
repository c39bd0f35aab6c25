"""Precision Gating (PG) building blocks: PACT, the static unsigned activation quantizer,
:class:`PGConv2d` and the gating loss.

Deployable variant of PG (Zhang et al., ICLR 2020; notes in algorithms.md §2a):

* activations feeding a PG conv are **unsigned b-bit integers with one static power-of-two
  scale** per tensor, ``lsb = ceil(log2(α / (2^b − 1)))`` derived from the PACT clip α, instead
  of PG's batch-max scale (rule G0 of docs/arithmetic.md). Train and eval compute the same thing,
  and so does the integer program;
* weights are fake-quantized with the project's BFP weight quantizer (rules W1-W3, Q2);
* the MSB/LSB split, the gate and the output follow rules G1-G4 on the float values:
  ``O = O_hb + [O_hb > δ]·O_lb``.

Units: ``x_lsb`` and ``lsb`` are LSB exponents (a value ``q`` stands for ``q·2^lsb``); δ is in
the units of the raw (pre-BN) conv output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .formats import BFPFormat, QuantConfig, WeightBlocking
from .functional import dequantize, quantize_weight

__all__ = ["GATE_SLOPE", "check_pg_bits", "pact_lsb", "pact_clamp_max", "quantize_unsigned", "PACT",
           "PGConv2d", "gating_loss", "pg_layers"]

#: α_g of the sigmoid straight-through estimator of the gate (hard-coded 5 in PG's code).
GATE_SLOPE = 5.0


def check_pg_bits(act_bits: int, msb_bits: int | None = None, fmt: BFPFormat | None = None,
                where: str = "") -> None:
    at = f" ({where})" if where else ""
    if isinstance(act_bits, bool) or not isinstance(act_bits, int) or act_bits < 2:
        raise ValueError(f"act_bits must be an integer >= 2, not {act_bits!r}{at}")
    if fmt is not None and act_bits > fmt.mantissa_bits - 1:
        raise ValueError(f"act_bits={act_bits} does not fit the M={fmt.mantissa_bits}-bit "
                         f"activation word: need act_bits <= M-1 = {fmt.mantissa_bits - 1}{at}")
    if msb_bits is not None and (isinstance(msb_bits, bool) or not isinstance(msb_bits, int)
                                 or not 1 <= msb_bits < act_bits):
        raise ValueError(f"msb_bits must be in [1, act_bits-1] = [1, {act_bits - 1}], "
                         f"not {msb_bits!r}{at}")


def pact_lsb(alpha: float, act_bits: int) -> int:
    """Static LSB exponent of a PACT-clipped unsigned ``act_bits`` activation: the smallest
    integer ``l`` with ``(2^b − 1)·2^l >= α``, i.e. ``ceil(log2(α / (2^b − 1)))``.

    Computed exactly (products by powers of two are exact in float64), never with a float
    ``log2``. ``α`` must be positive."""
    a = float(alpha)
    if not a > 0 or math.isinf(a):
        raise ValueError(f"PACT clip alpha must be positive and finite, not {alpha!r}")
    top = float((1 << act_bits) - 1)
    _, k = math.frexp(a / top)
    l = k
    while math.ldexp(top, l - 1) >= a:
        l -= 1
    while math.ldexp(top, l) < a:
        l += 1
    return l


def pact_clamp_max(alpha: float, act_bits: int) -> int:
    """Integer saturation of the quantized PACT output: ``round_half_even(α / 2^lsb)``, which
    is ``<= 2^b − 1`` by the choice of ``lsb`` (rule G0; the deployed ``clamp_max``)."""
    lsb = pact_lsb(alpha, act_bits)
    return int(torch.round(torch.tensor(math.ldexp(float(alpha), -lsb), dtype=torch.float64)))


def quantize_unsigned(y: torch.Tensor, lsb: int, act_bits: int) -> torch.Tensor:
    """``clamp(round_half_even(y / 2^lsb), 0, 2^b − 1)`` as int64 (the integer the program
    sees; scaling is exact)."""
    q = torch.round(torch.ldexp(y.detach().to(torch.float64),
                                torch.tensor(float(-lsb), dtype=torch.float64)))
    return q.clamp(0, (1 << act_bits) - 1).to(torch.int64)


class PACT(nn.Module):
    """PACT clip ``y = clamp(x, 0, α)`` with one learnable α, optionally followed by the static
    unsigned quantizer.

    Gradients (algorithms.md §2a.2): ``∂y/∂x = 1`` on ``[0, α]``, else 0; ``∂y/∂α`` = sum of the
    upstream gradient where ``x > α``. With ``act_bits`` set, the output is
    ``q·2^lsb`` with ``q = clamp(round_half_even(y/2^lsb), 0, 2^b − 1)`` and
    ``lsb = pact_lsb(α, b)``, with a straight-through gradient (α gets its gradient only
    through the clip). Without ``act_bits`` it is a float clipped ReLU.
    """

    def __init__(self, alpha: float = 6.0, act_bits: int | None = None) -> None:
        super().__init__()
        if act_bits is not None:
            check_pg_bits(act_bits)
        if not alpha > 0:
            raise ValueError(f"PACT alpha must be positive, not {alpha!r}")
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.act_bits = act_bits

    def lsb(self) -> int:
        """Current static LSB exponent (needs ``act_bits``)."""
        if self.act_bits is None:
            raise ValueError("this PACT does not quantize (act_bits is None)")
        return pact_lsb(float(self.alpha.detach().abs()), self.act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.abs().to(x.dtype)
        y = torch.where(x > a, a, F.relu(x))
        if self.act_bits is None:
            return y
        lsb = self.lsb()
        q = quantize_unsigned(y, lsb, self.act_bits)
        return y + (dequantize(q, lsb).to(y.dtype) - y).detach()

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha.detach()):.4g}, act_bits={self.act_bits}"


class _WeightFQ(torch.autograd.Function):
    """BFP weight fake-quant (rules W1-W3, Q2) with a straight-through gradient."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, fmt: BFPFormat, blocking: WeightBlocking):  # type: ignore[override]
        m, _, per_c = quantize_weight(w.detach(), fmt, blocking)
        shape = per_c.shape + (1,) * (w.dim() - 2)
        return dequantize(m, per_c.reshape(shape)).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None


class _GateSTE(torch.autograd.Function):
    """Hard gate ``[d > 0]`` forward, ``α_g·σ'(α_g·d)`` backward (sigmoid STE); with sparse
    back-prop the gradient is zeroed where the gate is closed (σ < 0.5)."""

    @staticmethod
    def forward(ctx, d: torch.Tensor, slope: float, sparse_bp: bool):  # type: ignore[override]
        mask = d > 0
        ctx.save_for_backward(d, mask)
        ctx.slope, ctx.sparse_bp = slope, sparse_bp
        return mask.to(d.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        d, mask = ctx.saved_tensors
        s = torch.sigmoid(ctx.slope * d)
        g = grad * ctx.slope * s * (1 - s)
        if ctx.sparse_bp:
            g = g * mask.to(g.dtype)
        return g, None, None


class PGConv2d(nn.Conv2d):
    """Precision-gated conv (algorithms.md §2a.3, rules G1-G4 on float values), no bias.

    ``forward(x, x_lsb)``: ``x`` holds unsigned ``act_bits``-bit integers times ``2^x_lsb``
    (the output of a quantizing :class:`PACT`). With ``L = act_bits − msb_bits``:
    ``A_hb = floor(q / 2^L)·2^L·2^x_lsb``, ``A_lb = x − A_hb``; ``O_hb = conv(A_hb, Ŵ)``,
    ``O_lb = conv(A_lb, Ŵ)`` with ``Ŵ`` the BFP fake-quantized weight (M from ``cfg``);
    mask ``= [O_hb > δ_c]`` (sigmoid STE, slope :data:`GATE_SLOPE`, optional sparse back-prop);
    ``O = O_hb + mask·O_lb``. ``δ`` (``threshold``, per output channel) starts at 0.

    After each forward ``last_gate`` holds ``(#mask=1, #outputs)`` of that batch (ints) for
    the update-sparsity statistics.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, *, act_bits: int = 3, msb_bits: int = 2,
                 cfg: QuantConfig | None = None, sparse_bp: bool = True,
                 gate_slope: float = GATE_SLOPE) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=padding, bias=False)
        self.cfg = cfg if cfg is not None else QuantConfig(fmt=BFPFormat(9, 8), method="max")
        check_pg_bits(act_bits, msb_bits, self.cfg.fmt)
        self.act_bits, self.msb_bits = act_bits, msb_bits
        self.sparse_bp, self.gate_slope = sparse_bp, gate_slope
        self.threshold = nn.Parameter(torch.zeros(out_channels))
        self.last_gate: tuple[int, int] = (0, 0)

    def quantized_weight(self) -> torch.Tensor:
        """The BFP fake-quantized weight Ŵ (straight-through gradient)."""
        return _WeightFQ.apply(self.weight, self.cfg.fmt, self.cfg.weights)

    def split(self, x: torch.Tensor, x_lsb: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_hb, A_lb)`` of rule G1 on float values; ``A_hb`` passes the gradient straight
        through, so ``A_lb = x − A_hb`` carries none."""
        q = torch.round(torch.ldexp(x.detach().to(torch.float64),
                                    torch.tensor(float(-x_lsb), dtype=torch.float64)))
        top = (1 << self.act_bits) - 1
        if q.numel() and (float(q.min()) < 0 or float(q.max()) > top):
            raise ValueError(f"PGConv2d input outside [0, {top}]·2^{x_lsb}: the producer must be "
                             f"a PACT with act_bits={self.act_bits}")
        l = self.act_bits - self.msb_bits
        hb = torch.ldexp(torch.floor(torch.ldexp(q, torch.tensor(float(-l), dtype=torch.float64))),
                         torch.tensor(float(l + x_lsb), dtype=torch.float64)).to(x.dtype)
        a_hb = x + (hb - x).detach()
        return a_hb, x - a_hb

    def forward(self, x: torch.Tensor, x_lsb: int) -> torch.Tensor:  # type: ignore[override]
        w = self.quantized_weight()
        a_hb, a_lb = self.split(x, x_lsb)
        o_hb = F.conv2d(a_hb, w, None, self.stride, self.padding)
        o_lb = F.conv2d(a_lb, w, None, self.stride, self.padding)
        mask = _GateSTE.apply(o_hb - self.threshold.to(o_hb.dtype)[None, :, None, None],
                              self.gate_slope, self.sparse_bp)
        self.last_gate = (int(mask.detach().sum()), mask.numel())
        return o_hb + mask * o_lb

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", act_bits={self.act_bits}, msb_bits={self.msb_bits}, "
                f"M={self.cfg.fmt.mantissa_bits}, sparse_bp={self.sparse_bp}")


def pg_layers(model: nn.Module) -> list[tuple[str, PGConv2d]]:
    """``(name, module)`` of every :class:`PGConv2d` of ``model``, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PGConv2d)]


def gating_loss(model: nn.Module, target: float, sigma_g: float = 1e-3) -> torch.Tensor:
    """``σ_g · Σ_layers ‖δ_l − target‖₂`` (unsquared L2 over each layer's channel vector)."""
    terms = [torch.linalg.vector_norm(m.threshold - target) for _, m in pg_layers(model)]
    if not terms:
        return torch.zeros(())
    return sigma_g * torch.stack(terms).sum()
