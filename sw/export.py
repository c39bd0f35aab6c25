"""Export a calibrated BFP program as a deploy folder (``python sw/deploy.py``).

:func:`export_program` maps a :class:`~dynacc.quant.program.BFPProgram` onto a hardware
config (``gen.layer_program``), derives every engine layer's memory images with the engine's
own :class:`~dynacc.hw.program.ConvProgram` (so the checks and word layouts are the RTL's) and
writes the folder described in :mod:`dynacc.sw.fileformat`. :func:`deploy_model` is the CLI's
flow: a calibrated checkpoint, or seeded random weights calibrated exactly as ``make gen``.

The folder is built in a temporary sibling and renamed onto the target at the end: a failure
leaves no partial folder and keeps the previous one. Same inputs give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from dynacc.gen.atomic import replace_dir
from dynacc.gen.engine_layers import conv_layer, dual_layer
from dynacc.gen.layer_program import EngineLayer, HostStep, LayerProgram, build_layer_program
from dynacc.hw.config import HwConfig
from dynacc.hw.program import ConvProgram
from dynacc.quant.program import BFPProgram
from dynacc.sim.memfile import pack_words, write_mem

from . import fileformat as ff
from .cheader import render_header

__all__ = ["ExportError", "DeployResult", "export_program", "deploy_model", "program_shapes"]


class ExportError(ValueError):
    """An export that cannot be made (the message names the model, layer or file)."""


@dataclasses.dataclass
class DeployResult:
    path: Path
    program: BFPProgram
    layer_program: LayerProgram
    random_weights: bool
    dataset: str


# ----------------------------------------------------------------------------- helpers
def _ints(t: torch.Tensor | np.ndarray, dtype: Any) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    a = a.astype(np.int64)
    info = np.iinfo(dtype)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise ExportError(f"values [{a.min()}, {a.max()}] do not fit {np.dtype(dtype).name}")
    return a.astype(dtype)


def _mant_dtype(mantissa_bits: int) -> Any:
    return np.int8 if mantissa_bits <= 8 else np.int16


def _uniform(t: torch.Tensor | None) -> int | list[int] | None:
    if t is None:
        return None
    vals = [int(v) for v in t.reshape(-1).tolist()]
    return vals[0] if len(set(vals)) == 1 else vals


def program_shapes(program: BFPProgram, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Every tensor's per-image shape from one golden run on a zero image."""
    env = program.run_golden(torch.zeros((1, *input_shape)))
    return {k: tuple(v.shape[1:]) for k, v in env.items()}


def _bfp_spec(program: BFPProgram) -> dict[str, Any]:
    fmt, cfg = program.fmt, program.cfg
    return {
        "mantissa_bits": fmt.mantissa_bits,
        "exponent_bits": fmt.exponent_bits,
        "value": "mantissa * 2**lsb; lsb = shared exponent - lsb_offset",
        "lsb_offset": fmt.lsb_offset,
        "rounding": "half-to-even",
        "saturation": {"min": -fmt.max_mantissa, "max": fmt.max_mantissa},
        "exponent_range": {"min": fmt.min_exponent, "max": fmt.max_exponent},
        "weight_blocks": {
            "group": cfg.weights.group,
            "align_span": cfg.weights.align_span,
            "geometry": "one output filter x group input channels x kh x kw (group -1: whole "
                        "filter); the last block of a filter may be a shorter tail block",
        },
        "activation_blocks": {
            "group": cfg.activations.group,
            "geometry": "one offline exponent per tensor" if cfg.activations.group == -1
                        else f"{cfg.activations.group} channels share one offline exponent",
        },
        "calibration": cfg.method,
        "quant_config": cfg.to_dict(),
    }


# ----------------------------------------------------------------------------- export
def _engine_program(program: BFPProgram, layer: EngineLayer, hw: HwConfig) -> Any:
    """The engine's own program of ``layer`` (checks, images, descriptor): a
    :class:`~dynacc.hw.program.ConvProgram`, or a :class:`~dynacc.hw.dual_program.DualProgram`
    for a dual-precision layer (in the op's own mode)."""
    try:
        if layer.engine == "dual":
            return dual_layer(program, layer).program(hw)
        return conv_layer(program, layer).program(hw)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc


