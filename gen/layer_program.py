"""Map a calibrated :class:`~dynacc.quant.program.BFPProgram` onto the BFP conv engine.

The result is the *layer program*: the engine layers (one descriptor per conv/FC, with
shapes, tiling, exponents, shifts and modes) and the host steps between them (input
quantization, first-layer im2col, pooling, flatten, un-fused adds, concat), in execution
order. It is what ``gen`` reports, ``sim`` runs and ``sw`` exports.

Mapping rules (see docs/arithmetic.md for the arithmetic):

* conv = K input-channel lanes × K output-channel lanes; reduction order ky, kx, channel word.
* FC = 1×1 conv on a 1×1 image.
* grouped / depthwise conv = dense conv with block-diagonal zero weights (exact; the lost
  utilization is reported).
* the first layer, whose input comes from the host, with fewer than K input channels and a
  kernel larger than 1×1 (e.g. ResNet-50's 7×7 stem, C = 3) runs as a 1×1 conv over the
  host-im2col'ed input: C' = C·kh·kw lanes of reduction instead of C.
* a residual add whose operand is a conv that feeds only it is fused into that conv's
  write-back (the other operand is read from memory).
* a dual-precision conv (Precision Gating / DFS precisions, rules G0-G4) runs on the
  dual-precision engine (``hw/dual_engine.py``, same lanes and mantissa width); its cycles
  depend on the gate outcomes, so the layer carries both bounds: ``cycles`` with every output
  passing (mode ``full``) and ``cycles_msb`` with none (mode ``msb``).

A layer the engine cannot run raises :class:`MappingError` naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dynacc.hw.config import HwConfig
from dynacc.hw.cycles import conv_cycles, dual_conv_cycles
from dynacc.quant.golden import accumulator_bound
from dynacc.quant.program import BFPProgram, QuantOp

__all__ = ["MappingError", "EngineLayer", "HostStep", "LayerProgram", "build_layer_program"]


class MappingError(ValueError):
    """A layer that the configured engine cannot execute (the message names the layer)."""


@dataclasses.dataclass
class EngineLayer:
    """Descriptor of one engine run (all shapes after mapping)."""

    name: str
    kind: str                 # "conv" | "linear"
    input: str
    output: str               # tensor written (the add's name when a residual is fused)
    residual: str | None      # tensor read by the fused residual add
    in_channels: int          # C as the engine sees it (C·kh·kw with host im2col)
    height: int
    width: int
    out_channels: int
    out_height: int
    out_width: int
    kernel: int               # 1 with host im2col
    stride: int
    padding: int
    groups: int               # of the original layer (expanded to dense)
    im2col: bool
    in_words: int             # CW = ceil(C / K)
    tiles: int                # T = ceil(O / K)
    activation: str | None
    macs: int                 # useful MACs of the original layer (per image)
    ideal_cycles: int         # ceil(macs / K²)
    cycles: int               # analytic cycles of this RTL
    acc_bits_needed: int
    max_align_shift: int
    in_lsb: int
    out_lsb: int
    joint_lsb: int | None
    residual_lsb: int | None
    engine: str = "conv"      # "conv" (ConvEngine) | "dual" (DualEngine)
    act_bits: int | None = None   # dual: unsigned input bits b (rule G0)
    msb_bits: int | None = None   # dual: MSB-phase bits
    dp_mode: str | None = None    # dual: gated | msb | full (DFS chooses per image at run time)
    cycles_msb: int | None = None  # dual: cycles when no output passes
    partitions: int | None = None  # dual, Channel Gating: p block-diagonal partitions

    @property
    def utilization(self) -> float:
        return self.ideal_cycles / self.cycles if self.cycles else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["utilization"] = round(self.utilization, 6)
        return d


@dataclasses.dataclass
class HostStep:
    """Work done on the host between engine runs (documented in docs/arithmetic.md)."""

    name: str
    kind: str                 # quantize_input | maxpool | avgpool | flatten | add | concat | relu
    inputs: list[str]
    output: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class LayerProgram:
    model: str
    hw: HwConfig
    steps: list[EngineLayer | HostStep]
    tensors: dict[str, dict[str, Any]]

    @property
    def engine_layers(self) -> list[EngineLayer]:
        return [s for s in self.steps if isinstance(s, EngineLayer)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "hw": self.hw.to_dict(),
            "steps": [{"engine" if isinstance(s, EngineLayer) else "host": s.to_dict()}
                      for s in self.steps],
            "tensors": self.tensors,
        }


def _scalar_lsb(program: BFPProgram, name: str, what: str) -> int:
    lsb = program.lsb[name]
    if lsb is None:
        return 0
    vals = torch.unique(lsb)
    if vals.numel() != 1:
        raise MappingError(f"layer {name!r}: {what} has per-channel-group exponents; the engine "
                           "takes one exponent per tensor")
    return int(vals[0])


def _check_layer(program: BFPProgram, layer: EngineLayer, hw: HwConfig) -> None:
    """Prove that the engine runs ``layer`` exactly (limits, one alignment shift per lane
    word, accumulator width, shift ranges): the checks of :class:`~dynacc.hw.program.ConvProgram`
    on the layer's real weights and zero activations."""
    from .engine_layers import conv_layer, dual_layer

    try:
        if layer.engine == "dual":
            op = program.op(layer.name)
            dual_layer(program, layer, mode=None if op.dp_threshold is not None else "full"
                       ).program(hw)
        else:
            conv_layer(program, layer).program(hw)
    except ValueError as exc:
        raise MappingError(str(exc)) from exc


