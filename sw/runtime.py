"""Run a deploy folder's layer program: the host side, engine-agnostic.

:func:`chain` walks the steps of a :class:`~dynacc.sw.reader.Deploy` for a batch of images.
Host steps run here with the golden rules (``gen.engine_layers.run_host_step`` on the
deploy's host program); every engine layer is handed out as an :class:`EngineJob` (its engine
input: the previous outputs, host-im2col'ed for the first layer) and the caller sends back the
engine's output. The RTL bench (``sim/benches/network_bench.py``) answers with the simulated
engine; tests answer with the golden model. Jobs come layer by layer, image by image inside a
layer, so an engine's weight memories are loaded once per layer.

Memory words of the per-image memories (``act``, ``res``, ``out``) use the layouts and address
orders of :class:`~dynacc.hw.conv_engine.ConvEngine` (``(y*W + x)*CW + cw``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Generator

import numpy as np
import torch

from dynacc.gen.engine_layers import im2col, run_host_step
from dynacc.gen.layer_program import HostStep
from dynacc.quant.program import BFPProgram, QuantOp

from .reader import Deploy, DeployHostStep, DeployLayer

__all__ = ["EngineJob", "act_image", "unpack_output", "engine_input", "host_program", "chain",
           "run_chain", "job_descriptor"]


def act_image(x: np.ndarray, lanes: int) -> np.ndarray:
    """``[C, H, W]`` mantissas -> ``[H*W*CW, K]`` words (word ``(y*W + x)*CW + cw`` holds
    channels ``cw*K ... cw*K + K-1``, zero-padded). Also the ``res`` image of ``[O, Ho, Wo]``."""
    x = np.asarray(x, dtype=np.int64)
    c, h, w = x.shape
    cw = -(-c // lanes)
    xp = np.zeros((cw * lanes, h, w), dtype=np.int64)
    xp[:c] = x
    return xp.reshape(cw, lanes, h, w).transpose(2, 3, 0, 1).reshape(h * w * cw, lanes)


def unpack_output(words: np.ndarray, layer: DeployLayer, lanes: int) -> np.ndarray:
    """``[out_words, K]`` output words -> ``[O, Ho, Wo]``."""
    ho, wo, t = layer.out_height, layer.out_width, layer.tiles
    y = np.asarray(words)[: layer.out_words].reshape(ho, wo, t * lanes).transpose(2, 0, 1)
    return y[: layer.out_channels]


def engine_input(layer: DeployLayer, x: torch.Tensor) -> torch.Tensor:
    """One image's input tensor -> what the engine reads: ``[C', H, W]`` (1-D FC inputs
    become ``[C, 1, 1]``; the first layer's image is host-im2col'ed)."""
    if x.dim() == 1:
        x = x[:, None, None]
    if layer.im2col:
        p = layer.im2col
        x = im2col(x, p["kernel"], p["stride"], p["padding"])
    return x


def host_program(dep: Deploy) -> BFPProgram:
    """The deploy's host steps as a weight-less :class:`BFPProgram`: every tensor's LSBs
    and the host ops' constants, all read from the deploy folder."""
    arr = dep.arrays
    lsb = {t: (torch.from_numpy(arr[f"{t}/lsb"].astype(np.int64)) if f"{t}/lsb" in arr else None)
           for t in dep.tensors}
    ops = []
    for s in dep.steps:
        if not isinstance(s, DeployHostStep):
            continue
        if s.kind == "quantize_input":
            ops.append(QuantOp("input", "input", [], lsb["input"]))
            continue

        def opt(key: str) -> torch.Tensor | None:
            k = f"{s.name}/{key}"
            return torch.from_numpy(arr[k].astype(np.int64)) if k in arr else None
        ops.append(QuantOp(s.name, s.kind, list(s.inputs), lsb.get(s.output),
                           stride=s.stride or 1, padding=s.padding or 0,
                           kernel=s.kernel or 1, activation=s.activation,
                           joint_lsb=opt("joint_lsb"), clamp_max=opt("clamp_max")))
    return BFPProgram(dep.quant, ops, lsb, dep.output, {})


@dataclasses.dataclass
class EngineJob:
    """One engine run: layer ``layer`` on image ``image``."""

    layer: DeployLayer
    image: int
    first_of_layer: bool      # load the layer's weight memories before this job
    x: np.ndarray             # [C', H, W] engine input mantissas
    residual: np.ndarray | None  # [O, Ho, Wo] residual mantissas (fused add)
    mode: str | None = None   # dual layer: run in this mode (DFS), None: as exported
    msb_bits: int | None = None  # dual layer: MSB-phase bits (DFS precision), None: as exported


