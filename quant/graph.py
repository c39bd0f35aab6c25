"""Float layer graph of a CNN: ``torch.fx`` trace, BatchNorm folded, activations fused.

The graph is the common skeleton of calibration, the integer program, the fake-quant model and
the generator's layer program. Each :class:`Node` produces one tensor, named after the module
that makes it (``layer1.0.conv1``); inputs refer to those names.

Supported: Conv2d (+ BatchNorm2d, folded; + ReLU/ReLU6/Hardtanh(0, α) ("pact", a clamp at
α), fused when the conv is its only producer), Linear, residual add (+ ReLU), channel concat, MaxPool2d, global average pooling
(AdaptiveAvgPool2d(1) / AvgPool2d over the whole map), flatten, Dropout/Identity (dropped).
Anything else raises :class:`UnsupportedLayerError` naming the node.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["Node", "FloatGraph", "UnsupportedLayerError", "trace", "fold_bn"]


class UnsupportedLayerError(ValueError):
    """A layer of the model that the flow cannot quantize or map to hardware."""


@dataclasses.dataclass
class Node:
    """One tensor-producing operation of the float graph.

    ``kind`` is one of ``input conv linear add concat maxpool avgpool flatten relu``.
    For ``conv``/``linear``, ``weight``/``bias`` are the BN-folded float64 parameters.
    ``activation`` is ``None``, ``"relu"``, ``"relu6"`` or ``"pact"`` (fused; ``"pact"`` clamps
    to ``[0, attrs["pact_alpha"]]``).
    """

    name: str
    kind: str
    inputs: list[str]
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    stride: int = 1
    padding: int = 0
    groups: int = 1
    kernel: int = 1
    activation: str | None = None
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FloatGraph:
    """Nodes in execution order; ``output`` names the node whose tensor is the network output."""

    nodes: list[Node]
    output: str

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def users(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, record: dict[str, torch.Tensor] | None = None,
                pre_activation: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Run in float64. ``record`` receives every node's output; ``pre_activation`` the
        value before a fused activation (what calibration observes)."""
        env: dict[str, torch.Tensor] = {}
        for n in self.nodes:
            if n.kind == "input":
                y = x.to(torch.float64)
                pre = y
            else:
                pre = _float_op(n, [env[i] for i in n.inputs])
                y = _activate(pre, n.activation, n.attrs.get("pact_alpha"))
            env[n.name] = y
            if record is not None:
                record[n.name] = y
            if pre_activation is not None:
                pre_activation[n.name] = pre
        return env[self.output]


def _activate(x: torch.Tensor, activation: str | None, alpha: float | None = None
              ) -> torch.Tensor:
    if activation is None:
        return x
    if activation == "relu":
        return F.relu(x)
    if activation == "relu6":
        return x.clamp(0.0, 6.0)
    if activation == "pact":
        return x.clamp(0.0, alpha)
    raise ValueError(activation)


