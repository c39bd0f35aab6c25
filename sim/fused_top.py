"""The simulation top of the fused-block engine: the Amaranth engine plus Verilog memories that
load and dump hex files (as :mod:`dynacc.sim.top` does for the conv engine).

Read memories ``act``, ``pred``, ``t``, ``lane`` load ``<m>.mem`` on their bit of ``load``;
the engine's own mask memories ``s1`` and ``s2`` (written in phases 1 and 2, read back later)
and the output memory ``out`` are dumped with ``$writememh`` on ``dump``, so the masks are
compared with the golden model as well as the outputs.
"""

from __future__ import annotations

from dynacc.hw.fused_config import FusedConfig
from dynacc.hw.fused_engine import FusedEngine

from .top import SimTop, engine_sim_top

__all__ = ["fused_sim_top", "TOP_NAME"]

TOP_NAME = "fused_sim_top"


def fused_sim_top(cfg: FusedConfig) -> SimTop:
    """Generate ``<engine>.v``, ``<engine>.component.json`` and the wrapper for ``cfg``."""
    return engine_sim_top(FusedEngine(cfg), f"fused_engine_{cfg.name}", TOP_NAME,
                          FusedEngine.memories(cfg),
                          f"dynacc.sim.fused_top for fused config {cfg.name!r}")
