"""Trained FBS model -> integer program, with the saliency predictor on the host.

:func:`build_fbs_program` makes an :class:`FBSProgram`: the calibrated
:class:`~dynacc.quant.program.BFPProgram` of the network plus one :class:`FBSGate` per conv.

* **Datapath** (bit-exact, rules FBS1-FBS3 of docs/arithmetic.md): every conv has BN_na
  folded into its weights (``w/σ_na``, static bias ``b = −μ/σ_na`` rounded onto the
  accumulator LSB, rule B1) and BFP weights in **whole-filter blocks** (weight group −1: one
  exponent per filter, so the hardware may compact the input channels of each image). Its
  input is unsigned 8-bit on the static PACT LSB of its producer (rules G0, PG1). Per image:
  ``acc_s = conv(x, w)·g_q[o] + bias[o]`` for an active output, 0 otherwise
  (:func:`~dynacc.quant.golden.fbs_conv2d`), requantized with ``out_lsb − acc_lsb −
  scale_lsb`` (R3) and clamped by the next PACT (``"pact"``, ``clamp_max``).
* **Host** (float, outside the bit-exact boundary, like the DFS gate): ``s`` = mean over H, W
  of the dequantized integer input, ``g = ReLU(φ·s + ρ)`` (float64), then the integers handed to
  the datapath: ``g_q = clamp(round_half_even(g / 2^scale_lsb), 0, 2^8 − 1)`` on the layer's
  static ``scale_lsb``, the decisions ``π = golden.fbs_active(g_q, d)`` **on the integers** (ties
  well defined) and the per-image bias ``bias[n, o] = g_q[n, o]·b_q[o] + beta_q[o]`` on LSB
  ``acc_lsb + scale_lsb``. ``beta_q = round_half_even(β / 2^(acc_lsb + scale_lsb))`` (rule B1's
  rounding and 48-bit saturation, once, offline); ``g_q·b_q`` is exact.
* ``scale_lsb`` is calibrated offline per layer: the smallest ``l`` with ``(2^8 − 1)·2^l >=``
  the largest ``g`` over the calibration images, measured on the integer program itself,
  layer after layer (:func:`~dynacc.quant.pg.pact_lsb`).
* The image enters through the model's input quantizer (a host step): ``clamp(x + offset, 0,
  α_in)`` quantized to unsigned 8 bits on ``pact_lsb(α_in)``. The classifier is a plain BFP
  FC on the integer average pool (P2); its output exponent is the max exponent of the float
  FBS model's logits on the calibration images (rule R6).

The BFPProgram alone, run with ``run_golden``, is **not** the FBS network (it knows nothing
of g, β and the decisions): always run it through :func:`run_fbs_golden`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Iterable

import torch
from torch import nn

from . import golden
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .fbs import FBS_ACT_BITS, ConvGeometry, FBSGatedCNN, check_density, fbs_mac_counts
from .formats import BFPFormat, QuantConfig, WeightBlocking
from .functional import quantize_bias, requantize
from .graph import trace
from .models.fbs_cnn import FBSCNN
from .observers import make_observer
from .pg import check_pg_bits, pact_lsb, quantize_unsigned
from .program import BFPProgram, build_program, iter_observed

__all__ = ["FBS_QUANT_CONFIG", "FBSGate", "FBSProgram", "FBSGoldenRun", "to_float_model",
           "build_fbs_program", "run_fbs_golden", "fbs_golden_stats", "fbs_layer_cases",
           "save_fbs_checkpoint", "fbs_model_from_checkpoint", "fbs_host_step"]

#: M = 9 (sign + 8 magnitude bits: the unsigned 8-bit activations fit, rule G0), max
#: calibration, whole-filter weight blocks.
FBS_QUANT_CONFIG = QuantConfig(fmt=BFPFormat(9, 8), weights=WeightBlocking(group=-1),
                               method="max")


@dataclasses.dataclass
class FBSGate:
    """The host side of one FBS conv ``name`` (a conv op of the program) reading tensor
    ``input``: predictor ``φ [O, C]``, ``ρ [O]`` and ``β [O]`` (float64), ``beta_q [O]`` (β on
    LSB ``acc_lsb + scale_lsb``), the saliency scale ``scale_lsb`` / ``scale_bits`` and the
    density d of its k-WTA."""

    name: str
    input: str
    phi: torch.Tensor
    rho: torch.Tensor
    beta: torch.Tensor
    density: float
    scale_lsb: int | None = None
    beta_q: torch.Tensor | None = None
    scale_bits: int = 8

    def to_state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "FBSGate":
        return cls(**state)


@dataclasses.dataclass
class FBSProgram:
    """The integer FBS network: ``program`` (datapath constants of every layer), ``gates`` (in
    network order) and the input quantizer ``clamp(x + input_offset, 0, input_alpha)`` on
    unsigned ``act_bits`` bits."""

    program: BFPProgram
    gates: list[FBSGate]
    input_offset: float
    input_alpha: float
    act_bits: int = FBS_ACT_BITS

    @property
    def input_lsb(self) -> int:
        return pact_lsb(self.input_alpha, self.act_bits)

    def gate(self, name: str) -> FBSGate:
        for g in self.gates:
            if g.name == name:
                return g
        raise KeyError(f"no FBS layer named {name!r}")

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Float images -> unsigned integers (the model's input PACT, computed in float32
        exactly as in training)."""
        y = x.to(torch.float32) + torch.tensor(self.input_offset, dtype=torch.float32)
        y = y.clamp(0.0, self.input_alpha)
        return quantize_unsigned(y, self.input_lsb, self.act_bits)

    def with_density(self, density: float) -> "FBSProgram":
        """The same program with every gate at density ``density`` (no retraining)."""
        d = check_density(density)
        return dataclasses.replace(self, gates=[dataclasses.replace(g, density=d)
                                                for g in self.gates])

    def to_state(self) -> dict[str, Any]:
        """Everything but the BFPProgram (stored by the checkpoint itself)."""
        return {"gates": [g.to_state() for g in self.gates], "input_offset": self.input_offset,
                "input_alpha": self.input_alpha, "act_bits": self.act_bits}

    @classmethod
    def from_state(cls, state: dict[str, Any], program: BFPProgram) -> "FBSProgram":
        return cls(program, [FBSGate.from_state(g) for g in state["gates"]],
                   state["input_offset"], state["input_alpha"], state["act_bits"])


