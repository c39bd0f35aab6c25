"""ReLU prediction for layer fusion (FusioNet, algorithms.md §5.5): quantizer, ternary
weights, the predicted unit and the statistics.

* :func:`q4_levels`: the pinned 4-bit predictor-input quantizer (TF ``fake_quant(min=-6,
  max=6, bits=4)`` after nudging): step 0.8, zero point 8, integer level
  ``q = clamp(floor(x/0.8 + 1/2), -8, 7)`` (round half **up**; value ``0.8·q`` in
  ``[-6.4, 5.6]``). Computed as ``floor(x·1.25 + 0.5)`` in float64, which is exact for
  float32 inputs (``x·1.25`` needs 27 bits); rounding then clamping equals TF's clamping then
  rounding because both bounds are levels.
* :func:`ternarize`: TWN per slice: ``Δ = 0.7·mean|w|``, ``t = sign(sign(w+Δ) + sign(w−Δ))``
  (so ``|w| = Δ`` gives ±1), ``α = mean |w|`` over ``|w| > Δ`` (0 for an empty set); computed
  in float64 so training and export agree. Grouped 1×1 convs use one slice per group,
  the depthwise conv one slice for the whole layer.
* :class:`PredictedUnit`: a frozen :class:`~dynacc.quant.models.fusionet.FusionUnit` plus its
  predictor: ``s1 = [BN_p1(α1·conv(t1, 0.8·q4(x))) > 0]``, ``ŷ1 = ReLU(BN_p1(...))``,
  ``s2 = [BN_p2(α2·dw(t2, 0.8·q4(ŷ1))) > 0]``; the real path is masked:
  ``h1 = where(s1, BN1(W1 x), 0)``, ``h2 = where(s2, BN2(D h1), 0)``. Zero padding of the
  depthwise inputs means mask 0 (and level 0) at padding positions.

The predictor BNs are copies of the real BNs (running statistics frozen, γ/β trainable), so
the predictor is an affine map of the integer ternary sum: ``v = k·acc + b`` with
``k = γ/√(σ²+ε)·(0.8·α)`` and ``b = β − γ·μ/√(σ²+ε)`` (:meth:`PredictedUnit.affine`). With
``exact_masks`` (the default) the masks are computed from exactly these float64 constants, the
form the integer golden model (``quant/fusion_golden.py``) turns into thresholds; training
(``exact_masks = False``) uses the autograd form with straight-through estimators and the
gradient routing of §5.5: forward = masked real activations, backward = through the
predictor's ReLU outputs.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .models.fusionet import FusionUnit, channel_shuffle

__all__ = ["Q4_STEP", "Q4_MIN", "Q4_MAX", "TWN_DELTA", "q4_levels", "fake_q4", "ternarize", "dw3x3",
           "PredictedUnit", "predicted_units", "make_predicted", "set_exact_masks",
           "fusion_stats"]

Q4_STEP = 0.8
Q4_MIN, Q4_MAX = -8, 7
TWN_DELTA = 0.7


def q4_levels(x: torch.Tensor) -> torch.Tensor:
    """Integer levels (float64) of the 4-bit predictor quantizer, half up, in ``[-8, 7]``."""
    return torch.floor(x.detach().to(torch.float64) * 1.25 + 0.5).clamp(Q4_MIN, Q4_MAX)


class _Q4STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return (q4_levels(x) * Q4_STEP).to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        inside = (x >= Q4_MIN * Q4_STEP) & (x <= Q4_MAX * Q4_STEP)
        return g * inside.to(g.dtype)


def fake_q4(x: torch.Tensor) -> torch.Tensor:
    """``0.8·q4_levels(x)`` with TF's gradient (identity inside ``[-6.4, 5.6]``, 0 outside)."""
    return _Q4STE.apply(x)


