"""One conv layer as the engine runs it: integer inputs (the same ones the golden model
takes), the checks that make the RTL exact for it, the memory images and the descriptor.

:class:`ConvLayer` holds golden-domain integers (mantissas and LSB exponents).
:meth:`ConvLayer.program` derives the hardware constants (rules A1/A2 alignment shifts,
R3 requantization shifts, B1 bias) and proves the layer fits the engine; it raises
``ValueError`` naming the layer and the violated limit. :meth:`ConvLayer.golden` is the
expected output from :mod:`dynacc.quant.golden`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from dynacc.quant import golden
from dynacc.quant.formats import BFPFormat

from .config import HwConfig

__all__ = ["ConvLayer", "ConvProgram", "ACTIVATIONS"]

#: activation name -> ActMode value (see hw/types.py)
ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2, "pact": 2}


def _i64(a: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.int64)


def _per_channel(v: Any, n: int) -> torch.Tensor:
    t = _i64(v).reshape(-1)
    return t.expand(n).clone() if t.numel() == 1 else t


@dataclasses.dataclass(frozen=True, eq=False)
class ConvLayer:
    """A conv layer in golden-model terms, batch 1.

    ``x``: ``[C, H, W]`` mantissas at LSB ``x_lsb`` (one exponent per tensor);
    ``w``: ``[O, C, kh, kw]`` mantissas with per-(filter, channel) LSBs ``w_lsb [O, C]``;
    ``bias``: ``[O]`` on the accumulator LSB (or None); ``out_lsb``: scalar or ``[O]``.
    With ``residual`` (``[O, Ho, Wo]`` at ``residual_lsb``) the layer is the fused
    ``golden.add(conv_acc, acc_lsb, residual, residual_lsb, joint_lsb, out_lsb)``.
    """

    name: str
    x: Any
    x_lsb: int
    w: Any
    w_lsb: Any
    bias: Any | None
    out_lsb: Any
    stride: int = 1
    padding: int = 0
    activation: str | None = None
    clamp_max: int | None = None
    residual: Any | None = None
    residual_lsb: Any = 0
    joint_lsb: Any | None = None

    # -- shapes --------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return int(np.shape(self.x)[0])

    @property
    def out_channels(self) -> int:
        return int(np.shape(self.w)[0])

    @property
    def kernel(self) -> tuple[int, int]:
        s = np.shape(self.w)
        return int(s[2]), int(s[3])

    @property
    def in_size(self) -> tuple[int, int]:
        s = np.shape(self.x)
        return int(s[1]), int(s[2])

    @property
    def out_size(self) -> tuple[int, int]:
        (h, w), (kh, kw) = self.in_size, self.kernel
        return ((h + 2 * self.padding - kh) // self.stride + 1,
                (w + 2 * self.padding - kw) // self.stride + 1)

    @property
    def macs(self) -> int:
        ho, wo = self.out_size
        kh, kw = self.kernel
        return ho * wo * self.out_channels * self.in_channels * kh * kw

    def shape_kwargs(self) -> dict[str, int]:
        """Keyword arguments of :func:`dynacc.hw.cycles.conv_cycles`."""
        ho, wo = self.out_size
        kh, kw = self.kernel
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    out_height=ho, out_width=wo, kernel_h=kh, kernel_w=kw)

    # -- golden --------------------------------------------------------------------------
    def golden(self, fmt: BFPFormat) -> np.ndarray:
        """Expected output ``[O, Ho, Wo]`` from :mod:`dynacc.quant.golden`."""
        x = _i64(self.x)[None]
        w = _i64(self.w)
        w_lsb = _i64(self.w_lsb)
        bias = None if self.bias is None else _i64(self.bias)
        if self.residual is None:
            y = golden.conv2d(x, self.x_lsb, w, w_lsb, bias, _i64(self.out_lsb), fmt,
                              self.stride, self.padding, activation=self.activation,
                              clamp_max=self.clamp_max)
        else:
            acc, acc_lsb = golden.conv2d_acc(x, self.x_lsb, w, w_lsb, bias, self.stride,
                                             self.padding)
            y = golden.add(acc, acc_lsb, _i64(self.residual)[None], _i64(self.residual_lsb),
                           _i64(self.joint_lsb), _i64(self.out_lsb), fmt,
                           activation=self.activation, clamp_max=self.clamp_max)
        return y[0].numpy()

    # -- hardware ------------------------------------------------------------------------
    def program(self, cfg: HwConfig) -> "ConvProgram":
        """Hardware constants and memory images; raises ``ValueError`` if the layer does
        not fit ``cfg`` or the engine could not be exact for it."""
        return ConvProgram(self, cfg)


class ConvProgram:
    """A :class:`ConvLayer` mapped onto a :class:`HwConfig` (checked on construction)."""

    def __init__(self, layer: ConvLayer, cfg: HwConfig):
        self.layer = layer
        self.cfg = cfg
        k = cfg.lanes
        fmt = cfg.fmt
        name = layer.name

        def fail(msg: str) -> None:
            raise ValueError(f"layer {name!r}: {msg}")

        x, w = np.asarray(layer.x), np.asarray(layer.w)
        if x.ndim != 3 or w.ndim != 4 or w.shape[1] != x.shape[0]:
            fail(f"x must be [C, H, W] and w [O, C, kh, kw], got {x.shape} and {w.shape}")
        c, h, wd = x.shape
        o, _, kh, kw = w.shape
        if min(c, h, wd, o, kh, kw) < 1:
            fail(f"empty tensor: x {x.shape}, w {w.shape}")
        ho, wo = layer.out_size
        self.cw = -(-c // k)
        self.tiles = -(-o // k)
        limits = [
            ("in_channels", c, cfg.max_in_channels), ("out_channels", o, cfg.max_out_channels),
            ("height", h, cfg.max_dim), ("width", wd, cfg.max_dim),
            ("out_height", ho, cfg.max_dim), ("out_width", wo, cfg.max_dim),
            ("kernel_h", kh, cfg.max_kernel), ("kernel_w", kw, cfg.max_kernel),
            ("stride", layer.stride, cfg.max_stride), ("padding", layer.padding, cfg.max_kernel),
            ("activation words", h * wd * self.cw, cfg.act_depth),
            ("output words", ho * wo * self.tiles, cfg.out_depth),
            ("weight words", self.tiles * kh * kw * self.cw, cfg.wgt_depth),
        ]
        for what, v, lim in limits:
            if v > lim:
                fail(f"{what} = {v} exceeds the hardware limit {lim} of config {cfg.name!r}")
        if layer.stride < 1 or layer.padding < 0 or ho < 1 or wo < 1:
            fail(f"invalid geometry: stride {layer.stride}, padding {layer.padding}, "
                 f"output {ho}x{wo}")
        for what, arr in (("x", x), ("w", w)) + ((("residual", np.asarray(layer.residual)),)
                                               if layer.residual is not None else ()):
            if arr.size and np.abs(arr).max() > fmt.max_mantissa:
                fail(f"|{what}| exceeds the mantissa range ±{fmt.max_mantissa}")
        if layer.residual is not None and np.shape(layer.residual) != (o, ho, wo):
            fail(f"residual must be [O, Ho, Wo] = {(o, ho, wo)}, got {np.shape(layer.residual)}")
        if layer.activation not in ACTIVATIONS:
            fail(f"unknown activation {layer.activation!r}")
        clamp = 0
        if layer.activation in ("relu6", "pact"):
            if layer.clamp_max is None or not 0 <= layer.clamp_max <= fmt.max_mantissa:
                fail(f"{layer.activation} needs clamp_max in [0, {fmt.max_mantissa}], got {layer.clamp_max!r}")
            clamp = int(layer.clamp_max)

        # rules A1/A2: accumulator LSB and alignment shifts
        w_lsb = _i64(layer.w_lsb)
        acc_lsb, d = golden.conv_alignment(layer.x_lsb, w_lsb)
        if int(d.max()) > cfg.align_span or int(d.min()) < 0:
            fail(f"alignment shift {int(d.max())} exceeds align_span {cfg.align_span}")
        d_pad = torch.zeros((o, self.cw * k), dtype=torch.int64)
        d_pad[:, :c] = d
        real = torch.zeros((o, self.cw * k), dtype=torch.bool)
        real[:, :c] = True
        # K channels of one word share the word's shift (the generator's weight blocks
        # are multiples of K); padded channels have zero weights, any shift is fine for them
        d_words = d_pad.reshape(o, self.cw, k)
        first = d_words[:, :, 0:1]
        if bool(((d_words != first) & real.reshape(o, self.cw, k)).any()):
            bad = ((d_words != first) & real.reshape(o, self.cw, k)).nonzero()[0].tolist()
            fail(f"filter {bad[0]}, input word {bad[1]}: the {k} channels of one word have "
                 f"different alignment shifts (weight blocks must be multiples of {k} channels)")
        self.acc_lsb = acc_lsb
        self.align = d_words[:, :, 0]                                      # [O, CW]

        # rule A4: the accumulator never wraps, for any input within the mantissa range
        bias = torch.zeros(o, dtype=torch.int64) if layer.bias is None else _i64(layer.bias)
        bound = int(golden.accumulator_bound(_i64(w), d, bias, fmt.max_mantissa).max())
        if bound > (1 << (cfg.acc_bits - 1)) - 1:
            fail(f"worst-case accumulator {bound} needs more than acc_bits = {cfg.acc_bits}")
        self.bias = bias

        # rule R3 shifts
        out_l = _per_channel(layer.out_lsb, o)
        if layer.residual is None:
            s_acc = out_l - acc_lsb
            s_res = torch.zeros(o, dtype=torch.int64)
            s_out = torch.zeros(o, dtype=torch.int64)
        else:
            if layer.joint_lsb is None:
                fail("a fused residual add needs joint_lsb")
            joint = _per_channel(layer.joint_lsb, o)
            s_acc = joint - acc_lsb
            s_res = joint - _per_channel(layer.residual_lsb, o)
            s_out = out_l - joint
        for what, s in (("requantization shift", s_acc), ("residual shift", s_res),
                        ("output shift", s_out)):
            if int(s.min()) < cfg.shift_min or int(s.max()) > cfg.shift_max:
                fail(f"{what} range [{int(s.min())}, {int(s.max())}] exceeds "
                     f"[{cfg.shift_min}, {cfg.shift_max}] (shift_bits = {cfg.shift_bits})")
        self.shifts = torch.stack([s_acc, s_res, s_out], dim=1)           # [O, 3]
        self.desc = {
            "height": h, "width": wd, "out_height": ho, "out_width": wo,
            "in_words": self.cw, "out_tiles": self.tiles, "kernel_h": kh, "kernel_w": kw,
            "stride": layer.stride, "pad": layer.padding, "act": ACTIVATIONS[layer.activation],
            "clamp_max": clamp, "residual": int(layer.residual is not None),
        }

    # -- memory images: [words, leaves] in the leaf order of hw/types.py layouts -------------
    def images(self) -> dict[str, np.ndarray]:
        """Memory name -> ``[words, leaves]`` int64 (see :data:`~dynacc.hw.conv_engine.MEMORIES`)."""
        k, cw, t = self.cfg.lanes, self.cw, self.tiles
        x = np.asarray(self.layer.x, dtype=np.int64)
        w = np.asarray(self.layer.w, dtype=np.int64)
        c, h, wd = x.shape
        o, _, kh, kw = w.shape
        xp = np.zeros((cw * k, h, wd), dtype=np.int64)
        xp[:c] = x
        act = xp.reshape(cw, k, h, wd).transpose(2, 3, 0, 1).reshape(h * wd * cw, k)
        wp = np.zeros((t * k, cw * k, kh, kw), dtype=np.int64)
        wp[:o, :c] = w
        wgt = wp.reshape(t, k, cw, k, kh, kw).transpose(0, 4, 5, 2, 1, 3).reshape(-1, k * k)
        al = np.zeros((t * k, cw), dtype=np.int64)
        al[:o] = self.align.numpy()
        align = al.reshape(t, k, cw).transpose(0, 2, 1).reshape(t * cw, k)
        b = np.zeros(t * k, dtype=np.int64)
        b[:o] = self.bias.numpy()
        q = np.zeros((t * k, 3), dtype=np.int64)
        q[:o] = self.shifts.numpy()
        imgs = {"act": act, "wgt": wgt, "align": align, "bias": b.reshape(t, k),
                "quant": q.reshape(t, k * 3)}
        if self.layer.residual is not None:
            r = np.asarray(self.layer.residual, dtype=np.int64)
            ho, wo = r.shape[1:]
            rp = np.zeros((t * k, ho, wo), dtype=np.int64)
            rp[:o] = r
            imgs["res"] = rp.reshape(t, k, ho, wo).transpose(2, 3, 0, 1).reshape(-1, k)
        return imgs

    @property
    def out_words(self) -> int:
        ho, wo = self.layer.out_size
        return ho * wo * self.tiles

    def unpack_output(self, words: np.ndarray) -> np.ndarray:
        """``[out_words, K]`` output words -> ``[O, Ho, Wo]``."""
        ho, wo = self.layer.out_size
        k, t = self.cfg.lanes, self.tiles
        y = np.asarray(words)[: self.out_words].reshape(ho, wo, t * k).transpose(2, 0, 1)
        return y[: self.layer.out_channels]