def to_float_model(model: FBSGatedCNN) -> FBSCNN:
    """The dense ``fbs_cnn`` the program is traced from: the FBS conv weights, BN_na as a
    BN with γ = 1, β = 0 (so tracing folds ``w/σ_na`` and ``−μ/σ_na``), each PACT as
    ``Hardtanh(0, α)`` (the tracer's ``"pact"``) and the classifier."""
    if not isinstance(model, FBSGatedCNN):
        raise ValueError(f"expected an FBSGatedCNN, not {type(model).__name__}")
    convs = model.convs()
    fm = FBSCNN(model.fc.out_features, convs[0].in_channels)
    with torch.no_grad():
        for i, m in enumerate(convs, start=1):
            getattr(fm, f"conv{i}").weight.copy_(m.conv.weight)
            bn = getattr(fm, f"bn{i}")
            bn.weight.fill_(1.0)
            bn.bias.zero_()
            bn.running_mean.copy_(m.bn.running_mean)
            bn.running_var.copy_(m.bn.running_var)
            bn.num_batches_tracked.copy_(m.bn.num_batches_tracked)
            bn.eps = m.bn.eps
            setattr(fm, f"relu{i}", nn.Hardtanh(0.0, float(m.act.alpha.detach().abs())))
        fm.fc.load_state_dict(model.fc.state_dict())
    return fm.eval()


def _single_lsb(lsb: torch.Tensor, what: str) -> int:
    v = torch.as_tensor(lsb).unique()
    if v.numel() != 1:
        raise ValueError(f"{what}: expected one LSB exponent per tensor, got {v.tolist()}")
    return int(v)


