"""A trained DFS model as an integer program, executed with the gate on the host.

:func:`build_dfs_program` traces the DFS backbone (a plain CIFAR ResNet, BN folded) into the
usual calibrated :class:`~dynacc.quant.program.BFPProgram` and then makes every gated block
deployable on the dual-precision datapath (rules G0-G4):

* the tensors its convs consume (the block input = the previous block's residual-add output,
  and conv1's output) take the DFS model's frozen activation LSBs (so training and the golden
  model truncate the same integers) and the ``"pact"`` activation with
  ``clamp_max = 2**b - 1``: unsigned ``b``-bit integers (rule G0);
* its convs (conv1, conv2 and a transition block's 1x1 downsample) become dual-precision ops:
  ``dp_act_bits = b``, ``dp_msb_bits`` = the lowest precision option, ``dp_mode = "full"`` (so
  the program run as-is is the full-precision network).

:func:`run_dfs_golden` executes it per image: the gate (:class:`HostGate`, float) runs on the
**host** on the dequantized block outputs - it is outside the bit-exact boundary, and its
decision is an *input* of the datapath (algorithms.md §7 item 18). Each gated block then runs
its convs with ``dual_precision_acc`` in mode ``"msb"`` (precision ``p < b``, ``msb_bits = p``)
or ``"full"``, or is skipped: the block output is its shortcut tensor (the input, or the 1x1
downsample run in mode ``"full"``) requantized onto the block output LSB (rule R3) and clamped
by the block's output activation.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import DataLoader

from . import golden
from .calibrate import calibrate_graph
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .dfs import SKIP, DFSOptions, DFSResNet, RecurrentGate, parse_options
from .formats import BFPFormat, QuantConfig
from .functional import requantize
from .graph import trace
from .program import BFPProgram, QuantOp, build_program

__all__ = ["BlockLayout", "block_layout", "HostGate", "build_dfs_program", "run_dfs_golden",
           "DFSGoldenRun", "run_dfs_golden_env", "dfs_variant", "skip_output",
           "dfs_golden_stats", "save_dfs_checkpoint", "load_dfs_checkpoint"]


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Where residual block ``index`` lives in a program: its ``ops`` (program order), the
    tensor it consumes (``input``), its convs, its 1x1 ``shortcut`` conv (transition blocks)
    and its residual add (``output``). Block 0 is never gated."""

    index: int
    prefix: str
    input: str
    ops: tuple[str, ...]
    conv1: str
    conv2: str
    shortcut: str | None
    output: str

    @property
    def gated(self) -> bool:
        return self.index > 0

    @property
    def convs(self) -> tuple[str, ...]:
        return (self.conv1, self.conv2) + ((self.shortcut,) if self.shortcut else ())


def block_layout(program: BFPProgram) -> list[BlockLayout]:
    """Find the residual blocks (``layer<s>.<j>``) of a traced CIFAR ResNet program.

    Raises ``ValueError`` naming the block whose structure is not conv1 -> conv2 -> add
    (+ an optional ``downsample.0`` conv).
    """
    names = [o.name for o in program.ops]
    prefixes = [n[: -len(".conv1")] for n in names
                if n.endswith(".conv1") and n.startswith("layer")]
    if not prefixes:
        raise ValueError("program has no residual blocks (layer<s>.<j>.conv1)")
    blocks = []
    for k, pre in enumerate(prefixes):
        conv1, conv2, ds = f"{pre}.conv1", f"{pre}.conv2", f"{pre}.downsample.0"
        adds = [o for o in program.ops if o.kind == "add" and conv2 in o.inputs]
        if len(adds) != 1:
            raise ValueError(f"block {pre!r}: expected one residual add after {conv2!r}")
        add = adds[0]
        shortcut = ds if ds in names else None
        x_in = program.op(conv1).inputs[0]
        other = [i for i in add.inputs if i != conv2][0]
        if other != (shortcut or x_in) or (shortcut and program.op(shortcut).inputs[0] != x_in):
            raise ValueError(f"block {pre!r}: the residual add does not take the block input "
                             "or its downsample")
        ops = tuple(n for n in names if n.startswith(pre + ".")) + (add.name,)
        if set(ops) != {conv1, conv2, add.name} | ({shortcut} if shortcut else set()):
            raise ValueError(f"block {pre!r}: unexpected ops {sorted(ops)}")
        blocks.append(BlockLayout(k, pre, x_in, ops, conv1, conv2, shortcut, add.name))
    return blocks


