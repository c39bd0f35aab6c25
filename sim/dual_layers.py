"""Random dual-precision layers for the co-simulation tests and benches: unsigned b-bit
inputs, BFP weights, and per-filter thresholds placed on the MSB (PG) or base (Channel
Gating) partial sums so that a chosen fraction of the outputs passes the gate (with exact
ties that must not pass); random FBS layers (dense tensors, active channel sets, scales) and
their compaction."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dynacc.hw.dual_program import DualLayer
from dynacc.quant import golden
from dynacc.quant.formats import BFPFormat

__all__ = ["gate_values", "random_dual_layer", "fit_dual_out_lsb", "random_cg_layer",
           "FbsDense", "random_fbs_dense", "random_fbs_layer"]


def _t(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(torch.int64)
    return torch.as_tensor(np.array(a, dtype=np.int64))


def gate_values(layer: DualLayer) -> np.ndarray:
    """What the gate compares, for every output ``[O, Ho, Wo]``: ``sign[o] * (acc_hb << L)``
    (PG), ``sign[o] * acc_base`` (mode ``cg``, rule CG2)."""
    x = _t(layer.x)[None]
    w = _t(layer.w)
    o = layer.out_channels
    if layer.mode == "cg":
        mask = golden.cg_base_mask(o, w.shape[1], layer.partitions).reshape(o, -1, 1, 1)
        acc, _ = golden.conv2d_acc(x, layer.x_lsb, w * mask, _t(layer.w_lsb), None,
                                   layer.stride, layer.padding)
        shift = 0
    else:
        hb, _ = golden.split_msb_lsb(x, layer.act_bits, layer.msb_bits)
        acc, _ = golden.conv2d_acc(hb, layer.x_lsb, w, _t(layer.w_lsb), None, layer.stride,
                                   layer.padding)
        shift = layer.lsb_bits
    sign = np.ones(o, dtype=np.int64) if layer.sign is None else \
        np.broadcast_to(np.asarray(layer.sign, dtype=np.int64).reshape(-1), (o,))
    return (acc[0].numpy() << shift) * sign[:, None, None]


def _layer_acc(layer: DualLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The accumulator the layer requantizes ``[1, O, Ho, Wo]`` and its LSB ``[O]`` (mode
    ``fbs``: ``acc*scale + bias`` on ``acc_lsb + scale_lsb``)."""
    x, w, wl = _t(layer.x)[None], _t(layer.w), _t(layer.w_lsb)
    bias = None if layer.bias is None else _t(layer.bias)
    thr = None if layer.threshold is None else _t(layer.threshold)
    sign = None if layer.sign is None else _t(layer.sign)
    if layer.mode == "cg":
        acc, _p, acc_lsb = golden.channel_gated_conv2d(
            x, layer.x_lsb, w, wl, bias, partitions=layer.partitions, threshold=thr, sign=sign,
            stride=layer.stride, padding=layer.padding)
        return acc, acc_lsb
    if layer.mode == "fbs":
        o = layer.out_channels
        acc, acc_lsb = golden.fbs_conv2d(
            x, layer.x_lsb, w, wl, bias, active=torch.ones(1, o, dtype=torch.bool),
            scale=_t(np.broadcast_to(np.asarray(layer.scale).reshape(-1), (o,)))[None],
            stride=layer.stride, padding=layer.padding)
        return acc, acc_lsb + int(layer.scale_lsb)
    acc, _p, acc_lsb = golden.dual_precision_conv2d(
        x, layer.x_lsb, w, wl, bias, act_bits=layer.act_bits, msb_bits=layer.msb_bits,
        threshold=thr, sign=sign, mode=layer.mode, stride=layer.stride, padding=layer.padding)
    return acc, acc_lsb


def fit_dual_out_lsb(layer: DualLayer, fmt: BFPFormat, margin: int = 0) -> np.ndarray:
    """Per-filter output LSB that maps the largest |accumulator| of the layer (in its own mode)
    just inside the mantissa range (``margin`` < 0: saturation)."""
    acc, acc_lsb = _layer_acc(layer)
    amax = acc.abs().amax(dim=(0, 2, 3))
    bits = torch.tensor([max(int(v).bit_length(), 1) for v in amax])
    return (acc_lsb + bits - (fmt.mantissa_bits - 1) + margin).numpy()