def _host_saliency(gate: FBSGate, x: torch.Tensor, x_lsb: int) -> torch.Tensor:
    """``g = ReLU(φ·s + ρ)`` in float64, ``s`` the mean of the dequantized input per channel."""
    h, w = x.shape[2], x.shape[3]
    s = torch.ldexp(x.to(torch.float64).sum(dim=(2, 3)),
                    torch.tensor(float(x_lsb), dtype=torch.float64)) / (h * w)
    return torch.relu(s @ gate.phi.to(torch.float64).T + gate.rho.to(torch.float64))


def _calibrate_scale(gate: FBSGate, op: Any, g: torch.Tensor) -> None:
    """Static ``scale_lsb`` (largest g on ``scale_bits``) and ``beta_q`` of ``gate``."""
    top = float(g.max()) if g.numel() else 0.0
    if not top > 0:
        raise ValueError(f"FBS layer {gate.name!r}: the saliency is 0 on every calibration "
                         "image (a dead layer)")
    gate.scale_lsb = pact_lsb(top, gate.scale_bits)
    gate.beta_q = quantize_bias(gate.beta, op.acc_lsb + gate.scale_lsb)


def _host(fbs_program: FBSProgram, gate: FBSGate, x: torch.Tensor, calibrate: bool = False
          ) -> tuple[torch.Tensor, ...]:
    """The host side of FBS conv ``gate`` on its integer input ``x [N, C, H, W]``: ``(g, g_q,
    active, bias)`` (rules FBS5-FBS6); with ``calibrate`` it first sets the gate's static
    ``scale_lsb`` and ``beta_q`` from these images."""
    if x.dim() != 4:
        raise ValueError(f"FBS layer {gate.name!r}: x_int must be [N, C, H, W], got "
                         f"{tuple(x.shape)}")
    op = fbs_program.program.op(gate.name)
    x_lsb = _single_lsb(fbs_program.program.lsb[gate.input],
                        f"input of FBS layer {gate.name!r}")
    g = _host_saliency(gate, x, x_lsb)
    if calibrate:
        _calibrate_scale(gate, op, g)
    if gate.scale_lsb is None or gate.beta_q is None:
        raise ValueError(f"FBS layer {gate.name!r} has no calibrated saliency scale")
    g_q = quantize_unsigned(g, gate.scale_lsb, gate.scale_bits)
    active = golden.fbs_active(g_q, gate.density)
    return g, g_q, active, g_q * op.bias[None, :] + gate.beta_q[None, :]