def job_descriptor(layer: DeployLayer, mode: str | None, msb_bits: int | None
                   ) -> dict[str, int]:
    """Descriptor fields of dual layer ``layer`` run in ``mode`` with ``msb_bits`` MSB-phase
    bits (None: as exported): the ``mode`` code and ``lsb_bits = act_bits - msb_bits``."""
    from dynacc.hw.dual_program import MODE_CODES

    desc = dict(layer.descriptor)
    if mode is None and msb_bits is None:
        return desc
    if layer.engine != "dual":
        raise ValueError(f"layer {layer.name!r} is not a dual-precision layer; it cannot run "
                         f"in mode {mode!r} / msb_bits {msb_bits!r}")
    if mode is not None:
        if mode not in MODE_CODES:
            raise ValueError(f"layer {layer.name!r}: mode {mode!r} must be one of "
                             f"{tuple(MODE_CODES)}")
        desc["mode"] = MODE_CODES[mode]
    if msb_bits is not None:
        if not 1 <= msb_bits < layer.act_bits:
            raise ValueError(f"layer {layer.name!r}: msb_bits {msb_bits} must be in "
                             f"[1, act_bits - 1 = {layer.act_bits - 1}]")
        desc["lsb_bits"] = layer.act_bits - msb_bits
    return desc


def chain(dep: Deploy, images: torch.Tensor, *, integer_input: bool = False,
          dfs: Any = None) -> Generator[EngineJob, np.ndarray, dict[str, torch.Tensor]]:
    """Generator: yields :class:`EngineJob` s, expects each job's engine output
    ``[O, Ho, Wo]`` via ``send``, returns every tensor of the run (``[N, ...]`` int64,
    keyed by tensor name) as its ``StopIteration`` value.

    ``images``: float images ``[N, C, H, W]`` (quantized by the host step), or input
    mantissas with ``integer_input``. ``dfs``: a :class:`~dynacc.sw.dfs_host.DfsHost` that
    sees every complete tensor (its gate decides the next block), sets the mode / precision
    of gated layers' jobs, drops a skipped block's conv jobs (their tensors stay zero for
    that image) and replaces its residual add by the skip rule.
    """
    hp = host_program(dep)
    n = images.shape[0]
    acts: dict[str, torch.Tensor] = {}
    for step in dep.steps:
        if isinstance(step, DeployHostStep):
            if step.kind == "quantize_input":
                acts[step.output] = (images.to(torch.int64) if integer_input
                                     else hp.quantize_input(images))
                continue
            hs = HostStep(step.name, step.kind, list(step.inputs), step.output)
            outs = [dfs.skip_output(step.output, i, acts)
                    if dfs is not None and dfs.skipped(step.output, i)
                    else run_host_step(hp, hs, {t: acts[t][i] for t in step.inputs})
                    for i in range(n)]
            acts[step.output] = torch.stack(outs)
            if dfs is not None:
                dfs.observe(step.output, acts[step.output])
            continue
        shape = tuple(dep.tensors[step.output]["shape"])
        out = torch.zeros((n, *shape), dtype=torch.int64)
        first = True
        for i in range(n):
            how = dfs.job(step.name, i) if dfs is not None else None
            if how == "skip":
                continue
            mode, msb = how if how is not None else (None, None)
            x = engine_input(step, acts[step.input][i]).numpy()
            res = acts[step.residual][i].numpy() if step.residual else None
            y = yield EngineJob(step, i, first, x, res, mode, msb)
            first = False
            y = np.asarray(y)
            if y.shape != (step.out_channels, step.out_height, step.out_width):
                raise ValueError(f"layer {step.name!r}, image {i}: engine output shape "
                                 f"{y.shape}, expected "
                                 f"{(step.out_channels, step.out_height, step.out_width)}")
            out[i] = torch.from_numpy(y.astype(np.int64)).reshape(shape)
        acts[step.output] = out
        if dfs is not None:
            dfs.observe(step.output, out)
    return acts


def run_chain(dep: Deploy, images: torch.Tensor, engine: Any, *, integer_input: bool = False,
              dfs: Any = None) -> dict[str, torch.Tensor]:
    """Drive :func:`chain` with a synchronous ``engine(job) -> [O, Ho, Wo]``."""
    gen = chain(dep, images, integer_input=integer_input, dfs=dfs)
    try:
        job = next(gen)
        while True:
            job = gen.send(engine(job))
    except StopIteration as stop:
        return stop.value
