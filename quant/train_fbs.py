"""Feature Boosting and Suppression fine-tuning, statistics and the density sweep.

The recipe of algorithms.md §3.2, scaled to the digits:

1. start from the trained dense ``fbs_cnn`` (:func:`~dynacc.quant.flow.cached_digits_model`);
2. warm-up at d = 1 with the backbone (conv weights, classifier) frozen, so the fresh
   predictors (φ, ρ), β and the PACT clips learn to stand in for the dense BN's γ/β;
3. unfreeze and lower d step by step (:func:`density_schedule`: 1 → 0.75 → 0.5 → 0.375 …),
   fine-tuning at each step (5 epochs by default).

Optimiser: Adam (lr 1e-3, cosine-annealed within each step, no weight decay), the predictors
and β at 10× the learning rate. Mayo uses RMSProp with a long staircase decay; here each step
is only a few epochs and the parameters live on very different scales (φ starts at σ 0.05, ρ
at 1, the backbone is pretrained): Adam's per-parameter step sizes move all of them, and the
10× lets ρ and φ spread the saliencies within a few hundred steps (at 1× they stay within
a few % of ρ = 1, so the ranking rests on differences the 8-bit g_q cannot resolve).
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from .fbs import (FBSGatedCNN, check_density, conv_geometries, fbs_layers, fbs_mac_counts,
                  saliency_l1)
from .train import run_epochs

__all__ = ["DENSITY_STEPS", "density_schedule", "train_fbs", "fbs_stats", "fbs_fine_tune",
           "run_fbs_sweep"]

#: the densities the schedule passes through on its way down.
DENSITY_STEPS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.375, 0.25, 0.1875, 0.125)


def density_schedule(target: float, steps: Sequence[float] = DENSITY_STEPS) -> list[float]:
    """The densities fine-tuned in turn to reach ``target``: every step above it, then it."""
    d = check_density(target)
    return [s for s in steps if s > d] + [d]


def train_fbs(model: FBSGatedCNN, train: DataLoader, epochs: int, lr: float = 1e-3,
              freeze_base: bool = False, l1: float = 0.0, gate_lr_scale: float = 10.0,
              seed: int = 0, progress: bool = True, max_batches: int | None = None,
              desc: str = "train-fbs") -> FBSGatedCNN:
    """Fine-tune ``model`` at its current density for ``epochs`` (Adam, cosine schedule).

    Loss: cross-entropy + ``l1 · saliency_l1`` (FBS's lasso on the active saliencies; 0 by
    default, as the shipped M-CifarNet config). ``freeze_base`` trains only the predictors,
    β and the PACT clips. The batch order comes from a generator seeded with ``seed``.
    ``max_batches`` caps the batches per epoch (smoke tests). Returns the model in eval mode.
    """
    if not fbs_layers(model):
        raise ValueError("train_fbs needs a model with FBSConv2d layers")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, not {epochs}")
    torch.manual_seed(seed)
    frozen = {id(p) for p in model.base_parameters()} if freeze_base else set()
    gate = {id(p) for m in model.convs() for p in m.gate_parameters()}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]
    groups = [{"params": [p for p in params if id(p) not in gate]},
              {"params": [p for p in params if id(p) in gate], "lr": lr * gate_lr_scale}]
    loader = DataLoader(train.dataset, batch_size=train.batch_size or 64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(groups, lr=lr)
    ce = nn.CrossEntropyLoss()

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = ce(model(x), y)
        return loss + l1 * saliency_l1(model) if l1 else loss

    return run_epochs(model, loader, opt, batch_loss, epochs, desc, progress, max_batches,
                      leave=False)


@torch.no_grad()
def fbs_stats(model: FBSGatedCNN, loader: Iterable) -> dict[str, Any]:
    """Eval-mode accuracy (percent) of the float FBS model and its MAC accounting
    (:func:`~dynacc.quant.fbs.fbs_mac_counts` on its own decisions) over ``loader``."""
    model.eval()
    layers = [m for _, m in fbs_layers(model)]
    correct = n = 0
    active: list[list[torch.Tensor]] = [[] for _ in layers]
    shape = None
    for x, y in loader:
        correct += int((model(x).argmax(dim=1) == y).sum())
        n += len(y)
        shape = tuple(x.shape[1:])
        for a, m in zip(active, layers):
            a.append(m.last_active.bool())
    if shape is None:
        raise ValueError("fbs_stats needs at least one batch")
    macs = fbs_mac_counts(conv_geometries(model, shape), [torch.cat(a) for a in active])
    return {"acc": 100.0 * correct / max(n, 1), **macs}


def fbs_fine_tune(model: FBSGatedCNN, train: DataLoader, densities: Sequence[float],
                  warmup_epochs: int = 3, epochs: int = 5, lr: float = 1e-3, l1: float = 0.0,
                  gate_lr_scale: float = 10.0, seed: int = 0, progress: bool = True,
                  max_batches: int | None = None) -> Iterator[float]:
    """The FBS schedule: warm-up (backbone frozen, d = 1), then for each of ``densities``
    (non-increasing) set it and fine-tune everything for ``epochs``; yields each density
    when its step is done (the model is then in eval mode at that density)."""
    ds = [check_density(d) for d in densities]
    if any(b > a for a, b in zip(ds, ds[1:])):
        raise ValueError(f"FBS densities must not increase, got {list(densities)}")
    model.set_density(1.0)
    train_fbs(model, train, warmup_epochs, lr=lr, freeze_base=True, gate_lr_scale=gate_lr_scale,
              seed=seed, progress=progress, max_batches=max_batches, desc="FBS warm-up d=1")
    for d in ds:
        model.set_density(d)
        train_fbs(model, train, epochs, lr=lr, l1=l1, gate_lr_scale=gate_lr_scale, seed=seed,
                  progress=progress, max_batches=max_batches, desc=f"FBS d={d:g}")
        yield d


def run_fbs_sweep(densities: Sequence[float] = (1.0, 0.75, 0.5, 0.375), warmup_epochs: int = 3,
                  epochs: int = 5, lr: float = 1e-3, l1: float = 0.0, gate_lr_scale: float = 10.0,
                  seed: int = 0, calib_images: int = 200, progress: bool = False,
                  details: bool = False) -> list[dict[str, Any]]:
    """Fine-tune the digits ``fbs_cnn`` down the densities (one schedule, see
    :func:`fbs_fine_tune`) and measure the integer program at each.

    Per density: ``{"density", "acc", "fp_acc", "mac_reduction", "predictor_macs"}``: ``acc``
    is the golden integer accuracy on the digits test split, ``fp_acc`` the dense float model
    it starts from, ``mac_reduction`` dense conv MACs / FBS conv MACs per image averaged at
    the golden (integer) decisions, ``predictor_macs`` the predictor's MACs per image. With
    ``details`` also ``fbs_acc`` / ``fbs_mac_reduction`` (float FBS model), ``layer_density``
    (golden, per conv) and ``seconds`` (wall time of the step incl. the program).
    """
    from .fbs import fbs_from_dense
    from .fbs_program import build_fbs_program, fbs_golden_stats
    from .flow import cached_digits_model, calibration_batches
    from .train import evaluate

    dense, splits = cached_digits_model("fbs_cnn", seed=seed)
    fp_acc = evaluate(dense, splits.test)
    calib = torch.cat(calibration_batches(splits.train, calib_images))
    model = fbs_from_dense(dense, calib)
    out = []
    t0 = time.perf_counter()
    for d in fbs_fine_tune(model, splits.train, densities, warmup_epochs, epochs, lr=lr, l1=l1,
                           gate_lr_scale=gate_lr_scale, seed=seed, progress=progress):
        program = build_fbs_program(model, calib)
        st = fbs_golden_stats(program, splits.test)
        row = {"density": d, "acc": st["acc"], "fp_acc": fp_acc,
               "mac_reduction": st["mac_reduction"], "predictor_macs": st["predictor_macs"]}
        if details:
            fs = fbs_stats(model, splits.test)
            row.update(fbs_acc=fs["acc"], fbs_mac_reduction=fs["mac_reduction"],
                       layer_density=st["density"], seconds=time.perf_counter() - t0)
        out.append(row)
        t0 = time.perf_counter()
    return out