@torch.no_grad()
def fbs_host_step(fbs_program: FBSProgram, gate: FBSGate | str, x_int: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The host side of FBS conv ``gate`` (an :class:`FBSGate` or its name) on its integer
    input ``x_int [N, C, H, W]`` (e.g. the previous layer's RTL output): ``(scale, active,
    bias)``, each ``[N, O]``: ``g_q`` (int64), the FBS1 decisions on the integers (bool) and
    the per-image bias on LSB ``acc_lsb + scale_lsb`` (int64, rule FBS6). The same code as
    :func:`run_fbs_golden`'s host steps."""
    if isinstance(gate, str):
        gate = fbs_program.gate(gate)
    _, g_q, active, bias = _host(fbs_program, gate, torch.as_tensor(x_int))
    return g_q, active, bias


@dataclasses.dataclass
class FBSGoldenRun:
    """One golden FBS run: ``env`` (every op's integer output ``[N, ...]``, incl. ``"input"``),
    per FBS conv ``saliency`` (float g ``[N, O]``), ``scale`` (g_q), ``active`` (decisions,
    bool) and ``bias`` (per-image integer bias), and the dequantized ``logits``."""

    env: dict[str, torch.Tensor]
    saliency: dict[str, torch.Tensor]
    scale: dict[str, torch.Tensor]
    active: dict[str, torch.Tensor]
    bias: dict[str, torch.Tensor]
    logits: torch.Tensor


def _fbs_conv(fp: FBSProgram, gate: FBSGate, x: torch.Tensor, run: FBSGoldenRun,
              calibrate: bool) -> torch.Tensor:
    prog = fp.program
    op = prog.op(gate.name)
    g, g_q, active, bias = _host(fp, gate, x, calibrate)
    acc_s, acc_lsb = golden.fbs_conv2d(x, prog.lsb[gate.input], op.weight, op.w_lsb, bias,
                                       active=active, scale=g_q, stride=op.stride,
                                       padding=op.padding)
    m = requantize(acc_s, (op.out_lsb - acc_lsb - gate.scale_lsb)[None, :, None, None], prog.fmt)
    run.saliency[gate.name], run.scale[gate.name] = g, g_q
    run.active[gate.name], run.bias[gate.name] = active, bias
    return golden.apply_activation(m, op.activation, op.clamp_max[None, :, None, None])


def _run(fp: FBSProgram, x: torch.Tensor, calibrate: bool = False) -> FBSGoldenRun:
    prog = fp.program
    gates = {g.name: g for g in fp.gates}
    run = FBSGoldenRun({}, {}, {}, {}, {}, torch.empty(0))
    env = run.env
    for o in prog.ops:
        if o.kind == "input":
            env[o.name] = fp.quantize_input(x)
        elif o.name in gates:
            env[o.name] = _fbs_conv(fp, gates[o.name], env[o.inputs[0]], run, calibrate)
        else:
            env[o.name] = prog.golden_op(o, [env[i] for i in o.inputs])
    run.logits = prog.dequantize_output(prog.output, env[prog.output])
    return run


@torch.no_grad()
def run_fbs_golden(fbs_program: FBSProgram, x: torch.Tensor) -> FBSGoldenRun:
    """Integer golden execution of the FBS network on float images ``x [N, C, H, W]``
    (host predictor in float64, datapath in integers; see the module docstring)."""
    if x.dim() == 3:
        x = x[None]
    return _run(fbs_program, x)


@torch.no_grad()
def build_fbs_program(model: FBSGatedCNN, calib_images: torch.Tensor | Iterable[torch.Tensor],
                      cfg: QuantConfig = FBS_QUANT_CONFIG, scale_bits: int = 8) -> FBSProgram:
    """Integer program of a trained FBS model (see the module docstring).

    ``cfg`` must have whole-filter weight blocks (group −1) and ``M − 1 >= 8``; the static
    scales: every conv's output LSB is its PACT's, the input's the input quantizer's, the
    classifier's the max exponent of the float FBS model's logits on ``calib_images``, and each
    ``scale_lsb`` the largest saliency of the integer program on them. Errors name the layer.
    """
    if not isinstance(model, FBSGatedCNN):
        raise ValueError(f"build_fbs_program needs an FBSGatedCNN (FBS fbs_cnn), not "
                         f"{type(model).__name__}")
    if cfg.weights.group != -1:
        raise ValueError(f"FBS needs whole-filter weight blocks (weight group -1, one exponent "
                         f"per filter), not weight group {cfg.weights.group}")
    acts = model.convs()
    check_pg_bits(acts[0].act.act_bits, None, cfg.fmt, "FBS activations")
    check_pg_bits(scale_bits, None, None, "FBS saliency scale_bits")
    model = model.eval()
    x = (calib_images if isinstance(calib_images, torch.Tensor)
         else torch.cat(list(calib_images)))
    if x.numel() == 0:
        raise ValueError("build_fbs_program needs calibration images")
    graph = trace(to_float_model(model))
    names = [f"conv{i}" for i in range(1, len(acts) + 1)]
    fmt, off = cfg.fmt, cfg.fmt.lsb_offset
    exps: dict[str, torch.Tensor] = {"input": torch.tensor([model.input_act.lsb() + off])}
    for name, m in zip(names, acts):
        node = graph.node(name)
        if node.kind != "conv" or node.activation != "pact":
            raise ValueError(f"layer {name!r}: expected a conv with a fused PACT clip")
        exps[name] = torch.tensor([m.act.lsb() + off])
    out_obs = make_observer(dataclasses.replace(cfg, method="max"))
    out_obs(model(x.to(torch.float32)).detach().to(torch.float64))
    exps[graph.output] = out_obs.calculate_qparams().to(torch.int64)
    for p, e in exps.items():
        if not fmt.min_exponent <= int(e.max()) <= fmt.max_exponent:
            raise ValueError(f"layer {p!r}: shared exponent {int(e.max())} outside the "
                             f"E={fmt.exponent_bits}-bit range")
    channels = iter_observed(graph, [x[:1]], lambda p, t: None)
    program = build_program(graph, cfg, exps, channels)
    gates = []
    prev = "input"
    for name, m in zip(names, acts):
        op = program.op(name)
        if op.inputs[0] != prev:
            raise ValueError(f"FBS layer {name!r} reads {op.inputs[0]!r}, expected {prev!r} "
                             "(a plain chain of convs)")
        if int(op.clamp_max.max()) > (1 << m.act.act_bits) - 1:
            raise ValueError(f"layer {name!r}: PACT clamp {int(op.clamp_max.max())} exceeds "
                             f"2^{m.act.act_bits} - 1")
        gates.append(FBSGate(name, prev, m.phi.detach().to(torch.float64).clone(),
                             m.rho.detach().to(torch.float64).clone(),
                             m.beta.detach().to(torch.float64).clone(), m.density,
                             scale_bits=scale_bits))
        prev = name
    fp = FBSProgram(program, gates, float(model.input_offset),
                    float(model.input_act.alpha.detach().abs()), acts[0].act.act_bits)
    _run(fp, x, calibrate=True)
    return fp


def _geometries(fp: FBSProgram, run: FBSGoldenRun) -> list[ConvGeometry]:
    out = []
    for g in fp.gates:
        w = fp.program.op(g.name).weight
        y = run.env[g.name]
        out.append(ConvGeometry(g.name, w.shape[1], w.shape[0], w.shape[2] * w.shape[3],
                                y.shape[2] * y.shape[3]))
    return out


@torch.no_grad()
def fbs_golden_stats(fbs_program: FBSProgram, loader: Iterable, progress: bool = False
                     ) -> dict[str, Any]:
    """Golden accuracy (percent, argmax of the output mantissas) over ``(images, labels)``
    batches, the realised densities per FBS conv (``density``) and FBS's MAC accounting at
    the integer decisions (:func:`~dynacc.quant.fbs.fbs_mac_counts`: ``mac_reduction``,
    ``dense_macs``, ``fbs_macs``, ``predictor_macs``, per image)."""
    from tqdm.auto import tqdm

    correct = n = 0
    active: list[list[torch.Tensor]] = [[] for _ in fbs_program.gates]
    geoms = None
    for x, y in tqdm(loader, desc="FBS golden", unit="batch", disable=not progress,
                     leave=False):
        run = run_fbs_golden(fbs_program, x)
        correct += int((run.env[fbs_program.program.output].argmax(dim=1) == y).sum())
        n += len(y)
        geoms = geoms or _geometries(fbs_program, run)
        for a, g in zip(active, fbs_program.gates):
            a.append(run.active[g.name])
    if geoms is None:
        raise ValueError("fbs_golden_stats needs at least one batch")
    macs = fbs_mac_counts(geoms, [torch.cat(a) for a in active])
    return {"acc": 100.0 * correct / max(n, 1), **macs, "layers": [g.name for g in geoms]}


@torch.no_grad()
def fbs_layer_cases(fbs_program: FBSProgram, x_image: torch.Tensor) -> list[dict[str, Any]]:
    """For one float image (``[C, H, W]`` or ``[1, C, H, W]``), every FBS conv as the datapath
    runs it, in network order (what the hardware side builds a compacted engine layer from).

    Keys: ``name``; ``x`` (int64 ``[C, H, W]``, the full unsigned input) and ``x_lsb``; ``w``
    (int64 ``[O, C, kh, kw]`` mantissas), ``w_lsb`` (``[O, C]``, constant per filter);
    ``bias`` (``[O]``, this image's bias on LSB ``acc_lsb + scale_lsb``), ``scale`` (``[O]``,
    g_q), ``scale_lsb``; ``active_in`` (bool ``[C]``: the previous FBS conv's decisions, all
    True for the first; the other input channels are zero) and ``active_out`` (bool ``[O]``);
    ``out_lsb``, ``stride``, ``padding``, ``activation`` (``"pact"``), ``clamp_max``,
    ``act_bits``; ``expected`` (int64 ``[O, Ho, Wo]`` golden output, 0 at inactive channels).
    ``bias`` and ``scale`` are given for every channel; only the active ones are used.
    """
    x = x_image[None] if x_image.dim() == 3 else x_image
    if x.shape[0] != 1:
        raise ValueError(f"fbs_layer_cases takes one image, got a batch of {x.shape[0]}")
    prog = fbs_program.program
    run = run_fbs_golden(fbs_program, x)
    cases = []
    active_in = None
    for g in fbs_program.gates:
        op = prog.op(g.name)
        xin = run.env[g.input][0]
        cases.append({
            "name": g.name, "x": xin.clone(),
            "x_lsb": _single_lsb(prog.lsb[g.input], f"input of FBS layer {g.name!r}"),
            "w": op.weight.clone(), "w_lsb": op.w_lsb.clone(),
            "bias": run.bias[g.name][0].clone(), "scale": run.scale[g.name][0].clone(),
            "scale_lsb": int(g.scale_lsb),
            "active_in": (torch.ones(xin.shape[0], dtype=torch.bool) if active_in is None
                          else active_in.clone()),
            "active_out": run.active[g.name][0].clone(),
            "out_lsb": _single_lsb(op.out_lsb, f"output of FBS layer {g.name!r}"),
            "stride": op.stride, "padding": op.padding, "activation": op.activation,
            "clamp_max": int(op.clamp_max.max()), "act_bits": fbs_program.act_bits,
            "expected": run.env[g.name][0].clone(),
        })
        active_in = run.active[g.name][0]
    return cases


def save_fbs_checkpoint(path: str | os.PathLike, model: FBSGatedCNN, fbs_program: FBSProgram,
                        meta: dict[str, Any] | None = None) -> None:
    """A dynacc checkpoint of ``fbs_cnn``: the traced dense-equivalent float model
    (:func:`to_float_model`) and the BFPProgram, with ``meta["technique"] = "fbs"``,
    ``meta["fbs"]`` (gates, input quantizer, density) and ``meta["fbs_state_dict"]``."""
    convs = model.convs()
    kwargs = {"num_classes": model.fc.out_features, "in_channels": convs[0].in_channels}
    save_checkpoint(path, "fbs_cnn", kwargs, to_float_model(model), fbs_program.program,
                    meta={**(meta or {}), "technique": "fbs",
                          "fbs": {**fbs_program.to_state(), "density": convs[0].density},
                          "fbs_state_dict": copy.deepcopy(model.state_dict())})


def fbs_model_from_checkpoint(path: str | os.PathLike
                              ) -> tuple[FBSGatedCNN, FBSProgram, dict[str, Any]]:
    """Inverse of :func:`save_fbs_checkpoint` (and of ``train-fbs``):
    ``(fbs_model, fbs_program, meta)``."""
    ck = load_checkpoint(path, expect_model="fbs_cnn")
    s = ck.meta.get("fbs")
    if ck.meta.get("technique") != "fbs" or s is None or "fbs_state_dict" not in ck.meta \
            or ck.program is None:
        raise CheckpointError(f"checkpoint {str(path)!r} was not written by train-fbs")
    model = FBSGatedCNN(ck.model_kwargs["num_classes"], ck.model_kwargs["in_channels"],
                        density=s["density"], input_offset=s["input_offset"],
                        input_alpha=s["input_alpha"], act_bits=s["act_bits"])
    model.load_state_dict(ck.meta["fbs_state_dict"])
    return model.eval(), FBSProgram.from_state(s, ck.program), ck.meta
