"""Hardware configuration of the BFP convolution engine, loaded from YAML and checked on load.

Every width in ``hw/`` is derived from a :class:`HwConfig` (and the
:class:`dynacc.quant.formats.BFPFormat` it names); nothing below repeats a literal width.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import yaml

from dynacc.quant.formats import BFPFormat

__all__ = ["HwConfig", "bits_for", "clog2", "load_named"]


def clog2(n: int) -> int:
    """``ceil(log2(n))`` for ``n >= 1`` (0 for 1)."""
    if n < 1:
        raise ValueError(f"clog2 needs n >= 1, not {n!r}")
    return (n - 1).bit_length()


def bits_for(n: int) -> int:
    """Unsigned bits needed to hold every value in ``[0, n]`` (at least 1)."""
    return max(1, int(n).bit_length())


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"HwConfig field {name!r} must be an integer, not {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"HwConfig field {name!r} must be {rng}, not {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class HwConfig:
    """Parameters of one generated BFP conv engine.

    Memory depths are in words; a word of the activation / output memories holds ``lanes``
    mantissas (``lanes`` consecutive channels of one pixel), a weight word ``lanes × lanes``.
    """

    #: name used in build directories and reports
    name: str = "default"
    #: K: the PE array is K input-channel lanes × K output-channel lanes (K² MACs per cycle)
    lanes: int = 16
    #: M: mantissa width, two's complement, sign included (the BFPFormat of the engine)
    mantissa_bits: int = 8
    #: accumulator width (bias format, rule B1); must hold the worst case of the largest layer
    acc_bits: int = 48
    #: largest block alignment left shift d (WeightBlocking.align_span, rule A3)
    align_span: int = 15
    #: width of the signed per-output-channel requantization shifts
    shift_bits: int = 8
    #: adder-tree levels between two pipeline registers (Fmax knob)
    tree_levels_per_stage: int = 2
    #: output lanes (the last ones; all of them when >= lanes) whose K products are LUT
    #: multipliers (radix-4 Booth, four registered stages, for Fmax); when > 0 every other
    #: lane registers its single product four times (DSP block + fabric registers), so all
    #: lanes have the same latency (:attr:`product_stages` = 4)
    split_lanes: int = 0
    #: activation memory depth (words)
    act_depth: int = 1 << 17
    #: output (and residual) memory depth (words)
    out_depth: int = 1 << 16
    #: weight memory depth (words of K×K mantissas); the alignment memory has the same depth
    wgt_depth: int = 1 << 14
    #: largest number of output channels (bias / requant memories hold ceil(this / K) words)
    max_out_channels: int = 2048
    #: largest number of input channels (after host im2col, e.g. 147 for the 7×7 stem)
    max_in_channels: int = 4096
    #: largest H, W, Ho, Wo
    max_dim: int = 256
    #: largest kernel height / width
    max_kernel: int = 7
    #: largest stride
    max_stride: int = 2
    #: width of the cycle counter
    cycle_bits: int = 32
    #: width of the unsigned per-output-channel runtime scale of the dual-precision engine
    #: (rule FBS3: the quantized FBS saliency); the conv engine does not use it
    scale_bits: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"HwConfig field 'name' must be an identifier string, not {self.name!r}")
        _check_int("lanes", self.lanes, 1, 64)
        _check_int("mantissa_bits", self.mantissa_bits, 2, 16)
        _check_int("acc_bits", self.acc_bits, 2 * self.mantissa_bits, 62)
        _check_int("align_span", self.align_span, 0, 63)
        _check_int("shift_bits", self.shift_bits, 2, 8)
        _check_int("tree_levels_per_stage", self.tree_levels_per_stage, 1, 16)
        _check_int("split_lanes", self.split_lanes, 0, 64)
        _check_int("act_depth", self.act_depth, 1, 1 << 24)
        _check_int("out_depth", self.out_depth, 1, 1 << 24)
        _check_int("wgt_depth", self.wgt_depth, 1, 1 << 24)
        _check_int("max_out_channels", self.max_out_channels, 1, 1 << 16)
        _check_int("max_in_channels", self.max_in_channels, 1, 1 << 16)
        _check_int("max_dim", self.max_dim, 1, 1 << 14)
        _check_int("max_kernel", self.max_kernel, 1, 15)
        _check_int("max_stride", self.max_stride, 1, 15)
        _check_int("cycle_bits", self.cycle_bits, 8, 64)
        _check_int("scale_bits", self.scale_bits, 1, 16)
        worst = self.worst_case_accumulator()
        if worst > (1 << (self.acc_bits - 1)) - 1:
            need = worst.bit_length() + 1
            raise ValueError(
                f"HwConfig field 'acc_bits' = {self.acc_bits} cannot hold the worst-case "
                f"accumulation of the largest admitted layer ({self.max_in_channels} channels × "
                f"{self.max_kernel}×{self.max_kernel}, |x| = |w| = {self.fmt.max_mantissa}, "
                f"alignment shift {self.align_span}): needs at least {need} bits")

    # -- derived quantities -------------------------------------------------------------
    @property
    def fmt(self) -> BFPFormat:
        """The mantissa format of the engine."""
        return BFPFormat(self.mantissa_bits)

    @property
    def product_stages(self) -> int:
        """Registered stages of each product in the MAC trees: 4 when any lane is split."""
        return 4 if self.split_lanes else 1

    def lane_split(self, o: int) -> bool:
        """Whether output lane ``o`` computes its products with LUT (Booth) multipliers."""
        return o >= self.lanes - min(self.split_lanes, self.lanes)

    @property
    def macs_per_cycle(self) -> int:
        return self.lanes * self.lanes

    @property
    def max_in_words(self) -> int:
        """Largest CW = ceil(C / K)."""
        return -(-self.max_in_channels // self.lanes)

    @property
    def max_tiles(self) -> int:
        """Largest T = ceil(O / K): depth of the bias and requantization memories."""
        return -(-self.max_out_channels // self.lanes)

    @property
    def shift_min(self) -> int:
        return -(1 << (self.shift_bits - 1))

    @property
    def shift_max(self) -> int:
        return (1 << (self.shift_bits - 1)) - 1

    def worst_case_accumulator(self, bias: int = 0) -> int:
        """Upper bound of |accumulator| for the largest admitted layer (rule A4): every
        product at full scale and shifted by ``align_span``, plus ``|bias|``."""
        m = self.fmt.max_mantissa
        terms = self.max_in_channels * self.max_kernel * self.max_kernel
        return abs(bias) + ((m * m * terms) << self.align_span)

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HwConfig":
        if not isinstance(d, Mapping):
            raise TypeError(f"a hardware config must be a mapping, not {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown HwConfig field(s): {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "HwConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"hardware config {str(path)!r} does not exist") from None
        try:
            return cls.from_dict(data or {})
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from None

    def key(self) -> str:
        """Stable text of every field (used in build-cache keys)."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.to_dict().items()))


def _repo_configs() -> Path:
    return Path(__file__).resolve().parent.parent / "configs" / "hw"


def load_named(name: str) -> HwConfig:
    """Load ``configs/hw/<name>.yaml`` of this checkout."""
    return HwConfig.from_yaml(_repo_configs() / f"{name}.yaml")

