"""Run conv layers on the RTL engine (Verilator + cocotb) and check them against the golden model.

>>> out, cycles = run_conv_layer(layer, "default")          # doctest: +SKIP
>>> check_conv_output(layer.name, out, layer.golden(cfg.fmt))  # doctest: +SKIP

:func:`run_conv_layers` runs a list of layers in one simulator process (one launch, the
memories reloaded per layer), which is what the generator and the benches use.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from dynacc.hw.config import HwConfig, load_named
from dynacc.hw.program import ConvLayer, ConvProgram
from dynacc.hw.types import (act_word_layout, align_word_layout, bias_word_layout, desc_layout,
                             quant_word_layout, weight_word_layout)

from . import runner
from .memfile import read_mem, write_mem

__all__ = [
    "ConvResult",
    "build_engine",
    "run_conv_layers",
    "run_conv_layer",
    "check_conv_output",
    "verify_conv_layers",
]

_log = logging.getLogger(__name__)

BENCH_MODULE = "dynacc.sim.benches.conv_bench"
#: -O2 on the per-cycle C++ (Verilator's default is -Os): ~25 % more cycles/s for ~10 s of build
MAKE_VARS = {"OPT_FAST": "-O2"}


@dataclasses.dataclass(frozen=True)
class ConvResult:
    name: str
    out: np.ndarray      # [O, Ho, Wo] int64
    cycles: int          # the RTL cycle counter (start -> done)
    wall_s: float        # wall time of the RTL run (start -> done), seconds


def _cfg(cfg: HwConfig | str) -> HwConfig:
    return load_named(cfg) if isinstance(cfg, str) else cfg


@functools.lru_cache(maxsize=None)
def _build_cached(cfg: HwConfig, waves: bool) -> tuple[runner.SimBuild, dict[str, int]]:
    from .top import sim_top

    return runner.cached_top_build(f"conv_{cfg.name}", cfg.key(), ["top.py"],
                                   lambda: sim_top(cfg), waves=waves, make_vars=MAKE_VARS)


def build_engine(cfg: HwConfig | str = "default") -> runner.SimBuild:
    """Build (or reuse from ``build/sim``) the simulator of the engine for ``cfg``."""
    return _build_cached(_cfg(cfg), runner.waves_enabled())[0]


_LAYOUTS = {
    "act": act_word_layout, "wgt": weight_word_layout, "align": align_word_layout,
    "bias": bias_word_layout, "quant": quant_word_layout, "res": act_word_layout,
}


def write_layer_cases(run_dir: Path, progs: Sequence, dlayout, layouts: dict) -> list[dict]:
    """One folder per layer program in ``run_dir`` (``layer000``, ...) with its memory
    images as ``<mem>.mem`` in the word ``layouts``; returns the bench manifest's cases
    (folder, name, descriptor bits in ``dlayout``, files to load, words to dump)."""
    cases = []
    for i, prog in enumerate(progs):
        cdir = run_dir / f"layer{i:03d}"
        cdir.mkdir()
        files = {}
        for mem, img in prog.images().items():
            path = cdir / f"{mem}.mem"
            write_mem(path, img, layouts[mem])
            files[mem] = str(path)
        desc = int(dlayout.const(prog.desc).as_bits())
        cases.append({"dir": str(cdir), "name": prog.layer.name, "desc": desc, "load": files,
                      "dump_words": prog.out_words})
    return cases


def finish_run_dir(run_dir: Path, keep: bool | None) -> None:
    """Delete a run directory unless ``keep`` or ``WAVES=1`` (then say where it is)."""
    if keep or runner.waves_enabled():
        _log.warning("kept the run directory %s (waves: dump.vcd)", run_dir)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_conv_layers(layers: Sequence[ConvLayer], cfg: HwConfig | str = "default", *,
                    clock: str = "gpi", keep: bool | None = None) -> list[ConvResult]:
    """Run ``layers`` one after the other in one simulator process.

    ``clock``: ``"gpi"`` (cocotb's C clock, the default), ``"py"`` (Python coroutine
    clock) or ``"edges"`` (Python awaits every edge: the slow baseline). The run directory
    (``build/sim/runs/...``) is deleted afterwards unless ``keep`` or ``WAVES=1``.
    Raises ``ValueError`` if a layer does not fit ``cfg`` and
    :class:`~dynacc.sim.runner.SimulationError` if the simulation fails.
    """
    cfg = _cfg(cfg)
    progs = [ConvProgram(layer, cfg) for layer in layers]  # checks before any build
    sim, load_bits = _build_cached(cfg, runner.waves_enabled())
    run_dir = runner.new_run_dir(f"conv_{cfg.name}")
    cases = write_layer_cases(run_dir, progs, desc_layout(cfg),
                              {m: f(cfg) for m, f in _LAYOUTS.items()})
    manifest = run_dir / "manifest.json"
    manifest.write_text(json.dumps({"clock": clock, "load_bits": load_bits, "layers": cases}))
    runner.run(sim, BENCH_MODULE, run_dir=run_dir,
               extra_env={"DYNACC_CONV_MANIFEST": str(manifest)})
    results = []
    olayout = act_word_layout(cfg)
    for prog, case in zip(progs, cases):
        cdir = Path(case["dir"])
        res = json.loads((cdir / "result.json").read_text())
        words = read_mem(cdir / "out.mem", olayout)
        results.append(ConvResult(prog.layer.name, prog.unpack_output(words), int(res["cycles"]),
                                  float(res["wall_s"])))
    finish_run_dir(run_dir, keep)
    return results


def run_conv_layer(layer: ConvLayer, cfg: HwConfig | str = "default") -> tuple[np.ndarray, int]:
    """Run one layer on the RTL: ``(out [O, Ho, Wo], cycles)``."""
    r = run_conv_layers([layer], cfg)[0]
    return r.out, r.cycles


def check_conv_output(name: str, rtl: np.ndarray, expected: np.ndarray) -> None:
    """Every element with ``==``; on mismatch raise ``AssertionError`` naming the layer and
    the first diverging (output channel, y, x) with both values, plus the count."""
    rtl = np.asarray(rtl)
    expected = np.asarray(expected)
    if rtl.shape != expected.shape:
        raise AssertionError(f"layer {name!r}: RTL output shape {rtl.shape} != golden "
                             f"{expected.shape}")
    bad = np.argwhere(rtl != expected)
    if len(bad):
        o, y, x = (int(v) for v in bad[0])
        raise AssertionError(
            f"layer {name!r}: output channel {o}, y {y}, x {x}: RTL {int(rtl[o, y, x])} != "
            f"golden {int(expected[o, y, x])} ({len(bad)} of {rtl.size} elements differ)")


def verify_conv_layers(layers: Sequence[ConvLayer], cfg: HwConfig | str = "default"
                       ) -> list[ConvResult]:
    """Run ``layers`` and assert bit-exactness and ``cycles == conv_cycles(...)`` for each."""
    from dynacc.hw.cycles import conv_cycles

    cfg = _cfg(cfg)
    results = run_conv_layers(layers, cfg)
    for layer, r in zip(layers, results):
        check_conv_output(layer.name, r.out, layer.golden(cfg.fmt))
        model = conv_cycles(cfg, **layer.shape_kwargs())
        if r.cycles != model:
            raise AssertionError(f"layer {layer.name!r}: RTL cycles {r.cycles} != "
                                 f"conv_cycles model {model}")
    return results
