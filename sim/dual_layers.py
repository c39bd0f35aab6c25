"""Random dual-precision layers for the co-simulation tests and benches: unsigned b-bit
inputs, BFP weights, and per-filter thresholds placed on the MSB partial sums so that a chosen
fraction of the outputs passes the gate (with exact ties that must not pass)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dynacc.hw.dual_program import DualLayer
from dynacc.quant import golden
from dynacc.quant.formats import BFPFormat

__all__ = ["gate_values", "random_dual_layer", "fit_dual_out_lsb"]


def gate_values(layer: DualLayer) -> np.ndarray:
    """``sign[o] * (acc_hb << L)`` of every output ``[O, Ho, Wo]`` (what the gate compares)."""
    x = torch.as_tensor(np.asarray(layer.x), dtype=torch.int64)[None]
    hb, _ = golden.split_msb_lsb(x, layer.act_bits, layer.msb_bits)
    acc, _ = golden.conv2d_acc(hb, layer.x_lsb, torch.as_tensor(np.asarray(layer.w)).long(),
                               torch.as_tensor(np.asarray(layer.w_lsb)).long(), None,
                               layer.stride, layer.padding)
    o = layer.out_channels
    sign = np.ones(o, dtype=np.int64) if layer.sign is None else \
        np.broadcast_to(np.asarray(layer.sign, dtype=np.int64).reshape(-1), (o,))
    return (acc[0].numpy() << layer.lsb_bits) * sign[:, None, None]


def fit_dual_out_lsb(layer: DualLayer, fmt: BFPFormat, margin: int = 0) -> np.ndarray:
    """Per-filter output LSB that maps the largest |accumulator| of the layer (in its own mode)
    just inside the mantissa range (``margin`` < 0: saturation)."""
    acc, _passed, acc_lsb = golden.dual_precision_conv2d(
        torch.as_tensor(np.asarray(layer.x)).long()[None], layer.x_lsb,
        torch.as_tensor(np.asarray(layer.w)).long(), torch.as_tensor(np.asarray(layer.w_lsb)).long(),
        None if layer.bias is None else torch.as_tensor(np.asarray(layer.bias)).long(),
        act_bits=layer.act_bits, msb_bits=layer.msb_bits,
        threshold=None if layer.threshold is None else torch.as_tensor(np.asarray(layer.threshold)),
        sign=None if layer.sign is None else torch.as_tensor(np.asarray(layer.sign)),
        mode=layer.mode, stride=layer.stride, padding=layer.padding)
    amax = acc.abs().amax(dim=(0, 2, 3))
    bits = torch.tensor([max(int(v).bit_length(), 1) for v in amax])
    return (acc_lsb + bits - (fmt.mantissa_bits - 1) + margin).numpy()


def random_dual_layer(name: str, fmt: BFPFormat, *, c: int, o: int, h: int, w: int, k: int,
                      stride: int = 1, padding: int = 0, act_bits: int = 8, msb_bits: int = 4,
                      mode: str = "gated", pass_fraction: float = 0.3, block: int = 4,
                      align_spread: int = 3, activation: str | None = "relu",
                      clamp_max: int | None = None, margin: int = 0, ties: bool = True,
                      seed: int = 0) -> DualLayer:
    """Uniform unsigned ``act_bits``-bit inputs, uniform weight mantissas with per-(filter,
    ``block`` channels) exponents, a random bias, random gate signs, and per-filter thresholds
    at the ``1 - pass_fraction`` quantile of the gate values. With ``ties`` the threshold is
    one of the gate values itself, so the outputs equal to it (which must not pass, rule G3)
    occur; output LSBs are fitted to the accumulators."""
    rng = np.random.default_rng(seed)
    m = fmt.max_mantissa
    x = rng.integers(0, 1 << act_bits, (c, h, w))
    wt = rng.integers(-m, m + 1, (o, c, k, k))
    nb = -(-c // block)
    w_lsb = np.repeat(rng.integers(-align_spread, 1, (o, nb)) - 5, block, axis=1)[:, :c]
    typical = m * (1 << act_bits) // 2 * int(np.sqrt(c * k * k))
    bias = rng.integers(-typical, typical + 1, o)
    sign = rng.choice([-1, 1], o)
    base = DualLayer(name, x, -4, wt, w_lsb, bias, 0, act_bits, msb_bits, None, sign, mode,
                     stride, padding, activation, clamp_max)
    thr = None
    if mode == "gated":
        g = gate_values(base).reshape(o, -1)
        q = np.quantile(g, 1.0 - pass_fraction, axis=1, method="lower" if ties else "linear")
        thr = np.floor(q).astype(np.int64) if ties else np.floor(q).astype(np.int64) - 1
    layer = dataclasses.replace(base, threshold=thr)
    return dataclasses.replace(layer, out_lsb=fit_dual_out_lsb(layer, fmt, margin))
