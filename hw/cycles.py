"""Analytic cycle model of :class:`~dynacc.hw.conv_engine.ConvEngine` (equal to the RTL's
cycle counter, asserted by the co-simulation) and the ideal cycle count it is reported against.
"""

from __future__ import annotations

import functools

from .address_gen import SETUP_CYCLES
from .config import HwConfig

__all__ = ["conv_cycles", "conv_steps", "ideal_cycles", "conv_macs", "engine_latency"]


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
