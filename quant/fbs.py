"""Feature Boosting and Suppression (FBS): :class:`FBSConv2d`, the gated network
:class:`FBSGatedCNN` and the FBS MAC accounting.

Deployable variant of FBS (Gao et al., ICLR 2019; mayo's "parametric" policy, notes in
algorithms.md §3.1). For a conv with input ``x`` (``C_in`` channels) and ``C`` outputs:

* subsample ``s = mean_{H,W} x`` ``[N, C_in]``;
* saliency ``g = ReLU(φ·s + ρ)`` ``[N, C]`` (φ truncated-normal σ 0.05, ρ = 1);
* the saliency is quantized as the program quantizes it: ``g_q = clamp(round_half_even(g /
  2^l), 0, 2^8 − 1)`` with ``l`` the smallest exponent with ``(2^8 − 1)·2^l >= max g`` (the
  batch max in training, its moving average in eval; the program calibrates its own). The forward
  uses ``g_q·2^l`` with a straight-through gradient. Without it the float model ranks
  channels by saliency differences far below the 8-bit step (g starts at ρ = 1 ± a few %),
  and the program's decisions, ties included, would not be the ones it was trained with;
* k-WTA ``π = golden.fbs_active(g_q, d)`` on the integers: ``k = ⌈d·C⌉``, strict ``>``
  against the (k+1)-th largest, ties inactive, a zero saliency never active (rule FBS1). π
  is a constant of the graph (stop-gradient); g gets its gradient through the product;
* ``y = π⊙g⊙BN_na(conv(x)) + π⊙β`` with BN without affine parameters (g plays γ per image,
  β is learned, init 0.1);
* the activation: a quantizing PACT to **unsigned 8-bit** on its static scale (rule PG1,
  :class:`~dynacc.quant.pg.PACT`), because the dual-precision engine takes unsigned
  activations (rule G0). An inactive channel is exactly 0, so the next layer can skip it.

Weights stay float in training (the program quantizes them to BFP after folding BN_na); the
program calibrates its own saliency scales on the integer network (``quant/fbs_program.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .golden import fbs_active
from .models.fbs_cnn import FBS_CNN_LAYERS, FBSCNN
from .pg import PACT, pact_lsb, quantize_unsigned

__all__ = ["FBS_ACT_BITS", "FBS_SCALE_BITS", "check_density", "FBSConv2d", "FBSGatedCNN",
           "fbs_layers", "fbs_from_dense", "saliency_l1", "ConvGeometry", "conv_geometries",
           "fbs_mac_counts"]

#: activation bits of every FBS conv input (unsigned, rule G0).
FBS_ACT_BITS = 8
#: bits of the quantized saliency g_q (unsigned).
FBS_SCALE_BITS = 8


def check_density(density: float, where: str = "") -> float:
    """``density`` as a float in (0, 1]; ``ValueError`` naming ``where`` otherwise."""
    at = f" ({where})" if where else ""
    if isinstance(density, bool) or not isinstance(density, (int, float)) \
            or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"FBS density must be in (0, 1], not {density!r}{at}")
    return float(density)


class FBSConv2d(nn.Module):
    """FBS-gated conv + BN_na + quantizing PACT (see the module docstring).

    ``density`` (d) is an attribute, changed between fine-tuning steps. After each forward
    ``last_saliency`` (g, with gradient) and ``last_active`` (π, float 0/1) hold the batch's
    values, for the regulariser and the statistics.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int = 1, *, density: float = 1.0,
                 act_bits: int = FBS_ACT_BITS, alpha: float = 6.0, beta_init: float = 0.1,
                 rho_init: float = 1.0, phi_std: float = 0.05) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, affine=False)
        self.phi = nn.Parameter(torch.empty(out_channels, in_channels))
        nn.init.trunc_normal_(self.phi, std=phi_std, a=-2 * phi_std, b=2 * phi_std)
        self.rho = nn.Parameter(torch.full((out_channels,), float(rho_init)))
        self.beta = nn.Parameter(torch.full((out_channels,), float(beta_init)))
        self.act = PACT(alpha, act_bits)
        self.density = check_density(density)
        self.scale_bits = FBS_SCALE_BITS
        #: moving average (momentum 0.1) of the batch max of g: the eval-mode saliency scale
        self.register_buffer("saliency_max", torch.zeros(()))
        self.last_saliency: torch.Tensor | None = None
        self.last_active: torch.Tensor | None = None

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        """``g = ReLU(φ·mean_{H,W}(x) + ρ)``, ``[N, C_out]``."""
        return F.relu(F.linear(x.mean(dim=(2, 3)), self.phi, self.rho))

    def saliency_lsb(self, g: torch.Tensor) -> int:
        """LSB exponent of the quantized saliency: from the batch max of ``g`` in training
        (which also updates ``saliency_max``), from ``saliency_max`` in eval."""
        top = float(g.detach().max()) if g.numel() else 0.0
        if self.training:
            old = float(self.saliency_max)
            self.saliency_max.fill_(top if old == 0.0 else 0.9 * old + 0.1 * top)
        else:
            top = float(self.saliency_max) or top
        return pact_lsb(top, self.scale_bits) if top > 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g_float = self.saliency(x)
        lsb = self.saliency_lsb(g_float)
        g_q = quantize_unsigned(g_float, lsb, self.scale_bits)
        g = g_float + (torch.ldexp(g_q.to(g_float.dtype),
                                   torch.tensor(float(lsb), dtype=g_float.dtype))
                       - g_float).detach()
        pi = fbs_active(g_q, self.density).to(g.dtype)
        y = self.bn(self.conv(x))
        y = (pi * g)[:, :, None, None] * y + (pi * self.beta)[:, :, None, None]
        self.last_saliency, self.last_active = g, pi
        return self.act(y)

    def base_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters (frozen during the warm-up): the conv weight."""
        return [self.conv.weight]

    def gate_parameters(self) -> list[nn.Parameter]:
        """The predictor and β (φ, ρ, β)."""
        return [self.phi, self.rho, self.beta]

    def extra_repr(self) -> str:
        return f"density={self.density:g}"


class FBSGatedCNN(nn.Module):
    """:class:`~dynacc.quant.models.fbs_cnn.FBSCNN` with every conv an :class:`FBSConv2d`.

    The image first passes the input quantizer ``input_act(x + input_offset)``: a frozen
    quantizing PACT (unsigned 8-bit, static scale) after a constant offset that makes the
    images non-negative (for the digits it is ``mean/std`` of the standardisation, so the
    background is exactly 0 and zero padding stays the background). Then ``conv1..conv8``,
    global average pooling and the (ungated) ``fc``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, *, density: float = 1.0,
                 input_offset: float = 0.0, input_alpha: float = 4.0, alpha: float = 6.0,
                 act_bits: int = FBS_ACT_BITS) -> None:
        super().__init__()
        self.register_buffer("input_offset", torch.tensor(float(input_offset)))
        self.input_act = PACT(input_alpha, act_bits)
        self.input_act.alpha.requires_grad_(False)
        c_in = in_channels
        for i, (c_out, stride) in enumerate(FBS_CNN_LAYERS, start=1):
            setattr(self, f"conv{i}", FBSConv2d(c_in, c_out, 3, stride, 1, density=density,
                                                act_bits=act_bits, alpha=alpha))
            c_in = c_out
        self.fc = nn.Linear(c_in, num_classes)

    def convs(self) -> list[FBSConv2d]:
        return [getattr(self, f"conv{i}") for i in range(1, len(FBS_CNN_LAYERS) + 1)]

    def set_density(self, density: float) -> None:
        """The same density d for every FBS conv."""
        d = check_density(density)
        for m in self.convs():
            m.density = d

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The image as the first conv sees it (unsigned 8-bit values times their LSB)."""
        return self.input_act(x + self.input_offset.to(x.dtype))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[N, C]`` of the last conv."""
        x = self.quantize_input(x)
        for m in self.convs():
            x = m(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def base_parameters(self) -> list[nn.Parameter]:
        """Backbone parameters (conv weights and the classifier), frozen in the warm-up."""
        return [p for m in self.convs() for p in m.base_parameters()] + list(self.fc.parameters())


def fbs_layers(model: nn.Module) -> list[tuple[str, FBSConv2d]]:
    """``(name, module)`` of every :class:`FBSConv2d` of ``model``, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FBSConv2d)]


def saliency_l1(model: nn.Module) -> torch.Tensor:
    """FBS's l1 regulariser on the active saliencies of the last forward:
    ``Σ_layers Σ_c |g·π|``, averaged over the batch."""
    terms = [(m.last_saliency * m.last_active).abs().sum(dim=1).mean()
             for _, m in fbs_layers(model) if m.last_saliency is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


@torch.no_grad()
def fbs_from_dense(dense: FBSCNN, calib_images: torch.Tensor, density: float = 1.0,
                   alpha: float = 6.0, seed: int = 0) -> FBSGatedCNN:
    """FBS model initialised from a trained dense :class:`FBSCNN`: conv weights, BN running
    statistics (BN_na's start) and the classifier are copied; φ, ρ, β start as FBS's (the
    dense BN's γ/β have no place: g and β replace them and learn in the warm-up).

    ``calib_images`` fix the input quantizer: ``input_offset = −min(x)`` (0 when the images
    are already non-negative) and ``input_alpha = max(x + offset)``. φ is drawn after
    ``torch.manual_seed(seed)``, so the model depends on nothing but its arguments.
    """
    if not isinstance(dense, FBSCNN):
        raise ValueError(f"FBS needs the dense fbs_cnn backbone, not {type(dense).__name__}")
    x = torch.as_tensor(calib_images, dtype=torch.float32)
    offset = max(0.0, -float(x.min()))
    top = float((x + offset).max())
    if not top > 0:
        raise ValueError("the calibration images are all equal: no input range")
    torch.manual_seed(seed)
    model = FBSGatedCNN(dense.fc.out_features, dense.conv1.in_channels, density=density,
                        input_offset=offset, input_alpha=top, alpha=alpha)
    for i, m in enumerate(model.convs(), start=1):
        m.conv.weight.copy_(getattr(dense, f"conv{i}").weight)
        bn = getattr(dense, f"bn{i}")
        m.bn.running_mean.copy_(bn.running_mean)
        m.bn.running_var.copy_(bn.running_var)
        m.bn.eps = bn.eps
    model.fc.load_state_dict(dense.fc.state_dict())
    return model.eval()


# ----------------------------------------------------------------------------- MACs
@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """MAC geometry of one conv: ``macs = in_channels·out_channels·kernel_area·out_pixels``
    (dense, per image)."""

    name: str
    in_channels: int
    out_channels: int
    kernel_area: int
    out_pixels: int

    @property
    def macs(self) -> int:
        return self.in_channels * self.out_channels * self.kernel_area * self.out_pixels


def conv_geometries(model: FBSGatedCNN, image_shape: Sequence[int]) -> list[ConvGeometry]:
    """Geometry of every FBS conv of ``model`` for images ``(C, H, W)``."""
    _, h, w = image_shape
    out = []
    for name, m in fbs_layers(model):
        c = m.conv
        (kh, kw), (sh, sw), (ph, pw) = c.kernel_size, c.stride, c.padding
        h, w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        out.append(ConvGeometry(name, c.in_channels, c.out_channels, kh * kw, h * w))
    return out


def fbs_mac_counts(geoms: Sequence[ConvGeometry], active: Iterable[torch.Tensor]
                   ) -> dict[str, Any]:
    """FBS's MAC accounting of a chain of gated convs over a batch (algorithms.md §3.1).

    ``active``: per conv the decisions ``[N, C_out]`` (bool), in chain order; the active
    inputs of conv l are the active outputs of conv l−1 (all inputs for the first). Per image:

    * conv MACs ``= dense MACs · (active in / C_in) · (active out / C_out)``;
    * predictor MACs ``= active in · C_out`` (the GEMV over the pooled input; every saliency
      is needed for the top-k) ``+ active out · out_pixels`` (the per-channel g scaling).

    Returns per-image means ``{"dense_macs", "fbs_macs", "predictor_macs", "mac_reduction"
    (dense / fbs), "density" [per conv, mean active fraction], "images"}``.
    """
    acts = [torch.as_tensor(a, dtype=torch.bool) for a in active]
    if len(acts) != len(geoms):
        raise ValueError(f"{len(acts)} decision tensors for {len(geoms)} convs")
    n = acts[0].shape[0] if acts else 0
    fbs = torch.zeros(n, dtype=torch.float64)
    pred = torch.zeros(n, dtype=torch.float64)
    a_in = None
    for geo, a in zip(geoms, acts):
        if tuple(a.shape) != (n, geo.out_channels):
            raise ValueError(f"layer {geo.name!r}: decisions of shape {tuple(a.shape)}, "
                             f"expected [{n}, {geo.out_channels}]")
        n_in = (torch.full((n,), float(geo.in_channels), dtype=torch.float64) if a_in is None
                else a_in.sum(dim=1).double())
        n_out = a.sum(dim=1).double()
        fbs += geo.macs * (n_in / geo.in_channels) * (n_out / geo.out_channels)
        pred += n_in * geo.out_channels + n_out * geo.out_pixels
        a_in = a
    dense = float(sum(g.macs for g in geoms))
    mean_fbs = float(fbs.mean()) if n else 0.0
    return {"dense_macs": dense, "fbs_macs": mean_fbs,
            "predictor_macs": float(pred.mean()) if n else 0.0,
            "mac_reduction": dense / mean_fbs if mean_fbs > 0 else math.inf,
            "density": [float(a.double().mean()) for a in acts], "images": n}