def _engine_entry(program: BFPProgram, index: int, layer: EngineLayer,
                  hw: HwConfig, work: Path, blobs: dict[str, list[bytes]],
                  blob_words: dict[str, int], arrays: dict[str, np.ndarray],
                  files: list[str]) -> dict[str, Any]:
    from dynacc.hw.dual_sequencer import dual_desc_layout
    from dynacc.hw.types import desc_layout

    op = program.op(layer.name)
    out_op = program.op(layer.output)
    prog = _engine_program(program, layer, hw)
    dual = layer.engine == "dual"
    cp: ConvProgram = prog.conv if dual else prog
    imgs = prog.images()
    mems: dict[str, Any] = {}
    for m in ff.memories_of(layer.engine):
        rel = ff.mem_name(index, layer.name, m)
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        lay = ff.layout_of(m, hw)
        write_mem(path, imgs[m], lay)
        data = ff.bits_to_bytes(pack_words(imgs[m], lay))
        blobs.setdefault(m, [])
        blob_words.setdefault(m, 0)
        offset = sum(len(b) for b in blobs[m])
        blobs[m].append(data)
        blob_words[m] += len(imgs[m])
        files.append(rel)
        mems[m] = {"file": rel, "words": int(len(imgs[m])), "bin": ff.bin_name(m),
                   "offset": offset, "size": len(data)}
    fmt = program.fmt
    md = _mant_dtype(fmt.mantissa_bits)
    n = layer.name
    arrays[f"{n}/weight"] = _ints(op.weight, md)
    arrays[f"{n}/block_exp"] = _ints(op.block_exp, np.int16)
    arrays[f"{n}/align_shift"] = _ints(op.shift, np.int8)
    arrays[f"{n}/bias"] = _ints(op.bias, np.int64)
    arrays[f"{n}/acc_lsb"] = _ints(op.acc_lsb, np.int16)
    arrays[f"{n}/out_lsb"] = _ints(program.lsb[layer.output], np.int16)
    for j, s in enumerate(("acc", "res", "out")):
        arrays[f"{n}/shift_{s}"] = _ints(cp.shifts[:, j], np.int8)
    if layer.residual:
        arrays[f"{n}/joint_lsb"] = _ints(out_op.joint_lsb, np.int16)
    if out_op.clamp_max is not None:
        arrays[f"{n}/clamp_max"] = _ints(out_op.clamp_max, np.int16)
    if dual:
        from dynacc.hw.dual_program import MODE_CODES

        o = layer.out_channels
        arrays[f"{n}/threshold"] = _ints(prog.threshold[:o], np.int64)
        arrays[f"{n}/sign"] = _ints(1 - 2 * prog.neg[:o], np.int8)
        # one-element arrays (the npz writer stores no 0-d arrays); mode: MODE_CODES
        arrays[f"{n}/act_bits"] = _ints([op.dp_act_bits], np.int8)
        if prog.layer.mode == "cg":   # Channel Gating: whole activations, p partitions
            arrays[f"{n}/partitions"] = _ints([prog.layer.partitions], np.int16)
        else:
            arrays[f"{n}/msb_bits"] = _ints([op.dp_msb_bits], np.int8)
        arrays[f"{n}/mode"] = _ints([MODE_CODES[prog.layer.mode]], np.int8)
    src = program.op(layer.name)
    d = layer.to_dict()
    entry: dict[str, Any] = {"index": index}
    entry.update(d)
    entry["utilization"] = float(d["utilization"])
    entry["im2col"] = ({"kernel": src.kernel, "stride": src.stride, "padding": src.padding}
                       if layer.im2col else None)
    entry["act_words"] = layer.height * layer.width * cp.cw
    entry["out_words"] = int(cp.out_words)
    entry["descriptor"] = {k: int(v) for k, v in prog.desc.items()}
    dl = dual_desc_layout(hw) if dual else desc_layout(hw)
    entry["descriptor_bits"] = hex(int(dl.const(prog.desc).as_bits()))
    entry["memories"] = mems
    return entry


def _host_entry(program: BFPProgram, step: HostStep, arrays: dict[str, np.ndarray]
                ) -> dict[str, Any]:
    e: dict[str, Any] = {"name": step.name, "kind": step.kind, "inputs": list(step.inputs),
                         "output": step.output}
    if step.kind == "quantize_input":
        return e
    op = program.op(step.name)
    if step.kind == "maxpool":
        e.update(kernel=int(op.kernel), stride=int(op.stride), padding=int(op.padding))
    if step.kind in ("add", "relu"):
        e["activation"] = op.activation
    if step.kind == "add":
        arrays[f"{step.name}/joint_lsb"] = _ints(op.joint_lsb, np.int16)
    if op.clamp_max is not None:
        arrays[f"{step.name}/clamp_max"] = _ints(op.clamp_max, np.int16)
    return e


