"""Predictive layer fusion flow on digits: vanilla → pruned → predictor → integer golden.

:func:`run_fusion` trains the three stages (progress bars), builds the integer program
(``fusion_program``) and measures; :func:`run_fusion_bench` returns the headline numbers;
:func:`save_fusion_checkpoint`/:func:`load_fusion_checkpoint` keep the pruned real network (the
checkpoint's model) and the predictor (``meta["predictor_state_dict"]``).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .fusion import fusion_stats, make_predicted, predicted_units, set_exact_masks
from .prune import train_pruned

__all__ = ["FUSION_DEFAULTS", "FUSION_MODELS", "train_epochs", "train_predictor", "other_mults", "run_fusion",
           "run_fusion_bench", "save_fusion_checkpoint", "load_fusion_checkpoint",
           "finetune_masked"]

#: zoo models built of fusion units (``FusioNetDigits``): the grouped FusioNet and the
#: MobileNetV2-style inverted residuals
FUSION_MODELS = ("fusionet_digits", "mbv2_fusion_digits")

FUSION_DEFAULTS: dict[str, Any] = {"float_epochs": 4, "prune_epochs": 4, "recover_epochs": 6,
                                   "pred_epochs": 3, "lr": 0.05, "prune_lr": 0.05,
                                   "pred_lr": 1e-3, "finetune_epochs": 12, "finetune_lr": 3e-3,
                                   "calib_images": 200}


def train_epochs(model: nn.Module, train: DataLoader, epochs: int, lr: float, seed: int = 0,
                 progress: bool = True, max_batches: int | None = None, desc: str = "train",
                 weight_decay: float = 5e-4, train_mode: bool = True,
                 clip: float | None = None, optimizer: str = "sgd") -> nn.Module:
    """SGD (momentum 0.9, nesterov) or ``optimizer="adam"`` with a cosine schedule over the
    parameters that require gradients; ``max_batches`` caps the batches per epoch (smoke
    runs). ``train_mode=False``
    keeps every module in eval mode (frozen BN statistics); ``clip`` clips the gradient norm;
    a batch with a non-finite loss (or, with ``clip``, gradient norm) is skipped and
    counted in the progress bar."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay,
                              nesterov=True)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', not {optimizer!r}")
    per = min(len(train), max_batches) if max_batches else len(train)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * per))
    ce = nn.CrossEntropyLoss()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress)
    skipped = 0
    for _ in bar:
        model.train(train_mode)
        tot, n = 0.0, 0
        for i, (x, y) in enumerate(train):
            if max_batches is not None and i >= max_batches:
                break
            opt.zero_grad(set_to_none=True)
            loss = ce(model(x), y)
            if not torch.isfinite(loss):
                skipped += 1
                sched.step()
                continue
            loss.backward()
            if clip is not None:
                norm = nn.utils.clip_grad_norm_(params, clip)
                if not torch.isfinite(norm):
                    skipped += 1
                    sched.step()
                    continue
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(y)
            n += len(y)
        bar.set_postfix(loss=f"{tot / max(n, 1):.4f}", skipped=skipped)
    return model.eval()


def train_predictor(pred: nn.Module, train: DataLoader, epochs: int = 3, lr: float = 1e-3,
                    seed: int = 0, progress: bool = True, max_batches: int | None = None
                    ) -> nn.Module:
    """Train the ternary latent weights and predictor BN affines with the real network frozen
    (gradient routing of §5.5, ``exact_masks = False``); every BN keeps its running
    statistics (eval mode throughout), Adam, gradient norm clipped to 5, no weight decay.
    Adam, not SGD: the latent-weight gradients scale with ``γ/√(σ²+ε)`` of the real BN, which
    spans orders of magnitude over the channels of a pruned layer (a channel with one small
    surviving weight has a tiny σ); SGD at 1e-3 already drove the loss from 1.1 to 6-10."""
    if not predicted_units(pred):
        raise ValueError("train_predictor needs a model with PredictedUnit layers")
    set_exact_masks(pred, False)
    try:
        train_epochs(pred, train, epochs, lr, seed, progress, max_batches, "predictor", 0.0,
                     train_mode=False, clip=5.0, optimizer="adam")
    finally:
        set_exact_masks(pred, True)
    return pred.eval()


