"""Unstructured magnitude pruning on the cubic Zhu–Gupta schedule (algorithms.md §5.4).

* per layer, keep the largest ``(1 − s)`` fraction of ``|w|``: with ``n`` weights,
  ``k = floor(s·n)`` are pruned, the threshold is the ``(k+1)``-th smallest ``|w|`` and every
  weight with ``|w| >= threshold`` is kept (ties at the threshold are kept, so slightly more
  than ``1 − s`` may survive); ``k = 0`` keeps everything;
* schedule ``s_t = s_f + (s_i − s_f)(1 − t/T)^3`` over ``T`` optimizer steps (``s_i = 0``),
  masks recomputed after every batch; then recovery fine-tuning with the masks frozen;
* then the BN running statistics are recomputed on the training images
  (:func:`recalibrate_bn`): a channel whose weights are all pruned outputs exactly 0, but its
  running mean and variance only decay by the momentum (0.9 per step) and their ratio
  ``μ/√(σ² + ε)`` even slower, so in eval mode it keeps a spurious constant
  ``−γ·μ/√(σ² + ε)`` (often large) that training mode never sees; the last, small batch of
  each epoch (3 digits images) also weighs 10 % in the running statistics;
* at the end of the schedule, depthwise filters whose expand channel is empty are pruned too
  (:meth:`Pruner.drop_orphans`: they only see a constant and amplify its border pattern);
* targets: 0.8 for 1×1 / grouped convs, 0.7 for depthwise convs; the stem (first conv) and
  the classifier are not pruned.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

__all__ = ["POINTWISE_SPARSITY", "DEPTHWISE_SPARSITY", "cubic_sparsity", "magnitude_mask",
           "prunable_layers", "Pruner", "recalibrate_bn", "train_pruned"]

POINTWISE_SPARSITY = 0.8
DEPTHWISE_SPARSITY = 0.7


def cubic_sparsity(step: int, total: int, final: float, initial: float = 0.0) -> float:
    """Zhu–Gupta: ``s_f + (s_i − s_f)(1 − step/total)^3``, ``step`` clamped to ``[0, total]``."""
    if total <= 0:
        return final
    f = min(max(step, 0), total) / total
    return final + (initial - final) * (1.0 - f) ** 3


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping ``|w| >= t``, ``t`` the ``(floor(s·n)+1)``-th smallest ``|w|`` (ties kept)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    a = w.detach().abs().reshape(-1)
    k = int(math.floor(sparsity * a.numel() + 1e-9))
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    if k >= a.numel():
        return torch.zeros_like(w, dtype=torch.bool)
    t = a.sort().values[k]
    return w.detach().abs() >= t


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d, float]]:
    """``(name, conv, target sparsity)``: every conv but the first (the stem); depthwise
    (``groups == in_channels == out_channels > 1``) gets :data:`DEPTHWISE_SPARSITY`, 1×1
    and grouped convs :data:`POINTWISE_SPARSITY`; other convs (k > 1, dense) are left alone."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    out = []
    for n, m in convs[1:]:
        if m.groups > 1 and m.groups == m.in_channels == m.out_channels:
            out.append((n, m, DEPTHWISE_SPARSITY))
        elif m.kernel_size == (1, 1):
            out.append((n, m, POINTWISE_SPARSITY))
    return out