def _write_folder(work: Path, program: BFPProgram, lp: LayerProgram, *, model: str,
                  dataset: str | None, input_shape: tuple[int, ...], source: dict[str, Any],
                  hook: Callable[[str], None] | None, dfs: dict[str, Any] | None = None) -> None:
    hw = lp.hw
    fmt = program.fmt
    blobs: dict[str, list[bytes]] = {m: [] for m in ff.WEIGHT_MEMORIES}
    blob_words = {m: 0 for m in ff.WEIGHT_MEMORIES}
    arrays: dict[str, np.ndarray] = {}
    mem_files: list[str] = []
    steps: list[dict[str, Any]] = []
    produced: dict[str, str] = {}
    index = 0
    for s in lp.steps:
        if isinstance(s, EngineLayer):
            entry = _engine_entry(program, index, s, hw, work, blobs, blob_words, arrays,
                                  mem_files)
            entry["input_shape"] = [int(v) for v in lp.tensors[s.input]["shape"]]
            entry["output_shape"] = [int(v) for v in lp.tensors[s.output]["shape"]]
            steps.append({"engine": entry})
            produced[s.output] = f"engine:{s.name}"
            index += 1
            if hook:
                hook(f"layer:{s.name}")
        else:
            entry = _host_entry(program, s, arrays)
            entry["output_shape"] = [int(v) for v in lp.tensors[s.output]["shape"]]
            entry["output_lsb"] = _uniform(program.lsb[s.output])
            steps.append({"host": entry})
            produced[s.output] = f"host:{s.name}"
    tensors: dict[str, Any] = {}
    for name, t in lp.tensors.items():
        lsb = program.lsb[name]
        u = _uniform(lsb)
        if isinstance(u, list):
            exp: Any = [v + fmt.lsb_offset for v in u]
            scale: Any = None
        else:
            exp = None if u is None else u + fmt.lsb_offset
            scale = None if u is None else float(2.0 ** u)
        tensors[name] = {"shape": [int(v) for v in t["shape"]], "lsb": u, "exponent": exp,
                         "scale": scale, "produced_by": produced.get(name)}
        if lsb is not None:
            arrays[f"{name}/lsb"] = _ints(lsb, np.int16)
    dfs_sec = None
    if dfs is not None:
        from .dfs_deploy import dfs_section
        try:
            dfs_sec, gate_arrays = dfs_section(program, dfs)
        except ValueError as exc:
            raise ExportError(f"{model}: DFS host gate: {exc}") from exc
        arrays.update(gate_arrays)
    if hook:
        hook("arrays")
    ff.write_npz(work / ff.ARRAYS, arrays)
    blob_info: dict[str, Any] = {}
    for m in blobs:   # the weight memories, then "gate" when there are dual layers
        data = b"".join(blobs[m])
        (work / ff.bin_name(m)).write_bytes(data)
        bits = int(ff.layout_of(m, hw).size)
        blob_info[m] = {"file": ff.bin_name(m), "word_bits": bits,
                        "word_bytes": ff.word_bytes(bits), "words": blob_words[m],
                        "size": len(data), "byte_order": "little"}
    man: dict[str, Any] = {
        "format": ff.FORMAT,
        "format_version": ff.FORMAT_VERSION,
        "model": model,
        "dataset": dataset,
        "input_shape": [int(v) for v in input_shape],
        "output": program.output,
        "random_weights": bool(source.get("random_weights", False)),
        "source": source,
        "bfp": _bfp_spec(program),
        "hw": hw.to_dict(),
        "blobs": blob_info,
        "totals": {
            "engine_layers": index,
            "cycles": sum(s["engine"]["cycles"] for s in steps if "engine" in s),
            "ideal_cycles": sum(s["engine"]["ideal_cycles"] for s in steps if "engine" in s),
        },
        "steps": steps,
        "tensors": tensors,
    }
    if dfs_sec is not None:
        man["dfs"] = dfs_sec
    if hook:
        hook("header")
    (work / ff.HEADER).write_text(render_header(man))
    files: dict[str, Any] = {}
    for rel in [ff.ARRAYS, ff.HEADER] + [ff.bin_name(m) for m in blobs] + mem_files:
        p = work / rel
        files[rel] = {"size": p.stat().st_size, "sha256": ff.sha256_file(p)}
    man["files"] = files
    if hook:
        hook("manifest")
    text = yaml.safe_dump(man, sort_keys=False, default_flow_style=None, width=100)
    (work / ff.MANIFEST).write_text(ff.seal_manifest(text))


def export_program(out_dir: str | os.PathLike, program: BFPProgram,
                   shapes: dict[str, tuple[int, ...]], hw: HwConfig, *, model: str,
                   dataset: str | None = None, source: dict[str, Any] | None = None,
                   dfs: dict[str, Any] | None = None,
                   _hook: Callable[[str], None] | None = None) -> LayerProgram:
    """Write the deploy folder of ``program`` for ``hw`` at ``out_dir`` (atomically).

    ``shapes`` gives every tensor's per-image shape (e.g. :func:`program_shapes`);
    ``source`` is recorded in the manifest (e.g. the checkpoint's sha256, or
    ``random_weights: true`` with the seed); ``dfs`` (a DFS checkpoint's ``meta['dfs']``)
    adds the host gate and block layout (:mod:`dynacc.sw.dfs_deploy`). Returns the layer
    program. Raises
    :class:`ExportError` or ``gen.layer_program.MappingError`` naming the layer that does not
    fit.
    """
    lp = build_layer_program(model, program, shapes, hw)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write_folder(work, program, lp, model=model, dataset=dataset,
                      input_shape=tuple(shapes["input"]), source=dict(source or {}), hook=_hook,
                      dfs=dfs)
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return lp


