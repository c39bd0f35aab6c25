"""Channel Gating (CG) building blocks: :class:`CGConv2d`, the partition check, the gating
loss and the FLOP accounting.

Deployable variant of CG (Hua et al., NeurIPS 2019; notes in algorithms.md §2b):

* ``p`` partitions with the block-diagonal base path of rule CG1 (:func:`~dynacc.quant.golden.
  cg_base_mask`): output chunk ``j`` sees input chunk ``j``, i.e. ``C/p`` of its ``C`` inputs;
* partial sum ``Y_p = conv(x, Ŵ⊙M)``, decision ``d = [BN_na(Y_p) > Δ_c]`` with a non-affine
  BatchNorm (batch statistics in training, running ones at eval) and a sigmoid straight-through
  estimator of slope α = 2;
* ``out = d⊙Y + (1 − d)⊙Y_p = Y_p + d⊙conv(x, Ŵ⊙¬M)`` (rule CG3 on float values): a gated-off
  output keeps its partial sum;
* the input is the unsigned ``act_bits`` output of a quantizing PACT (static ``2^lsb`` scale,
  rules G0/PG1), because CG runs on the dual-precision engine; weights are BFP fake-quantized
  as in Precision Gating.

Units: Δ is in units of the normalized partial sum ``z = BN_na(Y_p)``; MACs are multiply-adds.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import golden
from .formats import BFPFormat, QuantConfig
from .pg import _GateSTE, _WeightFQ, check_pg_bits

__all__ = ["CG_GATE_SLOPE", "CG_THRESHOLD_INIT", "check_cg_partitions", "CGConv2d", "cg_layers",
           "cg_gating_loss", "cg_flop_summary"]

#: α of the sigmoid straight-through estimator of the CG decision (``--alpha`` of CG's code).
CG_GATE_SLOPE = 2.0
#: class default of the threshold Δ in CG's code (its training script passes ``-gi 0.0``).
CG_THRESHOLD_INIT = -6.0


def check_cg_partitions(partitions: int, layers: Iterable[tuple[str, int, int]]) -> None:
    """Refuse a partition count that is not an integer ``p >= 1`` dividing the input and output
    channels ``(name, C, O)`` of every CG layer (rule CG1); the error names the layer."""
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"Channel Gating partitions must be an integer >= 1, not {partitions!r}")
    for name, c, o in layers:
        if c % partitions or o % partitions:
            raise ValueError(f"partitions p={partitions} does not divide the channels of CG layer "
                             f"{name!r} (C={c} inputs, O={o} outputs)")


class CGConv2d(nn.Conv2d):
    """Channel-gated conv (algorithms.md §2b.1, rules CG1-CG3 on float values), no bias.

    ``forward(x, x_lsb)``: ``x`` holds unsigned ``act_bits``-bit integers times ``2^x_lsb`` (the
    output of a quantizing PACT; ``x_lsb = None`` skips the range check). With ``Ŵ`` the BFP
    fake-quantized weight and ``M`` the base mask: ``Y_p = conv(x, Ŵ⊙M)`` (computed as a
    ``groups = p`` conv of the block-diagonal weights), ``Y_r = conv(x, Ŵ) − Y_p`` (the other
    channels), ``d = [BN_na(Y_p) > Δ_c]`` (STE slope ``gate_slope``, optional
    sparse back-prop: no gate gradient where ``d = 0``), output ``Y_p + d⊙Y_r``. ``threshold``
    Δ is per output channel.

    After each forward ``last_gate`` holds ``(#d=1, #outputs)`` of that batch (ints).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, *, partitions: int = 4, act_bits: int = 8,
                 cfg: QuantConfig | None = None, sparse_bp: bool = True,
                 gate_slope: float = CG_GATE_SLOPE, threshold_init: float = CG_THRESHOLD_INIT,
                 name: str = "") -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=padding, bias=False)
        self.cfg = cfg if cfg is not None else QuantConfig(fmt=BFPFormat(9, 8), method="max")
        check_pg_bits(act_bits, None, self.cfg.fmt, name)
        check_cg_partitions(partitions, [(name or "CGConv2d", in_channels, out_channels)])
        self.partitions, self.act_bits = partitions, act_bits
        self.sparse_bp, self.gate_slope = sparse_bp, gate_slope
        mask = golden.cg_base_mask(out_channels, in_channels, partitions)   # [O, C] bool
        self.register_buffer("base_mask", mask, persistent=False)
        self.bn_gate = nn.BatchNorm2d(out_channels, affine=False)
        self.threshold = nn.Parameter(torch.full((out_channels,), float(threshold_init)))
        self.last_gate: tuple[int, int] = (0, 0)

    def quantized_weight(self) -> torch.Tensor:
        """The BFP fake-quantized weight Ŵ (straight-through gradient)."""
        return _WeightFQ.apply(self.weight, self.cfg.fmt, self.cfg.weights)

    def base_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The base weights ``[O, C/p, kh, kw]`` of ``w`` under the block-diagonal mask (rule
        CG1): filter o keeps its input chunk ``o // (O/p)``, the weight of a ``groups = p``
        conv."""
        o, c = w.shape[:2]
        return w[self.base_mask].reshape(o, c // self.partitions, *w.shape[2:])

    def _check_input(self, x: torch.Tensor, x_lsb: int) -> None:
        top = float((1 << self.act_bits) - 1) * 2.0 ** x_lsb
        x = x.detach()
        if x.numel() and (float(x.min()) < 0 or float(x.max()) > top):
            raise ValueError(f"CGConv2d input outside [0, {(1 << self.act_bits) - 1}]·2^{x_lsb}: "
                             f"the producer must be a PACT with act_bits={self.act_bits}")

    def forward(self, x: torch.Tensor, x_lsb: int | None = None) -> torch.Tensor:  # type: ignore[override]
        if x_lsb is not None:
            self._check_input(x, x_lsb)
        w = self.quantized_weight()
        y_base = F.conv2d(x, self.base_weight(w), None, self.stride, self.padding,
                          groups=self.partitions)
        y_rest = F.conv2d(x, w, None, self.stride, self.padding) - y_base
        z = self.bn_gate(y_base)
        d = _GateSTE.apply(z - self.threshold.to(z.dtype)[None, :, None, None],
                           self.gate_slope, self.sparse_bp)
        self.last_gate = (int(d.detach().sum()), d.numel())
        return y_base + d * y_rest

    @torch.no_grad()
    def gate_offset(self) -> torch.Tensor:
        """``θ_c = Δ_c·√(var_c + ε) + μ_c`` (float64 ``[O]``, running statistics of ``bn_gate``):
        at eval ``BN_na(Y_p) > Δ_c ⟺ Y_p > θ_c`` (the square root is positive), the gate on the
        raw partial sum that the integer program folds (rule CG5)."""
        bn = self.bn_gate
        std = torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)
        return self.threshold.detach().to(torch.float64) * std + bn.running_mean.to(torch.float64)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", partitions={self.partitions}, "
                f"act_bits={self.act_bits}, M={self.cfg.fmt.mantissa_bits}, "
                f"sparse_bp={self.sparse_bp}")


def cg_layers(model: nn.Module) -> list[tuple[str, CGConv2d]]:
    """``(name, module)`` of every :class:`CGConv2d` of ``model``, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CGConv2d)]


