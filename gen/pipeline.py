"""``make gen``: a pipeline of named steps, model → calibrated program → layer program →
Verilog → reports, written atomically to ``build/<model>/``.

Steps (each ``step_<name>(state) -> state``, timed and logged):

* ``model``: build the model; load ``--checkpoint`` or use seeded random weights (said so),
  with BN statistics settled on seeded random images.
* ``calibrate``: BN folding + offline exponents (KL by default) on seeded calibration images.
* ``layer_program``: map onto the engine of the hardware config (clear error per layer).
* ``verilog``: emit the engine's Verilog and its port metadata.
* ``report``: ``report.json`` + ``report.md`` + plots (per-layer cycles and utilization, the
  roofline at the Fmax of an earlier ``make fpga`` of the same hardware config, else at the
  nominal target clock, said so).

Same inputs give byte-identical files (no timestamps; seeded everything). When a step fails,
the steps before it are kept and ``report.md`` / ``report.json`` record the failure (step,
error) before the error is raised: the output folder is still replaced in one move, never
half-written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from dynacc.hw.config import HwConfig
from dynacc.quant.calibrate import calibrate
from dynacc.quant.checkpoint import load_checkpoint, save_checkpoint
from dynacc.quant.data import random_images
from dynacc.quant.formats import QuantConfig, WeightBlocking
from dynacc.quant.models import DATASET_NUM_CLASSES, DEFAULT_DATASET, build_model, input_shape
from dynacc.quant.program import BFPProgram

from .atomic import replace_dir
from .layer_program import LayerProgram, build_layer_program
from .report import report_dict, report_markdown

__all__ = ["GenOptions", "GenState", "STEPS", "run", "execute"]

log = logging.getLogger("dynacc.gen")

#: digits test images whose gate outcomes the report of a gated model summarizes
GATE_REPORT_IMAGES = 50


@dataclasses.dataclass
class GenOptions:
    model: str
    hw: HwConfig
    out_dir: Path
    checkpoint: str | None = None
    method: str = "kl"
    calib_images: int = 4
    seed: int = 0
    dataset: str | None = None


@dataclasses.dataclass
class GenState:
    opts: GenOptions
    work: Path
    model: torch.nn.Module | None = None
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    random_weights: bool = False
    program: BFPProgram | None = None
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    layer_program: LayerProgram | None = None
    program_source: str | None = None   # checkpoint whose stored program is used as is
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _backbone(model: str) -> str:
    """Zoo model under a gen model name (``pg_resnet20`` -> ``resnet20``)."""
    from .gated_models import backbone
    return backbone(model)


def _dataset(o: GenOptions) -> str:
    """Input geometry: ``--dataset``, digits for the digits-trained gated models, else the
    model's default."""
    from .gated_models import GATED_MODELS
    if o.dataset:
        return o.dataset
    return "digits" if o.model in GATED_MODELS else DEFAULT_DATASET[o.model]


def step_model(st: GenState) -> GenState:
    o = st.opts
    backbone = _backbone(o.model)
    dataset = _dataset(o)
    shape = input_shape(backbone, dataset)
    kwargs = {"num_classes": DATASET_NUM_CLASSES[dataset], "in_channels": shape[0]}
    from .gated_models import model_checkpoint, stored_dual_program
    checkpoint = model_checkpoint(o.model, o.checkpoint)
    if checkpoint and o.checkpoint is None:
        log.info("%s: digits-trained checkpoint %s", o.model, checkpoint)
    if checkpoint:
        ck = load_checkpoint(checkpoint, expect_model=backbone)
        st.model, st.model_kwargs = ck.model, ck.model_kwargs or kwargs
        if stored_dual_program(ck) is not None:
            # a PG / DFS / CG program: its gates and PACT exponents come from training, keep it
            st.program, st.program_source = ck.program, checkpoint
    else:
        log.warning("no --checkpoint: %s uses seeded random weights (BN settled on random "
                    "images); cycle counts are exact, accuracy is meaningless", o.model)
        torch.manual_seed(o.seed)
        model = build_model(o.model, **kwargs)
        model.train()
        with torch.no_grad():
            for i in range(2):
                model(random_images(4, shape, seed=o.seed + 100 + i))
        st.model, st.model_kwargs, st.random_weights = model.eval(), kwargs, True
    st.model_kwargs = dict(st.model_kwargs)
    st.model_kwargs.setdefault("in_channels", shape[0])
    return st