class HostGate:
    """The trained DFS gate as the host runs it: float, on dequantized block outputs.

    ``decide(k, y, state)`` -> ``(option index [N], probs, state)`` for the block after block
    ``k`` (ties of the softmax go to the lowest option index).
    """

    def __init__(self, gate: RecurrentGate, options: DFSOptions, layout: Sequence[BlockLayout]):
        if len(gate.embed) != len(layout) - 1:
            raise ValueError(f"gate has {len(gate.embed)} embeddings for {len(layout)} blocks "
                             f"(needs {len(layout) - 1})")
        self.module = gate.eval()
        self.options = options
        self.layout = list(layout)

    @property
    def n_gated(self) -> int:
        return len(self.layout) - 1

    @torch.no_grad()
    def decide(self, k: int, y: torch.Tensor, state=None):
        y = y.to(torch.float32)
        if state is None:
            state = self.module.init_state(y.shape[0], y)
        p, state = self.module.step(k, y, state)
        return p.argmax(dim=-1), p, state

    def to_state(self) -> dict[str, Any]:
        return {"options": list(self.options.choices), "costs": list(self.options.costs),
                "channels": [m.in_channels for m in self.module.embed],
                "embed_dim": self.module.embed_dim,
                "gate_state": copy.deepcopy(self.module.state_dict())}

    @classmethod
    def from_state(cls, state: dict[str, Any], program: BFPProgram) -> "HostGate":
        opts = parse_options(state["options"], state["costs"])
        gate = RecurrentGate(state["channels"], len(opts), state["embed_dim"])
        gate.load_state_dict(state["gate_state"])
        return cls(gate, opts, block_layout(program))


def _producer_to_pact(program: BFPProgram, name: str, act_bits: int, what: str) -> None:
    o = program.op(name)
    if o.activation not in ("relu", "pact"):
        raise ValueError(f"layer {name!r} ({what}) must end in a ReLU to feed a dual-precision "
                         f"conv, it has activation {o.activation!r}")
    o.activation = "pact"
    c = o.out_lsb.numel()
    o.clamp_max = torch.full((c,), (1 << act_bits) - 1, dtype=torch.int64)


def build_dfs_program(model: DFSResNet, calib_batches: Iterable[torch.Tensor],
                      cfg: QuantConfig | None = None, progress: bool = False
                      ) -> tuple[BFPProgram, HostGate]:
    """Integer program of a trained DFS model plus its host gate (see the module docstring).

    ``cfg`` defaults to M = 9 (sign + 8 magnitude bits), max-exponent calibration; its
    mantissa width must hold the unsigned ``b``-bit activations (``b <= M - 1``).
    """
    cfg = cfg or QuantConfig(fmt=BFPFormat(9, 8), method="max")
    opts = model.options
    b = opts.act_bits
    if b > cfg.fmt.mantissa_bits - 1:
        raise ValueError(f"{b}-bit DFS activations do not fit M = {cfg.fmt.mantissa_bits} "
                         "(rule G0 needs act_bits <= M - 1)")
    if not bool(model.calibrated):
        raise ValueError("the DFS model has no calibrated activation LSBs")
    backbone = copy.deepcopy(model.backbone).eval()
    graph = trace(backbone)
    shapes: dict[str, tuple[int, ...]] = {}
    base = calibrate_graph(graph, list(calib_batches), cfg, progress, shapes)
    layout = block_layout(base)
    if len(layout) != len(model.blocks):
        raise ValueError(f"traced {len(layout)} blocks, the DFS model has {len(model.blocks)}")
    exps = dict(base.shared_exponents)
    off = cfg.fmt.lsb_offset

    def pin(point: str, lsb: int, what: str) -> None:
        if point not in exps:
            raise ValueError(f"layer {point!r} ({what}) has no exponent of its own to pin")
        exps[point] = torch.full_like(exps[point], int(lsb) + off)

    for blk in layout[1:]:
        pin(blk.input, model.act_lsb[blk.index, 0], f"input of gated block {blk.prefix}")
        pin(blk.conv1, model.act_lsb[blk.index, 1], f"conv1 output of gated block {blk.prefix}")
    channels = {k: v[0] for k, v in shapes.items()}
    program = build_program(graph, cfg, exps, channels)
    low = opts.low_precision
    for blk in layout[1:]:
        _producer_to_pact(program, blk.input, b, f"input of gated block {blk.prefix}")
        _producer_to_pact(program, blk.conv1, b, f"conv1 of gated block {blk.prefix}")
        if low is not None:
            for name in blk.convs:
                o = program.op(name)
                o.dp_act_bits, o.dp_msb_bits, o.dp_mode = b, low, "full"
    gate = HostGate(copy.deepcopy(model.gate), opts, layout)
    return program, gate


