"""Two-stage DFS training, statistics and the DFS vs skip-only sweep.

Schedule (algorithms.md §1.5, shortened for digits on a CPU):

1. :func:`train_gate_full` - the backbone is frozen and every gated block runs at full
   precision whatever the gate says (``full_execution``); with target CP 100 the cost sign is
   always -1, so the loss ``CE - beta * C`` rewards cost and the gate learns full execution.
2. :func:`train_dfs` - joint training of backbone and gate to ``target_cp`` with
   ``loss = CE + beta * sgn * C``, ``sgn = +1`` if the batch CP exceeds the target, else -1
   (the original's bang-bang regulariser). ``C`` is the mean cost *per image and gated block*
   (in [0, 1]), so ``beta`` does not depend on batch size or depth - the original sums the
   cost over images and blocks (``beta = 1e-5`` for 128 images x 17 blocks).

Optimisers: SGD (momentum 0.9, gradient norm clipped at 5) for the backbone, Adam for the
gate, both on a cosine schedule (the gate settles on its final policy while the backbone
adapts to it).
All candidates of a gated block are computed in training and mixed with the straight-through
one-hot (as the original), so the gradient reaches every option's probability.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .dfs import DFSOptions, DFSResNet, computation_percentage, parse_options
from .formats import BFPFormat, QuantConfig
from .models.resnet_cifar import CifarResNet

__all__ = ["DFS_DEFAULTS", "train_gate_full", "train_dfs", "dfs_stats", "decision_stats",
           "make_dfs_model", "run_dfs_sweep"]

#: stage-2 defaults (digits, CPU-sized runs): backbone SGD lr, gate Adam lr, cost weight
DFS_DEFAULTS = {"lr": 0.005, "gate_lr": 0.02, "beta": 4.0}


def _loader(loader: DataLoader, seed: int) -> DataLoader:
    """Same dataset and batch size, reshuffled by a generator seeded here (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size or 64, shuffle=True,
                      generator=g)


def _cost_loss(model: DFSResNet, decisions: torch.Tensor, target_cp: float
               ) -> tuple[torch.Tensor, float]:
    """``(sgn * C, CP)``: C the mean cost per image and block (differentiable through the
    straight-through one-hot), sgn = +1 above the target CP, -1 at or below it."""
    cp_t = computation_percentage(decisions, model.options.costs)
    cp = float(cp_t.detach())
    sgn = 1.0 if cp > target_cp else -1.0
    return sgn * cp_t / 100.0, cp


def train_gate_full(model: DFSResNet, train: DataLoader, epochs: int = 1, lr: float = 0.002,
                    beta: float = 1.0, seed: int = 0, progress: bool = True,
                    patience: int = 3) -> DFSResNet:
    """Stage 1: train only the gate toward full execution (backbone frozen, blocks at full
    precision). Stops early once ``patience`` consecutive batches chose full precision
    everywhere (CP 100), so stage 2 starts from a gate that is not saturated. Returns
    ``model`` with ``full_execution`` reset to False."""
    torch.manual_seed(seed)
    model.full_execution = True
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.gate.parameters(), lr=lr)
    bar = tqdm(range(epochs), desc="DFS stage 1 (gate -> full)", unit="epoch", disable=not progress)
    full_run = 0
    try:
        for ep in bar:
            model.train()
            for x, y in _loader(train, seed + ep):
                out = model(x)
                cost, cp = _cost_loss(model, out.decisions, 100.0)
                loss = F.cross_entropy(out.logits, y) + beta * cost
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                full_run = full_run + 1 if cp >= 100.0 else 0
                bar.set_postfix(cp=f"{cp:.1f}")
                if full_run >= patience:
                    return model
    finally:
        model.full_execution = False
        for p in model.backbone.parameters():
            p.requires_grad_(True)
        model.eval()
    return model