def cg_gating_loss(model: nn.Module, target: float, sigma_g: float = 1e-4) -> torch.Tensor:
    """``σ_g · Σ_layers Σ_c (Δ_{l,c} − target)²``: CG's gating loss is **squared** (PG's is not)."""
    terms = [((m.threshold - target) ** 2).sum() for _, m in cg_layers(model)]
    if not terms:
        return torch.zeros(())
    return sigma_g * torch.stack(terms).sum()


def cg_flop_summary(dense_macs: dict[str, int], gates: dict[str, dict[str, int]]
                    ) -> dict[str, object]:
    """FLOP accounting of a CG network over a set of images (rule CG7).

    ``dense_macs``: MACs of every conv/linear layer without gating, summed over the images;
    ``gates``: per CG layer ``{"passed", "total"}`` output counts and its ``"partitions"`` p.
    A CG output costs ``1/p`` of
    its dense MACs in the base phase plus ``1 − 1/p`` where its gate passed, so a CG layer's
    FLOP ratio is ``1/p + (1 − 1/p)(1 − Sp)``. Returns ``sparsity`` (``Sp = 1 − Σpassed/Σtotal``
    over the CG layers), ``cg_flop_reduction`` (dense / gated MACs of the CG layers),
    ``flop_reduction`` (dense / gated MACs of the whole network, other layers dense) and
    ``layers`` (per CG layer: passed, total, sparsity, flop_ratio).
    """
    layers: dict[str, dict[str, float]] = {}
    cg_dense = cg_gated = 0.0
    for name, g in gates.items():
        base = 1.0 / g["partitions"]
        on = g["passed"] / max(g["total"], 1)
        ratio = base + (1.0 - base) * on
        layers[name] = {"passed": g["passed"], "total": g["total"], "sparsity": 1.0 - on,
                        "flop_ratio": ratio}
        cg_dense += dense_macs[name]
        cg_gated += dense_macs[name] * ratio
    other = sum(v for k, v in dense_macs.items() if k not in gates)
    passed = sum(g["passed"] for g in gates.values())
    total = sum(g["total"] for g in gates.values())
    return {"sparsity": 1.0 - passed / max(total, 1),
            "cg_flop_reduction": cg_dense / cg_gated if cg_gated else 1.0,
            "flop_reduction": (cg_dense + other) / (cg_gated + other) if cg_gated + other else 1.0,
            "layers": layers}
