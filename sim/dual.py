"""Run dual-precision conv layers on the RTL engine (Verilator + cocotb) and check them
against the golden model (:func:`dynacc.quant.golden.dual_precision_conv2d`).

>>> r = run_dual_layers([layer], "dual")[0]                      # doctest: +SKIP
>>> check_dual_result(layer, r, cfg)                             # doctest: +SKIP

All layers of a call run in one simulator process (one launch, memories reloaded per layer).
The RTL returns the output words, the gate outcome of every output (the engine's ``passed``
port) and its cycle counter.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from dynacc.hw.config import HwConfig, load_named
from dynacc.hw.dual_engine import gate_word_layout, passed_word_layout, scale_word_layout
from dynacc.hw.dual_program import DualLayer, DualProgram
from dynacc.hw.dual_sequencer import dual_desc_layout
from dynacc.hw.types import (act_word_layout, align_word_layout, bias_word_layout,
                             quant_word_layout, weight_word_layout)

from . import runner
from .conv import MAKE_VARS, check_conv_output, finish_run_dir, write_layer_cases
from .memfile import read_mem

__all__ = ["DualResult", "build_dual_engine", "run_dual_layers", "check_dual_result",
           "verify_dual_layers"]


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