def build_layer_program(model: str, program: BFPProgram, shapes: dict[str, tuple[int, ...]],
                        hw: HwConfig) -> LayerProgram:
    """Map ``program`` onto ``hw``. ``shapes`` gives every tensor's per-image shape
    (``(C, H, W)`` or ``(C,)``), e.g. from one golden run."""
    if program.fmt.mantissa_bits != hw.mantissa_bits:
        raise MappingError(f"model is quantized with M={program.fmt.mantissa_bits}, the engine "
                           f"config {hw.name!r} has mantissa_bits={hw.mantissa_bits}")
    k = hw.lanes
    fused: dict[str, str] = {}  # add name -> conv fused into it
    for op in program.ops:
        if op.kind == "add":
            for src in op.inputs:
                s = program.op(src)
                if (s.kind == "conv" and not s.dual_precision and s.activation is None
                        and src not in fused.values()
                        and sum(src in o.inputs for o in program.ops) == 1
                        and torch.equal(program.lsb[src], op.joint_lsb)):
                    fused[op.name] = src
                    break
    conv_of_add = {v: a for a, v in fused.items()}
    steps: list[EngineLayer | HostStep] = []
    first_compute = next(o.name for o in program.ops if o.kind in ("conv", "linear"))
    for op in program.ops:
        if op.kind == "input":
            steps.append(HostStep("input", "quantize_input", [], "input"))
        elif op.kind in ("conv", "linear"):
            steps.append(_engine_layer(program, op, shapes, hw, conv_of_add.get(op.name),
                                       op.name == first_compute and op.inputs[0] == "input"))
        elif op.kind == "add" and op.name in fused:
            continue
        else:
            steps.append(HostStep(op.name, op.kind, list(op.inputs), op.name))
    for s in steps:
        if isinstance(s, EngineLayer):
            _check_layer(program, s, hw)
    tensors = {n: {"shape": list(shapes[n]),
                   "lsb": (int(program.lsb[n][0]) if program.lsb[n] is not None else None)}
               for n in shapes}
    return LayerProgram(model, hw, steps, tensors)


