"""Parameters of the fused-block engine (``hw/fused_engine.py``), checked on construction.

The engine runs one predicted FusioNet block (rules F1-F9 of ``docs/arithmetic.md``) whose
geometry (input size, stride, groups, channels per group, mid chunks, tiles) comes at run time
in a descriptor; this config fixes the widths and the largest sizes. Every width of the
engine is derived from here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dynacc.quant.formats import BFPFormat

from .config import clog2

__all__ = ["FusedConfig", "TAPS"]

#: taps of the fused accumulation: the 9 depthwise taps plus one for the ``V`` (b2) terms
TAPS = 10


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"FusedConfig field {name!r} must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"FusedConfig field {name!r} must be in [{lo}, {hi}], not {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    """Widths and largest sizes of one generated fused-block engine.

    A tile is ``lanes`` projection rows (output channels) of one group; an activation word is
    one pixel's ``channels`` mantissas; a mask word holds ``chunk`` mid channels of one group.
    """

    #: name used in build directories and reports
    name: str = "fused"
    #: K: output channels computed at once (one tile; all lanes of a tile share a group)
    lanes: int = 8
    #: M: mantissa width of activations and outputs
    mantissa_bits: int = 8
    #: largest input channels per group (C_in / G); the A accumulators are lanes × (this + 1)
    group_in: int = 8
    #: largest C_in and C_out of a block (mantissas per activation / output word)
    channels: int = 32
    #: mid channels per mask word (the scanner skips a whole empty chunk in two cycles)
    chunk: int = 16
    #: width of one precomputed fused weight T, U or V (32 bits were too few for some digits
    #: FusioNet trainings: a projection weight block 15 exponents below its layer's largest,
    #: aligned by the full align span, took |T| to 2**34)
    t_bits: int = 38
    #: width of one A accumulator (a masked sum of T over the mids of a group)
    a_bits: int = 44
    #: width of the block accumulator y (rule F7's bound must fit)
    acc_bits: int = 48
    #: width of the predictor thresholds (rules F3, F4)
    thr_bits: int = 10
    #: width of the signed output requantization shift (rule F9)
    shift_bits: int = 8
    #: largest input pixels H*W (activation memory words)
    act_depth: int = 256
    #: largest mid chunks of a block (mid / chunk, padded per group)
    max_chunks: int = 64
    #: words of the fused-weight memory (tiles * 10 taps * padded mids per group)
    t_depth: int = 8192
    #: largest tiles of a block (lane-constant memory words)
    max_tiles: int = 64
    #: width of the cycle counter
    cycle_bits: int = 40

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"FusedConfig field 'name' must be an identifier, not {self.name!r}")
        _int("lanes", self.lanes, 1, 64)
        _int("mantissa_bits", self.mantissa_bits, 2, 16)
        _int("group_in", self.group_in, 1, 64)
        _int("channels", self.channels, 1, 1024)
        _int("chunk", self.chunk, 1, 64)
        _int("t_bits", self.t_bits, 2, 62)
        _int("a_bits", self.a_bits, self.t_bits, 62)
        _int("acc_bits", self.acc_bits, self.a_bits, 62)
        _int("thr_bits", self.thr_bits, 4, 24)
        _int("shift_bits", self.shift_bits, 2, 16)
        _int("act_depth", self.act_depth, 1, 1 << 20)
        _int("max_chunks", self.max_chunks, 1, 1 << 12)
        _int("t_depth", self.t_depth, 1, 1 << 24)
        _int("max_tiles", self.max_tiles, 1, 1 << 12)
        _int("cycle_bits", self.cycle_bits, 16, 64)

    @property
    def fmt(self) -> BFPFormat:
        return BFPFormat(self.mantissa_bits, 8)

    @property
    def mask_depth(self) -> int:
        """Words of the s1/level and s2 memories: one per (pixel, chunk)."""
        return self.act_depth * self.max_chunks

    @property
    def chan_bits(self) -> int:
        return max(1, clog2(self.channels))

    def key(self) -> str:
        """Stable text of every field (used in build-cache keys)."""
        return ",".join(f"{k}={v}" for k, v in sorted(dataclasses.asdict(self).items()))