# ----------------------------------------------------------------------------- CLI flow
def deploy_model(model: str, out_dir: str | os.PathLike, hw: HwConfig, *,
                 checkpoint: str | os.PathLike | None = None, dataset: str | None = None,
                 method: str = "kl", calib_images: int = 4, seed: int = 0, log: Callable[[str], None] = print) -> DeployResult:
    """Deploy ``model`` for ``hw`` into ``out_dir``.

    With ``checkpoint``: a calibrated dynacc checkpoint (``python -m dynacc.quant
    calibrate``, or a ``train-pg`` / ``train-dfs`` / ``train-cg`` one); its stored program
    is exported as is (a dual-precision program's gates come from training; a DFS checkpoint
    also gives its host gate and block layout), its ``meta['dataset']`` gives the input
    geometry. A gated model name (``pg_resnet20``, ``cg_resnet20``, ``gen.gated_models``)
    means its backbone with the digits-trained checkpoint of ``make gen`` (trained on first
    use).
    Without: seeded random weights, BN settled and calibrated (``method``, ``calib_images``
    random images) by the same steps as ``make gen`` (``gen.pipeline``).
    """
    from dynacc.gen.gated_models import (GATED_MODELS, backbone, model_checkpoint,
                                         stored_dual_program)
    from dynacc.quant.checkpoint import CheckpointError, load_checkpoint
    from dynacc.quant.models import DEFAULT_DATASET, input_shape, list_models

    known = list_models() + list(GATED_MODELS)
    if model not in known:
        raise ExportError(f"unknown model {model!r}; known: {', '.join(known)}")
    zoo = backbone(model)
    checkpoint = model_checkpoint(model, checkpoint)
    if checkpoint is not None:
        ck = load_checkpoint(checkpoint, expect_model=zoo)
        if ck.program is None:
            raise CheckpointError(f"checkpoint {str(checkpoint)!r} holds no calibrated program "
                                  f"(float weights only): run `python -m dynacc.quant calibrate "
                                  f"--model {zoo} --checkpoint {checkpoint}` first")
        if stored_dual_program(ck) is not None:
            log(f"{model}: the trained dual-precision program of {checkpoint} is exported as "
                "stored (gates and PACT exponents from training, not recalibrated)")
        ds_meta = ck.meta.get("dataset")
        if dataset is not None and ds_meta is not None and dataset != ds_meta:
            raise ExportError(f"checkpoint {str(checkpoint)!r} was calibrated on {ds_meta!r}, "
                              f"not {dataset!r}")
        ds = dataset or ds_meta or DEFAULT_DATASET[zoo]
        program = ck.program
        shapes = program_shapes(program, input_shape(zoo, ds))
        source = {"random_weights": False, "checkpoint_sha256": ff.sha256_file(checkpoint),
                  "checkpoint_meta": {k: v for k, v in ck.meta.items()
                                      if isinstance(v, (str, int, bool))
                                      or (isinstance(v, float) and math.isfinite(v))}}
        random = False
        dfs = ck.meta.get("dfs")
        if dfs is not None:
            log(f"{model}: DFS checkpoint: the host gate ({len(dfs['options'])} options "
                f"{', '.join(map(str, dfs['options']))}) and the block layout are exported too")
    else:
        dfs = None
        from dynacc.gen.pipeline import GenOptions, GenState, step_calibrate, step_model

        ds = dataset or DEFAULT_DATASET[model]
        log(f"WARNING: no --checkpoint: {model} gets seeded RANDOM weights (seed {seed}, BN "
            f"settled on random images, {method} calibration on {calib_images} random "
            f"{ds} images). Accuracy is meaningless; bit-exactness and cycles are real.")
        with tempfile.TemporaryDirectory(prefix="dynacc-deploy-") as tmp:
            opts = GenOptions(model=model, hw=hw, out_dir=Path(tmp), checkpoint=None,
                              method=method, calib_images=calib_images, seed=seed, dataset=ds)
            st = GenState(opts, Path(tmp))
            st = step_calibrate(step_model(st))
        program, shapes = st.program, dict(st.shapes)
        shapes.setdefault("input", input_shape(model, ds))
        source = {"random_weights": True, "seed": seed, "method": method,
                  "calib_images": calib_images}
        random = True
    lp = export_program(out_dir, program, shapes, hw, model=model, dataset=ds, source=source,
                        dfs=dfs)
    return DeployResult(Path(out_dir), program, lp, random, ds)
