"""Trained Precision Gating model -> deployable integer :class:`~dynacc.quant.program.BFPProgram`.

Steps (docs/arithmetic.md, "Dual precision (PG, DFS)"):

1. :func:`to_float_model`: the PG ResNet as a plain ``CifarResNet`` (PGConv2d -> Conv2d with
   the same weights, PACT -> ``Hardtanh(0, α)``, which the tracer fuses as ``"pact"``);
2. calibrate every other exponent as usual (``cfg.method``), but fix the exponent of every
   quantizing PACT output (the inputs of the PG convs and the pooled features) to its static
   scale ``lsb = ceil(log2(α/(2^b − 1)))``; its producer op gets ``activation="pact"`` with
   ``clamp_max = round_half_even(α/2^lsb) <= 2^b − 1`` (rule G0);
3. every PG conv op becomes dual-precision (``dp_mode="gated"``) with the integer gate
   ``sign_c·(acc_hb << L) > T_c``, ``sign_c = sign(k_c)``, ``T_c = floor(|k_c|·δ_c/2^acc_lsb[c])``,
   ``k_c = γ_c/√(σ²_c + ε)`` (rule PG2).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from . import golden
from .calibrate import calibrate_graph
from .formats import QuantConfig
from .graph import trace
from .models.pg_resnet import PGResNet
from .models.resnet_cifar import CifarResNet
from .pg import PACT, pact_lsb
from .program import BFPProgram

__all__ = ["to_float_model", "gate_constants", "build_pg_program", "pg_gate_stats",
           "program_pg_stats", "pg_layer_cases", "pg_model_from_checkpoint"]


def _clip(p: PACT) -> nn.Hardtanh:
    return nn.Hardtanh(0.0, float(p.alpha.detach().abs()))


def to_float_model(pg: PGResNet) -> CifarResNet:
    """Plain float ``CifarResNet`` with the PG model's weights and its PACT clips as
    ``Hardtanh(0, α)`` (the tracer's ``"pact"``). Its state_dict has the ``resnet20`` keys."""
    if not isinstance(pg, PGResNet):
        raise ValueError(f"expected a PGResNet, not {type(pg).__name__}")
    fm = CifarResNet(pg.n, num_classes=pg.fc.out_features, in_channels=pg.conv1.in_channels)
    state = {k: v for k, v in pg.state_dict().items()
             if not (k.endswith(".threshold") or k.endswith(".alpha"))}
    fm.load_state_dict(state)
    fm.relu = _clip(pg.relu)
    for fb, pb in zip((b for s in (fm.layer1, fm.layer2, fm.layer3) for b in s), pg.blocks()):
        fb.relu1, fb.relu2 = _clip(pb.relu1), _clip(pb.relu2)
    return fm.eval()


def gate_constants(delta: torch.Tensor, bn: nn.BatchNorm2d, acc_lsb: torch.Tensor,
                   bound: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer gate of a PG conv followed by BN (rule PG2).

    The float gate ``O_hb,raw > δ_c`` on the raw conv output becomes, with the BN folded into
    the weights (``k_c = γ_c/√(σ²_c + ε)``, ``(acc_hb << L)·2^acc_lsb = k_c·O_hb,raw``),
    ``sign_c·(acc_hb << L) > T_c`` with ``sign_c = sign(k_c)`` (+1 for ``k_c = 0``) and
    ``T_c = floor(|k_c|·δ_c·2^−acc_lsb[c])`` (exact for an integer left side). With ``bound``
    (the largest ``|acc_hb << L|``) T is clamped to ``[−bound − 1, bound]``, which changes no
    decision. Returns ``(threshold, sign)``, int64 ``[O]``.
    """
    gamma = bn.weight.detach().to(torch.float64) if bn.affine else torch.ones_like(bn.running_var,
                                                                                  dtype=torch.float64)
    k = gamma / torch.sqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    sign = torch.where(k < 0, -1, 1).to(torch.int64)
    v = torch.ldexp(k.abs() * delta.detach().to(torch.float64), (-acc_lsb).to(torch.float64))
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"gate threshold is not finite (delta {delta.tolist()})")
    if bound is not None:
        b = bound.to(torch.float64)
        v = torch.minimum(torch.maximum(v, -b - 1), b)
    return torch.floor(v).to(torch.int64), sign


def _pact_producers(graph: Any, pg: PGResNet) -> dict[str, PACT]:
    """Graph node carrying each PACT of the PG ResNet (fused into its producer)."""
    out: dict[str, PACT] = {"conv1": pg.relu}
    for name, blk in _named_blocks(pg):
        out[f"{name}.conv1"] = blk.relu1
        users = graph.users(f"{name}.conv2")
        if len(users) != 1 or users[0].kind != "add":
            raise ValueError(f"block {name!r}: conv2 must feed exactly one residual add")
        out[users[0].name] = blk.relu2
    for node, p in out.items():
        n = graph.node(node)
        if n.activation != "pact" or not math.isclose(n.attrs["pact_alpha"],
                                                      float(p.alpha.detach().abs())):
            raise ValueError(f"layer {node!r}: expected a fused PACT clip, got {n.activation!r}")
    return out


def _named_blocks(pg: PGResNet) -> list[tuple[str, Any]]:
    return [(f"{s}.{i}", b) for s in ("layer1", "layer2", "layer3")
            for i, b in enumerate(getattr(pg, s))]


@torch.no_grad()
def build_pg_program(model: PGResNet, calib_batches: Iterable[torch.Tensor], cfg: QuantConfig,
                     progress: bool = False) -> BFPProgram:
    """Integer program of a trained PG ResNet (see the module docstring).

    ``cfg`` must have ``M - 1 >= act_bits`` (the unsigned activations fit the M-bit word).
    Raises ``ValueError`` naming the layer when a static scale does not fit the exponent range.
    """
    if model.act_bits > cfg.fmt.mantissa_bits - 1:
        raise ValueError(f"act_bits={model.act_bits} does not fit M={cfg.fmt.mantissa_bits} "
                         f"(need act_bits <= M-1)")
    model = model.eval()
    graph = trace(to_float_model(model))
    fmt = cfg.fmt
    overrides: dict[str, torch.Tensor] = {}
    static_lsb: dict[str, int] = {}
    for node, p in _pact_producers(graph, model).items():
        if p.act_bits is None:
            continue
        lsb = p.lsb()
        e = lsb + fmt.lsb_offset
        if not fmt.min_exponent <= e <= fmt.max_exponent:
            raise ValueError(f"layer {node!r}: PACT scale 2^{lsb} needs shared exponent {e}, "
                             f"outside the E={fmt.exponent_bits}-bit range")
        overrides[node] = torch.tensor([e])
        static_lsb[node] = lsb
    program = calibrate_graph(graph, calib_batches, cfg, progress=progress, overrides=overrides)
    for node, lsb in static_lsb.items():
        op = program.op(node)
        if bool((op.out_lsb != lsb).any()):
            raise ValueError(f"layer {node!r}: output LSB {op.out_lsb.tolist()} is not the PACT "
                             f"scale 2^{lsb}")
        if int(op.clamp_max.max()) > (1 << model.act_bits) - 1:
            raise ValueError(f"layer {node!r}: PACT clamp {int(op.clamp_max.max())} exceeds "
                             f"2^{model.act_bits} - 1")
    l_bits = model.act_bits - model.msb_bits
    for name, blk in _named_blocks(model):
        op = program.op(f"{name}.conv1")
        if op.inputs[0] not in static_lsb:
            raise ValueError(f"PG layer {op.name!r}: its input {op.inputs[0]!r} is not a "
                             f"quantizing PACT output")
        x_max = (1 << model.msb_bits) - 1
        bound = golden.accumulator_bound(op.weight, op.shift, None, x_max) * (1 << l_bits)
        op.dp_threshold, op.dp_sign = gate_constants(blk.conv1.threshold, blk.bn1, op.acc_lsb,
                                                     bound)
        op.dp_act_bits, op.dp_msb_bits, op.dp_mode = model.act_bits, model.msb_bits, "gated"
    return program


def _batch(x: torch.Tensor) -> torch.Tensor:
    return x[None] if x.dim() == 3 else x


def _gates(program: BFPProgram, env: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    out = {}
    for o in program.ops:
        if o.kind == "conv" and o.dual_precision:
            _, passed = program.dual_precision_acc(o, env[o.inputs[0]])
            out[o.name] = {"passed": int(passed.sum()), "total": passed.numel()}
    return out


@torch.no_grad()
def pg_gate_stats(program: BFPProgram, x: torch.Tensor) -> dict[str, dict[str, int]]:
    """Gate outcomes of the integer (golden) model on float images ``x``: per dual-precision
    layer ``{"passed": #outputs whose LSB phase runs, "total": #outputs}``."""
    return _gates(program, program.run_golden(_batch(x)))


@torch.no_grad()
def program_pg_stats(program: BFPProgram, loader: Iterable) -> dict[str, Any]:
    """One golden pass over ``(images, labels)`` batches: ``acc`` (percent, argmax of the
    output mantissas), ``update_sparsity`` = 1 − passed/total over all dual-precision layers,
    ``avg_bits`` = ``msb + (1 − Sp)(act − msb)`` and ``layers`` (per-layer counts)."""
    layers: dict[str, dict[str, int]] = {}
    correct = n = 0
    for x, y in loader:
        env = program.run_golden(_batch(x))
        correct += int((env[program.output].argmax(dim=1) == y).sum())
        n += len(y)
        for k, v in _gates(program, env).items():
            acc = layers.setdefault(k, {"passed": 0, "total": 0})
            acc["passed"] += v["passed"]
            acc["total"] += v["total"]
    if not layers:
        raise ValueError("program has no dual-precision layers")
    passed = sum(v["passed"] for v in layers.values())
    total = sum(v["total"] for v in layers.values())
    sp = 1.0 - passed / max(total, 1)
    o = next(op for op in program.ops if op.dual_precision)
    return {"acc": 100.0 * correct / max(n, 1), "update_sparsity": sp,
            "avg_bits": o.dp_msb_bits + (1.0 - sp) * (o.dp_act_bits - o.dp_msb_bits),
            "layers": layers}


@torch.no_grad()
def pg_layer_cases(program: BFPProgram, x_image: torch.Tensor) -> list[dict[str, Any]]:
    """For one float test image (``[C, H, W]`` or ``[1, C, H, W]``), every dual-precision
    layer's golden integer input: ``[{"name", "op", "x_int" [1, C, H, W] int64}]`` in program
    order (what an RTL bench feeds the dual-precision datapath)."""
    x = _batch(x_image)
    if x.shape[0] != 1:
        raise ValueError(f"pg_layer_cases takes one image, got a batch of {x.shape[0]}")
    env = program.run_golden(x)
    return [{"name": o.name, "op": o, "x_int": env[o.inputs[0]].clone()}
            for o in program.ops if o.kind == "conv" and o.dual_precision]


def pg_model_from_checkpoint(path: str) -> tuple[PGResNet, BFPProgram, dict[str, Any]]:
    """Rebuild the trained PG model saved by ``train-pg`` (its settings and PG state_dict are in
    the checkpoint's meta). Returns ``(pg_model, program, meta)``."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .models.pg_resnet import PGResNet as _PG

    ck = load_checkpoint(path)
    if ck.meta.get("technique") != "pg" or "pg_state_dict" not in ck.meta:
        raise CheckpointError(f"checkpoint {str(path)!r} was not written by train-pg")
    s = ck.meta["pg"]
    cfg = QuantConfig.from_dict(ck.meta["quant"])
    pg = _PG((ck.model.depth - 2) // 6, num_classes=ck.model.fc.out_features,
             in_channels=ck.model.conv1.in_channels, act_bits=s["act_bits"],
             msb_bits=s["msb_bits"], cfg=cfg, alpha=s["alpha"], sparse_bp=s["sparse_bp"])
    pg.load_state_dict(ck.meta["pg_state_dict"])
    return pg.eval(), ck.program, ck.meta