def _float_op(n: Node, xs: list[torch.Tensor]) -> torch.Tensor:
    if n.kind == "conv":
        return F.conv2d(xs[0], n.weight, n.bias, n.stride, n.padding, 1, n.groups)
    if n.kind == "linear":
        return F.linear(xs[0], n.weight, n.bias)
    if n.kind == "add":
        return xs[0] + xs[1]
    if n.kind == "concat":
        return torch.cat(xs, dim=1)
    if n.kind == "maxpool":
        return F.max_pool2d(xs[0], n.kernel, n.stride, n.padding)
    if n.kind == "avgpool":
        return xs[0].mean(dim=(2, 3), keepdim=True)
    if n.kind == "flatten":
        return torch.flatten(xs[0], 1)
    if n.kind == "relu":
        return xs[0]
    raise ValueError(n.kind)


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rule B0: fold eval-mode BN into the conv in float64:
    ``W' = W·γ/√(σ²+ε)``, ``b' = (b − μ)·γ/√(σ²+ε) + β`` (ε from the BN layer)."""
    w = conv.weight.detach().to(torch.float64)
    b = (conv.bias.detach().to(torch.float64) if conv.bias is not None
         else torch.zeros(w.shape[0], dtype=torch.float64))
    if bn is None:
        return w, b
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedLayerError(f"BatchNorm without running statistics after {conv}")
    gamma = bn.weight.detach().to(torch.float64) if bn.affine else torch.ones_like(b)
    beta = bn.bias.detach().to(torch.float64) if bn.affine else torch.zeros_like(b)
    scale = gamma / torch.sqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b = (b - bn.running_mean.detach().to(torch.float64)) * scale + beta
    return w, b


def _single(v: Any, what: str, name: str) -> int:
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise UnsupportedLayerError(f"layer {name!r}: non-square {what} {tuple(v)} is not supported")
        v = v[0]
    return int(v)


_ADD = {operator.add, operator.iadd, torch.add}
_RELU_FN = {F.relu, torch.relu}
_FLATTEN_FN = {torch.flatten}


def trace(model: nn.Module) -> FloatGraph:
    """Trace ``model`` (eval mode) into a :class:`FloatGraph`.

    Raises :class:`UnsupportedLayerError` naming the first layer that cannot be handled.
    """
    model = model.eval()
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    nodes: list[Node] = []
    alias: dict[str, str] = {}  # fx node name -> graph tensor name
    users = {n.name: list(n.users) for n in gm.graph.nodes}
    by_name: dict[str, Node] = {}
    output = None

    def src(a: Any) -> str:
        if not isinstance(a, torch.fx.Node):
            raise UnsupportedLayerError(f"non-tensor argument {a!r}")
        return alias[a.name]

    def emit(node: Node, fx_name: str) -> None:
        nodes.append(node)
        by_name[node.name] = node
        alias[fx_name] = node.name

    def fuse_activation(fx_node: torch.fx.Node, act: str, alpha: float | None = None) -> bool:
        """Fuse ``act`` into the producer of fx_node's input when it has that one user."""
        arg = fx_node.args[0]
        prod = by_name.get(alias.get(arg.name, ""))
        if prod is None or prod.kind not in ("conv", "linear", "add") or prod.activation:
            return False
        if len(users[arg.name]) != 1:
            return False
        prod.activation = act
        if alpha is not None:
            prod.attrs["pact_alpha"] = alpha
        alias[fx_node.name] = prod.name
        return True

    for fx in gm.graph.nodes:
        if fx.op == "placeholder":
            emit(Node("input", "input", []), fx.name)
        elif fx.op == "output":
            output = src(fx.args[0])
        elif fx.op == "call_module":
            mod = modules[fx.target]
            name = str(fx.target)
            if isinstance(mod, nn.Conv2d):
                if _single(mod.dilation, "dilation", name) != 1:
                    raise UnsupportedLayerError(f"layer {name!r}: dilation is not supported")
                if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                    raise UnsupportedLayerError(f"layer {name!r}: only explicit zero padding")
                w, b = fold_bn(mod, None)
                emit(Node(name, "conv", [src(fx.args[0])], w, b,
                          stride=_single(mod.stride, "stride", name),
                          padding=_single(mod.padding, "padding", name), groups=mod.groups,
                          kernel=_single(mod.kernel_size, "kernel", name),
                          attrs={"module": name}), fx.name)
            elif isinstance(mod, nn.BatchNorm2d):
                arg = fx.args[0]
                prod = by_name.get(alias.get(arg.name, ""))
                if prod is None or prod.kind != "conv" or prod.attrs.get("bn") \
                        or len(users[arg.name]) != 1:
                    raise UnsupportedLayerError(
                        f"layer {name!r}: BatchNorm2d must directly follow a conv it can be folded into")
                conv = modules[prod.attrs["module"]]
                prod.weight, prod.bias = fold_bn(conv, mod)
                prod.attrs["bn"] = name
                alias[fx.name] = prod.name
            elif isinstance(mod, nn.Hardtanh) and not isinstance(mod, nn.ReLU6):
                if float(mod.min_val) != 0.0 or not float(mod.max_val) > 0.0:
                    raise UnsupportedLayerError(f"layer {name!r}: only Hardtanh(0, alpha > 0) "
                                                "(a PACT clip) is supported")
                alpha = float(mod.max_val)
                if not fuse_activation(fx, "pact", alpha):
                    emit(Node(name, "relu", [src(fx.args[0])], activation="pact",
                              attrs={"pact_alpha": alpha}), fx.name)
            elif isinstance(mod, (nn.ReLU, nn.ReLU6)):
                act = "relu" if isinstance(mod, nn.ReLU) else "relu6"
                if not fuse_activation(fx, act):
                    emit(Node(name, "relu", [src(fx.args[0])], activation=act), fx.name)
            elif isinstance(mod, nn.Linear):
                emit(Node(name, "linear", [src(fx.args[0])],
                          mod.weight.detach().to(torch.float64),
                          (mod.bias.detach().to(torch.float64) if mod.bias is not None
                           else torch.zeros(mod.out_features, dtype=torch.float64)),
                          attrs={"module": name}), fx.name)
            elif isinstance(mod, nn.MaxPool2d):
                if _single(mod.dilation, "dilation", name) != 1 or mod.ceil_mode:
                    raise UnsupportedLayerError(f"layer {name!r}: dilated/ceil-mode max pooling")
                k = _single(mod.kernel_size, "kernel", name)
                emit(Node(name, "maxpool", [src(fx.args[0])], kernel=k,
                          stride=_single(mod.stride if mod.stride is not None else k, "stride", name),
                          padding=_single(mod.padding, "padding", name)), fx.name)
            elif isinstance(mod, nn.AdaptiveAvgPool2d):
                if _single(mod.output_size, "output size", name) != 1:
                    raise UnsupportedLayerError(f"layer {name!r}: only global average pooling")
                emit(Node(name, "avgpool", [src(fx.args[0])]), fx.name)
            elif isinstance(mod, (nn.Dropout, nn.Identity, nn.Flatten)):
                if isinstance(mod, nn.Flatten):
                    emit(Node(name, "flatten", [src(fx.args[0])]), fx.name)
                else:
                    alias[fx.name] = src(fx.args[0])
            else:
                raise UnsupportedLayerError(
                    f"layer {name!r}: module type {type(mod).__name__} is not supported")
        elif fx.op == "call_function":
            if fx.target in _ADD:
                a, b = fx.args[0], fx.args[1]
                emit(Node(fx.name, "add", [src(a), src(b)]), fx.name)
            elif fx.target in _RELU_FN:
                if not fuse_activation(fx, "relu"):
                    emit(Node(fx.name, "relu", [src(fx.args[0])], activation="relu"), fx.name)
            elif fx.target in _FLATTEN_FN:
                emit(Node(fx.name, "flatten", [src(fx.args[0])]), fx.name)
            elif fx.target is torch.cat:
                xs, dim = fx.args[0], fx.args[1] if len(fx.args) > 1 else fx.kwargs.get("dim", 0)
                if dim != 1:
                    raise UnsupportedLayerError(f"node {fx.name!r}: concat only along channels")
                emit(Node(fx.name, "concat", [src(a) for a in xs]), fx.name)
            else:
                raise UnsupportedLayerError(f"node {fx.name!r}: function {fx.target} is not supported")
        elif fx.op == "call_method":
            if fx.target in ("flatten", "view", "reshape"):
                emit(Node(fx.name, "flatten", [src(fx.args[0])]), fx.name)
            elif fx.target == "size":
                continue
            else:
                raise UnsupportedLayerError(f"node {fx.name!r}: method {fx.target!r} is not supported")
        elif fx.op == "get_attr":
            raise UnsupportedLayerError(f"node {fx.name!r}: parameters used outside a layer")
    if output is None:
        raise UnsupportedLayerError("model has no output")
    return FloatGraph(nodes, output)
