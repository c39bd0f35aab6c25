"""Block-floating-point number formats: the one place where bit widths are declared.

A BFP value is ``m * 2**lsb`` where ``m`` is an ``mantissa_bits``-wide two's complement
integer (sign included) and ``lsb = e - (mantissa_bits - 2)`` is derived from the block's
shared exponent ``e``. The shared exponent is the largest element exponent
``floor(log2|x|)`` in the block, so the largest magnitude of a block, in ``[2**e, 2**(e+1))``,
maps to a mantissa in ``[2**(M-2), 2**(M-1))``.

Everything else (``quant/functional.py``, ``quant/golden.py``, ``hw/``) derives widths and bounds
from these frozen objects; the rules themselves are written in ``docs/arithmetic.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

__all__ = ["BFPFormat", "WeightBlocking", "ActivationBlocking", "QuantConfig"]


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], not {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class BFPFormat:
    """Mantissa/exponent widths of one BFP format.

    Parameters
    ----------
    mantissa_bits:
        M, two's complement, sign included (2..16). Mantissas saturate symmetrically to
        ``±(2**(M-1) - 1)``; the code ``-2**(M-1)`` is never produced, so negation is closed.
    exponent_bits:
        E, width of a stored shared exponent. Shared exponents are clamped to
        ``[-2**(E-1), 2**(E-1) - 1]`` (8 bits: [-128, 127]; 4 bits, the paper's setting: [-8, 7]).
    """

    mantissa_bits: int = 8
    exponent_bits: int = 8

    def __post_init__(self) -> None:
        _check_int("mantissa_bits", self.mantissa_bits, 2, 16)
        _check_int("exponent_bits", self.exponent_bits, 2, 10)

    @property
    def max_mantissa(self) -> int:
        """Largest mantissa magnitude, ``2**(M-1) - 1`` (127 for M = 8)."""
        return (1 << (self.mantissa_bits - 1)) - 1

    @property
    def min_exponent(self) -> int:
        """Smallest shared exponent; also the exponent of an all-zero block."""
        return -(1 << (self.exponent_bits - 1))

    @property
    def max_exponent(self) -> int:
        """Largest shared exponent."""
        return (1 << (self.exponent_bits - 1)) - 1

    @property
    def lsb_offset(self) -> int:
        """``M - 2``: the LSB exponent of a block is its shared exponent minus this."""
        return self.mantissa_bits - 2

    def lsb(self, shared_exponent: int) -> int:
        """LSB exponent of a block with the given shared exponent."""
        return shared_exponent - self.lsb_offset

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class WeightBlocking:
    """Geometry of weight blocks.

    One block is one output filter × ``group`` input channels × kh × kw (``group = -1``: the
    whole filter). FC rows are blocked the same way with kh = kw = 1. When C is not a multiple
    of ``group`` the last block of a filter is a shorter tail block.

    ``align_span`` bounds the exponent spread inside one filter: a block exponent lower than
    ``max_filter_exponent - align_span`` is raised to it, so the hardware aligns block partial
    sums with a left shift of at most ``align_span`` bits (see docs/arithmetic.md, rule A3).
    """

    group: int = 64
    align_span: int = 15

    def __post_init__(self) -> None:
        if self.group != -1:
            _check_int("weight group", self.group, 1, 1 << 20)
        _check_int("align_span", self.align_span, 0, 63)


@dataclasses.dataclass(frozen=True)
class ActivationBlocking:
    """Geometry of activation exponents: ``group`` channels share one offline exponent
    (``-1``: one exponent per tensor, the default of the Static BFP paper for ResNet-50)."""

    group: int = -1

    def __post_init__(self) -> None:
        if self.group != -1:
            _check_int("activation group", self.group, 1, 1 << 20)


_METHODS = ("max", "kl", "kl-paper")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Everything that defines how a float model becomes a BFP integer model."""

    fmt: BFPFormat = BFPFormat()
    weights: WeightBlocking = WeightBlocking()
    activations: ActivationBlocking = ActivationBlocking()
    #: activation exponent method (weights always use the max exponent): "max", "kl" (KL
    #: search with level expansion) or "kl-paper" (KL on the histogram of quantized values,
    #: exactly as the Static BFP code)
    method: str = "kl"
    #: number of KL candidates below the max exponent (ê_max, ê_max-1, ... ê_max-n+1)
    kl_candidates: int = 3

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, not {self.method!r}")
        _check_int("kl_candidates", self.kl_candidates, 1, 8)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mantissa_bits": self.fmt.mantissa_bits,
            "exponent_bits": self.fmt.exponent_bits,
            "weight_group": self.weights.group,
            "align_span": self.weights.align_span,
            "activation_group": self.activations.group,
            "method": self.method,
            "kl_candidates": self.kl_candidates,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        known = {"mantissa_bits", "exponent_bits", "weight_group", "align_span",
                 "activation_group", "method", "kl_candidates"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown quantization config field(s): {sorted(unknown)}")
        return cls(
            fmt=BFPFormat(d.get("mantissa_bits", 8), d.get("exponent_bits", 8)),
            weights=WeightBlocking(d.get("weight_group", 64), d.get("align_span", 15)),
            activations=ActivationBlocking(d.get("activation_group", -1)),
            method=d.get("method", "kl"),
            kl_candidates=d.get("kl_candidates", 3),
        )