def step_calibrate(st: GenState) -> GenState:
    o = st.opts
    backbone = _backbone(o.model)
    shape = input_shape(backbone, _dataset(o))
    if st.program_source is not None:
        log.info("using the trained program of %s (dual-precision layers: not recalibrated)",
                 st.program_source)
        env = st.program.run_golden(random_images(1, shape, seed=o.seed + 1000))
        st.shapes.update({n: tuple(t.shape[1:]) for n, t in env.items()})
        shutil.copyfile(st.program_source, st.work / "calibrated.pt")
        return st
    cfg = QuantConfig(weights=WeightBlocking(group=64, align_span=o.hw.align_span),
                      method=o.method)
    cfg = dataclasses.replace(cfg, fmt=o.hw.fmt)
    batches = [random_images(1, shape, seed=o.seed + 1000 + i) for i in range(o.calib_images)]
    st.program = calibrate(st.model, batches, cfg, progress=True, shapes=st.shapes)
    save_checkpoint(st.work / "calibrated.pt", o.model, st.model_kwargs, st.model, st.program,
                    meta={"random_weights": st.random_weights, "quant": cfg.to_dict(),
                          "calib_images": o.calib_images, "seed": o.seed})
    return st


def step_layer_program(st: GenState) -> GenState:
    st.layer_program = build_layer_program(st.opts.model, st.program, st.shapes, st.opts.hw)
    _write_json(st.work / "program.json", st.layer_program.to_dict())
    return st


def step_verilog(st: GenState) -> GenState:
    from .emit import emit_dual_engine, emit_engine
    emit_engine(st.opts.hw, st.work / "rtl")
    if any(l.engine == "dual" for l in st.layer_program.engine_layers):
        emit_dual_engine(st.opts.hw, st.work / "rtl")
    return st


def _earlier_fmax(out_dir: Path, hw: HwConfig) -> dict[str, Any] | None:
    """The FPGA result of an earlier ``make fpga`` into ``out_dir`` for this same hardware
    config (so the roofline can use a measured Fmax), or None."""
    path = Path(out_dir) / "fpga.json"
    try:
        fd = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if fd.get("hw") != hw.to_dict() or fd.get("fmax_mhz") is None:
        return None
    return fd


def step_report(st: GenState) -> GenState:
    rep = report_dict(st.layer_program)
    rep["random_weights"] = st.random_weights
    md = report_markdown(rep)
    if st.program_source is not None and any(l.engine == "dual"
                                             for l in st.layer_program.engine_layers):
        from dynacc.quant.flow import load_data

        from .gate_report import dfs_markdown, dfs_statistics, gate_statistics, gates_markdown
        splits = load_data(_backbone(st.opts.model), "digits", seed=st.opts.seed)
        images = torch.cat([x for x, _ in splits.test])[:GATE_REPORT_IMAGES]
        labels = torch.cat([y for _, y in splits.test])[:GATE_REPORT_IMAGES]
        rep["gates"] = gate_statistics(st.program, st.layer_program, images, st.opts.hw)
        md += "\n" + gates_markdown(rep["gates"])
        gate = _dfs_gate(st.program_source)
        if gate is not None:
            rep["dfs"] = dfs_statistics(st.program, gate, st.layer_program, images, labels,
                                        st.opts.hw)
            md += "\n" + dfs_markdown(rep["dfs"])
    _write_json(st.work / "report.json", rep)
    _write_text(st.work / "report.md", md)
    _write_text(st.work / "hw.yaml", yaml.safe_dump(st.opts.hw.to_dict(), sort_keys=True))
    fpga = _earlier_fmax(st.opts.out_dir, st.opts.hw)
    if fpga is not None:
        shutil.copyfile(Path(st.opts.out_dir) / "fpga.json", st.work / "fpga.json")
    from .plots import update_report_md
    update_report_md(st.work, rep, fpga)
    if rep.get("gates", {}).get("layers") or rep.get("dfs"):
        _gated_plots(st.work, rep)
    return st


#: where ``make bench`` leaves the PG / DFS accuracy-vs-compute sweep
PG_DFS_BENCH = Path("build/bench/pg_dfs.json")


