"""Trained Channel Gating model -> deployable integer :class:`~dynacc.quant.program.BFPProgram`.

Steps (docs/arithmetic.md, "Channel Gating deployment"):

1. the float network of a CG ResNet and its static PACT scales are those of the PG ResNet with
   the same weights and PACT clips (:func:`_pg_twin`), so :func:`~dynacc.quant.pg_program.
   build_pg_program` calibrates it (rules PG1, G0): every CG conv reads unsigned ``act_bits``
   integers on a static ``2^lsb``, BN is folded (B0) and everything else is calibrated as usual;
2. every block ``conv1`` op becomes channel-gated (rule CG4: ``cg_partitions = p``, ``dp_msb_bits =
   None``, ``dp_mode = "gated"``): the float decision ``BN_na(Y_p) > Δ_c`` is
   ``Y_p > θ_c = Δ_c·√(var_c + ε) + μ_c`` and, with the outer BN folded into the weights
   (``k_c = γ_c/√(σ²_c + ε)``, ``acc_base·2^acc_lsb[c] = k_c·Y_p``), the integer gate
   ``sign_c·acc_base > T_c`` with ``sign_c = sign(k_c)`` and
   ``T_c = floor(|k_c|·θ_c/2^acc_lsb[c])``, clamped to the base-phase accumulator bound
   (rules CG2, CG5, CG6; :func:`~dynacc.quant.pg_program.gate_constants`).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from . import golden
from .cg import CGConv2d, cg_flop_summary
from .formats import QuantConfig
from .models.cg_resnet import CGResNet
from .models.pg_resnet import PGResNet
from .models.resnet_cifar import CifarResNet
from .pg_program import (_batch, _gates, _named_blocks, build_pg_program, gate_constants,
                         pg_layer_cases)
from .pg_program import to_float_model as _pg_to_float_model
from .program import BFPProgram

__all__ = ["to_float_model", "cg_gate_constants", "build_cg_program", "cg_gate_stats",
           "program_cg_stats", "cg_layer_cases", "cg_model_from_checkpoint"]


def _pg_twin(cg: CGResNet) -> PGResNet:
    """The PG ResNet with the CG model's weights, BNs and PACT clips (its PG thresholds are
    unused): the same float network with the same static PACT scales."""
    if not isinstance(cg, CGResNet):
        raise ValueError(f"expected a CGResNet, not {type(cg).__name__}")
    twin = PGResNet(cg.n, num_classes=cg.fc.out_features, in_channels=cg.conv1.in_channels,
                    act_bits=cg.act_bits, msb_bits=cg.act_bits - 1, cfg=cg.cfg)
    cg_state = cg.state_dict()
    twin.load_state_dict({k: v if k.endswith(".threshold") else cg_state[k]
                          for k, v in twin.state_dict().items()})
    return twin.eval()


def to_float_model(cg: CGResNet) -> CifarResNet:
    """Plain float ``CifarResNet`` with the CG model's weights (the full conv1, no gate) and its
    PACT clips as ``Hardtanh(0, α)``; its state_dict has the ``resnet20`` keys."""
    return _pg_to_float_model(_pg_twin(cg))


def cg_gate_constants(conv: CGConv2d, bn: nn.BatchNorm2d, acc_lsb: torch.Tensor,
                      bound: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer gate of CG conv ``conv`` followed by the BN ``bn`` (rules CG5, CG6): the float
    decision ``Y_p > θ_c`` (:meth:`~dynacc.quant.cg.CGConv2d.gate_offset`) on the raw partial
    sum becomes ``sign_c·acc_base > T_c``, ``T_c = floor(|k_c|·θ_c/2^acc_lsb[c])``, exactly as
    Precision Gating's gate (:func:`~dynacc.quant.pg_program.gate_constants`). Returns
    ``(threshold, sign)``, int64 ``[O]``."""
    return gate_constants(conv.gate_offset(), bn, acc_lsb, bound)