def train_dfs(model: DFSResNet, train: DataLoader, target_cp: float, epochs: int = 6,
              lr: float = DFS_DEFAULTS["lr"], gate_lr: float = DFS_DEFAULTS["gate_lr"],
              beta: float = DFS_DEFAULTS["beta"],
              weight_decay: float = 1e-4, seed: int = 0, progress: bool = True
              ) -> list[dict[str, float]]:
    """Stage 2: joint training to ``target_cp`` (percent, in (0, 100]).

    Returns the per-epoch history ``[{"loss", "ce", "cp", "acc"}]`` (training batches).
    """
    if not 0 < target_cp <= 100:
        raise ValueError(f"target CP must be in (0, 100], got {target_cp}")
    torch.manual_seed(seed)
    gate_params = list(model.gate.parameters())
    gate_ids = {id(p) for p in gate_params}
    body = [p for p in model.parameters() if id(p) not in gate_ids]
    opt = torch.optim.SGD(body, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    gopt = torch.optim.Adam(gate_params, lr=gate_lr)
    steps = max(1, epochs * len(train))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gsched = torch.optim.lr_scheduler.CosineAnnealingLR(gopt, steps)
    history: list[dict[str, float]] = []
    bar = tqdm(range(epochs), desc=f"DFS stage 2 (CP -> {target_cp:g} %)", unit="epoch",
               disable=not progress)
    for ep in bar:
        model.train()
        tot = {"loss": 0.0, "ce": 0.0, "cp": 0.0, "acc": 0.0}
        n = 0
        for x, y in _loader(train, seed + 1000 + ep):
            out = model(x)
            ce = F.cross_entropy(out.logits, y)
            cost, cp = _cost_loss(model, out.decisions, target_cp)
            loss = ce + beta * cost
            opt.zero_grad(set_to_none=True)
            gopt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(body, 5.0)
            opt.step()
            gopt.step()
            sched.step()
            gsched.step()
            b = len(y)
            tot["loss"] += float(loss.detach()) * b
            tot["ce"] += float(ce.detach()) * b
            tot["cp"] += cp * b
            tot["acc"] += 100.0 * float((out.logits.argmax(1) == y).sum())
            n += b
        rec = {k: v / max(n, 1) for k, v in tot.items()}
        history.append(rec)
        bar.set_postfix(ce=f"{rec['ce']:.3f}", cp=f"{rec['cp']:.1f}", acc=f"{rec['acc']:.1f}")
    model.eval()
    return history


@torch.no_grad()
def dfs_stats(model: DFSResNet, loader: DataLoader) -> dict[str, Any]:
    """Accuracy and computation of the (fake-quant) DFS model in eval mode.

    Returns ``{"acc": %, "cp": %, "cp_per_block": [% per gated block], "cp_per_input":
    tensor [N] (% per image), "option_share": [[fraction per option] per gated block],
    "decisions": int64 [N, n_gated]}``.
    """
    model.eval()
    correct, decs = 0, []
    for x, y in loader:
        out = model(x)
        correct += int((out.logits.argmax(1) == y).sum())
        decs.append(out.decisions.argmax(-1))
    return decision_stats(torch.cat(decs), model.options.costs, len(model.options),
                          100.0 * correct / max(1, sum(len(d) for d in decs)))


def decision_stats(decisions: torch.Tensor, costs: Sequence[float], n_options: int,
                   acc: float) -> dict[str, Any]:
    """Statistics of option indices ``decisions [N, n_gated]`` (see :func:`dfs_stats`)."""
    c = torch.as_tensor(costs, dtype=torch.float64)[decisions]
    share = F.one_hot(decisions, n_options).double().mean(0)
    return {"acc": acc, "cp": 100.0 * float(c.mean()),
            "cp_per_block": (100.0 * c.mean(0)).tolist(),
            "cp_per_input": 100.0 * c.mean(1),
            "option_share": share.tolist(), "decisions": decisions}


def make_dfs_model(backbone: CifarResNet, options, calib: Sequence[torch.Tensor],
                   fmt: BFPFormat = BFPFormat(9, 8), seed: int = 0) -> DFSResNet:
    """A DFS model on a copy of ``backbone`` (gate initialised from ``seed``) with calibrated
    activation LSBs."""
    torch.manual_seed(seed)
    opts = options if isinstance(options, DFSOptions) else parse_options(options)
    model = DFSResNet(copy.deepcopy(backbone), opts, fmt)
    model.calibrate_activations(calib)
    return model.eval()


def run_dfs_sweep(targets: Sequence[float], options=("skip", 4, 8), epochs: int = 6,
                  seed: int = 0, model_name: str = "resnet20", gate_epochs: int = 2,
                  beta: float = DFS_DEFAULTS["beta"], golden: bool = True, calib_images: int = 200,
                  cfg: QuantConfig | None = None, progress: bool = True,
                  lr: float = DFS_DEFAULTS["lr"], gate_lr: float = DFS_DEFAULTS["gate_lr"]
                  ) -> list[dict[str, Any]]:
    """Train one DFS model per target CP from the cached digits backbone and measure it.

    Stage 1 runs once per option set; every target starts from its result. Each row:
    ``{"target_cp", "measured_cp", "acc"`` (fake-quant DFS model, test set) ``,
    "golden_acc", "golden_cp"`` (integer golden with the host gate, if ``golden``)
    ``, "cp_per_block", "options", "seconds"}``.
    """
    from .dfs_program import build_dfs_program, dfs_golden_stats
    from .flow import cached_digits_model, calibration_batches

    opts = parse_options(options)
    backbone, splits = cached_digits_model(model_name, seed=seed)
    calib = calibration_batches(splits.train, calib_images)
    cfg = cfg or QuantConfig(fmt=BFPFormat(9, 8), method="max")
    t0 = time.perf_counter()
    base = make_dfs_model(backbone, opts, calib, cfg.fmt, seed)
    train_gate_full(base, splits.train, gate_epochs, seed=seed, progress=progress)
    t_stage1 = time.perf_counter() - t0
    rows = []
    for target in targets:
        t = time.perf_counter()
        model = copy.deepcopy(base)
        train_dfs(model, splits.train, target, epochs, lr=lr, gate_lr=gate_lr, beta=beta,
                  seed=seed, progress=progress)
        st = dfs_stats(model, splits.test)
        row = {"options": ",".join(str(c) for c in opts.choices), "target_cp": float(target),
               "measured_cp": st["cp"], "acc": st["acc"], "cp_per_block": st["cp_per_block"],
               "train_seconds": time.perf_counter() - t + t_stage1}
        if golden:
            program, gate = build_dfs_program(model, calib, cfg)
            g = dfs_golden_stats(program, gate, splits.test)
            row.update(golden_acc=g["acc"], golden_cp=g["cp"],
                       decision_agreement=float((g["decisions"] == st["decisions"])
                                                .double().mean()))
        row["seconds"] = time.perf_counter() - t + t_stage1
        rows.append(row)
    return rows
