"""Emit the engine's Verilog and its port metadata (the interface between gen, sim and sw)."""

from __future__ import annotations

import json
from pathlib import Path

from amaranth.back import verilog

from dynacc.hw.config import HwConfig
from dynacc.hw.fused_config import FusedConfig

__all__ = ["emit_engine", "emit_dual_engine", "emit_fused_engine"]


def emit_engine(hw: HwConfig, out_dir: Path, name: str = "conv_engine") -> Path:
    """Write ``<name>.v`` and ``<name>.component.json`` into ``out_dir``; returns the .v path."""
    from dynacc.hw.conv_engine import ConvEngine

    return _emit(ConvEngine(hw), out_dir, name)


def emit_dual_engine(hw: HwConfig, out_dir: Path, name: str = "dual_engine") -> Path:
    """The dual-precision engine (Precision Gating / DFS precisions), like :func:`emit_engine`."""
    from dynacc.hw.dual_engine import DualEngine

    return _emit(DualEngine(hw), out_dir, name)


def emit_fused_engine(cfg: FusedConfig, out_dir: Path, name: str = "fused_engine") -> Path:
    """The fused-block engine of a :class:`~dynacc.hw.fused_config.FusedConfig` (predictive
    layer fusion, rules F1-F9), like :func:`emit_engine`."""
    from dynacc.hw.fused_engine import FusedEngine

    return _emit(FusedEngine(cfg), out_dir, name)


def _emit(engine, out_dir: Path, name: str) -> Path:  # noqa: ANN001 - a wiring.Component
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = verilog.convert(engine, name=name, emit_src=False)
    v = out_dir / f"{name}.v"
    v.write_text(text)
    (out_dir / f"{name}.component.json").write_text(
        json.dumps(engine.metadata.as_json(), indent=1, sort_keys=True) + "\n")
    return v
