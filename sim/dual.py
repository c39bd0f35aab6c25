"""Run dual-precision conv layers on the RTL engine (Verilator + cocotb) and check them
against the golden model (:meth:`DualLayer.golden`: PG / DFS, Channel Gating, FBS).

>>> r = run_dual_layers([layer], "dual")[0]                      # doctest: +SKIP
>>> check_dual_result(layer, r, cfg)                             # doctest: +SKIP
>>> verify_dual_layers([pg_layer, cg_layer, fbs_layer], "dual")  # doctest: +SKIP
>>> outs = run_fbs_cases(cases, "dual")                          # doctest: +SKIP

All layers of a call run in one simulator process (one launch, memories reloaded per layer).
The RTL returns the output words, the gate outcome of every output (the engine's ``passed``
port) and its cycle counter. :func:`run_fbs_cases` takes dense FBS layers of one image each
(the arguments of :func:`dynacc.hw.fbs_layer.compact_fbs_layer`), runs their compacted
layers and expands the outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dynacc.hw.config import HwConfig, load_named
from dynacc.hw.dual_engine import gate_word_layout, passed_word_layout, scale_word_layout
from dynacc.hw.dual_program import DualLayer, DualProgram
from dynacc.hw.fbs_layer import compact_fbs_layer, expand_fbs_output, fbs_out_size
from dynacc.hw.dual_sequencer import dual_desc_layout
from dynacc.hw.types import (act_word_layout, align_word_layout, bias_word_layout,
                             quant_word_layout, weight_word_layout)

from . import runner
from .conv import MAKE_VARS, check_conv_output, finish_run_dir, write_layer_cases
from .memfile import read_mem

__all__ = ["DualResult", "build_dual_engine", "run_dual_layers", "check_dual_result",
           "verify_dual_layers", "FbsRun", "run_fbs_cases", "FBS_CASE_FIELDS"]


BENCH_MODULE = "dynacc.sim.benches.dual_bench"

_LAYOUTS = {
    "act": act_word_layout, "wgt": weight_word_layout, "align": align_word_layout,
    "bias": bias_word_layout, "quant": quant_word_layout, "gate": gate_word_layout,
    "scale": scale_word_layout,
}


@dataclasses.dataclass(frozen=True)
class DualResult:
    name: str
    out: np.ndarray       # [O, Ho, Wo] int64
    passed: np.ndarray    # [O, Ho, Wo] bool: the RTL gate outcomes
    cycles: int           # the RTL cycle counter (start -> done)
    wall_s: float         # wall time of the RTL run, seconds


def _cfg(cfg: HwConfig | str) -> HwConfig:
    return load_named(cfg) if isinstance(cfg, str) else cfg


@functools.lru_cache(maxsize=None)
def _build_cached(cfg: HwConfig, waves: bool) -> tuple[runner.SimBuild, dict[str, int]]:
    from .dual_top import dual_sim_top

    return runner.cached_top_build(f"dual_{cfg.name}", cfg.key(), ["top.py", "dual_top.py"],
                                   lambda: dual_sim_top(cfg), waves=waves, make_vars=MAKE_VARS)


def build_dual_engine(cfg: HwConfig | str = "dual") -> runner.SimBuild:
    """Build (or reuse from ``build/sim``) the simulator of the dual engine for ``cfg``."""
    return _build_cached(_cfg(cfg), runner.waves_enabled())[0]


def run_dual_layers(layers: Sequence[DualLayer], cfg: HwConfig | str = "dual", *,
                    keep: bool | None = None) -> list[DualResult]:
    """Run ``layers`` one after the other in one simulator process.

    Raises ``ValueError`` (naming the layer and field) if a layer does not fit ``cfg``, and
    :class:`~dynacc.sim.runner.SimulationError` if the simulation fails. The run directory
    is deleted afterwards unless ``keep`` or ``WAVES=1``.
    """
    cfg = _cfg(cfg)
    progs = [DualProgram(layer, cfg) for layer in layers]   # checks before any build
    sim, load_bits = _build_cached(cfg, runner.waves_enabled())
    run_dir = runner.new_run_dir(f"dual_{cfg.name}")
    cases = write_layer_cases(run_dir, progs, dual_desc_layout(cfg),
                              {m: f(cfg) for m, f in _LAYOUTS.items()})
    manifest = run_dir / "manifest.json"
    manifest.write_text(json.dumps({"load_bits": load_bits, "layers": cases,
                                    "dumps": ["out", "passed"]}))
    runner.run(sim, BENCH_MODULE, run_dir=run_dir,
               extra_env={"DYNACC_DUAL_MANIFEST": str(manifest)})
    results = []
    for prog, case in zip(progs, cases):
        cdir = Path(case["dir"])
        res = json.loads((cdir / "result.json").read_text())
        out = read_mem(cdir / "out.mem", act_word_layout(cfg))
        passed = read_mem(cdir / "passed.mem", passed_word_layout(cfg))
        results.append(DualResult(prog.layer.name, prog.unpack_output(out),
                                  prog.unpack_passed(passed), int(res["cycles"]),
                                  float(res["wall_s"])))
    finish_run_dir(run_dir, keep)
    return results


def check_dual_result(layer: DualLayer, result: DualResult, cfg: HwConfig | str = "dual") -> None:
    """Every output element and every gate outcome with ``==`` against the golden model, and
    the RTL cycles against :func:`dynacc.hw.cycles.dual_conv_cycles` of the golden gate
    outcomes. Raises ``AssertionError`` naming the layer, channel, y, x and both values."""
    cfg = _cfg(cfg)
    y, passed = layer.golden(cfg.fmt)
    check_conv_output(f"{layer.name} (gate outcomes)", result.passed.astype(np.int64),
                      passed.astype(np.int64))
    check_conv_output(layer.name, result.out, y)
    model = DualProgram(layer, cfg).cycles(passed)
    if result.cycles != model:
        raise AssertionError(f"layer {layer.name!r}: RTL cycles {result.cycles} != "
                             f"dual_conv_cycles model {model}")


def verify_dual_layers(layers: Sequence[DualLayer], cfg: HwConfig | str = "dual"
                       ) -> list[DualResult]:
    """Run ``layers`` and assert bit-exact outputs and gate outcomes and exact cycles."""
    cfg = _cfg(cfg)
    results = run_dual_layers(layers, cfg)
    for layer, r in zip(layers, results):
        check_dual_result(layer, r, cfg)
    return results


#: keyword arguments of :func:`dynacc.hw.fbs_layer.compact_fbs_layer` read from an FBS case
FBS_CASE_FIELDS = ("name", "x", "x_lsb", "w", "w_lsb", "bias", "scale", "scale_lsb",
                   "active_in", "active_out", "out_lsb", "stride", "padding", "activation",
                   "clamp_max", "act_bits")


@dataclasses.dataclass(frozen=True)
class FbsRun:
    name: str
    out: np.ndarray                # [O, Ho, Wo] int64, zeros at the inactive output channels
    layer: DualLayer | None        # the compacted layer (None: no active output, nothing ran)
    result: DualResult | None      # its RTL run


def run_fbs_cases(cases: Sequence[Mapping[str, Any]], cfg: HwConfig | str = "dual", *,
                  check: bool = True, keep: bool | None = None) -> list[FbsRun]:
    """Compact each dense FBS case (a mapping with :data:`FBS_CASE_FIELDS`, e.g. from
    ``quant.fbs_program.fbs_layer_cases``; other keys are ignored), run the compacted layers
    in one simulator process and expand their outputs to ``[O, Ho, Wo]``. A case with no
    active output runs nothing (all zeros).

    With ``check``: every compacted layer is checked as :func:`check_dual_result` does
    (outputs, gate outcomes, cycles), and a case's ``expected`` (dense ``[O, Ho, Wo]``), when
    given, is compared with ``==`` to the expanded output (``AssertionError`` naming it)."""
    cfg = _cfg(cfg)
    layers = [compact_fbs_layer(**{f: c[f] for f in FBS_CASE_FIELDS}) for c in cases]
    ran = [l for l in layers if l is not None]
    results = iter(run_dual_layers(ran, cfg, keep=keep) if ran else [])
    runs = []
    for case, layer in zip(cases, layers):
        r = None if layer is None else next(results)
        if r is None:
            size = fbs_out_size(np.shape(case["x"]), np.shape(case["w"]), int(case["stride"]),
                                int(case["padding"]))
            out = expand_fbs_output(None, np.asarray(case["active_out"]), size)
        else:
            if check:
                check_dual_result(layer, r, cfg)
            out = expand_fbs_output(r.out, np.asarray(case["active_out"]))
        if check and case.get("expected") is not None:
            check_conv_output(f"{case['name']} (expanded FBS output)", out,
                              np.asarray(case["expected"], dtype=np.int64))
        runs.append(FbsRun(str(case["name"]), out, layer, r))
    return runs