def finetune_masked(pred: nn.Module, train: DataLoader, epochs: int = 2, lr: float = 1e-4,
                    seed: int = 0, progress: bool = True, max_batches: int | None = None
                    ) -> nn.Module:
    """Fine-tune the real network of a predicted model under its predicted masks (exact
    masks, predictor frozen): the real weights adapt to the mask errors. Every conv weight
    that is 0 stays 0 (pruning masks and dead channels frozen, gradients masked), every BN
    keeps its running statistics (eval mode), Adam, gradient norm clipped to 5, no weight
    decay. The predictor's own parameters are left untouched."""
    units = predicted_units(pred)
    if not units:
        raise ValueError("finetune_masked needs a model with PredictedUnit layers")
    own = _predictor_params(units)
    real = [p for p in pred.parameters() if all(p is not q for q in own)]
    for p in own:
        p.requires_grad_(False)
    for p in real:
        p.requires_grad_(True)
    hooks = []
    for m in pred.modules():
        if isinstance(m, nn.Conv2d):
            keep = (m.weight.detach() != 0).to(m.weight.dtype)
            hooks.append(m.weight.register_hook(lambda g, k=keep: g * k))
    set_exact_masks(pred, True)
    try:
        train_epochs(pred, train, epochs, lr, seed, progress, max_batches, "masked fine-tune",
                     0.0, train_mode=False, clip=5.0, optimizer="adam")
    finally:
        for h in hooks:
            h.remove()
        for p in pred.parameters():
            p.requires_grad_(False)
        for p in own:
            p.requires_grad_(True)
    return pred.eval()


def _predictor_params(units) -> list[nn.Parameter]:
    """The predictor's own parameters (latent ternary weights, predictor BN affines)."""
    return [p for _, u in units
            for p in (u.t1_w, u.t2_w, *u.bn_p1.parameters(), *u.bn_p2.parameters())]