@torch.no_grad()
def build_cg_program(model: CGResNet, calib_batches: Iterable[torch.Tensor], cfg: QuantConfig,
                     progress: bool = False) -> BFPProgram:
    """Integer program of a trained CG ResNet (see the module docstring).

    ``cfg`` must have ``M - 1 >= act_bits`` (the unsigned activations fit the M-bit word).
    Raises ``ValueError`` naming the layer when a static scale does not fit the exponent range.
    """
    model = model.eval()
    program = build_pg_program(_pg_twin(model), calib_batches, cfg, progress=progress)
    x_max = (1 << model.act_bits) - 1
    for name, blk in _named_blocks(model):
        op = program.op(f"{name}.conv1")
        o, c = op.weight.shape[:2]
        base = golden.cg_base_mask(o, c, model.partitions)[:, :, None, None]
        bound = golden.accumulator_bound(op.weight * base, op.shift, None, x_max)
        op.dp_threshold, op.dp_sign = cg_gate_constants(blk.conv1, blk.bn1, op.acc_lsb, bound)
        op.dp_msb_bits, op.cg_partitions, op.dp_mode = None, model.partitions, "gated"
    return program


def _cg_gates(program: BFPProgram, env: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    gates = _gates(program, env)
    return {o.name: {**gates[o.name], "partitions": o.cg_partitions}
            for o in program.ops if o.channel_gated}


@torch.no_grad()
def cg_gate_stats(program: BFPProgram, x: torch.Tensor) -> dict[str, dict[str, int]]:
    """Gate outcomes of the integer (golden) model on float images ``x``: per channel-gated
    layer ``{"passed": #outputs whose rest phase runs, "total": #outputs, "partitions": p}``."""
    return _cg_gates(program, program.run_golden(_batch(x)))


@torch.no_grad()
def program_cg_stats(program: BFPProgram, loader: Iterable) -> dict[str, Any]:
    """One golden pass over ``(images, labels)`` batches: ``acc`` (percent, argmax of the
    output mantissas) and, from the integer gate outcomes, ``sparsity``,
    ``cg_flop_reduction``, ``flop_reduction`` (whole network) and ``layers`` as
    :func:`~dynacc.quant.cg.cg_flop_summary` (rule CG7)."""
    if not any(o.channel_gated for o in program.ops):
        raise ValueError("program has no channel-gated layers")
    gates: dict[str, dict[str, int]] = {}
    dense = {o.name: 0 for o in program.compute_ops()}
    correct = n = 0
    for x, y in loader:
        env = program.run_golden(_batch(x))
        correct += int((env[program.output].argmax(dim=1) == y).sum())
        n += len(y)
        for o in program.compute_ops():
            dense[o.name] += env[o.name].numel() * o.weight[0].numel()
        for k, v in _cg_gates(program, env).items():
            g = gates.setdefault(k, {"passed": 0, "total": 0, "partitions": v["partitions"]})
            g["passed"] += v["passed"]
            g["total"] += v["total"]
    return {"acc": 100.0 * correct / max(n, 1), **cg_flop_summary(dense, gates)}


@torch.no_grad()
def cg_layer_cases(program: BFPProgram, x_image: torch.Tensor) -> list[dict[str, Any]]:
    """For one float test image (``[C, H, W]`` or ``[1, C, H, W]``), every channel-gated
    layer's golden integer input: ``[{"name", "op", "x_int" [1, C, H, W] int64}]`` in program
    order (what an RTL bench feeds the two-phase datapath)."""
    if _batch(x_image).shape[0] != 1:
        raise ValueError(f"cg_layer_cases takes one image, got a batch of {x_image.shape[0]}")
    return [c for c in pg_layer_cases(program, x_image) if c["op"].channel_gated]


def cg_model_from_checkpoint(path: str) -> tuple[CGResNet, BFPProgram, dict[str, Any]]:
    """Rebuild the trained CG model saved by ``train-cg`` (its settings and CG state_dict are in
    the checkpoint's meta). Returns ``(cg_model, program, meta)``."""
    from .checkpoint import CheckpointError, load_checkpoint

    ck = load_checkpoint(path)
    if ck.meta.get("technique") != "cg" or "cg_state_dict" not in ck.meta:
        raise CheckpointError(f"checkpoint {str(path)!r} was not written by train-cg")
    s = ck.meta["cg"]
    cg = CGResNet((ck.model.depth - 2) // 6, num_classes=ck.model.fc.out_features,
                  in_channels=ck.model.conv1.in_channels, partitions=s["partitions"],
                  act_bits=s["act_bits"], cfg=QuantConfig.from_dict(ck.meta["quant"]),
                  alpha=s["alpha"], sparse_bp=s["sparse_bp"])
    cg.load_state_dict(ck.meta["cg_state_dict"])
    return cg.eval(), ck.program, ck.meta
