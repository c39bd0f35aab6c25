"""Turn layer-program steps into the engine's :class:`~dynacc.hw.program.ConvLayer` inputs.

This is the host side of running a network on the engine: it prepares each engine layer's
operands from the integer program (dense weights for grouped convs, im2col-folded weights
for the first layer) and from the activations of the previous steps, and runs the host
steps (:func:`run_host_step`) between engine layers with the golden model's rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynacc.hw.dual_program import DualLayer
from dynacc.hw.program import ConvLayer
from dynacc.quant.program import BFPProgram

from .layer_program import EngineLayer, HostStep, MappingError

__all__ = ["im2col", "engine_weights", "conv_layer", "dual_layer", "run_host_step"]


def im2col(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Host im2col of one image ``[C, H, W]`` -> ``[C·k·k, Ho, Wo]``, channel index
    ``c·k·k + ky·k + kx`` (the order of ``w.reshape(O, C·k·k)``); padding reads zero."""
    c, h, w = x.shape
    cols = F.unfold(x[None].to(torch.float64), kernel, padding=padding, stride=stride)[0]
    ho = (h + 2 * padding - kernel) // stride + 1
    wo = (w + 2 * padding - kernel) // stride + 1
    return cols.reshape(c * kernel * kernel, ho, wo).to(torch.int64)


def engine_weights(program: BFPProgram, layer: EngineLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[O, C', kh', kw']`` weight mantissas and ``[O, C']`` LSBs as the engine sees them.

    Grouped convs become block-diagonal dense convs; the zero weights outside a filter's group
    get that filter's smallest in-group LSB, so they change neither the accumulator anchor
    nor the word's alignment shift. With host im2col, the kernel folds into the channels.
    """
    op = program.op(layer.name)
    w = op.weight if op.weight.dim() == 4 else op.weight[:, :, None, None]
    w_lsb = op.w_lsb
    if op.groups > 1:
        o, cg = w_lsb.shape
        og = o // op.groups
        dense = torch.zeros((o, cg * op.groups) + tuple(w.shape[2:]), dtype=torch.int64)
        dlsb = w_lsb.amin(dim=1, keepdim=True).expand(o, cg * op.groups).clone()
        for g in range(op.groups):
            rows, cols = slice(g * og, (g + 1) * og), slice(g * cg, (g + 1) * cg)
            dense[rows, cols] = w[rows]
            dlsb[rows, cols] = w_lsb[rows]
        w, w_lsb = dense, dlsb
    if layer.im2col:
        kk = w.shape[2] * w.shape[3]
        w_lsb = w_lsb.repeat_interleave(kk, dim=1)
        w = w.reshape(w.shape[0], -1, 1, 1)
    return w.to(torch.int64), w_lsb.to(torch.int64)


def _uniform(name: str, what: str, t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    vals = torch.unique(t)
    if vals.numel() != 1:
        raise MappingError(f"layer {name!r}: {what} differs between channels; the engine "
                           "takes one value per layer")
    return int(vals[0])


def conv_layer(program: BFPProgram, layer: EngineLayer,
               acts: dict[str, torch.Tensor] | None = None) -> ConvLayer:
    """The engine inputs of ``layer`` for one image. ``acts`` maps tensor names to that
    image's integer activations (``[C, H, W]`` or ``[C]``); without it the activations are
    zeros of the right shape (enough to check that the layer fits the engine)."""
    op = program.op(layer.name)
    out_op = program.op(layer.output)
    w, w_lsb = engine_weights(program, layer)
    if acts is None:
        x = torch.zeros((layer.in_channels, layer.height, layer.width), dtype=torch.int64)
        res = (torch.zeros((layer.out_channels, layer.out_height, layer.out_width),
                           dtype=torch.int64) if layer.residual else None)
    else:
        x = acts[layer.input]
        if x.dim() == 1:
            x = x[:, None, None]
        if layer.im2col:
            x = im2col(x, op.kernel, op.stride, op.padding)
        res = acts[layer.residual] if layer.residual else None
    return ConvLayer(
        name=layer.name, x=x, x_lsb=layer.in_lsb, w=w, w_lsb=w_lsb, bias=op.bias,
        out_lsb=layer.out_lsb, stride=layer.stride, padding=layer.padding,
        activation=out_op.activation,
        clamp_max=_uniform(layer.name, "the ReLU6 bound", out_op.clamp_max),
        residual=res, residual_lsb=layer.residual_lsb if layer.residual else 0,
        joint_lsb=layer.joint_lsb)


def dual_layer(program: BFPProgram, layer: EngineLayer,
               acts: dict[str, torch.Tensor] | None = None, mode: str | None = None) -> DualLayer:
    """The dual-precision engine inputs of ``layer`` for one image (rules G0-G4), in ``mode``
    (default: the op's own; DFS passes the gate's decision for this image). Without ``acts``
    the input is zeros (enough to check that the layer fits)."""
    op = program.op(layer.name)
    if not op.dual_precision:
        raise MappingError(f"layer {layer.name!r} is not a dual-precision conv")
    w, w_lsb = engine_weights(program, layer)
    if acts is None:
        x = torch.zeros((layer.in_channels, layer.height, layer.width), dtype=torch.int64)
    else:
        x = acts[layer.input]
    mode = mode or op.dp_mode
    partitions = msb_bits = None
    if op.channel_gated:
        if mode != "gated":
            raise MappingError(f"layer {layer.name!r}: a Channel Gating conv runs gated on the "
                               f"dual-precision engine, not in mode {mode!r}")
        mode, partitions = "cg", op.cg_partitions
    else:
        msb_bits = op.dp_msb_bits
    return DualLayer(
        name=layer.name, x=x, x_lsb=layer.in_lsb, w=w, w_lsb=w_lsb, bias=op.bias,
        out_lsb=layer.out_lsb, act_bits=op.dp_act_bits, msb_bits=msb_bits,
        threshold=op.dp_threshold, sign=op.dp_sign, mode=mode,
        stride=layer.stride, padding=layer.padding, activation=op.activation,
        clamp_max=_uniform(layer.name, "the PACT bound", op.clamp_max), partitions=partitions)


def run_host_step(program: BFPProgram, step: HostStep, acts: dict[str, torch.Tensor]
                  ) -> torch.Tensor:
    """One host step on one image's integer activations: the golden op itself (rules P1,
    P2, E1, E2, R4), so host work and golden model cannot drift apart."""
    if step.kind == "quantize_input":
        raise MappingError("the input is quantized by BFPProgram.quantize_input, not a host op")
    op = program.op(step.name)
    return program.golden_op(op, [acts[i][None] for i in step.inputs])[0]
