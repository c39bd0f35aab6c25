"""One dual-precision conv layer (Precision Gating / DFS precisions, rules G0-G4; Channel
Gating, rules CG1-CG3; FBS, rules FBS2-FBS3) as the
:class:`~dynacc.hw.dual_engine.DualEngine` runs it: golden-domain integers, the checks that
make the RTL exact for it, the memory images and the descriptor.

The weight, alignment, bias and requantization images are those of the plain conv
(:class:`~dynacc.hw.program.ConvProgram`, which also proves rule A4 with ``|x| <=
max_mantissa``, a bound of every unsigned ``act_bits``-bit input); this module adds the gate
image (thresholds and signs), the scale image (mode ``fbs``), the dual-precision checks and
the expected gate outcomes.
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
from .cycles import cg_base_words, dual_conv_cycles
from .program import ACTIVATIONS, ConvLayer, ConvProgram

__all__ = ["DualLayer", "DualProgram", "DUAL_ACTIVATIONS", "MODE_CODES"]

#: activations a dual-precision layer may end with ("pact" runs on the relu6 clamp)
DUAL_ACTIVATIONS = (None, "relu", "pact")
#: mode name -> DualMode value (see hw/dual_sequencer.py)
MODE_CODES = {"gated": 0, "msb": 1, "full": 2, "cg": 3, "fbs": 4}
#: modes whose digits are the whole activation (L = 0; ``msb_bits`` unused)
WHOLE_X_MODES = ("cg", "fbs")


def _i64(a: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.int64)


def _per_filter(v: Any, n: int) -> np.ndarray:
    a = np.asarray(v, dtype=np.int64).reshape(-1)
    return np.broadcast_to(a, (n,)).copy() if a.size == 1 else a


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


@dataclasses.dataclass(frozen=True, eq=False)
class DualLayer:
    """A dual-precision conv layer in golden-model terms, batch 1.

    ``x``: ``[C, H, W]`` unsigned ``act_bits``-bit activations at LSB ``x_lsb`` (rule G0);
    ``w``: ``[O, C, kh, kw]`` mantissas with LSBs ``w_lsb [O, C]``; ``bias``: ``[O]`` on the
    accumulator LSB (or None); ``threshold``: ``[O]`` (or a scalar) in accumulator units and
    ``sign``: ``[O]`` of +1/-1 (default +1), used in modes ``gated`` and ``cg``; ``mode``:
    ``gated``, ``msb`` or ``full`` (rules G1-G4, ``msb_bits`` the MSB digit), ``cg``
    (Channel Gating with ``partitions`` p, rules CG1-CG3) or ``fbs`` (one host-compacted FBS
    layer, rule FBS3: ``scale [O]`` unsigned on LSB ``scale_lsb``, ``bias`` on the scaled LSB
    ``acc_lsb + scale_lsb``); ``out_lsb``: scalar or ``[O]``; ``activation``: None, ``relu``
    or ``pact`` (``min(max(m, 0), clamp_max)``). Modes ``cg`` and ``fbs`` use the whole
    activation in every phase: ``msb_bits`` is None (or ``act_bits``).

    Build a CG layer with ``DualLayer(name, x, x_lsb, w, w_lsb, bias, out_lsb, act_bits,
    threshold=T, sign=s, mode="cg", partitions=p, ...)``, an FBS layer with
    :func:`dynacc.hw.fbs_layer.compact_fbs_layer` (or directly with ``mode="fbs",
    scale=g, scale_lsb=l`` on already compacted tensors).
    """

    name: str
    x: Any
    x_lsb: int
    w: Any
    w_lsb: Any
    bias: Any | None
    out_lsb: Any
    act_bits: int
    msb_bits: int | None = None
    threshold: Any | None = None
    sign: Any | None = None
    mode: str = "gated"
    stride: int = 1
    padding: int = 0
    activation: str | None = None
    clamp_max: int | None = None
    partitions: int | None = None
    scale: Any | None = None
    scale_lsb: int = 0

    def conv_layer(self) -> ConvLayer:
        """The plain conv with the same tensors (the ``full`` mode result; in mode ``fbs``
        the conv before its scale, with the bias taken on the accumulator LSB)."""
        return ConvLayer(self.name, self.x, self.x_lsb, self.w, self.w_lsb, self.bias,
                         self.out_lsb, self.stride, self.padding, self.activation,
                         self.clamp_max)

    @property
    def lsb_bits(self) -> int:
        """L = act_bits - msb_bits (rule G1); 0 in modes ``cg`` and ``fbs``."""
        if self.mode in WHOLE_X_MODES:
            return 0
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
        """Expected ``(out [O, Ho, Wo], passed [O, Ho, Wo] bool)``: from
        :func:`dynacc.quant.golden.dual_precision_conv2d` (modes ``gated`` / ``msb`` /
        ``full``), :func:`~dynacc.quant.golden.channel_gated_conv2d` (``cg``) or
        :func:`~dynacc.quant.golden.fbs_conv2d` (``fbs``, every output active, requantized
        with ``out_lsb - acc_lsb - scale_lsb``; nothing passes a gate), requantized (R3) and
        activated (R4)."""
        o = self.out_channels
        x, w, w_lsb = _i64(self.x)[None], _i64(self.w), _i64(self.w_lsb)
        bias = None if self.bias is None else _i64(self.bias)
        thr = None if self.threshold is None else _i64(self.threshold)
        sign = None if self.sign is None else _i64(self.sign)
        shift_extra = 0
        if self.mode == "cg":
            acc, passed, acc_lsb = golden.channel_gated_conv2d(
                x, self.x_lsb, w, w_lsb, bias, partitions=self.partitions, threshold=thr,
                sign=sign, mode="gated", stride=self.stride, padding=self.padding)
        elif self.mode == "fbs":
            acc, acc_lsb = golden.fbs_conv2d(
                x, self.x_lsb, w, w_lsb, bias, active=torch.ones(1, o, dtype=torch.bool),
                scale=_i64(_per_filter(self.scale, o))[None], stride=self.stride,
                padding=self.padding)
            passed = torch.zeros_like(acc, dtype=torch.bool)
            shift_extra = int(self.scale_lsb)
        else:
            acc, passed, acc_lsb = golden.dual_precision_conv2d(
                x, self.x_lsb, w, w_lsb, bias, act_bits=self.act_bits, msb_bits=self.msb_bits,
                threshold=thr, sign=sign, mode=self.mode, stride=self.stride,
                padding=self.padding)
        out_l = torch.as_tensor(_per_filter(self.out_lsb, o))
        y = requantize(acc, (out_l - acc_lsb - shift_extra)[None, :, None, None], fmt)
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
        name = layer.name

        def fail(msg: str) -> None:
            raise ValueError(f"layer {name!r}: {msg}")

        m = cfg.mantissa_bits
        b, mb = layer.act_bits, layer.msb_bits
        mode = layer.mode
        if mode not in MODE_CODES:
            fail(f"field 'mode' = {mode!r} must be one of {tuple(MODE_CODES)}")
        if not _is_int(b) or not 2 <= b <= m - 1:
            fail(f"field 'act_bits' = {b!r} must be an integer in [2, {m - 1}] (unsigned inputs "
                 f"in the {m}-bit activation word of config {cfg.name!r})")
        if mode in WHOLE_X_MODES:
            if mb is not None and mb != b:
                fail(f"field 'msb_bits' = {mb!r} must be None (or act_bits = {b}) in mode "
                     f"{mode!r}: every phase uses the whole activation")
        elif not _is_int(mb) or not 1 <= mb < b:
            fail(f"field 'msb_bits' = {mb!r} must be an integer in [1, act_bits - 1 = {b - 1}]")
        if layer.activation not in DUAL_ACTIVATIONS:
            fail(f"field 'activation' = {layer.activation!r} must be one of {DUAL_ACTIVATIONS}")
        if mode != "cg" and layer.partitions is not None:
            fail(f"field 'partitions' = {layer.partitions!r} is only used in mode 'cg', not "
                 f"{mode!r}")
        if mode != "fbs" and layer.scale is not None:
            fail(f"field 'scale' is only used in mode 'fbs', not {mode!r}")
        x = np.asarray(layer.x)
        if x.ndim != 3:
            fail(f"field 'x' must be [C, H, W], got shape {x.shape}")
        if x.size and (int(x.min()) < 0 or int(x.max()) > (1 << b) - 1):
            fail(f"field 'x' must hold unsigned {b}-bit values in [0, {(1 << b) - 1}] "
                 f"(rule G0), got [{int(x.min())}, {int(x.max())}]")
        # geometry, weights, alignment, bias, accumulator bound (A4) and requantization shifts;
        # mode fbs: the accumulator before its scale (no bias), shifts onto the scaled LSB
        if mode == "fbs":
            out_l = np.asarray(layer.out_lsb, dtype=np.int64) - _scalar_int(
                layer.scale_lsb, "scale_lsb", fail)
            conv = dataclasses.replace(layer.conv_layer(), bias=None, out_lsb=out_l)
        else:
            conv = layer.conv_layer()
        self.conv = ConvProgram(conv, cfg)
        o = layer.out_channels
        t = self.conv.tiles
        k = cfg.lanes
        self.scale = np.ones(t * k, dtype=np.int64)
        if mode == "fbs":
            scale, bias = self._fbs_scale_bias(layer, cfg, o, fail)
            self._check_scaled_bound(scale, bias, cfg, fail)
            self.scale[:] = 0
            self.scale[:o] = scale
            self.fbs_bias = bias

        base_words = chunk_tiles = 0
        if mode == "cg":
            c = int(x.shape[0])
            try:
                base_words = cg_base_words(cfg, in_channels=c, out_channels=o,
                                           partitions=layer.partitions)
            except ValueError as exc:
                fail(f"field 'partitions': {exc}")
            chunk_tiles = t // layer.partitions

        thr = np.zeros(o, dtype=np.int64)
        sgn = np.ones(o, dtype=np.int64)
        if mode in ("gated", "cg"):
            if layer.threshold is None:
                fail(f"field 'threshold' is needed in mode {mode!r}")
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
                          "mode": MODE_CODES[mode]})
        if mode == "cg":
            self.desc.update({"base_words": base_words, "chunk_tiles": chunk_tiles})

    @staticmethod
    def _fbs_scale_bias(layer: DualLayer, cfg: HwConfig, o: int, fail):
        """Mode ``fbs``: the scale ``[O]`` (unsigned ``scale_bits``) and the bias ``[O]``
        (on the scaled LSB, held by the ``acc_bits`` bias memory)."""
        if layer.scale is None:
            fail("field 'scale' is needed in mode 'fbs' (rule FBS3)")
        sc = _per_filter(layer.scale, o)
        if sc.shape != (o,):
            fail(f"field 'scale' must be a scalar or [{o}], got {np.shape(layer.scale)}")
        top = (1 << cfg.scale_bits) - 1
        if sc.size and (int(sc.min()) < 0 or int(sc.max()) > top):
            bad = int(np.argmax((sc < 0) | (sc > top)))
            fail(f"field 'scale' of filter {bad} = {int(sc[bad])} must be an unsigned "
                 f"{cfg.scale_bits}-bit integer in [0, {top}] (scale_bits of config "
                 f"{cfg.name!r})")
        bias = np.zeros(o, dtype=np.int64) if layer.bias is None else _per_filter(layer.bias, o)
        if bias.shape != (o,):
            fail(f"field 'bias' must be [{o}], got {np.shape(layer.bias)}")
        lim = (1 << (cfg.acc_bits - 1)) - 1
        if bias.size and int(np.abs(bias).max()) > lim:
            bad = int(np.argmax(np.abs(bias)))
            fail(f"field 'bias' of filter {bad} = {int(bias[bad])} exceeds the {cfg.acc_bits}-bit "
                 f"bias word (acc_bits = {cfg.acc_bits})")
        return sc, bias

    def _check_scaled_bound(self, scale: np.ndarray, bias: np.ndarray, cfg: HwConfig,
                            fail) -> None:
        """Rule A4 for ``acc*scale + bias`` (mode ``fbs``): the worst-case accumulator of each
        filter times its scale plus ``|bias|`` fits ``acc_bits + scale_bits``."""
        layer = self.layer
        _acc_lsb, d = golden.conv_alignment(layer.x_lsb, _i64(layer.w_lsb))
        acc = golden.accumulator_bound(_i64(layer.w), d, torch.zeros(len(scale), dtype=torch.int64),
                                       cfg.fmt.max_mantissa)
        width = cfg.acc_bits + cfg.scale_bits
        for f in range(len(scale)):
            v = int(acc[f]) * int(scale[f]) + abs(int(bias[f]))
            if v > (1 << (width - 1)) - 1:
                fail(f"filter {f}: worst-case scaled accumulator |acc*scale + bias| = {v} needs "
                     f"more than acc_bits + scale_bits = {width} bits")

    # -- memory images -------------------------------------------------------------------
    def images(self) -> dict[str, np.ndarray]:
        """Memory name -> ``[words, leaves]`` int64 (``act``, ``wgt``, ``align``, ``bias``,
        ``quant`` as :meth:`ConvProgram.images`, plus ``gate`` and ``scale``). Mode ``fbs``:
        ``bias`` holds the bias on the scaled LSB and ``scale`` the scales (the other modes
        ignore ``scale``; it holds 1)."""
        imgs = self.conv.images()
        k = self.cfg.lanes
        t = self.conv.tiles
        gate = np.stack([self.threshold, self.neg], axis=1).reshape(-1, 2 * k)
        imgs["gate"] = gate
        imgs["scale"] = self.scale.reshape(t, k)
        if self.layer.mode == "fbs":
            b = np.zeros(t * k, dtype=np.int64)
            b[: len(self.fbs_bias)] = self.fbs_bias
            imgs["bias"] = b.reshape(t, k)
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
        engine queues in modes ``gated`` and ``cg``."""
        k = self.cfg.lanes
        p = np.asarray(passed, dtype=bool)
        return [int(p[t * k:(t + 1) * k].sum()) for t in range(self.tiles)]

    def cycles(self, passed: np.ndarray | None = None) -> int:
        """:func:`dynacc.hw.cycles.dual_conv_cycles` of this layer for gate outcomes
        ``passed`` (default: the golden ones)."""
        if passed is None:
            passed = self.layer.golden(self.cfg.fmt)[1]
        return dual_conv_cycles(self.cfg, **self.layer.shape_kwargs(), mode=self.layer.mode,
                                passed_counts=self.passed_counts(passed),
                                partitions=self.layer.partitions)


def _scalar_int(v: Any, field: str, fail) -> int:
    if not _is_int(v):
        fail(f"field {field!r} = {v!r} must be an integer")
    return int(v)