def _gated_plots(work: Path, rep: dict[str, Any]) -> None:
    """gate_speedups.png (theoretical vs cycle-model speed-up of each PG / CG layer on the
    report's test images) and, for PG / DFS when ``make bench`` has run,
    accuracy_vs_compute.png from its sweep; appended to report.md as the "Gated plots"
    section."""
    from .plots import append_sections, plot_accuracy_vs_compute, plot_speedups

    text = ["## Gated plots", ""]
    gates = rep.get("gates", {}).get("layers")
    cg = bool(gates) and all(x.get("technique") == "cg" for x in gates)
    if gates:
        rows = [{"layer": x["name"], "theoretical": x["theoretical_speedup"],
                 "measured": x["cycle_speedup"]} for x in gates]
        kind = "CG" if cg else "PG"
        rule = ("1 / (1/p + (1 - 1/p) · passed fraction), over every output passing" if cg
                else "2 / (1 + passed fraction), over the dense mode")
        plot_speedups(rows, work / "gate_speedups.png",
                      f"{kind} layers, {rep['gates']['images']} test images: exact engine cycles "
                      "vs theory", measured_label="engine cycles (= RTL)")
        text += ["![gate_speedups](gate_speedups.png)", "",
                 f"Per {kind} layer: the speed-up that the gate outcomes allow ({rule}) and the "
                 "one the engine's exact cycles give.", ""]
    try:
        bench = None if cg else json.loads(PG_DFS_BENCH.read_text())
    except (OSError, ValueError):
        bench = None
    if bench and (bench.get("pg") or bench.get("dfs")):
        plot_accuracy_vs_compute(bench, work / "accuracy_vs_compute.png")
        text += ["![accuracy_vs_compute](accuracy_vs_compute.png)", "",
                 f"Accuracy vs compute of the digits ResNet-20 from `make bench` "
                 f"({PG_DFS_BENCH}): PG configurations and DFS vs skip-only.", ""]
    if len(text) == 2:
        return
    md = (work / "report.md").read_text()
    _write_text(work / "report.md", append_sections(md, {"gated-plots": "\n".join(text)}))


def _dfs_gate(checkpoint: str):  # noqa: ANN202 - HostGate | None
    """The host gate of a DFS checkpoint (None for other checkpoints)."""
    from dynacc.quant.checkpoint import load_checkpoint
    if "dfs" not in (load_checkpoint(checkpoint).meta or {}):
        return None
    from dynacc.quant.dfs_program import load_dfs_checkpoint
    return load_dfs_checkpoint(checkpoint)[2]


def _failure_report(st: GenState, step: str, exc: BaseException) -> None:
    """Record a failed step in report.json / report.md (with the per-layer table when the
    layer program was built before the failure)."""
    failure = {"step": step, "error": f"{type(exc).__name__}: {exc}",
               "completed_steps": [n for n, _ in STEPS if n in st.timings]}
    rep: dict[str, Any] = {"model": st.opts.model, "hw": st.opts.hw.to_dict(), "failed": failure}
    md = ""
    if st.layer_program is not None:
        rep.update(report_dict(st.layer_program))
        rep["failed"] = failure
        md = report_markdown(rep) + "\n"
    else:
        md = f"# {st.opts.model} on the BFP engine `{st.opts.hw.name}`\n\n"
    md += (f"## Failed\n\nStep **{step}** failed: `{failure['error']}`.\n\n"
           f"Completed steps: {', '.join(failure['completed_steps']) or 'none'}. Their outputs "
           "are in this folder; later steps did not run.\n")
    _write_json(st.work / "report.json", rep)
    _write_text(st.work / "report.md", md)


STEPS: list[tuple[str, Callable[[GenState], GenState]]] = [
    ("model", step_model),
    ("calibrate", step_calibrate),
    ("layer_program", step_layer_program),
    ("verilog", step_verilog),
    ("report", step_report),
]


def execute(steps: list[tuple[str, Callable[[Any], Any]]], wanted: list[str],
            make_state: Callable[[Path], Any], out_dir: Path,
            failure_report: Callable[[Any, str, BaseException], None]) -> Any:
    """Run the ``wanted`` named ``steps`` on the state ``make_state(work)`` of a temporary
    folder beside ``out_dir``, then move that folder onto ``out_dir`` in one move. A failing
    step is recorded by ``failure_report(state, step, error)``, the folder still moved (the
    steps before it are kept), then the error raised; any other error leaves ``out_dir``
    untouched and no partial folder. The state's ``timings`` get each step's seconds and its
    ``work`` becomes ``out_dir``."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    st = make_state(work)
    failed: BaseException | None = None
    try:
        for name, fn in steps:
            if name not in wanted:
                continue
            t0 = time.perf_counter()
            log.info("step %s ...", name)
            try:
                st = fn(st)
            except Exception as exc:  # recorded in the report, then raised
                log.error("step %s failed: %s", name, exc)
                failure_report(st, name, exc)
                failed = exc
                break
            st.timings[name] = time.perf_counter() - t0
            log.info("step %s done in %.2f s", name, st.timings[name])
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    st.work = out
    if failed is not None:
        raise failed
    return st


def run(opts: GenOptions, steps: list[str] | None = None) -> GenState:
    """Run the pipeline into a temporary folder, then move it onto ``opts.out_dir``
    (an error leaves the previous output untouched and no partial folder)."""
    wanted = steps or [n for n, _ in STEPS]
    unknown = set(wanted) - {n for n, _ in STEPS}
    if unknown:
        raise ValueError(f"unknown gen step(s) {sorted(unknown)}; steps: {[n for n, _ in STEPS]}")
    return execute(STEPS, wanted, lambda work: GenState(opts, work), opts.out_dir,
                   _failure_report)
