"""Analytic cycle model of :class:`~dynacc.hw.conv_engine.ConvEngine` (equal to the RTL's
cycle counter, asserted by the co-simulation) and the ideal cycle count it is reported against.
"""

from __future__ import annotations

import functools

from .address_gen import SETUP_CYCLES
from .config import HwConfig

__all__ = ["conv_cycles", "conv_steps", "ideal_cycles", "conv_macs", "engine_latency",
           "dual_conv_cycles", "dual_conv_work", "cg_base_words", "DUAL_MODES"]


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


# -- dual-precision engine (Precision Gating / DFS precisions, Channel Gating, FBS) ----------
DUAL_MODES = ("gated", "msb", "full", "cg", "fbs")


def _dual_items(cfg: HwConfig, mode: str, tiles: int, pixels: int,
                passed_counts: "list[int] | tuple[int, ...] | None") -> list[int]:
    """Items (passing (pixel, lane) outputs) of each tile, as the engine queues them."""
    if mode not in DUAL_MODES:
        raise ValueError(f"dual-precision mode must be one of {DUAL_MODES}, not {mode!r}")
    if mode in ("msb", "fbs"):
        return [0] * tiles
    if mode == "full":   # every lane of every tile passes, padding lanes of the last tile too
        return [pixels * cfg.lanes] * tiles
    if passed_counts is None or len(passed_counts) != tiles:
        raise ValueError(f"mode {mode!r} needs passed_counts for each of the {tiles} output "
                         f"tiles, got {passed_counts!r}")
    for t, n in enumerate(passed_counts):
        if not 0 <= int(n) <= pixels * cfg.lanes:
            raise ValueError(f"passed_counts[{t}] = {n} is outside [0, {pixels * cfg.lanes}]")
    return [int(n) for n in passed_counts]


def cg_base_words(cfg: HwConfig, *, in_channels: int, out_channels: int,
                  partitions: int | None) -> int:
    """``nb = C / (p*K)``: input words of a Channel Gating partition (the first phase of each
    tile). Needs ``p >= 2`` dividing C and O with ``(C/p) % K == 0`` and ``(O/p) % K == 0``."""
    k, p = cfg.lanes, partitions
    if (isinstance(p, bool) or not isinstance(p, int) or p < 2 or in_channels % p
            or out_channels % p or (in_channels // p) % k or (out_channels // p) % k):
        raise ValueError(f"mode 'cg' needs partitions p >= 2 with (C/p) % K == 0 and "
                         f"(O/p) % K == 0 (C = {in_channels}, O = {out_channels}, "
                         f"K = {k}), got p = {p!r}")
    return in_channels // (p * k)


def dual_conv_cycles(cfg: HwConfig, *, in_channels: int, out_channels: int, out_height: int,
                     out_width: int, kernel_h: int, kernel_w: int, mode: str = "gated",
                     passed_counts: "list[int] | tuple[int, ...] | None" = None,
                     partitions: int | None = None) -> int:
    """Cycles the :class:`~dynacc.hw.dual_engine.DualEngine` is busy for one layer (its RTL
    ``cycles`` register, asserted equal by the co-simulation).

    With ``P = Ho*Wo``, ``CW = ceil(C/K)``, phase-1 and phase-2 steps per output ``S1``,
    ``S2`` and ``n_t`` passing outputs in tile t (``passed_counts[t]``; modes ``msb`` and
    ``fbs``: 0, ``full``: ``P*K``)::

        SETUP + sum_t [ P*S1 + drain_msb + (ceil(n_t/K)*S2 + drain_lsb if n_t else 0) + P ]
              + output latency

    ``S1 = S2 = kh*kw*CW``, except mode ``cg`` (``partitions`` p): ``S1 = kh*kw*nb`` over
    the tile's base words, ``S2 = kh*kw*(CW - nb)``, ``nb = C/(p*K)``. Mode ``fbs`` gets the
    compacted layer's sizes. The drains and latency come from :meth:`DualEngine.stages` /
    ``drains`` / ``out_stages``.
    """
    from .dual_engine import DualEngine
    from .dual_sequencer import SETUP_CYCLES as DUAL_SETUP

    tiles = _ceil(out_channels, cfg.lanes)
    pixels = out_height * out_width
    cw = _ceil(in_channels, cfg.lanes)
    items = _dual_items(cfg, mode, tiles, pixels, passed_counts)
    n1 = n2 = cw
    if mode == "cg":
        n1 = cg_base_words(cfg, in_channels=in_channels, out_channels=out_channels,
                           partitions=partitions)
        n2 = cw - n1
    s1, s2 = kernel_h * kernel_w * n1, kernel_h * kernel_w * n2
    drains = DualEngine.drains(cfg)
    total = DUAL_SETUP + DualEngine.out_stages(cfg)["write"]
    for n in items:
        total += pixels * s1 + drains["msb"] + pixels
        if n:
            total += _ceil(n, cfg.lanes) * s2 + drains["lsb"]
    return total


def dual_conv_work(*, out_channels: int, out_height: int, out_width: int, mode: str = "gated",
                   passed: int | None = None, partitions: int | None = None,
                   in_channels: int | None = None, dense_in_channels: int | None = None,
                   dense_out_channels: int | None = None) -> float:
    """Theoretical work of a dual-precision layer, in passes of the dense conv.

    * ``gated`` / ``msb`` / ``full`` (per output: the MSB pass, plus the LSB pass of each
      passing one): dense (``full``) 2, ``msb`` 1, ``gated`` ``1 + passed / outputs``;
      theoretical speed-up of gating = ``2 / work``.
    * ``cg`` (``partitions`` p): the base path is ``1/p`` of the dense conv, the rest
      ``1 - 1/p`` of it for each passing output: ``1/p + (1 - 1/p) * passed / outputs``.
    * ``fbs``: the compacted conv's MACs over the dense one's, ``(in_channels *
      out_channels) / (dense_in_channels * dense_out_channels)`` (compacted sizes
      ``in_channels``, ``out_channels``).

    Modes ``cg`` and ``fbs`` have a single dense pass: their speed-up is ``1 / work``.
    """
    outputs = out_channels * out_height * out_width
    if mode not in DUAL_MODES:
        raise ValueError(f"dual-precision mode must be one of {DUAL_MODES}, not {mode!r}")
    if mode == "full":
        return 2.0
    if mode == "msb":
        return 1.0
    if mode == "fbs":
        if (in_channels is None or dense_in_channels is None or dense_out_channels is None
                or not 0 <= in_channels <= dense_in_channels
                or not 0 <= out_channels <= dense_out_channels or dense_in_channels < 1
                or dense_out_channels < 1):
            raise ValueError(f"mode 'fbs' needs compacted in_channels <= dense_in_channels and "
                             f"out_channels <= dense_out_channels, got {in_channels!r} / "
                             f"{dense_in_channels!r}, {out_channels} / {dense_out_channels!r}")
        return in_channels * out_channels / (dense_in_channels * dense_out_channels)
    if passed is None or not 0 <= passed <= outputs:
        raise ValueError(f"mode {mode!r} needs passed in [0, {outputs}], got {passed!r}")
    if mode == "cg":
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ValueError(f"mode 'cg' needs partitions >= 1, got {partitions!r}")
        return 1.0 / partitions + (1.0 - 1.0 / partitions) * passed / outputs
    return 1.0 + passed / outputs