def other_mults(model: nn.Module, shape: tuple[int, int, int]) -> float:
    """Multiplications per image of the stem, head and FC (dense; not fused)."""
    _, h, w = shape
    s = model.stem
    ho = (h + 2 * s.padding[0] - 3) // s.stride[0] + 1
    wo = (w + 2 * s.padding[1] - 3) // s.stride[1] + 1
    stem = s.out_channels * s.in_channels * 9 * ho * wo
    for u in model.units:
        ho, wo = (ho - 1) // u.stride + 1, (wo - 1) // u.stride + 1
    hd = model.head
    head = hd.out_channels * (hd.in_channels // hd.groups) * ho * wo
    return float(stem + head + model.fc.in_features * model.fc.out_features)


def _subset(loader: DataLoader, images: int | None) -> DataLoader:
    if images is None or images >= len(loader.dataset):
        return loader
    return DataLoader(Subset(loader.dataset, range(images)), batch_size=loader.batch_size or 256)


def run_fusion(splits, model_name: str = "fusionet_digits", vanilla: nn.Module | None = None,
               float_epochs: int = FUSION_DEFAULTS["float_epochs"],
               prune_epochs: int = FUSION_DEFAULTS["prune_epochs"],
               recover_epochs: int = FUSION_DEFAULTS["recover_epochs"],
               pred_epochs: int = FUSION_DEFAULTS["pred_epochs"], lr: float = FUSION_DEFAULTS["lr"],
               prune_lr: float = FUSION_DEFAULTS["prune_lr"],
               pred_lr: float = FUSION_DEFAULTS["pred_lr"],
               finetune_epochs: int = FUSION_DEFAULTS["finetune_epochs"],
               finetune_lr: float = FUSION_DEFAULTS["finetune_lr"],
               calib_images: int = FUSION_DEFAULTS["calib_images"], seed: int = 0,
               progress: bool = True, max_batches: int | None = None,
               eval_images: int | None = None) -> dict[str, Any]:
    """The whole flow. Returns ``{"results": {...}, "vanilla", "pruned", "predicted",
    "program"}``; results hold accuracies (percent) of the float vanilla/pruned/predicted models
    and of the integer golden model (``predicted_acc``), mask error rates (integer golden and
    float), per-image multiplication/addition counts and their ratios. After the predictor,
    the real network inside ``predicted`` is fine-tuned under the predicted masks
    (:func:`finetune_masked`; ``pruned`` stays the network before that)."""
    from .flow import calibration_batches
    from .fusion_program import build_fusion_program, program_fusion_stats
    from .models import build_model
    from .train import evaluate

    t0 = time.perf_counter()
    kwargs = {"num_classes": splits.num_classes, "in_channels": splits.shape[0]}
    if vanilla is None:
        torch.manual_seed(seed)
        vanilla = build_model(model_name, **kwargs)
        train_epochs(vanilla, splits.train, float_epochs, lr, seed, progress, max_batches, "vanilla")
    test = _subset(splits.test, eval_images)
    vanilla_acc = evaluate(vanilla, test)
    pruned = copy.deepcopy(vanilla)
    pr = train_pruned(pruned, splits.train, prune_epochs, recover_epochs, prune_lr, seed=seed,
                      progress=progress, max_batches=max_batches)
    pruned.eval()
    pruned_acc = evaluate(pruned, test)
    pred = make_predicted(pruned)
    before = fusion_stats(pred, test)
    train_predictor(pred, splits.train, pred_epochs, pred_lr, seed, progress, max_batches)
    trained = fusion_stats(pred, test)
    finetune_masked(pred, splits.train, finetune_epochs, finetune_lr, seed, progress, max_batches)
    fst = fusion_stats(pred, test)
    program = build_fusion_program(pred, calibration_batches(splits.train, calib_images))
    gst = program_fusion_stats(program, test)
    c = gst["counts"]
    other = other_mults(pruned, splits.shape)
    res = {
        "vanilla_acc": vanilla_acc, "pruned_acc": pruned_acc, "predicted_acc": gst["acc"],
        "predicted_float_acc": fst["acc"], "predicted_float_acc_untrained": before["acc"],
        "predicted_float_acc_before_finetune": trained["acc"],
        "mask_error_rate": {"s1": gst["s1_error"], "s2": gst["s2_error"],
                            "mean": 0.5 * (gst["s1_error"] + gst["s2_error"])},
        "mask_error_rate_float": {"s1": fst["s1_error"], "s2": fst["s2_error"]},
        "mask_density_float": {"s1": fst["s1_density"], "s2": fst["s2_density"]},
        "mults_dense": c["mults_dense"], "mults_pruned": c["mults_pruned"],
        "mults_fused": c["mults_fused"], "mult_reduction": c["mults_dense"] / c["mults_fused"],
        "mult_reduction_vs_pruned": c["mults_pruned"] / c["mults_fused"],
        "adds_dense": c["adds_dense"], "adds_pruned": c["adds_pruned"],
        "adds_fused": c["adds_fused"], "adds_fused_A": c["adds_fused_A"],
        "adds_fused_c": c["adds_fused_c"], "adds_predictor": c["adds_predictor"],
        "compares": c["compares"], "mults_other": other,
        "mult_reduction_network": (c["mults_dense"] + other) / (c["mults_fused"] + other),
        "sparsity": pr.sparsity(), "seconds": time.perf_counter() - t0,
    }
    return {"results": res, "vanilla": vanilla, "pruned": pruned, "predicted": pred,
            "program": program}


def run_fusion_bench(seed: int = 0, progress: bool = False, return_all: bool = False,
                     model: str = "fusionet_digits", **kw) -> dict[str, Any]:
    """:func:`run_fusion` on digits from the cached vanilla ``model`` (``fusionet_digits``)
    (``cached_digits_model``, 4 epochs). Returns the results dict: ``vanilla_acc``,
    ``pruned_acc``, ``predicted_acc`` (integer golden model of the fused network),
    ``mask_error_rate`` (``{s1, s2, mean}``, integer golden vs the real integer ReLU outcomes),
    ``mults_dense``/``mults_fused`` (per image, over the fused blocks) and
    ``mult_reduction = mults_dense / mults_fused``, plus the extra keys of :func:`run_fusion`.
    With ``return_all``: the whole :func:`run_fusion` dict plus ``"splits"``."""
    from .flow import cached_digits_model

    vanilla, splits = cached_digits_model(model, epochs=FUSION_DEFAULTS["float_epochs"],
                                          seed=seed, progress=progress)
    out = run_fusion(splits, model, vanilla=vanilla, seed=seed, progress=progress, **kw)
    return {**out, "splits": splits} if return_all else out["results"]


def save_fusion_checkpoint(path: str | Path, model_name: str, kwargs: dict, pruned: nn.Module,
                           predicted: nn.Module, meta: dict) -> None:
    """The pruned real network as the checkpoint's model, the predictor in
    ``meta["predictor_state_dict"]``, ``meta["technique"] = "fusion"``."""
    from .checkpoint import save_checkpoint

    save_checkpoint(path, model_name, kwargs, pruned,
                    meta={**meta, "technique": "fusion",
                          "predictor_state_dict": predicted.state_dict()})


def load_fusion_checkpoint(path: str | Path) -> tuple[nn.Module, nn.Module, dict]:
    """``(pruned model, predicted model, meta)`` from :func:`save_fusion_checkpoint`;
    ``meta["model"]`` is the zoo name."""
    from .checkpoint import CheckpointError, load_checkpoint, load_state_dict_checked

    ck = load_checkpoint(path)
    if ck.meta.get("technique") != "fusion" or "predictor_state_dict" not in ck.meta:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a fusion checkpoint")
    pred = make_predicted(ck.model)
    load_state_dict_checked(pred, ck.meta["predictor_state_dict"], f"predictor of {str(path)!r}")
    return ck.model, pred.eval(), {**ck.meta, "model": ck.model_name}