def dfs_variant(o: QuantOp, choice, act_bits: int) -> QuantOp:
    """Op ``o`` as run for DFS option ``choice`` (a precision): a dual-precision conv in mode
    ``"full"`` at ``act_bits``, else in mode ``"msb"`` with ``dp_msb_bits = choice``."""
    if o.kind != "conv":
        return o
    if not o.dual_precision:
        if choice != act_bits:
            raise ValueError(f"layer {o.name!r} is not dual-precision; it cannot run at "
                             f"{choice} bits")
        return o
    if choice == act_bits:
        return dataclasses.replace(o, dp_mode="full")
    return dataclasses.replace(o, dp_mode="msb", dp_msb_bits=int(choice))


def _chan(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def skip_output(fmt: BFPFormat, s: torch.Tensor, s_lsb: torch.Tensor, out_lsb: torch.Tensor,
                activation: str | None, clamp_max: torch.Tensor | None) -> torch.Tensor:
    """A skipped block's output from its shortcut mantissas ``s [N, C, H, W]`` (LSBs
    ``s_lsb``): requantized onto the block output's ``out_lsb`` (rule R3) and clamped by the
    block output's activation (the residual add's). Shared by the golden model and the
    deploy host."""
    m = requantize(s, _chan(out_lsb - s_lsb, s.dim()), fmt)
    cmax = None if clamp_max is None else _chan(clamp_max, s.dim())
    return golden.apply_activation(m, activation, cmax)


def _run_block(program: BFPProgram, blk: BlockLayout, x: torch.Tensor, choice, act_bits: int
               ) -> dict[str, torch.Tensor]:
    """Integer block ``blk`` on input mantissas ``x`` with DFS option ``choice``: every
    tensor it computes (a skipped block: its shortcut conv's, if any, and its output)."""
    add = program.op(blk.output)
    if choice == SKIP:
        env: dict[str, torch.Tensor] = {}
        if blk.shortcut is None:
            s, s_lsb = x, program.lsb[blk.input]
        else:
            ds = dfs_variant(program.op(blk.shortcut), act_bits, act_bits)
            s, s_lsb = program.golden_op(ds, [x]), program.lsb[blk.shortcut]
            env[blk.shortcut] = s
        env[blk.output] = skip_output(program.fmt, s, s_lsb, add.out_lsb, add.activation,
                                      add.clamp_max)
        return env
    env = {blk.input: x}
    for name in blk.ops:
        o = dfs_variant(program.op(name), choice, act_bits)
        env[name] = program.golden_op(o, [env[i] for i in o.inputs])
    del env[blk.input]
    return env


@dataclasses.dataclass
class DFSGoldenRun:
    """One golden DFS run: ``logits [N, classes]``, ``decisions [N, n_gated]`` (what ran),
    ``gate_decisions`` (the gate's own picks, also where ``decisions`` were forced), every
    tensor ``env[name] [N, ...]`` int64 (zeros for images that did not compute it) and
    ``ran[name] [N]`` bool (the images that did: a skipped block computes no conv1 / conv2)."""

    logits: torch.Tensor
    decisions: torch.Tensor
    gate_decisions: torch.Tensor
    env: dict[str, torch.Tensor]
    ran: dict[str, torch.Tensor]


@torch.no_grad()
def run_dfs_golden_env(program: BFPProgram, gate: HostGate, x: torch.Tensor,
                       decisions: torch.Tensor | None = None) -> DFSGoldenRun:
    """:func:`run_dfs_golden` keeping every tensor (see :class:`DFSGoldenRun`)."""
    layout = {b.index: b for b in gate.layout}
    first = {b.ops[0]: b for b in gate.layout}
    member = {n for b in gate.layout for n in b.ops}
    opts = gate.options
    b_bits = opts.act_bits
    n = x.shape[0]
    if decisions is not None:
        decisions = torch.as_tensor(decisions, dtype=torch.int64)
        if tuple(decisions.shape) != (n, gate.n_gated):
            raise ValueError(f"decisions must be [{n}, {gate.n_gated}], got "
                             f"{tuple(decisions.shape)}")
        if int(decisions.min()) < 0 or int(decisions.max()) >= len(opts):
            raise ValueError(f"decision indices must be in [0, {len(opts) - 1}]")
        dec = decisions.clone()
    else:
        dec = torch.zeros(n, gate.n_gated, dtype=torch.int64)
    picks = torch.full((n, gate.n_gated), -1, dtype=torch.int64)
    env: dict[str, torch.Tensor] = {}
    ran: dict[str, torch.Tensor] = {}

    def put(name: str, idx: torch.Tensor, part: torch.Tensor) -> None:
        if name not in env:
            env[name] = torch.zeros((n,) + tuple(part.shape[1:]), dtype=torch.int64)
            ran[name] = torch.zeros(n, dtype=torch.bool)
        env[name][idx] = part
        ran[name][idx] = True

    state = None
    for o in program.ops:
        if o.kind == "input":
            env[o.name] = program.quantize_input(x)
            ran[o.name] = torch.ones(n, dtype=torch.bool)
            continue
        if o.name in first:
            blk = first[o.name]
            xin = env[blk.input]
            if not blk.gated:
                for k, v in _run_block(program, blk, xin, b_bits, b_bits).items():
                    put(k, torch.arange(n), v)
            else:
                col = dec[:, blk.index - 1]
                for j in torch.unique(col).tolist():
                    idx = (col == j).nonzero().flatten()
                    part = _run_block(program, blk, xin[idx], opts.choices[j], b_bits)
                    for k, v in part.items():
                        put(k, idx, v)
            y = env[blk.output]
            if blk.index + 1 in layout:
                yf = program.dequantize_output(blk.output, y)
                choice, _, state = gate.decide(blk.index, yf, state)
                picks[:, blk.index] = choice
                if decisions is None:
                    dec[:, blk.index] = choice
            continue
        if o.name in member:
            continue
        env[o.name] = program.golden_op(o, [env[i] for i in o.inputs])
        ran[o.name] = torch.ones(n, dtype=torch.bool)
    logits = program.dequantize_output(program.output, env[program.output])
    return DFSGoldenRun(logits, dec, picks, env, ran)


def run_dfs_golden(program: BFPProgram, gate: HostGate, x: torch.Tensor,
                   decisions: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer golden execution of a DFS program on float images ``x [N, C, H, W]``.

    The host gate picks each image's option for every gated block from the dequantized output
    of the block before; ``decisions`` (option indices ``[N, n_gated]``) overrides it.
    Returns ``(logits [N, classes] float, decisions int64 [N, n_gated])``.
    """
    run = run_dfs_golden_env(program, gate, x, decisions)
    return run.logits, run.decisions


def dfs_golden_stats(program: BFPProgram, gate: HostGate, loader: DataLoader,
                     progress: bool = False) -> dict[str, Any]:
    """Integer-golden accuracy and CP over ``loader`` (same keys as
    :func:`~dynacc.quant.train_dfs.dfs_stats`)."""
    from tqdm.auto import tqdm

    from .train_dfs import decision_stats

    correct, decs, n = 0, [], 0
    for x, y in tqdm(loader, desc="DFS golden", unit="batch", disable=not progress, leave=False):
        logits, d = run_dfs_golden(program, gate, x)
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
        decs.append(d)
    return decision_stats(torch.cat(decs), gate.options.costs, len(gate.options),
                          100.0 * correct / max(n, 1))


def save_dfs_checkpoint(path: str | os.PathLike, model_name: str, model_kwargs: dict[str, Any],
                        model: DFSResNet, program: BFPProgram, gate: HostGate,
                        meta: dict[str, Any] | None = None) -> None:
    """A dynacc checkpoint of the backbone and its DFS program; ``meta["dfs"]`` holds the
    options, costs, gate state_dict and the frozen activation LSBs."""
    dfs = {**gate.to_state(), "act_lsb": model.act_lsb.clone(),
           "mantissa_bits": model.fmt.mantissa_bits, "exponent_bits": model.fmt.exponent_bits}
    save_checkpoint(path, model_name, model_kwargs, model.backbone, program,
                    meta={**(meta or {}), "dfs": dfs})


def load_dfs_checkpoint(path: str | os.PathLike
                        ) -> tuple[DFSResNet, BFPProgram, HostGate, dict[str, Any]]:
    """Inverse of :func:`save_dfs_checkpoint`: ``(model, program, gate, meta)``."""
    ck = load_checkpoint(path)
    dfs = ck.meta.get("dfs")
    if dfs is None or ck.program is None:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no DFS model (meta 'dfs' and a "
                              "program are needed)")
    opts = parse_options(dfs["options"], dfs["costs"])
    model = DFSResNet(ck.model, opts, BFPFormat(dfs["mantissa_bits"], dfs["exponent_bits"]),
                      embed_dim=dfs["embed_dim"])
    model.gate.load_state_dict(dfs["gate_state"])
    model.act_lsb.copy_(dfs["act_lsb"])
    model.calibrated.fill_(True)
    gate = HostGate.from_state(dfs, ck.program)
    return model.eval(), ck.program, gate, ck.meta
