"""Plain float training and evaluation loops (CPU-friendly, with progress bars)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

__all__ = ["train_float", "run_epochs", "evaluate", "accuracy_of"]


def train_float(model: nn.Module, train: DataLoader, epochs: int = 10, lr: float = 0.05,
                weight_decay: float = 5e-4, seed: int = 0, progress: bool = True) -> nn.Module:
    """SGD + momentum with a cosine schedule; deterministic for a given seed."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * max(1, len(train)))
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(range(epochs), desc="train", unit="epoch", disable=not progress)
    for _ in bar:
        model.train()
        total, n = 0.0, 0
        for x, y in train:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        bar.set_postfix(loss=f"{total / max(n, 1):.4f}")
    return model.eval()


def run_epochs(model: nn.Module, loader: Iterable, opt: torch.optim.Optimizer,
               batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], epochs: int,
               desc: str, progress: bool = True, max_batches: int | None = None,
               leave: bool = True) -> nn.Module:
    """The epoch loop of the fine-tuners (train-pg, train-fbs): ``epochs`` passes over
    ``loader`` (at most ``max_batches`` batches each) in train mode; per batch an ``opt`` step
    on ``batch_loss(x, y)``, then a cosine-annealed learning rate over all steps. A tqdm bar
    shows each epoch's mean loss. Returns the model in eval mode."""
    steps = epochs * (min(len(loader), max_batches) if max_batches else len(loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=leave)
    for _ in bar:
        model.train()
        tot, n = 0.0, 0
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(x, y)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(y)
            n += len(y)
        bar.set_postfix(loss=f"{tot / max(n, 1):.4f}")
    return model.eval()


@torch.no_grad()
def accuracy_of(predict: Callable[[torch.Tensor], torch.Tensor], data: DataLoader) -> float:
    """Top-1 accuracy in percent of ``predict(x) -> logits`` over ``data``."""
    correct, n = 0, 0
    for x, y in data:
        correct += int((predict(x).argmax(dim=1) == y).sum())
        n += len(y)
    return 100.0 * correct / max(n, 1)


def evaluate(model: nn.Module, data: DataLoader) -> float:
    """Top-1 accuracy (percent) of a float model in eval mode."""
    model.eval()
    return accuracy_of(model, data)
