"""The simulation top of the dual-precision engine: the Amaranth engine plus Verilog memories
that load and dump hex files (as :mod:`dynacc.sim.top` does for the conv engine).

Generated from the engine's ``metadata.as_json()`` and :meth:`DualEngine.memories`: ports
that read the same memory (``act0`` .. ``act{K-1}``, one per MAC row) share one
``reg [W-1:0] act_mem [...]`` with one registered read (latency 1) per port, loaded by
``$readmemh("act.mem", ...)`` on the edge that samples its bit of ``load``. The write memories
(``out``, ``passed``) are dumped with ``$writememh("<m>.mem", ..., 0, dump_words - 1)`` on the
edge that samples ``dump``.
"""

from __future__ import annotations

from dynacc.hw.config import HwConfig
from dynacc.hw.dual_engine import DualEngine

from .top import SimTop, engine_sim_top

__all__ = ["dual_sim_top", "TOP_NAME"]

TOP_NAME = "dual_sim_top"


def dual_sim_top(cfg: HwConfig) -> SimTop:
    """Generate ``<engine>.v``, ``<engine>.component.json`` and the wrapper for ``cfg``.

    ``SimTop.load_bits`` maps memory names (``act``, ``wgt``, ...) to bits of ``load``;
    ``geometry`` maps memory names to (word width, address width).
    """
    return engine_sim_top(DualEngine(cfg), f"dual_engine_{cfg.name}", TOP_NAME,
                          {p: (kind, mem) for p, (kind, _depth, mem)
                           in DualEngine.memories(cfg).items()},
                          f"dynacc.sim.dual_top for hardware config {cfg.name!r}")
