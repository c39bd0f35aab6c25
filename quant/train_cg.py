"""Channel Gating fine-tuning and statistics.

:func:`train_cg` fine-tunes a CG model (usually :func:`~dynacc.quant.models.cg_resnet.
cg_resnet_from_float` of a trained float ResNet) with ``CE + σ_g·Σ(Δ − target)²``;
:func:`cg_stats` measures accuracy, update sparsity and FLOP reduction of the float
(fake-quant) CG model; :func:`run_cg_sweep` runs the whole flow (fine-tune, integer program,
golden accuracy) for several partition counts on digits.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader

from .cg import cg_flop_summary, cg_gating_loss, cg_layers
from .train import run_epochs

__all__ = ["CG_TRAIN_DEFAULTS", "train_cg", "cg_stats", "run_cg_sweep"]

#: fine-tuning defaults of ``train-cg`` and :func:`run_cg_sweep`: CG's ``-gi 0.0 -gtar 1.0``,
#: but a few epochs from a trained float ResNet instead of 250 from scratch, so the gating loss
#: weighs σ_g = 0.05 (CG: 1e-4) and the thresholds learn 100× faster; with CG's own values Δ
#: stays near 0 (half the gates open, 1.6× on the CG layers at p = 4 instead of 2.8×)
CG_TRAIN_DEFAULTS: dict[str, float] = {
    "epochs": 3, "lr": 0.01, "threshold_init": 0.0, "gate_target": 1.0, "sigma_g": 0.05,
    "threshold_lr_scale": 100.0,
}


def train_cg(model: nn.Module, splits: Any, epochs: int = 3, lr: float = 0.01,
             gate_target: float = 1.0, sigma_g: float = 1e-4, sparse_bp: bool = True,
             seed: int = 0, progress: bool = True, weight_decay: float = 1e-4,
             threshold_lr_scale: float = 1.0, max_batches: int | None = None) -> nn.Module:
    """Fine-tune CG ``model`` on ``splits.train`` (SGD, momentum 0.9, cosine schedule;
    :func:`~dynacc.quant.train.run_epochs`).

    Loss: cross-entropy + :func:`~dynacc.quant.cg.cg_gating_loss` (``sigma_g``,
    ``gate_target``). As in CG's code, weight decay applies to the multi-dimensional weights
    (and the PACT clips, as in PG), not to 1-D parameters: thresholds Δ, BN, biases. Δ's
    learning rate is ``lr · threshold_lr_scale``. The batch order comes from a generator
    seeded with ``seed``; ``max_batches`` caps the batches per epoch (smoke tests). Returns the
    model in eval mode.
    """
    if not cg_layers(model):
        raise ValueError("train_cg needs a model with CGConv2d layers")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, not {epochs}")
    torch.manual_seed(seed)
    for _, m in cg_layers(model):
        m.sparse_bp = sparse_bp
    loader = DataLoader(splits.train.dataset, batch_size=splits.train.batch_size or 64,
                        shuffle=True, generator=torch.Generator().manual_seed(seed))
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "threshold": []}
    for name, p in model.named_parameters():
        key = ("threshold" if name.endswith(".threshold") else
               "no_decay" if p.dim() == 1 else "decay")
        groups[key].append(p)
    opt = torch.optim.SGD([{"params": groups["decay"], "weight_decay": weight_decay},
                           {"params": groups["no_decay"], "weight_decay": 0.0},
                           {"params": groups["threshold"], "weight_decay": 0.0,
                            "lr": lr * threshold_lr_scale}],
                          lr=lr, momentum=0.9)
    ce = nn.CrossEntropyLoss()
    return run_epochs(model, loader, opt,
                      lambda x, y: ce(model(x), y) + cg_gating_loss(model, gate_target, sigma_g),
                      epochs, "train-cg", progress, max_batches)


@torch.no_grad()
def cg_stats(model: nn.Module, loader: Iterable) -> dict[str, Any]:
    """Eval-mode accuracy (percent) and CG statistics of the float model over ``loader``:
    ``sparsity``, ``cg_flop_reduction``, ``flop_reduction`` and ``layers`` as
    :func:`~dynacc.quant.cg.cg_flop_summary` (MACs counted by hooks on every conv/linear)."""
    layers = cg_layers(model)
    if not layers:
        raise ValueError("cg_stats needs a model with CGConv2d layers")
    model.eval()
    dense: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def count(mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        k = names[mod]
        dense[k] = dense.get(k, 0) + out.numel() * mod.weight[0].numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    gates = {n: {"passed": 0, "total": 0, "partitions": m.partitions} for n, m in layers}
    correct = n = 0
    try:
        for x, y in loader:
            correct += int((model(x).argmax(dim=1) == y).sum())
            n += len(y)
            for name, m in layers:
                gates[name]["passed"] += m.last_gate[0]
                gates[name]["total"] += m.last_gate[1]
    finally:
        for h in hooks:
            h.remove()
    return {"acc": 100.0 * correct / max(n, 1), **cg_flop_summary(dense, gates)}


def run_cg_sweep(partitions_list: Iterable[int], epochs: int = CG_TRAIN_DEFAULTS["epochs"],
                 seed: int = 0, gate_target: float = CG_TRAIN_DEFAULTS["gate_target"],
                 sigma_g: float = CG_TRAIN_DEFAULTS["sigma_g"],
                 threshold_init: float = CG_TRAIN_DEFAULTS["threshold_init"],
                 threshold_lr_scale: float = CG_TRAIN_DEFAULTS["threshold_lr_scale"],
                 lr: float = CG_TRAIN_DEFAULTS["lr"], progress: bool = False,
                 details: bool = False) -> list[dict[str, Any]]:
    """Fine-tune the digits ResNet-20 with CG for each partition count ``p``, build the integer
    program (M = 9, unsigned 8-bit CG inputs, max calibration on 200 train images) and measure it.

    Returns per ``p`` ``{partitions, acc, fp_acc, flop_reduction, sparsity}``: ``acc`` is the
    golden integer accuracy on the digits test split, ``fp_acc`` that of the float ResNet-20 it
    starts from, ``sparsity`` and ``flop_reduction`` (whole network, rule CG7) from the golden
    gate outcomes on the test split. With ``details`` each dict also carries
    ``cg_flop_reduction`` (CG layers only), ``cg_acc`` / ``cg_sparsity`` (float fake-quant CG
    model) and ``seconds`` (wall time of fine-tuning + program + statistics).
    """
    import copy

    from .cg_program import build_cg_program, program_cg_stats
    from .flow import cached_digits_model, calibration_batches
    from .formats import BFPFormat, QuantConfig
    from .models.cg_resnet import cg_resnet_from_float
    from .train import evaluate

    float_model, splits = cached_digits_model("resnet20")
    fp_acc = evaluate(float_model, splits.test)
    cfg = QuantConfig(fmt=BFPFormat(9, 8), method="max")
    out = []
    for p in partitions_list:
        t0 = time.perf_counter()
        cg = cg_resnet_from_float(copy.deepcopy(float_model), partitions=p, act_bits=8, cfg=cfg,
                                  threshold_init=threshold_init)
        train_cg(cg, splits, epochs=epochs, lr=lr, gate_target=gate_target, sigma_g=sigma_g,
                 seed=seed, progress=progress, threshold_lr_scale=threshold_lr_scale)
        program = build_cg_program(cg, calibration_batches(splits.train, 200), cfg)
        st = program_cg_stats(program, splits.test)
        row = {"partitions": p, "acc": st["acc"], "fp_acc": fp_acc,
               "flop_reduction": st["flop_reduction"], "sparsity": st["sparsity"]}
        if details:
            fs = cg_stats(cg, splits.test)
            row.update(cg_flop_reduction=st["cg_flop_reduction"], cg_acc=fs["acc"],
                       cg_sparsity=fs["sparsity"], seconds=time.perf_counter() - t0)
        out.append(row)
    return out