def ternarize(w: torch.Tensor, slices: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TWN of ``w`` (``[O, ...]``) in ``slices`` equal slices along dim 0.

    Returns ``(t, alpha, delta)``: ``t`` int64 in {-1, 0, 1} shaped like ``w``, ``alpha``
    float64 per output row ``[O]`` (its slice's α), ``delta`` float64 per slice."""
    o = w.shape[0]
    if slices < 1 or o % slices:
        raise ValueError(f"ternarize: {slices} slices do not divide {o} output channels")
    ws = w.detach().to(torch.float64).reshape(slices, -1)
    delta = TWN_DELTA * ws.abs().mean(dim=1, keepdim=True)
    t = torch.sign(torch.sign(ws + delta) + torch.sign(ws - delta))
    big = ws.abs() > delta
    alpha = (ws.abs() * big).sum(dim=1) / big.sum(dim=1).clamp(min=1)
    return (t.reshape(w.shape).to(torch.int64), alpha.repeat_interleave(o // slices),
            delta.reshape(-1))


def dw3x3(x: torch.Tensor, w: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Depthwise 3×3 conv with zero padding 1 as a sum of 9 shifted products (any dtype,
    exact for integers): ``y[c, p] = Σ_k w[c, k]·x[c, stride·p + k − 1]``; ``w``: ``[C, 9]``
    or ``[C, 1, 3, 3]``. PyTorch has no fast int64/float64 depthwise kernel on CPU."""
    n, c, h, wd = x.shape
    ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
    xp = F.pad(x, (1, 1, 1, 1))
    wk = w.reshape(c, 9).to(x.dtype)
    y = torch.zeros(n, c, ho, wo, dtype=x.dtype)
    for k in range(9):
        ky, kx = divmod(k, 3)
        tap = xp[:, :, ky:ky + stride * (ho - 1) + 1:stride, kx:kx + stride * (wo - 1) + 1:stride]
        y = y + tap * wk[None, :, k, None, None]
    return y


def _twn_ste(w: torch.Tensor, slices: int) -> torch.Tensor:
    t, alpha, _ = ternarize(w, slices)
    shape = (-1,) + (1,) * (w.dim() - 1)
    wq = (t.to(torch.float64) * alpha.reshape(shape)).to(w.dtype)
    return w + (wq - w).detach()


def _frozen_bn_copy(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    p = copy.deepcopy(bn)
    p.eval()
    p.weight.requires_grad_(True)
    p.bias.requires_grad_(True)
    return p


class PredictedUnit(nn.Module):
    """A fusion unit whose inner ReLUs are replaced by predicted masks (see module doc).

    ``unit`` is the real (pruned) unit, kept frozen; ``t1_w``/``t2_w`` are the latent
    ternary weights (initialised from the real ``expand``/``dw`` weights; where those are
    pruned the ternary weight stays 0: a pruned-away expand channel outputs exactly 0, its BN
    variance is 0 and its ``γ/√(σ²+ε)`` ≈ 316·γ would otherwise blow up the latent gradients
    and, under the norm clip, stall the rest of the predictor), ``bn_p1``/``bn_p2``
    the predictor BNs (copies of ``bn1``/``bn2``). After a forward ``last`` holds the masks and
    the real ReLU outcomes of that batch: ``(s1, r1, s2, r2)`` bool tensors, ``r1 = [BN1(W1 x)
    > 0]``, ``r2 = [BN2(D h1) > 0]`` on the masked ``h1``."""

    def __init__(self, unit: FusionUnit) -> None:
        super().__init__()
        self.unit = unit
        for p in self.unit.parameters():
            p.requires_grad_(False)
        self.t1_w = nn.Parameter(unit.expand.weight.detach().clone())
        self.t2_w = nn.Parameter(unit.dw.weight.detach().clone())
        # the ternary weights keep the pruned zeros (derived from the unit, not saved)
        self.register_buffer("keep1", unit.expand.weight.detach() != 0, persistent=False)
        self.register_buffer("keep2", unit.dw.weight.detach() != 0, persistent=False)
        self.bn_p1 = _frozen_bn_copy(unit.bn1)
        self.bn_p2 = _frozen_bn_copy(unit.bn2)
        self.exact_masks = True
        self.last: tuple[torch.Tensor, ...] | None = None

    def train(self, mode: bool = True) -> "PredictedUnit":
        """The real unit and the predictor BNs always stay in eval mode (static statistics)."""
        super().train(mode)
        self.unit.eval()
        self.bn_p1.eval()
        self.bn_p2.eval()
        return self

    def ternary(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``((t1, α1), (t2, α2))``: ternary weights (int64) and α per output channel."""
        t1, a1, _ = ternarize(self.latent1(), self.unit.groups)
        t2, a2, _ = ternarize(self.latent2(), 1)
        return (t1, a1), (t2, a2)

    def latent1(self) -> torch.Tensor:
        """``t1_w`` with the expand's pruned weights held at 0 (no gradient reaches them)."""
        return self.t1_w * self.keep1.to(self.t1_w.dtype)

    def latent2(self) -> torch.Tensor:
        """``t2_w`` with the depthwise conv's pruned weights held at 0."""
        return self.t2_w * self.keep2.to(self.t2_w.dtype)

    @staticmethod
    def _bn_affine(bn: nn.BatchNorm2d, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        k = inv * (Q4_STEP * alpha)
        b = bn.bias.detach().double() - inv * bn.running_mean.double()
        return k, b

    def affine(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """float64 ``((k1, b1), (k2, b2))`` per mid channel: ``v = k·acc + b`` where ``acc`` is
        the integer ternary sum over integer 4-bit levels (the predictor pre-activation)."""
        (_, a1), (_, a2) = self.ternary()
        return self._bn_affine(self.bn_p1, a1), self._bn_affine(self.bn_p2, a2)

    def exact_predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 masks ``(s1, s2)`` from :meth:`affine` (no autograd)."""
        u = self.unit
        (t1, _), (t2, _) = self.ternary()
        (k1, b1), (k2, b2) = self.affine()
        acc1 = F.conv2d(q4_levels(x), t1.double(), None, 1, 0, 1, u.groups)
        v1 = acc1 * k1[None, :, None, None] + b1[None, :, None, None]
        lv = q4_levels(torch.relu(v1))
        acc2 = dw3x3(lv, t2.double(), u.stride)
        v2 = acc2 * k2[None, :, None, None] + b2[None, :, None, None]
        return v1 > 0, v2 > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.unit
        h1r = u.bn1(u.expand(x))
        if self.exact_masks:
            s1, s2 = self.exact_predict(x)
            h1 = torch.where(s1, h1r, torch.zeros_like(h1r))
            h2r = u.bn2(u.dw(h1))
            h2 = torch.where(s2, h2r, torch.zeros_like(h2r))
        else:
            z1 = F.conv2d(fake_q4(x), _twn_ste(self.latent1(), u.groups), None, 1, 0, 1, u.groups)
            v1 = self.bn_p1(z1)
            y1 = torch.relu(v1)
            s1 = v1 > 0
            h1 = y1 + (torch.where(s1, h1r, torch.zeros_like(h1r)) - y1).detach()
            z2 = F.conv2d(fake_q4(y1), _twn_ste(self.latent2(), 1), None, u.stride, 1, 1, u.mid)
            v2 = self.bn_p2(z2)
            y2 = torch.relu(v2)
            s2 = v2 > 0
            h2r = u.bn2(u.dw(h1))
            h2 = y2 + (torch.where(s2, h2r, torch.zeros_like(h2r)) - y2).detach()
        self.last = (s1.detach(), (h1r > 0).detach(), s2.detach(), (h2r > 0).detach())
        y = channel_shuffle(u.bn3(u.project(h2)), u.groups)
        return x + y if u.use_res else y


def predicted_units(model: nn.Module) -> list[tuple[str, PredictedUnit]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PredictedUnit)]


def make_predicted(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every :class:`FusionUnit` wrapped in a
    :class:`PredictedUnit` (everything else frozen, eval mode)."""
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    names = [n for n, mod in m.named_modules() if isinstance(mod, FusionUnit)]
    if not names:
        raise ValueError("make_predicted: the model has no FusionUnit")
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = m.get_submodule(parent_name) if parent_name else m
        setattr(parent, child, PredictedUnit(getattr(parent, child)))
    return m.eval()


def set_exact_masks(model: nn.Module, exact: bool) -> None:
    for _, u in predicted_units(model):
        u.exact_masks = exact


@torch.no_grad()
def fusion_stats(model: nn.Module, loader) -> dict[str, float]:
    """Accuracy (percent) and mask misprediction rates of a predicted model (exact masks):
    ``s1_error`` = fraction of in-image expansion outputs where ``s1`` differs from the real
    ReLU outcome, ``s2_error`` likewise for the depthwise outputs; ``s1_density``/``s2_density``
    the fraction of predicted survivors."""
    units = [u for _, u in predicted_units(model)]
    model.eval()
    set_exact_masks(model, True)
    correct = n = 0
    acc = {"e1": 0, "n1": 0, "e2": 0, "n2": 0, "d1": 0, "d2": 0}
    for x, y in loader:
        correct += int((model(x).argmax(dim=1) == y).sum())
        n += len(y)
        for u in units:
            s1, r1, s2, r2 = u.last
            acc["e1"] += int((s1 != r1).sum()); acc["n1"] += s1.numel(); acc["d1"] += int(s1.sum())
            acc["e2"] += int((s2 != r2).sum()); acc["n2"] += s2.numel(); acc["d2"] += int(s2.sum())
    return {"acc": 100.0 * correct / max(n, 1), "s1_error": acc["e1"] / max(acc["n1"], 1),
            "s2_error": acc["e2"] / max(acc["n2"], 1), "s1_density": acc["d1"] / max(acc["n1"], 1),
            "s2_density": acc["d2"] / max(acc["n2"], 1)}
