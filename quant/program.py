"""The calibrated integer program of a network, with its golden and fake-quant executions.

A :class:`BFPProgram` is a :class:`~dynacc.quant.graph.FloatGraph` whose every tensor has an
offline LSB exponent per channel and whose every conv/linear has BFP weight mantissas, block
exponents, alignment shifts and an integer bias. It is what the checkpoint stores, what the
golden model executes, what ``gen/`` turns into a layer program and what ``sw/`` exports.

Where quantization happens (docs/arithmetic.md, "Quantization points"):

* the network input (one exponent, calibrated);
* every conv/linear output, after bias and before its activation (Static BFP's rule);
* a conv whose only consumer is a residual add targets the add's *joint* exponent, calibrated
  on both operands together, so the adder needs no alignment; other operands (identity
  shortcuts) are requantized onto it;
* the sum of a residual add and the output of a concat (calibrated);
* the classifier (network output) is requantized like any layer, always with the max
  exponent (rule R6), so it never saturates on the calibration set.

Max/avg pooling, flatten and a standalone ReLU keep their input's exponent.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from . import golden
from .formats import QuantConfig
from .functional import (dequantize, fake_quantize, quantize, quantize_bias, quantize_weight,
                         requantize)
from .graph import FloatGraph, Node

__all__ = ["QuantOp", "BFPProgram", "quant_points", "build_program"]


@dataclasses.dataclass
class QuantOp:
    """One op of the integer program (mirrors a graph :class:`Node`).

    Integer fields (all ``torch.int64``): ``weight`` mantissas, ``block_exp`` shared exponents
    ``[O, n_blocks]``, ``w_lsb`` ``[O, C/groups]``, ``acc_lsb`` ``[O]``, ``shift`` alignment
    ``[O, C/groups]``, ``bias`` on ``acc_lsb``, ``joint_lsb`` (add), ``clamp_max`` (relu6, per
    channel). ``out_lsb`` is per output channel, ``None`` for a raw-accumulator output.

    A conv on the dual-precision engine has ``dp_act_bits`` set (its unsigned input width, rule
    G0), a gate ``dp_threshold``/``dp_sign`` per filter in accumulator units and ``dp_mode``.
    Precision Gating and DFS split the input **bits** (``dp_msb_bits``, rules G1-G4,
    ``cg_partitions = None``); Channel Gating splits the input **channels** into
    ``cg_partitions`` block-diagonal groups (rules CG1-CG3, ``dp_msb_bits = None``; mode
    ``msb`` is the base phase only, ``full`` the plain conv).
    """

    name: str
    kind: str
    inputs: list[str]
    out_lsb: torch.Tensor | None
    stride: int = 1
    padding: int = 0
    groups: int = 1
    kernel: int = 1
    activation: str | None = None
    weight: torch.Tensor | None = None
    block_exp: torch.Tensor | None = None
    w_lsb: torch.Tensor | None = None
    acc_lsb: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    joint_lsb: torch.Tensor | None = None
    clamp_max: torch.Tensor | None = None
    # dual-precision conv (Precision Gating / DFS, rules G0-G4); None for a plain conv
    dp_act_bits: int | None = None
    dp_msb_bits: int | None = None
    dp_threshold: torch.Tensor | None = None
    dp_sign: torch.Tensor | None = None
    dp_mode: str = "gated"
    # Channel Gating (rules CG1-CG3): partitions p of the base phase; None for PG / DFS / plain
    cg_partitions: int | None = None

    @property
    def dual_precision(self) -> bool:
        return self.dp_act_bits is not None

    @property
    def channel_gated(self) -> bool:
        return self.cg_partitions is not None


def quant_points(graph: FloatGraph) -> dict[str, list[str]]:
    """Map each calibrated exponent to the tensors observed for it.

    Keys are point names: a node name (its pre-activation output is observed), or
    ``"<add>.joint"`` (both operands of a residual add). Values list the node names whose
    tensors feed the observer. Nodes that inherit an exponent have no point.
    """
    points: dict[str, list[str]] = {}
    for n in graph.nodes:
        if n.kind in ("input", "concat"):
            points[n.name] = [n.name]
        elif n.kind in ("conv", "linear"):
            if _joint_target(graph, n) is None:
                points[n.name] = [n.name]
        elif n.kind == "add":
            points[n.name + ".joint"] = list(n.inputs)
            points[n.name] = [n.name]
    return points


def _joint_target(graph: FloatGraph, n: Node) -> str | None:
    """The add whose joint exponent conv ``n`` targets directly, if any."""
    if n.kind != "conv" or n.activation is not None:
        return None
    users = graph.users(n.name)
    if len(users) == 1 and users[0].kind == "add":
        return users[0].name
    return None


def _expand(lsb: torch.Tensor, channels: int) -> torch.Tensor:
    lsb = lsb.to(torch.int64).reshape(-1)
    if lsb.numel() == channels:
        return lsb.clone()
    if channels % lsb.numel():
        raise ValueError(f"{lsb.numel()} exponent groups do not divide {channels} channels")
    return lsb.repeat_interleave(channels // lsb.numel())


@dataclasses.dataclass
class BFPProgram:
    """A calibrated BFP network: ops in execution order plus the per-tensor LSB exponents."""

    cfg: QuantConfig
    ops: list[QuantOp]
    lsb: dict[str, torch.Tensor | None]
    output: str
    shared_exponents: dict[str, torch.Tensor]

    @property
    def fmt(self):  # noqa: ANN201 - BFPFormat
        return self.cfg.fmt

    def op(self, name: str) -> QuantOp:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(f"no layer named {name!r}")

    def compute_ops(self) -> list[QuantOp]:
        """Conv and linear ops (what the engine executes)."""
        return [o for o in self.ops if o.kind in ("conv", "linear")]

    # ------------------------------------------------------------------ execution
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Float image batch -> input mantissas."""
        lsb = self.lsb["input"]
        return quantize(x, lsb.reshape(1, -1, *([1] * (x.dim() - 2))), self.fmt)

    @torch.no_grad()
    def run_golden(self, x: torch.Tensor, integer_input: bool = False) -> dict[str, torch.Tensor]:
        """Integer execution: every op's output mantissas (``int64``), keyed by op name."""
        env: dict[str, torch.Tensor] = {}
        for o in self.ops:
            if o.kind == "input":
                env[o.name] = x.to(torch.int64) if integer_input else self.quantize_input(x)
            else:
                env[o.name] = self.golden_op(o, [env[i] for i in o.inputs])
        return env

    def golden_op(self, o: QuantOp, xs: list[torch.Tensor]) -> torch.Tensor:
        """One op of the program on batched integer inputs (the host steps of a hardware run
        call this too, so host and golden share one implementation)."""
        fmt = self.fmt
        if o.kind == "conv" and o.dual_precision:
            acc, _ = self.dual_precision_acc(o, xs[0])
            return self._finish(acc, o)
        if o.kind == "conv":
            acc, _ = golden.conv2d_acc(xs[0], self.lsb[o.inputs[0]], o.weight, o.w_lsb, o.bias,
                                       o.stride, o.padding, o.groups)
            return self._finish(acc, o)
        if o.kind == "linear":
            acc, _ = golden.conv2d_acc(xs[0][:, :, None, None], self.lsb[o.inputs[0]],
                                       o.weight[:, :, None, None], o.w_lsb, o.bias)
            return self._finish(acc[:, :, 0, 0], o)
        if o.kind == "add":
            la, lb = (self.lsb[i] for i in o.inputs)
            return golden.add(xs[0], la, xs[1], lb, o.joint_lsb, o.out_lsb, fmt,
                              o.activation, _cmax(o, xs[0].dim()))
        if o.kind == "concat":
            return golden.concat(xs, [self.lsb[i] for i in o.inputs], o.out_lsb, fmt)
        if o.kind == "maxpool":
            return golden.max_pool2d(xs[0], o.kernel, o.stride, o.padding)
        if o.kind == "avgpool":
            return golden.global_avg_pool(xs[0])[:, :, None, None]
        if o.kind == "flatten":
            return torch.flatten(xs[0], 1)
        if o.kind == "relu":
            return golden.apply_activation(xs[0], o.activation, _cmax(o, xs[0].dim()))
        raise ValueError(f"layer {o.name!r}: unknown op kind {o.kind!r}")

    def dual_precision_acc(self, o: QuantOp, x: torch.Tensor, mode: str | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulator and gate outcomes of dual-precision conv ``o`` (rules G1-G4, or CG1-CG3
        for a channel-gated op) in mode ``mode`` (default: the op's own ``dp_mode``).
        Returns ``(acc, passed)``."""
        if o.channel_gated:
            top = (1 << o.dp_act_bits) - 1
            if o.groups != 1:
                raise ValueError(f"layer {o.name!r}: a channel-gated conv must be dense (groups=1)")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) > top):
                raise ValueError(f"layer {o.name!r}: channel-gated input outside [0, {top}] "
                                 f"(rule G0; min {int(x.min())}, max {int(x.max())})")
            acc, passed, _ = golden.channel_gated_conv2d(
                x, self.lsb[o.inputs[0]], o.weight, o.w_lsb, o.bias, partitions=o.cg_partitions,
                threshold=o.dp_threshold, sign=o.dp_sign, mode=mode or o.dp_mode,
                stride=o.stride, padding=o.padding)
            return acc, passed
        acc, passed, _ = golden.dual_precision_conv2d(
            x, self.lsb[o.inputs[0]], o.weight, o.w_lsb, o.bias, act_bits=o.dp_act_bits,
            msb_bits=o.dp_msb_bits, threshold=o.dp_threshold, sign=o.dp_sign,
            mode=mode or o.dp_mode, stride=o.stride, padding=o.padding, groups=o.groups)
        return acc, passed

    def _finish(self, acc: torch.Tensor, o: QuantOp) -> torch.Tensor:
        if o.out_lsb is None:
            return golden.apply_activation(acc, o.activation)
        shape = (1, -1) + (1,) * (acc.dim() - 2)
        m = requantize(acc, (o.out_lsb - o.acc_lsb).reshape(shape), self.fmt)
        return golden.apply_activation(m, o.activation, _cmax(o, acc.dim()))

    def dequantize_output(self, name: str, m: torch.Tensor) -> torch.Tensor:
        """Mantissas of tensor ``name`` -> float values."""
        lsb = self.lsb[name]
        if lsb is None:
            lsb = self.op(name).acc_lsb
        return dequantize(m, lsb.reshape((1, -1) + (1,) * (m.dim() - 2)))

    def fake_quant(self, x: torch.Tensor, dtype: torch.dtype = torch.float64
                   ) -> dict[str, torch.Tensor]:
        """Float execution of the same program (quantize-dequantize at every quantization
        point, float accumulation). Agrees with :meth:`run_golden` within float rounding."""
        env: dict[str, torch.Tensor] = {}

        def fq(v: torch.Tensor, lsb: torch.Tensor) -> torch.Tensor:
            return fake_quantize(v, lsb.reshape((1, -1) + (1,) * (v.dim() - 2)), self.fmt).to(dtype)

        for o in self.ops:
            xs = [env[i] for i in o.inputs]
            if o.kind == "input":
                y = fq(x.to(dtype), self.lsb["input"])
            elif o.kind in ("conv", "linear"):
                w = dequantize(o.weight, o.w_lsb.reshape(o.w_lsb.shape + (1,) * (o.weight.dim() - 2)))
                b = dequantize(o.bias, o.acc_lsb)
                if o.kind == "conv":
                    y = F.conv2d(xs[0], w.to(dtype), b.to(dtype), o.stride, o.padding, 1, o.groups)
                else:
                    y = F.linear(xs[0], w.to(dtype), b.to(dtype))
                if o.out_lsb is not None:
                    y = fq(y, o.out_lsb)
                y = self._float_act(y, o)
            elif o.kind == "add":
                y = fq(xs[0], o.joint_lsb) + fq(xs[1], o.joint_lsb)
                y = self._float_act(fq(y, o.out_lsb), o)
            elif o.kind == "concat":
                bounds = torch.tensor([0] + [v.shape[1] for v in xs]).cumsum(0).tolist()
                y = torch.cat([fq(v, o.out_lsb[a:b]) for v, a, b in zip(xs, bounds, bounds[1:])], 1)
            elif o.kind == "maxpool":
                y = F.max_pool2d(xs[0], o.kernel, o.stride, o.padding)
            elif o.kind == "avgpool":
                lsb = self.lsb[o.name]
                y = fq(xs[0].mean(dim=(2, 3), keepdim=True), lsb)
            elif o.kind == "flatten":
                y = torch.flatten(xs[0], 1)
            elif o.kind == "relu":
                y = self._float_act(xs[0], o)
            else:
                raise ValueError(o.kind)
            env[o.name] = y
        return env

    def _float_act(self, y: torch.Tensor, o: QuantOp) -> torch.Tensor:
        if o.activation is None:
            return y
        if o.activation == "relu":
            return F.relu(y)
        lsb = self.lsb[o.name]
        top = dequantize(o.clamp_max, lsb).to(y.dtype).reshape((1, -1) + (1,) * (y.dim() - 2))
        return torch.minimum(F.relu(y), top)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Golden output, dequantized to float (e.g. classifier logits)."""
        env = self.run_golden(x)
        return self.dequantize_output(self.output, env[self.output])

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict[str, Any]:
        """Plain dict of tensors and Python values (for ``torch.save``)."""
        return {
            "cfg": self.cfg.to_dict(),
            "output": self.output,
            "lsb": dict(self.lsb),
            "shared_exponents": dict(self.shared_exponents),
            "ops": [{k: _compact(v) for k, v in dataclasses.asdict(o).items()} for o in self.ops],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "BFPProgram":
        ops = [QuantOp(**{k: _widen(v) for k, v in o.items()}) for o in state["ops"]]
        return cls(QuantConfig.from_dict(state["cfg"]), ops, dict(state["lsb"]), state["output"],
                   dict(state["shared_exponents"]))


def _compact(v: Any) -> Any:
    """Store an int64 tensor in the narrowest integer dtype that holds it (checkpoints of
    ResNet-50 shrink 8× for 8-bit mantissas); :func:`_widen` restores int64."""
    if not isinstance(v, torch.Tensor) or v.dtype != torch.int64 or v.numel() == 0:
        return v
    lo, hi = int(v.min()), int(v.max())
    for dt in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return v.to(dt)
    return v


def _widen(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.dtype in (torch.int8, torch.int16, torch.int32):
        return v.to(torch.int64)
    return v


def _cmax(o: QuantOp, ndim: int) -> torch.Tensor | None:
    if o.clamp_max is None:
        return None
    return o.clamp_max.reshape((1, -1) + (1,) * (ndim - 2))


def build_program(graph: FloatGraph, cfg: QuantConfig, exponents: dict[str, torch.Tensor],
                  channels: dict[str, int]) -> BFPProgram:
    """Quantize ``graph`` with calibrated shared ``exponents`` (one entry per
    :func:`quant_points` key, one value per activation channel group).

    ``channels`` gives each node's output channel count (from one float forward pass).
    """
    fmt = cfg.fmt
    missing = set(quant_points(graph)) - set(exponents)
    if missing:
        raise ValueError(f"missing calibrated exponents for {sorted(missing)}")

    def point_lsb(point: str, node: str) -> torch.Tensor:
        e = exponents[point].to(torch.int64).clamp(fmt.min_exponent, fmt.max_exponent)
        return _expand(e - fmt.lsb_offset, channels[node])

    lsb: dict[str, torch.Tensor | None] = {}
    ops: list[QuantOp] = []
    for n in graph.nodes:
        op = QuantOp(n.name, n.kind, list(n.inputs), None, n.stride, n.padding, n.groups,
                     n.kernel, n.activation)
        if n.kind in ("input", "concat"):
            op.out_lsb = point_lsb(n.name, n.name)
        elif n.kind in ("conv", "linear"):
            x_lsb = lsb[n.inputs[0]]
            if x_lsb is None:
                raise ValueError(f"layer {n.name!r} consumes a raw accumulator")
            w = n.weight if n.kind == "conv" else n.weight[:, :, None, None]
            op.weight, op.block_exp, op.w_lsb = quantize_weight(w, fmt, cfg.weights)
            if n.kind == "linear":
                op.weight = op.weight[:, :, 0, 0]
            op.acc_lsb, op.shift = golden.conv_alignment(x_lsb, op.w_lsb, n.groups)
            op.bias = quantize_bias(n.bias, op.acc_lsb)
            target = _joint_target(graph, n)
            if target is not None:
                op.out_lsb = point_lsb(target + ".joint", n.name)
            else:
                op.out_lsb = point_lsb(n.name, n.name)
        elif n.kind == "add":
            op.joint_lsb = point_lsb(n.name + ".joint", n.name)
            op.out_lsb = point_lsb(n.name, n.name)
        else:  # maxpool, avgpool, flatten, relu inherit
            op.out_lsb = lsb[n.inputs[0]]
        if n.activation == "relu6":
            op.clamp_max = quantize(torch.full((channels[n.name],), 6.0, dtype=torch.float64),
                                    op.out_lsb, fmt)
        elif n.activation == "pact":  # rule G0: the PACT clip α on the output LSB
            op.clamp_max = quantize(torch.full((channels[n.name],), n.attrs["pact_alpha"],
                                               dtype=torch.float64), op.out_lsb, fmt)
        lsb[n.name] = op.out_lsb
        ops.append(op)
    return BFPProgram(cfg, ops, lsb, graph.output, dict(exponents))


def iter_observed(graph: FloatGraph, batches: Iterable[torch.Tensor],
                  on_point: Callable[[str, torch.Tensor], None],
                  shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, int]:
    """Run float batches and hand each quantization point's observed tensors to
    ``on_point(point, tensor)``: a node's pre-activation output for its own point, the actual
    operand tensors for a joint point. Returns each node's output channel count; ``shapes``
    (if given) receives each node's per-image output shape."""
    points = quant_points(graph)
    channels: dict[str, int] = {}
    for x in batches:
        pre: dict[str, torch.Tensor] = {}
        post: dict[str, torch.Tensor] = {}
        graph.forward(x, record=post, pre_activation=pre)
        for name, t in post.items():
            channels[name] = t.shape[1]
            if shapes is not None:
                shapes[name] = tuple(t.shape[1:])
        for point, srcs in points.items():
            joint = point.endswith(".joint")
            for s in srcs:
                on_point(point, post[s] if joint else pre[s])
    return channels