class Pruner:
    """Holds one mask per prunable layer; :meth:`update` recomputes them for a schedule step,
    :meth:`apply` zeroes the pruned weights (call after every optimizer step)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = prunable_layers(model)
        if not self.layers:
            raise ValueError("model has no prunable convs (1x1, grouped or depthwise)")
        self.masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m, _ in self.layers}

    def update(self, step: int, total: int) -> None:
        for n, m, s_f in self.layers:
            self.masks[n] = magnitude_mask(m.weight, cubic_sparsity(step, total, s_f))

    @torch.no_grad()
    def apply(self) -> None:
        for n, m, _ in self.layers:
            m.weight.mul_(self.masks[n].to(m.weight.dtype))

    def drop_orphans(self, model: nn.Module) -> int:
        """Prune every depthwise filter whose expand channel has no weight left (FusionUnit
        modules: ``expand`` → ``dw`` channel by channel). Its input is then the constant
        ``ReLU(β)``, so its output depends on the pixel position only (border taps), with a
        BN scale of hundreds (its variance comes from the border alone): no image
        information, but a mask the predictor cannot guess. Returns the filters dropped."""
        names = {id(m): n for n, m, _ in self.layers}
        dropped = 0
        for u in model.modules():
            ex, dw = getattr(u, "expand", None), getattr(u, "dw", None)
            if not (isinstance(ex, nn.Conv2d) and isinstance(dw, nn.Conv2d)
                    and id(ex) in names and id(dw) in names
                    and dw.groups == dw.in_channels == ex.out_channels):
                continue
            dead = ~self.masks[names[id(ex)]].flatten(1).any(dim=1)
            m = self.masks[names[id(dw)]]
            dropped += int((m.flatten(1).any(dim=1) & dead).sum())
            m[dead] = False
        self.apply()
        return dropped

    def sparsity(self) -> dict[str, float]:
        """Realised fraction of zero weights per layer."""
        return {n: float((m.weight == 0).float().mean()) for n, m, _ in self.layers}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, train: DataLoader, images: int | None = None,
                   chunk: int = 2048) -> None:
    """Recompute every BatchNorm's running mean/variance on the first ``images`` (default all)
    training images, in fixed order: one forward in train mode per ``chunk`` images, averaged
    over the chunks (exact population statistics when one chunk holds them all, as for
    digits). Leaves the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    ds = train.dataset
    n = len(ds) if images is None else min(images, len(ds))
    if not bns or n == 0:
        model.eval()
        return
    moms = [b.momentum for b in bns]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None          # cumulative average over the chunks
    model.train()
    try:
        for lo in range(0, n, chunk):
            model(torch.stack([ds[i][0] for i in range(lo, min(n, lo + chunk))]))
    finally:
        for b, m in zip(bns, moms):
            b.momentum = m
        model.eval()


def train_pruned(model: nn.Module, train: DataLoader, prune_epochs: int = 4,
                 recover_epochs: int = 6, lr: float = 0.05, weight_decay: float = 1e-4,
                 seed: int = 0, progress: bool = True, max_batches: int | None = None,
                 recalibrate: bool = True, drop_orphans: bool = True) -> Pruner:
    """Prune ``model`` in place: ``prune_epochs`` on the cubic schedule (masks after every
    batch, final sparsity reached on the last step), then ``recover_epochs`` with the masks
    frozen. SGD momentum 0.9, cosine learning rate. ``recalibrate``: recompute the BN running
    statistics afterwards (:func:`recalibrate_bn`, on ``max_batches · batch size`` images when
    capped). ``drop_orphans``: with the final masks, also prune the depthwise filters whose
    expand channel is empty (:meth:`Pruner.drop_orphans`). Returns the :class:`Pruner` (final
    masks); the model is left in eval mode."""
    torch.manual_seed(seed)
    pr = Pruner(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    per = min(len(train), max_batches) if max_batches else len(train)
    total = (prune_epochs + recover_epochs) * per
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, total))
    prune_steps = prune_epochs * per
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    if prune_steps == 0:
        pr.update(1, 1)
        if drop_orphans:
            pr.drop_orphans(model)
        pr.apply()
    bar = tqdm(range(prune_epochs + recover_epochs), desc="prune", unit="epoch",
               disable=not progress)
    for ep in bar:
        model.train()
        tot, n = 0.0, 0
        for i, (x, y) in enumerate(train):
            if max_batches is not None and i >= max_batches:
                break
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step <= prune_steps:
                pr.update(step, prune_steps)
                if step == prune_steps and drop_orphans:
                    pr.drop_orphans(model)
            pr.apply()
            tot += float(loss.detach()) * len(y)
            n += len(y)
        bar.set_postfix(loss=f"{tot / max(n, 1):.4f}",
                        phase="prune" if ep < prune_epochs else "recover")
    if recalibrate:
        cap = None if max_batches is None else max_batches * (train.batch_size or 1)
        recalibrate_bn(model, train, cap)
    model.eval()
    return pr
