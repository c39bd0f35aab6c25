"""A whole FBS network on the RTL, layer after layer, checked against the FBS golden model.

>>> res = run_fbs_network(fbs_program, images)                    # doctest: +SKIP
>>> chk = check_fbs_network(fbs_program, res, images); chk.assert_ok()   # doctest: +SKIP

:func:`run_fbs_network` launches the dual engine's simulator once for all images and layers
(:mod:`dynacc.sim.benches.fbs_network_bench`). The bench walks :func:`fbs_chain`: the image
enters through the input quantizer (host); before each FBS conv the host predictor (float,
outside the bit-exact boundary, rule FBS5: :func:`~dynacc.quant.fbs_program.fbs_host_step`)
reads the **RTL output** of the previous conv and gives ``g_q``, the decisions and the
per-image bias; the layer is compacted per image (:func:`~dynacc.hw.fbs_layer.
compact_fbs_layer`), runs on the engine in mode ``fbs`` and its output is expanded
(inactive channels exactly zero); the head (average pool, FC) runs on the host with the
golden rules on the RTL output. A layer with no active output runs nothing (all zeros).

:func:`check_fbs_network` compares with :func:`~dynacc.quant.fbs_program.run_fbs_golden`,
``==`` element by element: every tensor, every layer's ``g_q``, decisions and bias, the
predictions; no output of a compacted layer passes a gate; each run's RTL cycles equal
``dual_conv_cycles`` of its compacted sizes. It also gives the engine cycles of the dense
network (every channel of every conv active, same engine).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Generator

import numpy as np
import torch

from dynacc.hw.config import HwConfig
from dynacc.hw.dual_program import DualLayer
from dynacc.hw.fbs_layer import compact_fbs_layer, expand_fbs_output, fbs_out_size
from dynacc.quant.fbs_program import FBSProgram, fbs_host_step, run_fbs_golden

from . import runner
from .dual import _build_cached, _cfg
from .network import _compare

__all__ = ["FbsJob", "FbsChainOut", "fbs_chain", "FbsNetworkResult", "FbsNetworkCheck",
           "run_fbs_network", "check_fbs_network", "fbs_dense_cycles"]

BENCH_MODULE = "dynacc.sim.benches.fbs_network_bench"

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FbsJob:
    """One compacted FBS conv of one image for the engine."""

    gate: str
    image: int
    layer: DualLayer


@dataclasses.dataclass
class FbsChainOut:
    """What :func:`fbs_chain` computed: ``env`` (every tensor ``[N, ...]`` int64, incl.
    ``"input"``), per FBS conv ``scale`` (g_q), ``active`` and ``bias`` ``[N, O]``, and
    ``layers`` (per FBS conv, the compacted layer of each image, None where nothing ran)."""

    env: dict[str, torch.Tensor]
    scale: dict[str, torch.Tensor]
    active: dict[str, torch.Tensor]
    bias: dict[str, torch.Tensor]
    layers: dict[str, list[DualLayer | None]]


def _one_lsb(lsb: Any, what: str) -> int:
    v = torch.as_tensor(lsb).unique()
    if v.numel() != 1:
        raise ValueError(f"{what}: expected one LSB exponent per tensor, got {v.tolist()}")
    return int(v)


def fbs_chain(fbs_program: FBSProgram, images: torch.Tensor
              ) -> Generator[FbsJob, np.ndarray, FbsChainOut]:
    """Walk the FBS network layer after layer (all images per layer): yields a
    :class:`FbsJob` per compacted conv and image and takes back its engine output
    ``[O', Ho, Wo]``; host steps (input quantizer, predictor, pooling, FC) run here. Returns
    the :class:`FbsChainOut` (``StopIteration.value``)."""
    prog = fbs_program.program
    gates = {g.name: g for g in fbs_program.gates}
    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x[None]
    n = len(x)
    out = FbsChainOut({}, {}, {}, {}, {})
    env = out.env
    active_in: torch.Tensor | None = None
    for o in prog.ops:
        if o.kind == "input":
            env[o.name] = fbs_program.quantize_input(x)
            continue
        if o.name not in gates:
            env[o.name] = prog.golden_op(o, [env[i] for i in o.inputs])
            continue
        g = gates[o.name]
        xin = env[g.input]
        scale, active, bias = fbs_host_step(fbs_program, g, xin)
        x_lsb = _one_lsb(prog.lsb[g.input], f"input of FBS layer {g.name!r}")
        out_lsb = _one_lsb(o.out_lsb, f"output of FBS layer {g.name!r}")
        ain = (torch.ones(n, xin.shape[1], dtype=torch.bool) if active_in is None
               else active_in)
        size = fbs_out_size(tuple(xin.shape[1:]), tuple(o.weight.shape), o.stride, o.padding)
        y = np.zeros((n, o.weight.shape[0]) + size, dtype=np.int64)
        layers: list[DualLayer | None] = []
        for i in range(n):
            layer = compact_fbs_layer(
                f"{g.name}/img{i}", xin[i].numpy(), x_lsb, o.weight.numpy(), o.w_lsb.numpy(),
                bias[i].numpy(), scale[i].numpy(), int(g.scale_lsb), ain[i].numpy(),
                active[i].numpy(), out_lsb, o.stride, o.padding, o.activation,
                int(o.clamp_max.max()), fbs_program.act_bits)
            layers.append(layer)
            if layer is None:
                continue
            yc = yield FbsJob(g.name, i, layer)
            y[i] = expand_fbs_output(yc, active[i].numpy())
        env[o.name] = torch.from_numpy(y)
        out.scale[g.name], out.active[g.name], out.bias[g.name] = scale, active, bias
        out.layers[g.name] = layers
        active_in = active
    return out


@dataclasses.dataclass
class FbsNetworkResult:
    """An RTL run: ``acts`` (every tensor ``[N, ...]``), per FBS conv ``scale`` / ``active``
    / ``bias`` (the host's, from the RTL tensors), ``cycles`` (``[N]`` RTL cycle counter, 0
    where nothing ran), ``passed`` (``[N]`` outputs the RTL flagged as passing a gate: 0 in
    mode fbs) and ``compact`` (``[N, 2]`` compacted input / output channels that ran)."""

    images: int
    acts: dict[str, np.ndarray]
    scale: dict[str, np.ndarray]
    active: dict[str, np.ndarray]
    bias: dict[str, np.ndarray]
    cycles: dict[str, np.ndarray]
    passed: dict[str, np.ndarray]
    compact: dict[str, np.ndarray]
    rtl_wall_s: float           # the engine runs (start -> done), all layers and images
    sim_wall_s: float           # the simulator process (launch, host steps, loads, runs)

    @property
    def cycles_per_image(self) -> np.ndarray:
        return np.sum(list(self.cycles.values()), axis=0)


def run_fbs_network(fbs_program: FBSProgram, images: torch.Tensor | np.ndarray,
                    cfg: HwConfig | str = "dual", *, keep: bool | None = None
                    ) -> FbsNetworkResult:
    """Run float ``images [N, C, H, W]`` through the FBS network on the RTL, one simulator
    process (see the module docstring). Raises ``ValueError`` naming the layer if a compacted
    layer does not fit ``cfg`` and :class:`~dynacc.sim.runner.SimulationError` if the
    simulation fails."""
    cfg = _cfg(cfg)
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    sim, load_bits = _build_cached(cfg, runner.waves_enabled())
    run_dir = runner.new_run_dir(f"fbsnet_{cfg.name}")
    out = run_dir / "out"
    out.mkdir()
    torch.save({"fbs_program": fbs_program, "images": x, "cfg": cfg}, run_dir / "inputs.pt")
    manifest = run_dir / "manifest.json"
    manifest.write_text(json.dumps({"inputs": str(run_dir / "inputs.pt"), "out": str(out),
                                    "load_bits": load_bits, "keep": bool(keep)}))
    t0 = time.perf_counter()
    runner.run(sim, BENCH_MODULE, run_dir=run_dir,
               extra_env={"DYNACC_FBSNET_MANIFEST": str(manifest)})
    wall = time.perf_counter() - t0
    r = torch.load(out / "result.pt", weights_only=False)
    if keep or runner.waves_enabled():
        _log.warning("kept the run directory %s", run_dir)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return FbsNetworkResult(len(x), r["acts"], r["scale"], r["active"], r["bias"], r["cycles"],
                            r["passed"], r["compact"], r["rtl_wall_s"], wall)


def fbs_dense_cycles(fbs_program: FBSProgram, acts: dict[str, Any], cfg: HwConfig | str = "dual"
                     ) -> dict[str, int]:
    """Engine cycles per FBS conv of the dense network (every input and output channel
    active: the whole layer in mode fbs), from ``acts`` (shapes only)."""
    from dynacc.hw.cycles import dual_conv_cycles

    cfg = _cfg(cfg)
    out = {}
    for g in fbs_program.gates:
        w = fbs_program.program.op(g.name).weight
        ho, wo = np.shape(acts[g.name])[2:4]
        out[g.name] = dual_conv_cycles(cfg, in_channels=w.shape[1], out_channels=w.shape[0],
                                       out_height=int(ho), out_width=int(wo),
                                       kernel_h=w.shape[2], kernel_w=w.shape[3], mode="fbs")
    return out


@dataclasses.dataclass
class FbsNetworkCheck:
    failures: list[str]
    rtl_pred: np.ndarray
    golden_pred: np.ndarray
    model_cycles: dict[str, np.ndarray]    # per FBS conv, [N] dual_conv_cycles (0: no run)
    dense_cycles: dict[str, int]           # per FBS conv, every channel active
    tensors: int                           # tensors compared (per image)

    @property
    def cycles_per_image(self) -> np.ndarray:
        return np.sum(list(self.model_cycles.values()), axis=0)

    @property
    def dense_cycles_per_image(self) -> int:
        return int(sum(self.dense_cycles.values()))

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` with the first failure (in layer order)."""
        f = self.failures
        if f:
            raise AssertionError(f[0] + (f" (+{len(f) - 1} more)" if len(f) > 1 else ""))


def check_fbs_network(fbs_program: FBSProgram, result: FbsNetworkResult,
                      images: torch.Tensor | np.ndarray, cfg: HwConfig | str = "dual"
                      ) -> FbsNetworkCheck:
    """Compare an RTL run with :func:`run_fbs_golden` on the same images (see the module
    docstring); failures name the image, layer, field and values."""
    from dynacc.hw.cycles import dual_conv_cycles

    cfg = _cfg(cfg)
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    gold = run_fbs_golden(fbs_program, x)
    n = len(x)
    fails: list[str] = []
    for t, ref in gold.env.items():
        if t not in result.acts:
            fails.append(f"tensor {t!r}: not in the RTL run")
            continue
        nb, msg = _compare(t, result.acts[t], ref.numpy(), 0)
        if nb:
            fails.append(msg or f"tensor {t!r} differs on {nb} images")
    model, dense = {}, fbs_dense_cycles(fbs_program, gold.env, cfg)
    prev = None
    for g in fbs_program.gates:
        for key, field, ref in (("scale", "scale (g_q)", gold.scale[g.name]),
                                ("active", "decision", gold.active[g.name]),
                                ("bias", "bias", gold.bias[g.name])):
            rtl = np.asarray(getattr(result, key)[g.name])
            bad = np.argwhere(rtl != ref.numpy())
            if len(bad):
                i, c = bad[0]
                fails.append(f"image {i}: layer {g.name!r}: host {field} of channel {c} on the RTL "
                             f"tensors {rtl[i, c]} != golden {ref.numpy()[i, c]}")
        w = fbs_program.program.op(g.name).weight
        ho, wo = gold.env[g.name].shape[2:4]
        a_in = (gold.active[prev].sum(dim=1) if prev is not None
                else torch.full((n,), w.shape[1]))
        a_out = gold.active[g.name].sum(dim=1)
        prev = g.name
        mc = np.array([0 if int(a_out[i]) == 0 else dual_conv_cycles(
            cfg, in_channels=max(int(a_in[i]), 1), out_channels=int(a_out[i]),
            out_height=int(ho), out_width=int(wo), kernel_h=w.shape[2], kernel_w=w.shape[3],
            mode="fbs") for i in range(n)], dtype=np.int64)
        model[g.name] = mc
        rc = np.asarray(result.cycles[g.name])
        if not np.array_equal(rc, mc):
            i = int(np.argmax(rc != mc))
            fails.append(f"image {i}: layer {g.name!r}: RTL cycles {rc[i]} != dual_conv_cycles "
                         f"model {mc[i]} (compacted {int(a_in[i])} in / {int(a_out[i])} out)")
        comp = np.stack([a_in.clamp(min=1).numpy() * (a_out.numpy() > 0),
                         a_out.numpy()], axis=1)
        if not np.array_equal(np.asarray(result.compact[g.name]), comp):
            fails.append(f"layer {g.name!r}: the RTL ran compacted sizes "
                         f"{np.asarray(result.compact[g.name]).tolist()}, golden {comp.tolist()}")
        if np.asarray(result.passed[g.name]).any():
            fails.append(f"layer {g.name!r}: {np.asarray(result.passed[g.name]).tolist()} outputs "
                         "passed a gate in mode fbs (expected none)")
    out = fbs_program.program.output
    rtl_pred = np.asarray(result.acts[out]).reshape(n, -1).argmax(axis=1)
    gold_pred = gold.env[out].reshape(n, -1).numpy().argmax(axis=1)
    if not np.array_equal(rtl_pred, gold_pred):
        fails.append(f"predictions differ: RTL {rtl_pred.tolist()}, golden {gold_pred.tolist()}")
    return FbsNetworkCheck(fails, rtl_pred, gold_pred, model, dense, len(gold.env))
