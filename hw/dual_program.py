"""One dual-precision conv layer (Precision Gating / DFS precisions, rules G0-G4) as the
:class:`~dynacc.hw.dual_engine.DualEngine` runs it: golden-domain integers, the checks that
make the RTL exact for it, the memory images and the descriptor.

The weight, alignment, bias and requantization images are those of the plain conv
(:class:`~dynacc.hw.program.ConvProgram`, which also proves rule A4 with ``|x| <=
max_mantissa``, a bound of every unsigned ``act_bits``-bit input); this module adds the gate
image (thresholds and signs), the dual-precision checks and the expected gate outcomes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from dynacc.quant import golden
from dynacc.quant.formats import BFPFormat
from dynacc.quant.functional import requantize

from .config import HwConfig
from .cycles import dual_conv_cycles
from .program import ACTIVATIONS, ConvLayer, ConvProgram

__all__ = ["DualLayer", "DualProgram", "DUAL_ACTIVATIONS", "MODE_CODES"]

#: activations a dual-precision layer may end with ("pact" runs on the relu6 clamp)
DUAL_ACTIVATIONS = (None, "relu", "pact")
#: mode name -> DualMode value (see hw/dual_sequencer.py)
MODE_CODES = {"gated": 0, "msb": 1, "full": 2}


def _i64(a: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.int64)


def _per_filter(v: Any, n: int) -> np.ndarray:
    a = np.asarray(v, dtype=np.int64).reshape(-1)
    return np.broadcast_to(a, (n,)).copy() if a.size == 1 else a


@dataclasses.dataclass(frozen=True, eq=False)
class DualLayer:
    """A dual-precision conv layer in golden-model terms, batch 1.

    ``x``: ``[C, H, W]`` unsigned ``act_bits``-bit activations at LSB ``x_lsb`` (rule G0);
    ``w``: ``[O, C, kh, kw]`` mantissas with LSBs ``w_lsb [O, C]``; ``bias``: ``[O]`` on the
    accumulator LSB (or None); ``threshold``: ``[O]`` (or a scalar) in accumulator units and
    ``sign``: ``[O]`` of +1/-1 (default +1), used in mode ``gated``; ``mode``: ``gated``,
    ``msb`` or ``full``; ``out_lsb``: scalar or ``[O]``; ``activation``: None, ``relu`` or
    ``pact`` (``min(max(m, 0), clamp_max)``).
    """

    name: str
    x: Any
    x_lsb: int
    w: Any
    w_lsb: Any
    bias: Any | None
    out_lsb: Any
    act_bits: int
    msb_bits: int
    threshold: Any | None = None
    sign: Any | None = None
    mode: str = "gated"
    stride: int = 1
    padding: int = 0
    activation: str | None = None
    clamp_max: int | None = None

    def conv_layer(self) -> ConvLayer:
        """The plain conv with the same tensors (the ``full`` mode result)."""
        return ConvLayer(self.name, self.x, self.x_lsb, self.w, self.w_lsb, self.bias,
                         self.out_lsb, self.stride, self.padding, self.activation,
                         self.clamp_max)

    @property
    def lsb_bits(self) -> int:
        """L = act_bits - msb_bits (rule G1)."""
        return self.act_bits - self.msb_bits

    @property
    def out_channels(self) -> int:
        return int(np.shape(self.w)[0])

    @property
    def out_size(self) -> tuple[int, int]:
        return self.conv_layer().out_size

    def shape_kwargs(self) -> dict[str, int]:
        """Shape keyword arguments of :func:`dynacc.hw.cycles.dual_conv_cycles`."""
        return self.conv_layer().shape_kwargs()

    # -- golden --------------------------------------------------------------------------
    def golden(self, fmt: BFPFormat) -> tuple[np.ndarray, np.ndarray]:
        """Expected ``(out [O, Ho, Wo], passed [O, Ho, Wo] bool)`` from
        :func:`dynacc.quant.golden.dual_precision_conv2d`, requantized (R3) and activated
        (R4)."""
        o = self.out_channels
        acc, passed, acc_lsb = golden.dual_precision_conv2d(
            _i64(self.x)[None], self.x_lsb, _i64(self.w), _i64(self.w_lsb),
            None if self.bias is None else _i64(self.bias), act_bits=self.act_bits,
            msb_bits=self.msb_bits,
            threshold=None if self.threshold is None else _i64(self.threshold),
            sign=None if self.sign is None else _i64(self.sign), mode=self.mode,
            stride=self.stride, padding=self.padding)
        out_l = torch.as_tensor(_per_filter(self.out_lsb, o))
        y = requantize(acc, (out_l - acc_lsb)[None, :, None, None], fmt)
        y = golden.apply_activation(y, self.activation, self.clamp_max)
        return y[0].numpy(), passed[0].numpy()

    def program(self, cfg: HwConfig) -> "DualProgram":
        """Memory images and descriptor; raises ``ValueError`` naming the layer and field if
        the layer does not fit ``cfg`` or the engine could not be exact for it."""
        return DualProgram(self, cfg)


class DualProgram:
    """A :class:`DualLayer` mapped onto a :class:`HwConfig` (checked on construction)."""

    def __init__(self, layer: DualLayer, cfg: HwConfig):
        self.layer = layer
        self.cfg = cfg
        fmt = cfg.fmt
        name = layer.name

        def fail(msg: str) -> None:
            raise ValueError(f"layer {name!r}: {msg}")

        m = cfg.mantissa_bits
        b, mb = layer.act_bits, layer.msb_bits
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 2 <= b <= m - 1:
            fail(f"field 'act_bits' = {b!r} must be an integer in [2, {m - 1}] (unsigned inputs "
                 f"in the {m}-bit activation word of config {cfg.name!r})")
        if isinstance(mb, bool) or not isinstance(mb, (int, np.integer)) or not 1 <= mb < b:
            fail(f"field 'msb_bits' = {mb!r} must be an integer in [1, act_bits - 1 = {b - 1}]")
        if layer.mode not in MODE_CODES:
            fail(f"field 'mode' = {layer.mode!r} must be one of {tuple(MODE_CODES)}")
        if layer.activation not in DUAL_ACTIVATIONS:
            fail(f"field 'activation' = {layer.activation!r} must be one of {DUAL_ACTIVATIONS}")
        x = np.asarray(layer.x)
        if x.ndim != 3:
            fail(f"field 'x' must be [C, H, W], got shape {x.shape}")
        if x.size and (int(x.min()) < 0 or int(x.max()) > (1 << b) - 1):
            fail(f"field 'x' must hold unsigned {b}-bit values in [0, {(1 << b) - 1}] "
                 f"(rule G0), got [{int(x.min())}, {int(x.max())}]")
        # geometry, weights, alignment, bias, accumulator bound (A4) and requantization shifts
        self.conv = ConvProgram(layer.conv_layer(), cfg)
        o = layer.out_channels
        t = self.conv.tiles
        k = cfg.lanes

        thr = np.zeros(o, dtype=np.int64)
        sgn = np.ones(o, dtype=np.int64)
        if layer.mode == "gated":
            if layer.threshold is None:
                fail("field 'threshold' is needed in mode 'gated'")
            thr = _per_filter(layer.threshold, o)
            if thr.shape != (o,):
                fail(f"field 'threshold' must be a scalar or [{o}], got {np.shape(layer.threshold)}")
            if layer.sign is not None:
                sgn = _per_filter(layer.sign, o)
                if sgn.shape != (o,):
                    fail(f"field 'sign' must be a scalar or [{o}], got {np.shape(layer.sign)}")
                if not np.isin(sgn, (-1, 1)).all():
                    fail(f"field 'sign' must be +1 or -1 per filter, got {sorted(set(sgn.tolist()))}")
        lo, hi = -(1 << (cfg.acc_bits - 1)), (1 << (cfg.acc_bits - 1)) - 1
        if thr.size and (int(thr.min()) < lo or int(thr.max()) > hi):
            bad = int(np.argmax((thr < lo) | (thr > hi)))
            fail(f"field 'threshold' of filter {bad} = {int(thr[bad])} exceeds the comparator "
                 f"range [{lo}, {hi}] (acc_bits = {cfg.acc_bits})")
        # padding lanes of the last tile never pass in mode gated: no LSB work for them
        self.threshold = np.full(t * k, hi, dtype=np.int64)
        self.threshold[:o] = thr
        self.neg = np.zeros(t * k, dtype=np.int64)
        self.neg[:o] = sgn < 0

        act_code = ACTIVATIONS[layer.activation]
        self.desc = {k_: v for k_, v in self.conv.desc.items() if k_ != "residual"}
        self.desc.update({"act": act_code, "lsb_bits": layer.lsb_bits,
                          "mode": MODE_CODES[layer.mode]})

    # -- memory images -------------------------------------------------------------------
    def images(self) -> dict[str, np.ndarray]:
        """Memory name -> ``[words, leaves]`` int64 (``act``, ``wgt``, ``align``, ``bias``,
        ``quant`` as :meth:`ConvProgram.images`, plus ``gate``)."""
        imgs = self.conv.images()
        k = self.cfg.lanes
        gate = np.stack([self.threshold, self.neg], axis=1).reshape(-1, 2 * k)
        imgs["gate"] = gate
        return imgs

    @property
    def tiles(self) -> int:
        return self.conv.tiles

    @property
    def out_words(self) -> int:
        return self.conv.out_words

    def unpack_output(self, words: np.ndarray) -> np.ndarray:
        """``[out_words, K]`` output words -> ``[O, Ho, Wo]``."""
        return self.conv.unpack_output(words)

    def unpack_passed(self, words: np.ndarray) -> np.ndarray:
        """``[out_words, K]`` gate outcome words -> ``[O, Ho, Wo]`` bool."""
        return self.conv.unpack_output(words).astype(bool)

    def passed_counts(self, passed: np.ndarray) -> list[int]:
        """Passing outputs of each output tile (``passed``: ``[O, Ho, Wo]``), the items the
        engine queues in mode ``gated``."""
        k = self.cfg.lanes
        p = np.asarray(passed, dtype=bool)
        return [int(p[t * k:(t + 1) * k].sum()) for t in range(self.tiles)]

    def cycles(self, passed: np.ndarray | None = None) -> int:
        """:func:`dynacc.hw.cycles.dual_conv_cycles` of this layer for gate outcomes
        ``passed`` (default: the golden ones)."""
        if passed is None:
            passed = self.layer.golden(self.cfg.fmt)[1]
        return dual_conv_cycles(self.cfg, **self.layer.shape_kwargs(), mode=self.layer.mode,
                                passed_counts=self.passed_counts(passed))
