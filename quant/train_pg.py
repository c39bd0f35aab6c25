"""Precision Gating fine-tuning and statistics.

:func:`train_pg` fine-tunes a PG model (usually :func:`~dynacc.quant.models.pg_resnet.
pg_resnet_from_float` of a trained float ResNet) with ``CE + σ_g·Σ‖δ_l − target‖₂``;
:func:`pg_stats` measures accuracy and the update-phase sparsity of the float (fake-quant) PG
model; :func:`run_pg_sweep` runs the whole flow (fine-tune, integer program, golden accuracy)
for several bit configurations on digits.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader

from .pg import gating_loss, pg_layers
from .train import run_epochs

__all__ = ["train_pg", "pg_stats", "run_pg_sweep"]


def _set_sparse_bp(model: nn.Module, sparse_bp: bool) -> None:
    for _, m in pg_layers(model):
        m.sparse_bp = sparse_bp


def train_pg(model: nn.Module, splits: Any, epochs: int = 3, lr: float = 0.01,
             gate_target: float = 1.0, sigma_g: float = 1e-3, sparse_bp: bool = True,
             seed: int = 0, progress: bool = True, weight_decay: float = 1e-4,
             threshold_lr_scale: float = 1.0, max_batches: int | None = None) -> nn.Module:
    """Fine-tune PG ``model`` on ``splits.train`` (SGD, momentum 0.9, cosine schedule).

    Loss: cross-entropy + :func:`~dynacc.quant.pg.gating_loss` (``sigma_g``, ``gate_target``).
    Weight decay applies to weights and PACT clips, not to the thresholds δ (the gating loss
    is their regularizer); δ's learning rate is ``lr · threshold_lr_scale``. The batch order
    comes from a generator seeded with ``seed`` (deterministic for a seed and thread count).
    ``max_batches`` caps the batches per epoch (smoke tests). Returns the model in eval mode.
    """
    if not pg_layers(model):
        raise ValueError("train_pg needs a model with PGConv2d layers")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, not {epochs}")
    torch.manual_seed(seed)
    _set_sparse_bp(model, sparse_bp)
    loader = DataLoader(splits.train.dataset, batch_size=splits.train.batch_size or 64,
                        shuffle=True, generator=torch.Generator().manual_seed(seed))
    thresholds = [p for n, p in model.named_parameters() if n.endswith(".threshold")]
    others = [p for n, p in model.named_parameters() if not n.endswith(".threshold")]
    opt = torch.optim.SGD([{"params": others, "weight_decay": weight_decay},
                           {"params": thresholds, "weight_decay": 0.0,
                            "lr": lr * threshold_lr_scale}],
                          lr=lr, momentum=0.9)
    ce = nn.CrossEntropyLoss()
    return run_epochs(model, loader, opt,
                      lambda x, y: ce(model(x), y) + gating_loss(model, gate_target, sigma_g),
                      epochs, "train-pg", progress, max_batches)


@torch.no_grad()
def pg_stats(model: nn.Module, loader: Iterable) -> dict[str, float]:
    """Eval-mode accuracy (percent) and PG statistics over ``loader``.

    ``update_sparsity`` = 1 − (#outputs with mask = 1)/(#outputs) over all PG layers;
    ``avg_bits`` = ``msb_bits + (1 − Sp)(act_bits − msb_bits)`` (PG layers share one config).
    """
    layers = [m for _, m in pg_layers(model)]
    if not layers:
        raise ValueError("pg_stats needs a model with PGConv2d layers")
    model.eval()
    correct = n = on = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=1) == y).sum())
        n += len(y)
        for m in layers:
            on += m.last_gate[0]
            total += m.last_gate[1]
    sp = 1.0 - on / max(total, 1)
    b, h = layers[0].act_bits, layers[0].msb_bits
    return {"acc": 100.0 * correct / max(n, 1), "update_sparsity": sp,
            "avg_bits": h + (1.0 - sp) * (b - h)}


def run_pg_sweep(configs: Iterable[tuple[int, int]] | Iterable[dict[str, Any]], epochs: int = 3,
                 seed: int = 0, gate_target: float = 1.0, sigma_g: float = 0.05,
                 threshold_lr_scale: float = 100.0, progress: bool = False,
                 details: bool = False) -> list[dict[str, Any]]:
    """Fine-tune the digits ResNet-20 with PG for each ``(act_bits, msb_bits)`` config
    (or dict with those keys and optionally ``gate_target``/``sigma_g``), build the integer
    program (M = 9, max calibration on 200 train images) and measure it. The defaults
    (σ_g = 0.05, thresholds learning 100× faster) let δ reach its target within a few epochs
    of fine-tuning; PG's own σ_g = 1e-3 assumes 200 epochs from scratch.

    Returns per config ``{act_bits, msb_bits, acc, fp_acc, update_sparsity, avg_bits}``:
    ``acc`` is the integer golden accuracy on the digits test split, ``fp_acc`` the float
    ResNet-20 it starts from, sparsity/avg bits from the golden gate outcomes on the test split.
    With ``details`` each dict also carries ``pg_acc`` (fake-quant float PG model),
    ``pg_update_sparsity`` (float gate) and ``seconds`` (wall time).
    """
    import copy

    from .flow import cached_digits_model, calibration_batches
    from .formats import BFPFormat, QuantConfig
    from .models.pg_resnet import pg_resnet_from_float
    from .pg_program import build_pg_program, program_pg_stats
    from .train import evaluate

    float_model, splits = cached_digits_model("resnet20")
    fp_acc = evaluate(float_model, splits.test)
    cfg = QuantConfig(fmt=BFPFormat(9, 8), method="max")
    out = []
    for c in configs:
        c = dict(c) if isinstance(c, dict) else {"act_bits": c[0], "msb_bits": c[1]}
        t0 = time.perf_counter()
        pg = pg_resnet_from_float(copy.deepcopy(float_model), act_bits=c["act_bits"],
                                  msb_bits=c["msb_bits"], cfg=cfg)
        train_pg(pg, splits, epochs=epochs, gate_target=c.get("gate_target", gate_target),
                 sigma_g=c.get("sigma_g", sigma_g), seed=seed, progress=progress,
                 threshold_lr_scale=threshold_lr_scale)
        program = build_pg_program(pg, calibration_batches(splits.train, 200), cfg)
        st = program_pg_stats(program, splits.test)
        row = {"act_bits": c["act_bits"], "msb_bits": c["msb_bits"], "acc": st["acc"],
               "fp_acc": fp_acc, "update_sparsity": st["update_sparsity"],
               "avg_bits": st["avg_bits"]}
        if details:
            fs = pg_stats(pg, splits.test)
            row.update(pg_acc=fs["acc"], pg_update_sparsity=fs["update_sparsity"],
                       seconds=time.perf_counter() - t0)
        out.append(row)
    return out