def _engine_layer(program: BFPProgram, op: QuantOp, shapes: dict[str, tuple[int, ...]],
                  hw: HwConfig, add: str | None, first: bool) -> EngineLayer:
    k = hw.lanes
    in_shape = shapes[op.inputs[0]]
    if op.kind == "linear":
        c, h, w = in_shape[0], 1, 1
        o, ho, wo = op.weight.shape[0], 1, 1
        kernel, stride, padding = 1, 1, 0
    else:
        c, h, w = in_shape
        o, ho, wo = shapes[op.name]
        kernel, stride, padding = op.kernel, op.stride, op.padding
    cg = c // op.groups
    macs = o * ho * wo * cg * kernel * kernel
    im2col = first and op.kind == "conv" and c < k and kernel > 1
    if im2col:
        c_eng, h_eng, w_eng, kernel_eng, stride_eng, pad_eng = c * kernel * kernel, ho, wo, 1, 1, 0
    else:
        c_eng, h_eng, w_eng, kernel_eng, stride_eng, pad_eng = c, h, w, kernel, stride, padding
    cw = -(-c_eng // k)
    tiles = -(-o // k)
    w4 = op.weight if op.weight.dim() == 4 else op.weight[:, :, None, None]
    bound = int(accumulator_bound(w4, op.shift, op.bias, program.fmt.max_mantissa).max())
    x_lsb = _scalar_lsb(program, op.inputs[0], "input")
    out_name = add if add is not None else op.name
    out_lsb = _scalar_lsb(program, out_name, "output") if program.lsb[out_name] is not None else 0
    joint = residual = residual_lsb = None
    if add is not None:
        a = program.op(add)
        joint = int(a.joint_lsb[0])
        residual = next(i for i in a.inputs if i != op.name)
        residual_lsb = _scalar_lsb(program, residual, "residual")
    shape_kw = dict(in_channels=c_eng, out_channels=o, out_height=ho, out_width=wo,
                    kernel_h=kernel_eng, kernel_w=kernel_eng)
    dual: dict[str, Any] = {}
    ideal = -(-macs // (k * k))
    cycles = conv_cycles(hw, **shape_kw)
    if op.kind == "conv" and op.dual_precision:
        if im2col or op.groups > 1:
            raise MappingError(f"layer {op.name!r}: a dual-precision conv must be a dense conv "
                               "on engine-resident activations (no groups, not the host-im2col "
                               "first layer)")
        if op.channel_gated:
            # Channel Gating: base words, then the other words of every passing output; the
            # dense conv on this engine is the all-pass case (each MAC once)
            p = op.cg_partitions
            tiles_all = [wo * ho * k] * tiles
            try:
                cycles = dual_conv_cycles(hw, **shape_kw, mode="cg", partitions=p,
                                          passed_counts=tiles_all)
                base = dual_conv_cycles(hw, **shape_kw, mode="cg", partitions=p,
                                        passed_counts=[0] * tiles)
            except ValueError as exc:
                raise MappingError(f"layer {op.name!r}: {exc}") from exc
            dual = dict(engine="dual", act_bits=op.dp_act_bits, msb_bits=None,
                        dp_mode="cg", cycles_msb=base, partitions=p)
        else:
            dual = dict(engine="dual", act_bits=op.dp_act_bits, msb_bits=op.dp_msb_bits,
                        dp_mode=op.dp_mode,
                        cycles_msb=dual_conv_cycles(hw, **shape_kw, mode="msb"))
            cycles = dual_conv_cycles(hw, **shape_kw, mode="full")
            ideal *= 2   # two digit passes (MSB, LSB) per MAC when every output passes
    return EngineLayer(
        name=op.name, kind=op.kind, input=op.inputs[0], output=out_name, residual=residual,
        in_channels=c_eng, height=h_eng, width=w_eng, out_channels=o, out_height=ho,
        out_width=wo, kernel=kernel_eng, stride=stride_eng, padding=pad_eng, groups=op.groups,
        im2col=im2col, in_words=cw, tiles=tiles,
        activation=program.op(out_name).activation, macs=macs,
        ideal_cycles=ideal, cycles=cycles,
        acc_bits_needed=bound.bit_length() + 1, max_align_shift=int(op.shift.max()),
        in_lsb=x_lsb, out_lsb=out_lsb, joint_lsb=joint, residual_lsb=residual_lsb, **dual)
