"""``make gen MODEL=fusion_net``: the digits-trained predicted FusioNet (predictive layer
fusion) mapped onto the fused-block engine, its stem and head onto the BFP conv engine.

Steps (named like the pipeline's, each ``step_<name>(state) -> state``, timed and logged):

* ``model``: the fusion checkpoint: ``--checkpoint``, else the digits-trained
  ``build/cache/fusion_net-digits.pt`` (``train-fusion`` defaults, trained on first use). A
  checkpoint that is not a fusion checkpoint is refused (``CheckpointError`` naming it).
* ``calibrate``: the integer program (``quant.fusion_program``): BN folded, activation
  exponents by the max rule (Q3) on the first training images, exactly as ``train-fusion``
  built the program it measured (the checkpoint's calibration count and data seed).
* ``evaluate``: one integer golden run over the whole digits test split: accuracy, per-block
  mask densities and mispredictions (against the real integer ReLU outcomes), multiplication
  counts, and the fused engine's exact cycles per image (``hw.fused_program.
  fusion_network_cycles``, equal to the RTL's counter).
* ``layer_program``: ``program.json`` (the ops in execution order: host steps, conv-engine
  layers, fused blocks with descriptor, LSBs, constant files and memory words) and per block
  ``blocks/units.<b>/{pred,t,lane}.mem`` + ``desc.json``: the constants a board loads.
* ``verilog``: ``rtl/fused_engine.v`` and ``rtl/conv_engine.v`` with their port metadata.
* ``report``: ``report.json`` + ``report.md`` + ``block_cycles.png`` + ``hw.yaml``.

Global average pooling and the classifier run on the host: the golden program's classifier
returns raw accumulators (the logits), which the conv engine, that writes requantized
mantissas, cannot return.

Like the pipeline: same inputs give byte-identical files (no timestamps or wall times in
them), the output folder is built in a temporary sibling and replaced in one move, and a
failing step is recorded in report.md / report.json before it is raised.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
import yaml

from dynacc.hw.config import HwConfig
from dynacc.hw.cycles import conv_cycles
from dynacc.hw.fused_config import FusedConfig
from dynacc.sw.fileformat import sha256_file

from .pipeline import _write_json, _write_text, execute
from .layer_program import EngineLayer, MappingError

__all__ = ["FUSED_MODELS", "FusedGenOptions", "FusedGenState", "STEPS", "run", "summary",
           "plot_block_cycles"]

log = logging.getLogger("dynacc.gen")

#: gen model names handled here -> trained model name of ``gated_models.gated_checkpoint``
FUSED_MODELS: dict[str, str] = {"fusion_net": "fusion_net", "fusion_mbv2": "fusion_mbv2"}

#: digits test images the ``evaluate`` step runs (None: the whole split, 450 images, about
#: 10-15 s on two cores); tests set fewer, the report says how many of how many
TEST_IMAGES: int | None = None


@dataclasses.dataclass
class FusedGenOptions:
    model: str
    hw: HwConfig                       # conv engine (stem, head; dense baseline of the blocks)
    out_dir: Path
    checkpoint: str | None = None
    #: calibration images (default: the checkpoint's ``train-fusion`` count)
    calib_images: int | None = None
    #: digits split seed when the checkpoint records none (else its training seed)
    seed: int = 0
    fused: FusedConfig = dataclasses.field(default_factory=FusedConfig)


@dataclasses.dataclass
class FusedGenState:
    opts: FusedGenOptions
    work: Path
    checkpoint: Path | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    units: list[Any] = dataclasses.field(default_factory=list)   # the model's FusionUnits
    program: Any = None                # quant.fusion_program.FusionProgram
    splits: Any = None
    evaluation: dict[str, Any] | None = None
    program_dict: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------- steps
def step_model(st: FusedGenState) -> FusedGenState:
    from dynacc.quant.checkpoint import CheckpointError
    from dynacc.quant.train_fusion import load_fusion_checkpoint

    from .gated_models import gated_checkpoint

    o = st.opts
    if o.checkpoint is None:
        path = gated_checkpoint(FUSED_MODELS[o.model])
        log.info("%s: digits-trained checkpoint %s", o.model, path)
    else:
        path = Path(o.checkpoint)
    pruned, _pred, meta = load_fusion_checkpoint(path)
    if meta.get("dataset", "digits") != "digits" or not hasattr(pruned, "units"):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a digits fusionet_digits "
                              "fusion checkpoint")
    st.checkpoint, st.meta, st.units = path, meta, list(pruned.units)
    return st


def step_calibrate(st: FusedGenState) -> FusedGenState:
    from dynacc.quant.fusion_program import fusion_program_from_checkpoint
    from dynacc.quant.train_fusion import FUSION_DEFAULTS

    train = st.meta.get("train", {})
    n = st.opts.calib_images or train.get("calib_images", FUSION_DEFAULTS["calib_images"])
    seed = int(train.get("seed", st.opts.seed))
    log.info("integer program: max-rule exponents on %d digits training images (split seed "
             "%d)", n, seed)
    st.program, st.splits = fusion_program_from_checkpoint(st.checkpoint, calib_images=n,
                                                           seed=seed)
    st.meta = {**st.meta, "gen_calib_images": n, "gen_split_seed": seed}
    fmt = st.program.fmt
    for what, bits in (("conv engine config " + repr(st.opts.hw.name), st.opts.hw.mantissa_bits),
                       ("fused config " + repr(st.opts.fused.name),
                        st.opts.fused.mantissa_bits)):
        if bits != fmt.mantissa_bits:
            raise MappingError(f"model is quantized with M={fmt.mantissa_bits}, the {what} has "
                               f"mantissa_bits={bits}")
    return st


class _Replay:
    """The ``FusionProgram`` interface ``fusion_network_cycles`` uses (``blocks``, ``run``),
    answering ``run`` from one earlier golden pass over the same batches, in the same order
    (so the statistics and the cycles come from one run of the golden model)."""

    def __init__(self, program: Any, passes: list[tuple[torch.Tensor, Any]]):
        self.blocks = program.blocks
        self._passes = iter(passes)

    def run(self, x: torch.Tensor):  # noqa: ANN201 - (logits, infos)
        x_seen, result = next(self._passes)
        if x is not x_seen:
            raise RuntimeError("replayed golden pass asked for a different batch")
        return result


def step_evaluate(st: FusedGenState) -> FusedGenState:
    from dynacc.hw.fused_program import fusion_network_cycles

    prog = st.program
    nb = len(prog.blocks)
    correct = n = 0
    keys = ("pos1", "err1", "miss1", "extra1", "real1", "pos2", "err2", "miss2", "extra2", "real2")
    acc: list[dict[str, int]] = [dict.fromkeys(keys, 0) for _ in range(nb)]
    counts: list[dict[str, float]] = [{} for _ in range(nb)]
    passes = []
    shapes: dict[str, list[int]] = {}
    limit = TEST_IMAGES
    with torch.no_grad():
        for x, y in st.splits.test:
            if limit is not None:
                if n >= limit:
                    break
                x, y = x[:limit - n], y[:limit - n]
            logits, infos = prog.run(x)
            correct += int((logits.argmax(dim=1) == y).sum())
            n += len(y)
            for b, info in enumerate(infos):
                a = acc[b]
                for k, s, h in (("1", info["s1"], info["h1"]), ("2", info["s2"], info["h2"])):
                    real = h > 0
                    a["pos" + k] += s.numel()
                    a["real" + k] += int(real.sum())
                    a["miss" + k] += int((~s & real).sum())
                    a["extra" + k] += int((s & ~real).sum())
                    a["err" + k] += int((s != real).sum())
                for k, v in info["counts"].items():
                    counts[b][k] = counts[b].get(k, 0.0) + v * len(y)
                shapes.setdefault(f"units.{b}.in", list(info["x"].shape[1:]))
            passes.append((x, (logits, [{"x": i["x"], "s1": i["s1"], "s2": i["s2"]}
                                        for i in infos])))
    cyc = fusion_network_cycles(_Replay(prog, passes), [x for x, _ in passes], st.opts.fused)
    blocks = []
    for b in range(nb):
        a, c, cb = acc[b], {k: v / max(n, 1) for k, v in counts[b].items()}, cyc["blocks"][b]
        blocks.append({
            "name": cb["name"], "cycles": cb["cycles"], "geometry": cb["geometry"],
            "s1_density": cb["s1_density"], "s2_density": cb["s2_density"],
            "s1_real_density": a["real1"] / max(a["pos1"], 1),
            "s2_real_density": a["real2"] / max(a["pos2"], 1),
            "s1_error": a["err1"] / max(a["pos1"], 1), "s2_error": a["err2"] / max(a["pos2"], 1),
            "s1_missed": a["miss1"] / max(a["pos1"], 1),
            "s1_extra": a["extra1"] / max(a["pos1"], 1),
            "s2_missed": a["miss2"] / max(a["pos2"], 1),
            "s2_extra": a["extra2"] / max(a["pos2"], 1),
            "counts": c,
        })
    st.evaluation = {"images": n, "split_images": len(st.splits.test.dataset),
                     "accuracy": 100.0 * correct / max(n, 1),
                     "cycles": cyc["cycles"], "blocks": blocks,
                     "in_shape": list(passes[0][0].shape[1:]) if passes else [],
                     "block_in_shapes": [shapes[f"units.{b}.in"] for b in range(nb)]}
    log.info("integer golden accuracy %.2f %% on %d digits test images; fused blocks %.1f "
             "cycles/image", st.evaluation["accuracy"], n, cyc["cycles"])
    return st


def _conv_layer(name: str, op: dict, input_name: str, in_shape: list[int], x_lsb: int,
                out_lsb: int, hw: HwConfig, fmt: Any, first: bool) -> EngineLayer:
    """A conv of the golden program (``FusionProgram.stem`` / ``.head``) as a conv-engine
    layer, mapped like ``gen/layer_program.py`` maps a BFP program's conv (grouped conv =
    block-diagonal dense conv, host im2col for a first layer with fewer than K input
    channels), and proven to run exactly on ``hw`` (``ConvProgram``'s checks)."""
    from dynacc.hw.program import ConvLayer
    from dynacc.quant.golden import accumulator_bound, conv_alignment

    from .engine_layers import engine_weights

    k = hw.lanes
    w = op["w"]
    o, cg, kk = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    c, h, wd = in_shape
    s, p, g = int(op["stride"]), int(op["padding"]), int(op["groups"])
    ho, wo = (h + 2 * p - kk) // s + 1, (wd + 2 * p - kk) // s + 1
    macs = o * ho * wo * cg * kk * kk
    im2col = first and c < k and kk > 1
    if im2col:
        c_eng, h_eng, w_eng, k_eng, s_eng, p_eng = c * kk * kk, ho, wo, 1, 1, 0
    else:
        c_eng, h_eng, w_eng, k_eng, s_eng, p_eng = c, h, wd, kk, s, p
    _, shift = conv_alignment(x_lsb, op["w_lsb"], g)
    bound = int(accumulator_bound(w, shift, op["bias"], fmt.max_mantissa).max())
    shape = dict(in_channels=c_eng, out_channels=o, out_height=ho, out_width=wo,
                 kernel_h=k_eng, kernel_w=k_eng)
    layer = EngineLayer(
        name=name, kind="conv", input=input_name, output=name, residual=None,
        in_channels=c_eng, height=h_eng, width=w_eng, out_channels=o, out_height=ho,
        out_width=wo, kernel=k_eng, stride=s_eng, padding=p_eng, groups=g, im2col=im2col,
        in_words=-(-c_eng // k), tiles=-(-o // k), activation="relu", macs=macs,
        ideal_cycles=-(-macs // (k * k)), cycles=conv_cycles(hw, **shape),
        acc_bits_needed=bound.bit_length() + 1, max_align_shift=int(shift.max()),
        in_lsb=int(x_lsb), out_lsb=int(out_lsb), joint_lsb=None, residual_lsb=None)
    qop = SimpleNamespace(weight=w, w_lsb=op["w_lsb"], groups=g)
    we, we_lsb = engine_weights(SimpleNamespace(op=lambda _name: qop), layer)
    try:
        ConvLayer(name=name, x=torch.zeros((c_eng, h_eng, w_eng), dtype=torch.int64),
                  x_lsb=int(x_lsb), w=we, w_lsb=we_lsb, bias=op["bias"], out_lsb=int(out_lsb),
                  stride=s_eng, padding=p_eng, activation="relu").program(hw)
    except ValueError as exc:
        raise MappingError(str(exc)) from exc
    return layer


def _host(name: str, kind: str, inputs: list[str], output: str, note: str | None = None
          ) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "kind": kind, "inputs": inputs, "output": output}
    if note:
        d["note"] = note
    return {"host": d}


def step_layer_program(st: FusedGenState) -> FusedGenState:
    from dynacc.hw.fused_engine import FusedEngine, fused_desc_layout
    from dynacc.hw.fused_program import FusedLayer, FusedProgram, dense_block_cycles
    from dynacc.sim.memfile import word_width, write_mem

    o, p, ev = st.opts, st.program, st.evaluation
    cfg, hw, fmt = o.fused, o.hw, st.program.fmt
    layouts = FusedEngine.layouts(cfg)
    dlay = fused_desc_layout(cfg)
    dwidth = word_width(dlay)
    in_shape = ev["in_shape"]
    block_in = ev["block_in_shapes"]
    dense = dense_block_cycles(hw, st.units, block_in[0][1])
    steps: list[dict[str, Any]] = [_host("input", "quantize_input", [], "input")]
    tensors: dict[str, dict[str, Any]] = {"input": {"shape": in_shape, "lsb": p.in_lsb}}
    stem = _conv_layer("stem", p.stem, "input", in_shape, p.in_lsb, p.stem_lsb, hw, fmt, True)
    steps.append({"engine": stem.to_dict()})
    tensors["stem"] = {"shape": [stem.out_channels, stem.out_height, stem.out_width],
                       "lsb": p.stem_lsb}
    steps.append(_host("stem.repack", "repack", ["stem"], "stem",
                       "conv-engine output words (K channels of one pixel) -> fused-engine "
                       f"activation words ({cfg.channels} channels of one pixel)"))
    prev = "stem"
    for b, blk in enumerate(p.blocks):
        name = f"units.{b}"
        c, h, w = block_in[b]
        if [c, h, w] != tensors[prev]["shape"]:
            raise MappingError(f"fused block {name!r}: input {[c, h, w]} != {prev} output "
                               f"{tensors[prev]['shape']}")
        try:
            fp = FusedProgram(FusedLayer(name, blk, np.zeros((c, h, w), dtype=np.int64),
                                         p.block_lsb[b]), cfg)
        except ValueError as exc:
            raise MappingError(str(exc)) from exc
        geo = fp.geo
        folder = Path("blocks") / name
        (st.work / folder).mkdir(parents=True, exist_ok=True)
        imgs = fp.images()
        files = {}
        for mem in ("pred", "t", "lane"):
            write_mem(st.work / folder / f"{mem}.mem", imgs[mem], layouts[mem])
            files[mem] = str(folder / f"{mem}.mem")
        desc = fp.desc
        packed = int(dlay.const(desc).as_bits())
        _write_json(st.work / folder / "desc.json",
                    {"block": name, "desc": desc, "packed": packed, "width": dwidth,
                     "packed_hex": f"{packed:0{-(-dwidth // 4)}x}"})
        files["desc"] = str(folder / "desc.json")
        evb = ev["blocks"][b]
        rows = [r for r in dense["layers"] if r["layer"].startswith(name + ".")]
        steps.append({"engine": {
            "name": name, "kind": "fused_block", "engine": "fused", "input": prev,
            "output": name, "in_channels": blk.in_ch, "mid": blk.mid,
            "out_channels": blk.out_ch, "groups": blk.groups, "stride": blk.stride,
            "residual": bool(blk.use_res), "height": h, "width": w,
            "out_height": geo["ho"], "out_width": geo["wo"],
            "in_lsb": int(blk.x_lsb), "out_lsb": int(p.block_lsb[b]),
            "geometry": geo, "desc": desc, "desc_packed": packed, "files": files,
            "words": {"act": h * w, "pred": len(imgs["pred"]), "t": len(imgs["t"]),
                      "lane": len(imgs["lane"]), "s1": h * w * geo["chunks"],
                      "s2": geo["ho"] * geo["wo"] * geo["chunks"],
                      "out": geo["ho"] * geo["wo"]},
            "cycles": evb["cycles"], "cycles_images": ev["images"],
            "cycles_dense": sum(r["cycles"] for r in rows),
            "mults_dense": evb["counts"]["mults_dense"],
            "mults_fused": evb["counts"]["mults_fused"],
        }})
        tensors[name] = {"shape": [blk.out_ch, geo["ho"], geo["wo"]], "lsb": int(p.block_lsb[b])}
        prev = name
    steps.append(_host(f"{prev}.repack", "repack", [prev], prev,
                       f"fused-engine output words ({cfg.channels} channels of one pixel) -> "
                       "conv-engine activation words (K channels of one pixel)"))
    head = _conv_layer("head", p.head, prev, tensors[prev]["shape"], p.block_lsb[-1],
                       p.head_lsb, hw, fmt, False)
    steps.append({"engine": head.to_dict()})
    tensors["head"] = {"shape": [head.out_channels, head.out_height, head.out_width],
                       "lsb": p.head_lsb}
    steps.append(_host("avgpool", "avgpool", ["head"], "avgpool",
                       "global average pool (rule P2)"))
    tensors["avgpool"] = {"shape": [head.out_channels], "lsb": p.head_lsb}
    steps.append(_host("fc", "linear", ["avgpool"], "fc",
                       f"classifier {int(p.fc_w.shape[1])}->{int(p.fc_w.shape[0])} on the host: "
                       "the golden program returns its raw accumulators as the logits, which "
                       "the conv engine (requantized mantissa outputs) cannot return"))
    tensors["fc"] = {"shape": [int(p.fc_w.shape[0])], "lsb": None}
    st.program_dict = {
        "model": o.model,
        "checkpoint": {"path": str(st.checkpoint), "sha256": sha256_file(st.checkpoint)},
        "calibration": {"rule": "max (Q3)", "images": st.meta.get("gen_calib_images"),
                        "split_seed": st.meta.get("gen_split_seed")},
        "hw": hw.to_dict(),
        "fused": dataclasses.asdict(cfg),
        "steps": steps,
        "tensors": tensors,
        "dense_blocks": dense,
    }
    _write_json(st.work / "program.json", st.program_dict)
    return st


def step_verilog(st: FusedGenState) -> FusedGenState:
    from .emit import emit_engine, emit_fused_engine
    emit_engine(st.opts.hw, st.work / "rtl")
    emit_fused_engine(st.opts.fused, st.work / "rtl")
    return st


# --------------------------------------------------------------------------------- report
def _report_dict(st: FusedGenState) -> dict[str, Any]:
    pd, ev, cfg, hw = st.program_dict, st.evaluation, st.opts.fused, st.opts.hw
    layers, other_mults = [], 0
    for s in pd["steps"]:
        kind, d = next(iter(s.items()))
        if kind == "engine" and d["engine"] == "conv":
            c, h, w = pd["tensors"][d["input"]]["shape"]
            layers.append({"name": d["name"], "engine": "conv", "cycles": d["cycles"],
                           "cycles_dense": d["cycles"], "mults_dense": d["macs"],
                           "mults_fused": d["macs"], "mult_reduction": 1.0,
                           "shape": f"{c}→{d['out_channels']}, {h}×{w} in → "
                                    f"{d['out_height']}×{d['out_width']}",
                           "im2col": d["im2col"], "groups": d["groups"]})
            other_mults += d["macs"]
        elif kind == "engine":
            b = int(d["name"].split(".")[1])
            e = ev["blocks"][b]
            layers.append({"name": d["name"], "engine": "fused", "cycles": d["cycles"],
                           "cycles_dense": d["cycles_dense"], "mults_dense": d["mults_dense"],
                           "mults_fused": d["mults_fused"],
                           "mult_reduction": d["mults_dense"] / max(d["mults_fused"], 1),
                           "shape": f"{d['in_channels']}→{d['mid']}→{d['out_channels']}, "
                                    f"{d['height']}×{d['width']} in, stride {d['stride']}",
                           "adds_fused": e["counts"].get("adds_fused"),
                           "s1_density": e["s1_density"], "s2_density": e["s2_density"]})
    fc = pd["tensors"]["fc"]["shape"][0] * pd["tensors"]["avgpool"]["shape"][0]
    other_mults += fc
    fused_net = sum(l["cycles"] for l in layers)
    dense_net = sum(l["cycles_dense"] for l in layers)
    blocks = [l for l in layers if l["engine"] == "fused"]
    bf = sum(l["cycles"] for l in blocks)
    bd = sum(l["cycles_dense"] for l in blocks)
    md_, mf_ = (sum(l["mults_dense"] for l in blocks), sum(l["mults_fused"] for l in blocks))
    dense = pd["dense_blocks"]
    return {
        "model": pd["model"],
        "checkpoint": pd["checkpoint"],
        "calibration": pd["calibration"],
        "hw": pd["hw"],
        "fused": pd["fused"],
        "engines": {
            "conv": {"config": hw.name, "macs_per_cycle": hw.lanes ** 2, "lanes": hw.lanes},
            "fused": {"config": cfg.name, "lanes": cfg.lanes, "group_in": cfg.group_in,
                      "multipliers": cfg.lanes * cfg.group_in,
                      "a_adders": cfg.lanes * (cfg.group_in + 1), "chunk": cfg.chunk},
        },
        "test_images": ev["images"],
        "test_split_images": ev["split_images"],
        "accuracy": ev["accuracy"],
        "checkpoint_predicted_acc": st.meta.get("predicted_acc"),
        "masks": [{k: e[k] for k in ("name", "s1_density", "s2_density", "s1_real_density",
                                     "s2_real_density", "s1_error", "s2_error", "s1_missed",
                                     "s1_extra", "s2_missed", "s2_extra")}
                  for e in ev["blocks"]],
        "counts": [{"name": e["name"], **e["counts"]} for e in ev["blocks"]],
        "layers": layers,
        "host": {"fc_mults": fc, "steps": [next(iter(s.values()))["name"] for s in pd["steps"]
                                           if "host" in s]},
        "dense_blocks": {"layers": dense["layers"], "useful_cycles": dense["useful_cycles"]},
        "totals": {
            "cycles_fused_network": fused_net, "cycles_dense_network": dense_net,
            "network_speedup": dense_net / fused_net if fused_net else 0.0,
            "block_cycles_fused": bf, "block_cycles_dense": bd,
            "block_speedup": bd / bf if bf else 0.0,
            "block_cycles_dense_useful": dense["useful_cycles"],
            "block_mults_dense": md_, "block_mults_fused": mf_,
            "block_mult_reduction": md_ / mf_ if mf_ else 0.0,
            "network_mults_dense": md_ + other_mults, "network_mults_fused": mf_ + other_mults,
            "network_mult_reduction": (md_ + other_mults) / max(mf_ + other_mults, 1),
        },
    }


def _report_markdown(rep: dict[str, Any]) -> str:
    t, e = rep["totals"], rep["engines"]
    conv, fu = e["conv"], e["fused"]
    ck = rep["checkpoint"]
    which = (f"all {rep['test_images']}" if rep["test_images"] == rep["test_split_images"]
             else f"the first {rep['test_images']} of the {rep['test_split_images']}")
    acc_note = (f" (the checkpoint records {rep['checkpoint_predicted_acc']:.2f} % on its "
                "whole test split)"
                if rep.get("checkpoint_predicted_acc") is not None else "")
    lines = [
        f"# {rep['model']}: predictive layer fusion on the fused-block engine `{fu['config']}`",
        "",
        f"Checkpoint `{ck['path']}` (sha256 {ck['sha256'][:16]}…); integer program with "
        f"max-rule exponents on {rep['calibration']['images']} training images.",
        "",
        f"**Integer golden accuracy {rep['accuracy']:.2f} % on {which} digits test "
        f"images**{acc_note}.",
        "",
        f"**Network: {t['cycles_fused_network']:,.0f} cycles/image with the fused blocks vs "
        f"{t['cycles_dense_network']:,.0f} with the same blocks unfused on the conv engine "
        f"({t['network_speedup']:.2f}× fewer); blocks alone {t['block_cycles_fused']:,.0f} vs "
        f"{t['block_cycles_dense']:,.0f} ({t['block_speedup']:.2f}×).**",
        "",
        f"The engines differ in size, so these cycles compare different-size engines: the "
        f"dense conv engine `{conv['config']}` has {conv['lanes']}×{conv['lanes']} = "
        f"{conv['macs_per_cycle']} MACs/cycle; the fused engine has {fu['lanes']}·"
        f"({fu['group_in']}+1) = {fu['a_adders']} A adders and {fu['lanes']}·{fu['group_in']} "
        f"= {fu['multipliers']} multipliers. The conv engine runs a grouped or depthwise conv "
        f"as a dense conv with block-diagonal zero weights (as `make gen` maps them), which "
        f"is where most of its block cycles go: a {conv['macs_per_cycle']}-MAC array that "
        f"wasted no lane on them would need {t['block_cycles_dense_useful']:,.0f} cycles for "
        f"the unfused blocks (their MACs / {conv['macs_per_cycle']}).",
        "",
        "| layer | engine | shape | cycles/image | unfused on the conv engine | mults dense | "
        "mults fused | reduction |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for l in rep["layers"]:
        eng = "conv (im2col)" if l.get("im2col") else (
            f"conv (groups {l['groups']})" if l.get("groups", 1) > 1 else l["engine"])
        cyc = (f"{l['cycles']:,.1f} (mean)" if l["engine"] == "fused" else f"{l['cycles']:,}")
        lines.append(f"| {l['name']} | {eng} | {l['shape']} | {cyc} | {l['cycles_dense']:,} | "
                     f"{l['mults_dense']:,.0f} | {l['mults_fused']:,.0f} | "
                     f"{l['mult_reduction']:.2f}× |")
    lines += [
        f"| avgpool + fc | host | {rep['host']['fc_mults']:,} MACs | – | – | "
        f"{rep['host']['fc_mults']:,} | {rep['host']['fc_mults']:,} | 1.00× |",
        f"| **network** | | | **{t['cycles_fused_network']:,.1f}** | "
        f"**{t['cycles_dense_network']:,}** | {t['network_mults_dense']:,.0f} | "
        f"{t['network_mults_fused']:,.0f} | {t['network_mult_reduction']:.2f}× |",
        "",
        f"Fused-block cycles are the mean over the {rep['test_images']} test images of the "
        "engine's exact cycle count for the golden masks (`hw.fused_program.fused_cycles`, equal "
        "to the RTL's counter); they depend on the input through the masks. Conv-engine "
        "cycles are `hw.cycles.conv_cycles` (equal to the RTL). Global average pooling and "
        "the classifier run on the host (the golden classifier returns raw accumulators, "
        "which the conv engine does not), between engines the host repacks activation words. "
        "Multiplications per image: `quant.fusion_golden.block_counts` (dense: the unpruned "
        "unfused block; fused: 9·(in/G)·out per output pixel).",
        "",
    ]
    big = [r for r in rep["dense_blocks"]["layers"] if not r["fits_weight_memory"]]
    if big:
        lines += ["Unfused baseline caveat: " + ", ".join(
            f"`{r['layer']}` needs {r['weight_words']:,} weight words" for r in big)
            + f", more than the conv engine's `wgt_depth` = {rep['hw']['wgt_depth']:,}: it "
            "would not fit the engine without splitting; its cycles are counted as if it did.",
            ""]
    lines += [
        "## Masks",
        "",
        "Predicted mask densities next to the real (integer ReLU) ones, and mispredictions "
        "(fraction of all mask positions; *missed*: predicted off but the real ReLU passes, "
        "which changes the result; *extra*: predicted on but the real ReLU is zero, which "
        "only costs cycles).",
        "",
        "| block | s1 density (real) | s2 density (real) | s1 error (missed / extra) | "
        "s2 error (missed / extra) |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in rep["masks"]:
        lines.append(
            f"| {m['name']} | {100 * m['s1_density']:.1f} % ({100 * m['s1_real_density']:.1f} %) | "
            f"{100 * m['s2_density']:.1f} % ({100 * m['s2_real_density']:.1f} %) | "
            f"{100 * m['s1_error']:.2f} % ({100 * m['s1_missed']:.2f} / "
            f"{100 * m['s1_extra']:.2f}) | {100 * m['s2_error']:.2f} % "
            f"({100 * m['s2_missed']:.2f} / {100 * m['s2_extra']:.2f}) |")
    lines += [
        "",
        "## Plot",
        "",
        "![block_cycles](block_cycles.png)",
        "",
        "Per block: cycles per image of the same block unfused on the conv engine (expand, "
        "depthwise and project as three conv layers) and fused on the fused-block engine "
        "(mean over the test images).",
        "",
        "## Files",
        "",
        "`program.json` (ops in order), `blocks/units.<b>/{pred,t,lane}.mem` (`$readmemh`, one "
        "word per line, `FusedEngine.layouts`) and `desc.json` (descriptor and its packed "
        "value), `rtl/fused_engine.v`, `rtl/conv_engine.v` (+ `.component.json`), `hw.yaml`.",
        "",
    ]
    return "\n".join(lines)


def plot_block_cycles(layers: list[dict[str, Any]], path: Path, title: str,
                      dense_label: str = "unfused on the conv engine",
                      fused_label: str = "fused-block engine") -> Path:
    """Grouped bars per fused block: conv-engine cycles of the unfused block vs fused-engine
    cycles (``layers``: report rows with ``engine``, ``name``, ``cycles``, ``cycles_dense``),
    with the ratio annotated."""
    from .plots import _fig_width, _save, plt

    rows = [l for l in layers if l["engine"] == "fused"]
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(_fig_width(len(rows)) + 1, 4.2))
    ax.bar([x - 0.2 for x in xs], [r["cycles_dense"] for r in rows], 0.4, color="tab:gray",
           label=dense_label)
    ax.bar([x + 0.2 for x in xs], [r["cycles"] for r in rows], 0.4, color="tab:blue",
           label=fused_label)
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['cycles_dense'] / r['cycles']:.1f}×", (x + 0.2, r["cycles"]),
                    ha="center", va="bottom", fontsize=8)
    top = max([r["cycles_dense"] for r in rows] + [r["cycles"] for r in rows] + [1])
    ax.set_ylim(0, 1.3 * top)            # room for the legend above the bars
    ax.set_xticks(xs)
    ax.set_xticklabels([r["name"] for r in rows])
    ax.set_ylabel("cycles per image")
    ax.set_title(title, loc="left", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", frameon=False)
    ax.grid(axis="y", which="major", alpha=0.3)
    return _save(fig, Path(path))


def step_report(st: FusedGenState) -> FusedGenState:
    rep = _report_dict(st)
    st.report = rep
    _write_json(st.work / "report.json", rep)
    _write_text(st.work / "report.md", _report_markdown(rep))
    _write_text(st.work / "hw.yaml", yaml.safe_dump(st.opts.hw.to_dict(), sort_keys=True))
    t = rep["totals"]
    conv, fu = rep["engines"]["conv"], rep["engines"]["fused"]
    plot_block_cycles(rep["layers"], st.work / "block_cycles.png",
                      f"{rep['model']}: blocks {t['block_cycles_dense']:,} → "
                      f"{t['block_cycles_fused']:,.0f} cycles/image",
                      f"unfused on the conv engine '{conv['config']}' "
                      f"({conv['macs_per_cycle']} MACs/cycle)",
                      f"fused-block engine ({fu['multipliers']} multipliers, {fu['a_adders']} "
                      f"A adders; mean over {rep['test_images']} test images)")
    return st


def _failure_report(st: FusedGenState, step: str, exc: BaseException) -> None:
    failure = {"step": step, "error": f"{type(exc).__name__}: {exc}",
               "completed_steps": [n for n, _ in STEPS if n in st.timings]}
    rep = {"model": st.opts.model, "hw": st.opts.hw.to_dict(),
           "fused": dataclasses.asdict(st.opts.fused), "failed": failure}
    md = (f"# {st.opts.model} on the fused-block engine `{st.opts.fused.name}`\n\n"
          f"## Failed\n\nStep **{step}** failed: `{failure['error']}`.\n\n"
          f"Completed steps: {', '.join(failure['completed_steps']) or 'none'}. Their outputs "
          "are in this folder; later steps did not run.\n")
    _write_json(st.work / "report.json", rep)
    _write_text(st.work / "report.md", md)


STEPS: list[tuple[str, Callable[[FusedGenState], FusedGenState]]] = [
    ("model", step_model),
    ("calibrate", step_calibrate),
    ("evaluate", step_evaluate),
    ("layer_program", step_layer_program),
    ("verilog", step_verilog),
    ("report", step_report),
]

#: step -> the step whose result it needs
REQUIRES = {"calibrate": "model", "evaluate": "calibrate", "layer_program": "evaluate",
            "report": "layer_program"}


def run(opts: FusedGenOptions, steps: list[str] | None = None) -> FusedGenState:
    """Run the steps into a temporary folder, then move it onto ``opts.out_dir`` in one
    move (a failed step is recorded in report.md / report.json, then raised)."""
    if opts.model not in FUSED_MODELS:
        raise ValueError(f"unknown fused gen model {opts.model!r}; known: "
                         f"{', '.join(FUSED_MODELS)}")
    names = [n for n, _ in STEPS]
    wanted = steps or names
    unknown = set(wanted) - set(names)
    if unknown:
        raise ValueError(f"unknown gen step(s) {sorted(unknown)}; steps of {opts.model}: "
                         f"{names}")
    for s in wanted:
        if s in REQUIRES and REQUIRES[s] not in wanted:
            raise ValueError(f"gen step {s!r} of {opts.model} needs step {REQUIRES[s]!r}")
    return execute(STEPS, wanted, lambda work: FusedGenState(opts, work), opts.out_dir,
                   _failure_report)


def summary(st: FusedGenState) -> str:
    """The command line's last line for a fused gen run."""
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in st.timings.items())
    if st.report is not None:
        t = st.report["totals"]
        blocks = sum(1 for l in st.report["layers"] if l["engine"] == "fused")
        convs = len(st.report["layers"]) - blocks
        return (f"{st.opts.model}: {blocks} fused blocks + {convs} conv layers, "
                f"{t['cycles_fused_network']:,.0f} cycles/image (same blocks unfused: "
                f"{t['cycles_dense_network']:,} cycles, {t['network_speedup']:.2f}x), integer "
                f"accuracy {st.report['accuracy']:.2f} % on {st.report['test_images']} test "
                f"images -> {st.work}/report.md [{timings}]")
    return f"{st.opts.model}: -> {st.work} [{timings}]"
