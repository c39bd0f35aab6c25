"""Host-side compaction of one FBS conv layer for one image (rules FBS2-FBS3): only the
active input channels are stored and read, only the active output channels are computed, so
the engine runs a plain single-pass conv of the compacted sizes plus the runtime scale
(:class:`~dynacc.hw.dual_program.DualLayer` mode ``fbs``).

>>> layer = compact_fbs_layer("conv2", x, -4, w, w_lsb, bias, g, -8, act_in, act_out,
...                           out_lsb, 1, 1, "relu", None, 8)            # doctest: +SKIP
>>> y = expand_fbs_output(run(layer), act_out)                          # doctest: +SKIP

Edge cases: no active output channel: nothing runs (:func:`compact_fbs_layer` returns
None) and the output is all zeros (``expand_fbs_output(None, active_out, out_size)``); no
active input channel: the compacted layer keeps one all-zero input channel with zero
weights, so ``acc = 0`` and the engine outputs ``activation(requantize(bias))``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dual_program import DualLayer

__all__ = ["compact_fbs_layer", "expand_fbs_output", "fbs_out_size"]


def _mask(v: Any, n: int, field: str, name: str) -> np.ndarray:
    a = np.asarray(v)
    if a.shape != (n,) or a.dtype != bool:
        raise ValueError(f"layer {name!r}: field {field!r} must be a bool [{n}], got "
                         f"{a.dtype} {a.shape}")
    return a


def _per_out(v: Any, o: int, field: str, name: str) -> np.ndarray:
    a = np.asarray(v, dtype=np.int64).reshape(-1)
    if a.size == 1:
        return np.broadcast_to(a, (o,)).copy()
    if a.shape != (o,):
        raise ValueError(f"layer {name!r}: field {field!r} must be a scalar or [{o}], got "
                         f"{np.shape(v)}")
    return a


def fbs_out_size(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: int,
                 padding: int) -> tuple[int, int]:
    """``(Ho, Wo)`` of the conv of ``x [C, H, W]`` with ``w [O, C, kh, kw]``."""
    _, h, wd = x_shape
    kh, kw = w_shape[2], w_shape[3]
    return (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1


def compact_fbs_layer(name: str, x: Any, x_lsb: int, w: Any, w_lsb: Any, bias: Any | None,
                      scale: Any, scale_lsb: int, active_in: Any, active_out: Any, out_lsb: Any,
                      stride: int, padding: int, activation: str | None, clamp_max: int | None,
                      act_bits: int) -> DualLayer | None:
    """The compacted FBS layer of one image: ``x [C, H, W]`` (unsigned ``act_bits``-bit,
    inactive channels exactly zero, rule FBS2), ``w [O, C, kh, kw]`` with ``w_lsb [O, C]``
    (or ``[O]``) constant over each filter's input channels (compaction puts any K active
    channels in one word, which must share one alignment shift, rule A2), ``bias [O]`` on
    the scaled LSB ``acc_lsb + scale_lsb``, ``scale [O]`` (unsigned, the quantized saliency
    of this image), ``active_in [C]`` / ``active_out [O]`` bool, ``out_lsb`` scalar or
    ``[O]``.

    Returns the :class:`DualLayer` (mode ``fbs``) over the active input channels and active
    output filters (their ``w_lsb``, ``bias``, ``scale``, ``out_lsb``), or None when no output
    channel is active (nothing to run, the output is all zeros). Raises ``ValueError``
    naming the layer and field.
    """
    xa, wa = np.asarray(x, dtype=np.int64), np.asarray(w, dtype=np.int64)
    if xa.ndim != 3 or wa.ndim != 4 or wa.shape[1] != xa.shape[0]:
        raise ValueError(f"layer {name!r}: x must be [C, H, W] and w [O, C, kh, kw], got "
                         f"{xa.shape} and {wa.shape}")
    o, c = wa.shape[:2]
    ain = _mask(active_in, c, "active_in", name)
    aout = _mask(active_out, o, "active_out", name)
    wl = np.asarray(w_lsb, dtype=np.int64)
    if wl.shape == (o,):
        wl = np.repeat(wl[:, None], c, axis=1)
    if wl.shape != (o, c):
        raise ValueError(f"layer {name!r}: field 'w_lsb' must be [{o}, {c}] or [{o}], got "
                         f"{np.shape(w_lsb)}")
    varies = (wl != wl[:, :1]).any(axis=1)
    if varies.any():
        f = int(np.argmax(varies))
        raise ValueError(f"layer {name!r}: field 'w_lsb' of filter {f} is not constant over "
                         f"its input channels ({sorted(set(wl[f].tolist()))}): an FBS layer is "
                         "compacted, any K active channels share one word and its alignment "
                         "shift")
    dead = ~ain & (xa != 0).reshape(c, -1).any(axis=1)
    if dead.any():
        ch = int(np.argmax(dead))
        raise ValueError(f"layer {name!r}: field 'x' channel {ch} is inactive but not zero "
                         "(rule FBS2: an inactive input channel is exactly zero)")
    sc = _per_out(scale, o, "scale", name)
    b = np.zeros(o, dtype=np.int64) if bias is None else _per_out(bias, o, "bias", name)
    ol = _per_out(out_lsb, o, "out_lsb", name)
    cm = None if clamp_max is None else _per_out(clamp_max, o, "clamp_max", name)
    oi = np.flatnonzero(aout)
    if not len(oi):
        return None
    ci = np.flatnonzero(ain)
    if len(ci):
        xc, wc, wlc = xa[ci], wa[oi][:, ci], wl[oi][:, ci]
    else:   # no active input: one zero channel with zero weights, acc = 0
        xc = np.zeros((1,) + xa.shape[1:], dtype=np.int64)
        wc = np.zeros((len(oi), 1) + wa.shape[2:], dtype=np.int64)
        wlc = wl[oi][:, :1]
    if cm is not None:
        if (cm[oi] != cm[oi][0]).any():
            raise ValueError(f"layer {name!r}: field 'clamp_max' must be one value for the "
                             f"engine's activation, got {sorted(set(cm[oi].tolist()))}")
        cm = int(cm[oi][0])
    return DualLayer(name, xc, x_lsb, wc, wlc, b[oi], ol[oi], act_bits, None, mode="fbs",
                     stride=stride, padding=padding, activation=activation, clamp_max=cm,
                     scale=sc[oi], scale_lsb=scale_lsb)


def expand_fbs_output(y_compact: Any | None, active_out: Any,
                      out_size: tuple[int, int] | None = None) -> np.ndarray:
    """``y_compact [O', Ho, Wo]`` of the active output channels -> ``[O, Ho, Wo]`` with
    exact zeros at the inactive ones (rule FBS3: an inactive output is 0, and every
    activation keeps 0). ``y_compact = None`` (no active output, nothing ran) needs
    ``out_size = (Ho, Wo)`` and gives all zeros."""
    aout = np.asarray(active_out)
    if aout.ndim != 1 or aout.dtype != bool:
        raise ValueError(f"active_out must be a bool [O], got {aout.dtype} {aout.shape}")
    if y_compact is None:
        if out_size is None:
            raise ValueError("expand_fbs_output(None, ...) needs out_size = (Ho, Wo)")
        return np.zeros((len(aout),) + tuple(out_size), dtype=np.int64)
    y = np.asarray(y_compact, dtype=np.int64)
    n = int(aout.sum())
    if y.ndim != 3 or y.shape[0] != n:
        raise ValueError(f"y_compact must be [{n}, Ho, Wo] (one row per active output "
                         f"channel), got {y.shape}")
    out = np.zeros((len(aout),) + y.shape[1:], dtype=np.int64)
    out[aout] = y
    return out
