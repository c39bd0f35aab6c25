"""Whole-network integer golden model of a predicted FusioNet (``fusionet_digits``,
``mbv2_fusion_digits``).

Stem conv, head conv and FC run on the plain BFP golden ops (``golden.conv2d``/``linear``,
rules A1-R6, one weight block per filter); every :class:`~dynacc.quant.fusion.PredictedUnit`
runs as a fused block (``fusion_golden``, rules F1-F9). Activation exponents are fixed offline
by the max rule (Q3) on calibration images through the float predicted model.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import golden
from .formats import BFPFormat, WeightBlocking
from .functional import quantize, quantize_bias, quantize_weight, tensor_shared_exponent
from .fusion import predicted_units, set_exact_masks
from .fusion_golden import FusedBlock, block_counts, fold_bn, fold_predicted_unit, fused_block

__all__ = ["FusionProgram", "build_fusion_program", "program_fusion_stats",
           "fusion_program_from_checkpoint"]

_PER_FILTER = WeightBlocking(group=-1, align_span=15)


def _conv_op(conv: nn.Conv2d, bn: nn.BatchNorm2d, x_lsb: int, fmt: BFPFormat) -> dict:
    wf, bf = fold_bn(conv.weight, bn)
    w, _, per_c = quantize_weight(wf, fmt, _PER_FILTER)
    acc_lsb, _ = golden.conv_alignment(x_lsb, per_c, conv.groups)
    return {"w": w, "w_lsb": per_c, "bias": quantize_bias(bf, acc_lsb), "stride": conv.stride[0],
            "padding": conv.padding[0], "groups": conv.groups}


@dataclasses.dataclass
class FusionProgram:
    """Integer constants of the whole network; :meth:`run` returns int64 logits."""

    fmt: BFPFormat
    in_lsb: int
    stem: dict
    stem_lsb: int
    blocks: list[FusedBlock]
    block_lsb: list[int]
    head: dict
    head_lsb: int
    fc_w: torch.Tensor
    fc_lsb: torch.Tensor
    fc_bias: torch.Tensor

    def run(self, x: torch.Tensor, method: str = "unfused") -> tuple[torch.Tensor, list[dict]]:
        """Float images -> ``(logits [N, classes] int64, per-block info)``; a block's info
        holds its masks, counts and its input mantissas ``x`` (``fused_block`` keys plus
        ``x`` and ``counts``)."""
        f = self.fmt
        m = quantize(x, self.in_lsb, f)
        s = self.stem
        m = golden.conv2d(m, self.in_lsb, s["w"], s["w_lsb"], s["bias"], self.stem_lsb, f,
                          s["stride"], s["padding"], s["groups"], activation="relu")
        lsb, infos = self.stem_lsb, []
        for blk, out_lsb in zip(self.blocks, self.block_lsb):
            if blk.x_lsb != lsb:
                raise ValueError(f"fused block expects input LSB {blk.x_lsb}, got {lsb}")
            x_in = m
            m, info = fused_block(blk, m, out_lsb, f, method)
            info["x"] = x_in
            info["counts"] = block_counts(blk, info["s1"], info["s2"])
            infos.append(info)
            lsb = out_lsb
        h = self.head
        m = golden.conv2d(m, lsb, h["w"], h["w_lsb"], h["bias"], self.head_lsb, f,
                          h["stride"], h["padding"], h["groups"], activation="relu")
        pooled = golden.global_avg_pool(m)
        logits, _ = golden.linear(pooled, self.head_lsb, self.fc_w, self.fc_lsb, self.fc_bias,
                                  None, f)
        return logits, infos


def _lsb_of(t: torch.Tensor, fmt: BFPFormat) -> int:
    return fmt.lsb(tensor_shared_exponent(t, fmt))


@torch.no_grad()
def build_fusion_program(model: nn.Module, calib: list[torch.Tensor],
                         fmt: BFPFormat = BFPFormat(8, 8)) -> FusionProgram:
    """Fold and quantize a predicted ``fusionet_digits`` (see :func:`~dynacc.quant.fusion.
    make_predicted`); activation exponents by the max rule over ``calib`` batches."""
    set_exact_masks(model, True)
    model.eval()
    units = [u for _, u in predicted_units(model)]
    if not units or not hasattr(model, "stem"):
        raise ValueError("build_fusion_program needs a predicted fusionet_digits model")
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_m, _i, out):
            a = out.detach().abs().amax()
            seen[name] = torch.maximum(seen.get(name, a), a)
        return hook

    hooks = [model.stem_bn.register_forward_hook(keep("stem")),
             model.head_bn.register_forward_hook(keep("head"))]
    hooks += [u.register_forward_hook(keep(f"u{i}")) for i, u in enumerate(units)]
    xmax = torch.zeros(())
    for x in calib:
        xmax = torch.maximum(xmax, x.abs().amax())
        model(x)
    for h in hooks:
        h.remove()
    in_lsb = _lsb_of(xmax, fmt)
    stem_lsb = _lsb_of(seen["stem"], fmt)
    stem = _conv_op(model.stem, model.stem_bn, in_lsb, fmt)
    blocks, lsbs, lsb = [], [], stem_lsb
    for i, u in enumerate(units):
        blocks.append(fold_predicted_unit(u, lsb, fmt))
        lsb = _lsb_of(seen[f"u{i}"], fmt)
        lsbs.append(lsb)
    head_lsb = _lsb_of(seen["head"], fmt)
    head = _conv_op(model.head, model.head_bn, lsb, fmt)
    fw, _, fc_lsb = quantize_weight(model.fc.weight, fmt, _PER_FILTER)
    acc_lsb, _ = golden.conv_alignment(head_lsb, fc_lsb)
    fb = quantize_bias(model.fc.bias, acc_lsb)
    return FusionProgram(fmt, in_lsb, stem, stem_lsb, blocks, lsbs, head, head_lsb, fw, fc_lsb, fb)


@torch.no_grad()
def program_fusion_stats(program: FusionProgram, loader) -> dict:
    """Integer golden accuracy (percent), mask error rates against the real (integer) ReLU
    outcomes ``[h1 > 0]``/``[h2 > 0]`` on in-image positions, and per-image counts summed over
    the fused blocks (``block_counts`` keys) plus the dense stem/head/FC multiplications
    (``mults_other``)."""
    correct = n = 0
    e1 = n1 = e2 = n2 = 0
    counts: dict[str, float] = {}
    batches = 0
    for x, y in loader:
        logits, infos = program.run(x)
        correct += int((logits.argmax(dim=1) == y).sum())
        n += len(y)
        batches += 1
        for info in infos:
            e1 += int((info["s1"] != (info["h1"] > 0)).sum()); n1 += info["s1"].numel()
            h2 = info["h2"]
            e2 += int((info["s2"] != (h2 > 0)).sum()); n2 += h2.numel()
            for k, v in info["counts"].items():
                counts[k] = counts.get(k, 0.0) + v * len(y)
    counts = {k: v / max(n, 1) for k, v in counts.items()}
    return {"acc": 100.0 * correct / max(n, 1), "s1_error": e1 / max(n1, 1),
            "s2_error": e2 / max(n2, 1), "counts": counts}


def fusion_program_from_checkpoint(path, calib_images: int | None = None,
                                   seed: int = 0) -> tuple[FusionProgram, object]:
    """The integer program of a ``train-fusion`` checkpoint as ``run_fusion`` builds it (the
    fine-tuned predicted network, exponents by the max rule on the first ``calib_images``
    digits training images), and the digits splits: ``(program, splits)``."""
    from .flow import calibration_batches, load_data
    from .train_fusion import FUSION_DEFAULTS, load_fusion_checkpoint

    _pruned, pred, meta = load_fusion_checkpoint(path)
    splits = load_data(meta["model"], "digits", seed=seed)
    n = FUSION_DEFAULTS["calib_images"] if calib_images is None else calib_images
    return build_fusion_program(pred, calibration_batches(splits.train, n)), splits