def _thresholds(layer: DualLayer, pass_fraction: float, ties: bool) -> np.ndarray:
    """Per-filter thresholds at the ``1 - pass_fraction`` quantile of the gate values (with
    ``ties``: one of the values itself, so exact ties occur)."""
    g = gate_values(layer).reshape(layer.out_channels, -1)
    q = np.quantile(g, 1.0 - pass_fraction, axis=1, method="lower" if ties else "linear")
    return np.floor(q).astype(np.int64) if ties else np.floor(q).astype(np.int64) - 1


def _random_tensors(fmt: BFPFormat, *, c: int, o: int, h: int, w: int, k: int, act_bits: int,
                    block: int, align_spread: int, seed: int):
    """Uniform unsigned ``act_bits``-bit inputs ``[C, H, W]``, uniform weight mantissas
    ``[O, C, k, k]`` with per-(filter, ``block`` channels) LSBs, a random bias and random gate
    signs (the tensors of the random PG and CG layers)."""
    rng = np.random.default_rng(seed)
    m = fmt.max_mantissa
    x = rng.integers(0, 1 << act_bits, (c, h, w))
    wt = rng.integers(-m, m + 1, (o, c, k, k))
    nb = -(-c // block)
    w_lsb = np.repeat(rng.integers(-align_spread, 1, (o, nb)) - 5, block, axis=1)[:, :c]
    typical = m * (1 << act_bits) // 2 * int(np.sqrt(c * k * k))
    bias = rng.integers(-typical, typical + 1, o)
    sign = rng.choice([-1, 1], o)
    return x, wt, w_lsb, bias, sign


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
    x, wt, w_lsb, bias, sign = _random_tensors(fmt, c=c, o=o, h=h, w=w, k=k, act_bits=act_bits,
                                               block=block, align_spread=align_spread, seed=seed)
    base = DualLayer(name, x, -4, wt, w_lsb, bias, 0, act_bits, msb_bits, None, sign, mode,
                     stride, padding, activation, clamp_max)
    thr = _thresholds(base, pass_fraction, ties) if mode == "gated" else None
    layer = dataclasses.replace(base, threshold=thr)
    return dataclasses.replace(layer, out_lsb=fit_dual_out_lsb(layer, fmt, margin))


def random_cg_layer(name: str, fmt: BFPFormat, *, c: int, o: int, h: int, w: int, k: int,
                    partitions: int, stride: int = 1, padding: int = 0, act_bits: int = 8,
                    pass_fraction: float = 0.3, block: int = 4, align_spread: int = 3,
                    activation: str | None = "relu", clamp_max: int | None = None,
                    margin: int = 0, ties: bool = True, seed: int = 0) -> DualLayer:
    """A Channel Gating layer (mode ``cg``, ``partitions`` p): uniform unsigned inputs,
    uniform weight mantissas with per-(filter, ``block`` channels) exponents, a random bias
    and gate signs, per-filter thresholds at the ``1 - pass_fraction`` quantile of the gate
    values ``sign*acc_base`` (with ``ties``: exact ties, which must not pass, rule CG2);
    output LSBs fitted to the accumulators."""
    x, wt, w_lsb, bias, sign = _random_tensors(fmt, c=c, o=o, h=h, w=w, k=k, act_bits=act_bits,
                                               block=block, align_spread=align_spread, seed=seed)
    base = DualLayer(name, x, -4, wt, w_lsb, bias, 0, act_bits, None, None, sign, "cg", stride,
                     padding, activation, clamp_max, partitions=partitions)
    layer = dataclasses.replace(base, threshold=_thresholds(base, pass_fraction, ties))
    return dataclasses.replace(layer, out_lsb=fit_dual_out_lsb(layer, fmt, margin))


@dataclasses.dataclass(frozen=True, eq=False)
class FbsDense:
    """One image of a dense FBS layer: the arguments of
    :func:`dynacc.hw.fbs_layer.compact_fbs_layer`."""

    name: str
    x: np.ndarray            # [C, H, W], inactive channels zero
    x_lsb: int
    w: np.ndarray            # [O, C, kh, kw]
    w_lsb: np.ndarray        # [O, C], constant per filter
    bias: np.ndarray         # [O] on acc_lsb + scale_lsb
    scale: np.ndarray        # [O] unsigned
    scale_lsb: int
    active_in: np.ndarray    # [C] bool
    active_out: np.ndarray   # [O] bool
    out_lsb: np.ndarray      # [O]
    stride: int
    padding: int
    activation: str | None
    clamp_max: int | None
    act_bits: int

    def compact(self) -> DualLayer | None:
        """The engine's layer (:func:`~dynacc.hw.fbs_layer.compact_fbs_layer`)."""
        from dynacc.hw.fbs_layer import compact_fbs_layer

        return compact_fbs_layer(self.name, self.x, self.x_lsb, self.w, self.w_lsb, self.bias,
                                 self.scale, self.scale_lsb, self.active_in, self.active_out,
                                 self.out_lsb, self.stride, self.padding, self.activation,
                                 self.clamp_max, self.act_bits)

    def case(self, fmt: BFPFormat) -> dict:
        """The fields as a mapping plus ``expected`` (:meth:`golden`): an FBS case of
        :func:`dynacc.sim.dual.run_fbs_cases`."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["expected"] = self.golden(fmt)
        return d

    def golden(self, fmt: BFPFormat) -> np.ndarray:
        """The dense layer's output ``[O, Ho, Wo]`` from
        :func:`dynacc.quant.golden.fbs_conv2d` (inactive outputs 0), requantized with
        ``out_lsb - acc_lsb - scale_lsb`` (R3) and activated (R4)."""
        from dynacc.quant.functional import requantize

        acc, acc_lsb = golden.fbs_conv2d(
            _t(self.x)[None], self.x_lsb, _t(self.w), _t(self.w_lsb), _t(self.bias),
            active=torch.as_tensor(self.active_out)[None], scale=_t(self.scale)[None],
            stride=self.stride, padding=self.padding)
        shift = _t(self.out_lsb) - acc_lsb - self.scale_lsb
        y = requantize(acc, shift[None, :, None, None], fmt)
        return golden.apply_activation(y, self.activation, self.clamp_max)[0].numpy()


def _active(rng: np.random.Generator, n: int, density: float) -> np.ndarray:
    """``ceil(density*n)`` active channels at random (rule FBS1's k)."""
    a = np.zeros(n, dtype=bool)
    a[rng.choice(n, int(np.ceil(density * n - 1e-9)), replace=False)] = True
    return a


def random_fbs_dense(name: str, fmt: BFPFormat, *, c: int, o: int, h: int, w: int, k: int,
                     density_in: float = 0.5, density_out: float = 0.5, stride: int = 1,
                     padding: int = 0, act_bits: int = 8, scale: np.ndarray | None = None,
                     scale_bits: int = 8, scale_lsb: int = -8, align_spread: int = 3,
                     activation: str | None = "relu", clamp_max: int | None = None,
                     margin: int = 0, active_in: np.ndarray | None = None,
                     active_out: np.ndarray | None = None, seed: int = 0) -> FbsDense:
    """A dense FBS layer for one image: ``ceil(d*C)`` active inputs (the others exactly 0)
    and ``ceil(d*O)`` active outputs at random (or the given masks), uniform unsigned inputs
    and weight mantissas, one weight exponent per filter, random unsigned ``scale_bits``
    scales (or ``scale``), a random bias on the scaled LSB; output LSBs fitted to the
    active outputs' ``acc*scale + bias``."""
    rng = np.random.default_rng(seed)
    m = fmt.max_mantissa
    ain = _active(rng, c, density_in) if active_in is None else np.asarray(active_in, bool)
    aout = _active(rng, o, density_out) if active_out is None else np.asarray(active_out, bool)
    x = rng.integers(0, 1 << act_bits, (c, h, w)) * ain[:, None, None]
    wt = rng.integers(-m, m + 1, (o, c, k, k))
    w_lsb = np.repeat(rng.integers(-align_spread, 1, (o, 1)) - 5, c, axis=1)
    sc = (rng.integers(0, 1 << scale_bits, o) if scale is None
          else np.broadcast_to(np.asarray(scale, dtype=np.int64).reshape(-1), (o,)).copy())
    typical = m * (1 << act_bits) // 2 * int(np.sqrt(c * k * k)) * (1 << (scale_bits - 1))
    bias = rng.integers(-typical, typical + 1, o)
    dense = FbsDense(name, x, -4, wt, w_lsb, bias, sc, scale_lsb, ain, aout,
                     np.zeros(o, dtype=np.int64), stride, padding, activation, clamp_max,
                     act_bits)
    layer = dense.compact()
    out_lsb = np.zeros(o, dtype=np.int64)
    if layer is not None:
        out_lsb[aout] = fit_dual_out_lsb(layer, fmt, margin)
    return dataclasses.replace(dense, out_lsb=out_lsb)


def random_fbs_layer(name: str, fmt: BFPFormat, **kw) -> DualLayer | None:
    """The compacted layer of :func:`random_fbs_dense` (same arguments)."""
    return random_fbs_dense(name, fmt, **kw).compact()
