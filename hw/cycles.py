"""Analytic cycle model of :class:`~dynacc.hw.conv_engine.ConvEngine` (equal to the RTL's
cycle counter, asserted by the co-simulation) and the ideal cycle count it is reported against.
"""

from __future__ import annotations

import functools

from .address_gen import SETUP_CYCLES
from .config import HwConfig

__all__ = ["conv_cycles", "conv_steps", "ideal_cycles", "conv_macs", "engine_latency",
           "dual_conv_cycles", "dual_conv_work", "DUAL_MODES"]


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def engine_latency(cfg: HwConfig) -> int:
    """Pipeline cycles from the issue of the last reduction step to its output write."""
    from .conv_engine import ConvEngine  # the pipeline is defined there
    return ConvEngine.stages(cfg)["write"]


def conv_steps(cfg: HwConfig, *, in_channels: int, out_channels: int, out_height: int,
               out_width: int, kernel_h: int, kernel_w: int) -> int:
    """Issued reduction steps: ``Ho * Wo * T * kh * kw * CW`` (one per cycle, no bubble)."""
    t = _ceil(out_channels, cfg.lanes)
    cw = _ceil(in_channels, cfg.lanes)
    return out_height * out_width * t * kernel_h * kernel_w * cw


def conv_cycles(cfg: HwConfig, *, in_channels: int, out_channels: int, out_height: int,
                out_width: int, kernel_h: int, kernel_w: int) -> int:
    """Cycles the engine is busy for one conv layer (the RTL ``cycles`` register):
    ``SETUP_CYCLES + conv_steps(...) + engine_latency(cfg)``."""
    return SETUP_CYCLES + engine_latency(cfg) + conv_steps(
        cfg, in_channels=in_channels, out_channels=out_channels, out_height=out_height,
        out_width=out_width, kernel_h=kernel_h, kernel_w=kernel_w)


def conv_macs(*, in_channels: int, out_channels: int, out_height: int, out_width: int,
              kernel_h: int, kernel_w: int) -> int:
    """Useful MACs of a dense conv (no padding of channels to the lane count)."""
    return out_height * out_width * out_channels * in_channels * kernel_h * kernel_w


def ideal_cycles(cfg: HwConfig, *, in_channels: int, out_channels: int, out_height: int,
                 out_width: int, kernel_h: int, kernel_w: int) -> float:
    """MACs / K²: the cycles of a perfectly used array."""
    return conv_macs(in_channels=in_channels, out_channels=out_channels, out_height=out_height,
                     out_width=out_width, kernel_h=kernel_h,
                     kernel_w=kernel_w) / cfg.macs_per_cycle


# -- dual-precision engine (Precision Gating / DFS precisions) --------------------------------
DUAL_MODES = ("gated", "msb", "full")


def _dual_items(cfg: HwConfig, mode: str, tiles: int, pixels: int,
                passed_counts: "list[int] | tuple[int, ...] | None") -> list[int]:
    """Items (passing (pixel, lane) outputs) of each tile, as the engine queues them."""
    if mode not in DUAL_MODES:
        raise ValueError(f"dual-precision mode must be one of {DUAL_MODES}, not {mode!r}")
    if mode == "msb":
        return [0] * tiles
    if mode == "full":   # every lane of every tile passes, padding lanes of the last tile too
        return [pixels * cfg.lanes] * tiles
    if passed_counts is None or len(passed_counts) != tiles:
        raise ValueError(f"mode 'gated' needs passed_counts for each of the {tiles} output "
                         f"tiles, got {passed_counts!r}")
    for t, n in enumerate(passed_counts):
        if not 0 <= int(n) <= pixels * cfg.lanes:
            raise ValueError(f"passed_counts[{t}] = {n} is outside [0, {pixels * cfg.lanes}]")
    return [int(n) for n in passed_counts]


def dual_conv_cycles(cfg: HwConfig, *, in_channels: int, out_channels: int, out_height: int,
                     out_width: int, kernel_h: int, kernel_w: int, mode: str = "gated",
                     passed_counts: "list[int] | tuple[int, ...] | None" = None) -> int:
    """Cycles the :class:`~dynacc.hw.dual_engine.DualEngine` is busy for one layer (its RTL
    ``cycles`` register, asserted equal by the co-simulation).

    With ``P = Ho*Wo``, ``S = kh*kw*ceil(C/K)`` and ``n_t`` passing outputs in tile t
    (``passed_counts[t]``; mode ``msb``: 0, ``full``: ``P*K``)::

        SETUP + sum_t [ P*S + drain_msb + (ceil(n_t/K)*S + drain_lsb if n_t else 0) + P ]
              + output latency

    The drains and latency come from :meth:`DualEngine.stages` / ``drains`` / ``out_stages``.
    """
    from .dual_engine import DualEngine
    from .dual_sequencer import SETUP_CYCLES as DUAL_SETUP

    tiles = _ceil(out_channels, cfg.lanes)
    pixels = out_height * out_width
    steps = kernel_h * kernel_w * _ceil(in_channels, cfg.lanes)
    drains = DualEngine.drains(cfg)
    total = DUAL_SETUP + DualEngine.out_stages(cfg)["write"]
    for n in _dual_items(cfg, mode, tiles, pixels, passed_counts):
        total += pixels * steps + drains["msb"] + pixels
        if n:
            total += _ceil(n, cfg.lanes) * steps + drains["lsb"]
    return total


def dual_conv_work(*, out_channels: int, out_height: int, out_width: int, mode: str = "gated",
                   passed: int | None = None) -> float:
    """Theoretical work of a dual-precision layer in passes per output: the MSB pass of every
    output plus the LSB pass of each passing one (dense / ``full``: 2, ``msb``: 1, ``gated``:
    ``1 + passed / outputs``). Theoretical speed-up of gating = ``2 / dual_conv_work(...)``."""
    outputs = out_channels * out_height * out_width
    if mode not in DUAL_MODES:
        raise ValueError(f"dual-precision mode must be one of {DUAL_MODES}, not {mode!r}")
    if mode == "full":
        return 2.0
    if mode == "msb":
        return 1.0
    if passed is None or not 0 <= passed <= outputs:
        raise ValueError(f"mode 'gated' needs passed in [0, {outputs}], got {passed!r}")
    return 1.0 + passed / outputs
