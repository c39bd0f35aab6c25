"""Run fused blocks on the RTL fused-block engine (Verilator + cocotb) and check them against
the golden model (:meth:`dynacc.hw.fused_program.FusedLayer.golden`, rules F1-F9).

>>> results = verify_fused_layers([layer])        # doctest: +SKIP

All layers of a call run in one simulator process (memories reloaded per layer) with the
load / run / dump sequence of the dual-engine bench. The RTL returns the output words, the
masks it computed (``s1``, the predicted levels, ``s2``) and its cycle counter; the check is
``==`` on every output element and every mask bit and level, and the cycles against
:func:`dynacc.hw.fused_program.fused_cycles`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from dynacc.hw.fused_config import FusedConfig
from dynacc.hw.fused_engine import FusedEngine, fused_desc_layout
from dynacc.hw.fused_program import FusedGolden, FusedLayer, FusedProgram

from . import runner
from .conv import MAKE_VARS, check_conv_output, finish_run_dir, write_layer_cases
from .memfile import read_mem

__all__ = ["FusedResult", "build_fused_engine", "run_fused_layers", "check_fused_result",
           "verify_fused_layers", "network_block_layers"]

#: the dual-engine bench runs any manifest of load / run / dump cases
BENCH_MODULE = "dynacc.sim.benches.dual_bench"


@dataclasses.dataclass(frozen=True)
class FusedResult:
    name: str
    rtl: FusedGolden      # the engine's output and masks
    cycles: int           # the RTL cycle counter (start -> done)
    wall_s: float         # wall time of the RTL run, seconds


@functools.lru_cache(maxsize=None)
def _build_cached(cfg: FusedConfig, waves: bool) -> tuple[runner.SimBuild, dict[str, int]]:
    from .fused_top import fused_sim_top

    return runner.cached_top_build(f"fused_{cfg.name}", cfg.key(), ["top.py", "fused_top.py"],
                                   lambda: fused_sim_top(cfg), waves=waves, make_vars=MAKE_VARS)


def build_fused_engine(cfg: FusedConfig | None = None) -> runner.SimBuild:
    """Build (or reuse from ``build/sim``) the simulator of the fused engine for ``cfg``."""
    return _build_cached(cfg or FusedConfig(), runner.waves_enabled())[0]


def run_fused_layers(layers: Sequence[FusedLayer], cfg: FusedConfig | None = None, *,
                     keep: bool | None = None) -> list[FusedResult]:
    """Run ``layers`` one after the other in one simulator process. Raises ``ValueError``
    (naming the layer and field) if a block does not fit ``cfg``."""
    cfg = cfg or FusedConfig()
    progs = [FusedProgram(layer, cfg) for layer in layers]   # checks before any build
    sim, load_bits = _build_cached(cfg, runner.waves_enabled())
    run_dir = runner.new_run_dir(f"fused_{cfg.name}")
    layouts = FusedEngine.layouts(cfg)
    cases = write_layer_cases(run_dir, progs, fused_desc_layout(cfg), layouts)
    manifest = run_dir / "manifest.json"
    manifest.write_text(json.dumps({"load_bits": load_bits, "layers": cases,
                                    "dumps": ["out", "s1", "s2"]}))
    runner.run(sim, BENCH_MODULE, run_dir=run_dir,
               extra_env={"DYNACC_DUAL_MANIFEST": str(manifest)})
    results = []
    for prog, case in zip(progs, cases):
        cdir = Path(case["dir"])
        res = json.loads((cdir / "result.json").read_text())
        words = {m: read_mem(cdir / f"{m}.mem", layouts[m]) for m in ("out", "s1", "s2")}
        results.append(FusedResult(prog.layer.name, prog.unpack(words["out"], words["s1"],
                                                                words["s2"]),
                                   int(res["cycles"]), float(res["wall_s"])))
    finish_run_dir(run_dir, keep)
    return results


def check_fused_result(layer: FusedLayer, result: FusedResult,
                       cfg: FusedConfig | None = None) -> FusedGolden:
    """``==`` on every mask bit, predicted level and output element against the golden
    model, and the RTL cycles against the model of the golden masks. Raises
    ``AssertionError`` naming the layer, the tensor, channel, y, x and both values."""
    cfg = cfg or FusedConfig()
    gold = layer.golden(cfg.fmt)
    for what in ("s1", "level", "s2", "out"):
        name = layer.name if what == "out" else f"{layer.name} ({what})"
        check_conv_output(name, np.asarray(getattr(result.rtl, what), dtype=np.int64),
                          np.asarray(getattr(gold, what), dtype=np.int64))
    model = FusedProgram(layer, cfg).cycles(gold.s1, gold.s2)
    if result.cycles != model:
        raise AssertionError(f"fused layer {layer.name!r}: RTL cycles {result.cycles} != "
                             f"fused_cycles model {model}")
    return gold


def verify_fused_layers(layers: Sequence[FusedLayer], cfg: FusedConfig | None = None
                        ) -> list[FusedResult]:
    """Run ``layers`` and assert bit-exact outputs and masks and exact cycles."""
    results = run_fused_layers(layers, cfg)
    for layer, r in zip(layers, results):
        check_fused_result(layer, r, cfg)
    return results


def network_block_layers(program, infos, labels: Sequence[str]) -> list[tuple[FusedLayer, int, int]]:
    """The fused blocks of a ``quant.fusion_program.FusionProgram`` run (``infos`` from
    ``program.run(x)``) as engine layers: ``(layer, image, block)`` for every image of the
    batch (named ``units.<b>/<label>``) and block, each on its golden input."""
    out = []
    for n, label in enumerate(labels):
        for b, (blk, out_lsb) in enumerate(zip(program.blocks, program.block_lsb)):
            out.append((FusedLayer(f"units.{b}/{label}", blk, infos[b]["x"][n].numpy(), out_lsb),
                        n, b))
    return out
