"""Offline calibration observers for static BFP activation exponents.

Layering contract (same as ``torch.ao.quantization`` observers, re-implemented here because that
package is deprecated and is never imported by ``dynacc``):

* ``forward(x) -> x`` only *records statistics* of the observed tensor into registered buffers
  (no autograd, the input is returned unchanged, an empty tensor records nothing);
* ``calculate_qparams()`` turns the statistics into the quantization parameters: here the
  **shared exponents** of the activation, ``int64`` of shape ``[n_groups]`` (``group = -1``:
  shape ``[1]``), clamped to the format's exponent range ``[-2**(E-1), 2**(E-1) - 1]``;
* ``lsb()`` = shared - (M - 2) (rule Q2's LSB exponent) and ``per_channel_lsb(C)`` expands the
  group exponents to the ``C`` channels.

Activations are ``[N, C, ...]`` (channels on dim 1; ``[N, C]`` for FC outputs). ``group`` channels
share one exponent: channel ``c`` belongs to group ``c // group``; when ``C`` is not a multiple
of ``group`` the last group is a shorter tail group (the weight-blocking rule W1); ``group = -1``
is one exponent per tensor (the Static BFP default). The number of groups is fixed by the first
non-empty tensor observed; the buffers are sized then (and re-sized on ``load_state_dict``).

**Joint calibration** (residual adds, Static BFP's ``sc_layer_num``): the two addends must share
one exponent list, so the *same observer instance* is simply called on both operands (conv3's
output and the block input). Every statistic kept here is a sum or a max over all elements
seen, so this is identical to observing the two tensors concatenated along the batch axis.

Performance: the KL observer's per-batch work is one ``aminmax`` pass plus a fine histogram
built by :func:`_scaled_floor_histogram`, which temporarily sets ``torch.set_num_threads(1)``
(restored on exit) and streams the tensor in L2-sized chunks; ``calculate_qparams`` is
``O(candidates * bins)`` per group, also single-threaded.

Exposed
    :class:`MaxExponentObserver`   max element exponent (rule Q3, exact)
    :class:`KLExponentObserver`    Static BFP KL-divergence search, streaming
    :func:`make_observer`          the observer named by ``QuantConfig.method``
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator

import torch
from torch import nn

from .formats import BFPFormat, QuantConfig
from .functional import element_exponent, quantize

__all__ = [
    "ExponentObserverBase",
    "MaxExponentObserver",
    "KLExponentObserver",
    "make_observer",
]

#: ``element_exponent`` of 0: below every real exponent, ignored by a max.
_ZERO_EXP = -(1 << 30)


def _check_group(group: Any) -> int:
    if isinstance(group, bool) or not isinstance(group, int):
        raise TypeError(f"group must be an integer, not {group!r}")
    if group != -1 and group < 1:
        raise ValueError(f"group must be -1 or >= 1, not {group!r}")
    return group


#: Elements per chunk of the fine-histogram pipeline (float32 + int32 scratch: 1 MiB, L2-sized).
_CHUNK = 1 << 17
_scratch = threading.local()


@contextlib.contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """Temporarily run ATen kernels of this thread with ``n`` intra-op threads."""
    saved = torch.get_num_threads()
    if saved == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _scaled_floor_histogram(x: torch.Tensor, scale: float, offset: float, bins: int
                            ) -> torch.Tensor:
    """``bincount(floor(x * scale) + offset)`` of a flat float32 CPU tensor, int64 ``[bins]``.

    Exact when ``scale`` is a power of two ``>= 1`` and every ``floor(x * scale) + offset`` lies
    in ``[0, bins)`` with ``bins <= 2**24``. Runs single-threaded in cache-sized chunks through
    reused (thread-local) scratch buffers: the only main-memory traffic is one read of ``x``, and
    there is no parallel region per chunk (ATen parallelises ``floor`` from a few thousand
    elements on; on an oversubscribed CPU every parallel-region barrier costs a scheduler
    quantum, which made a multi-threaded chunk loop 100x slower).
    """
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None or bufs[0].numel() != _CHUNK:
        bufs = (torch.empty(_CHUNK, dtype=torch.float32), torch.empty(_CHUNK, dtype=torch.int32))
        _scratch.bufs = bufs
    fbuf, ibuf = bufs
    parts = []
    with _intra_op_threads(1):
        for start in range(0, x.numel(), _CHUNK):
            chunk = x[start:start + _CHUNK]
            n = chunk.numel()
            y = torch.mul(chunk, scale, out=fbuf[:n])
            y.floor_().add_(offset)
            idx = ibuf[:n]
            idx.copy_(y)
            parts.append(torch.bincount(idx, minlength=bins))
        return torch.stack(parts).sum(0)


class ExponentObserverBase(nn.Module):
    """Shared machinery: group geometry, running per-group min/max, guards.

    Buffers (all in ``state_dict``):
        ``min_val``, ``max_val``  float64 ``[G]``, exact running extremes of each group
        ``num_seen``             int64 scalar, elements observed
        ``num_channels``         int64 scalar, ``C`` of the observed tensors (-1 before data)
    """

    def __init__(self, fmt: BFPFormat = BFPFormat(), group: int = -1) -> None:
        super().__init__()
        if not isinstance(fmt, BFPFormat):
            raise TypeError(f"fmt must be a BFPFormat, not {fmt!r}")
        self.fmt = fmt
        self.group = _check_group(group)
        self.register_buffer("min_val", torch.empty(0, dtype=torch.float64))
        self.register_buffer("max_val", torch.empty(0, dtype=torch.float64))
        self.register_buffer("num_seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_channels", torch.full((), -1, dtype=torch.int64))

    # ----------------------------------------------------------------------------- geometry
    def extra_repr(self) -> str:
        return (f"mantissa_bits={self.fmt.mantissa_bits}, exponent_bits={self.fmt.exponent_bits}, "
                f"group={self.group}")

    def _group_size(self, channels: int) -> int:
        return channels if self.group == -1 else min(self.group, channels)

    @property
    def num_groups(self) -> int:
        """Number of exponent groups (0 before any data)."""
        return int(self.min_val.numel())

    def _channel_group(self, channels: int, device: torch.device) -> torch.Tensor:
        """Group index of every channel, ``[C]`` int64."""
        return torch.arange(channels, device=device) // self._group_size(channels)

    def _init_state(self, channels: int, n_groups: int, device: torch.device) -> None:
        self.min_val = torch.full((n_groups,), math.inf, dtype=torch.float64, device=device)
        self.max_val = torch.full((n_groups,), -math.inf, dtype=torch.float64, device=device)
        self.num_channels.fill_(channels)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
        # Buffers are sized by the first observed tensor: adopt the stored shapes first.
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty(state_dict[key].shape, dtype=buf.dtype,
                                                  device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    # ------------------------------------------------------------------------------ forward
    def _group_minmax(self, x: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group ``(min, max)`` of a batch, float64 ``[G]``."""
        if n_groups == 1:
            mn, mx = torch.aminmax(x)
            return mn.reshape(1).to(torch.float64), mx.reshape(1).to(torch.float64)
        dims = (0,) + tuple(range(2, x.dim()))
        cmn = x.amin(dim=dims).to(torch.float64)
        cmx = x.amax(dim=dims).to(torch.float64)
        c = x.shape[1]
        g = self._group_size(c)
        pad = n_groups * g - c
        if pad:
            cmn = torch.cat([cmn, cmn.new_full((pad,), math.inf)])
            cmx = torch.cat([cmx, cmx.new_full((pad,), -math.inf)])
        return cmn.reshape(n_groups, g).amin(1), cmx.reshape(n_groups, g).amax(1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record the statistics of ``x`` (``[N, C, ...]``) and return ``x`` unchanged."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a tensor, not {type(x).__name__}")
        if x.numel() == 0:
            return x
        if x.dim() < 2:
            raise ValueError(f"expected an [N, C, ...] activation, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point activation, not {x.dtype}")
        xd = x.detach()
        c = xd.shape[1]
        n_groups = -(-c // self._group_size(c))
        if self.num_groups == 0:
            self._init_state(c, n_groups, xd.device)
        elif int(self.num_channels) != c:
            raise ValueError(f"observer calibrated on {int(self.num_channels)} channels, "
                             f"got a tensor with {c}")
        bmn, bmx = self._group_minmax(xd, n_groups)
        if not (torch.isfinite(bmn).all() and torch.isfinite(bmx).all()):
            raise ValueError("activation contains inf or NaN; calibration needs finite values")
        self._observe(xd, bmn, bmx)
        self.min_val.copy_(torch.minimum(self.min_val, bmn))
        self.max_val.copy_(torch.maximum(self.max_val, bmx))
        self.num_seen.add_(xd.numel())
        return x

    def _observe(self, x: torch.Tensor, bmin: torch.Tensor, bmax: torch.Tensor) -> None:
        """Subclass hook: record more statistics of a (validated, detached) batch."""

    # ------------------------------------------------------------------------------ qparams
    def _require_data(self) -> None:
        if int(self.num_seen) == 0:
            raise RuntimeError(f"{type(self).__name__}.calculate_qparams() called before any data "
                               "was observed; run calibration batches through it first")

    def max_exponents(self) -> torch.Tensor:
        """``ê_max`` per group, unclamped: ``max floor(log2|x|)`` = ``element_exponent`` of
        ``max|x| = max(-min, max)`` (floor∘log2 is monotone), int64 ``[G]``; an all-zero group
        gives the sentinel ``-(2**30)``."""
        self._require_data()
        return element_exponent(torch.maximum(-self.min_val, self.max_val))

    def _clamp(self, e: torch.Tensor) -> torch.Tensor:
        return e.clamp(self.fmt.min_exponent, self.fmt.max_exponent)

    def calculate_qparams(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def lsb(self) -> torch.Tensor:
        """LSB exponent per group: ``shared - (M - 2)``."""
        return self.calculate_qparams() - self.fmt.lsb_offset

    def per_channel_lsb(self, channels: int) -> torch.Tensor:
        """LSB exponent of each of the ``channels`` channels, int64 ``[C]``."""
        lsb = self.lsb()
        if channels != int(self.num_channels):
            raise ValueError(f"observer calibrated on {int(self.num_channels)} channels, "
                             f"asked for {channels}")
        return lsb[self._channel_group(channels, lsb.device)]


class MaxExponentObserver(ExponentObserverBase):
    """Max-exponent rule (Q3) for activations.

    ``ê_g = clamp(max_{x in group g, all batches} floor(log2|x|), -2**(E-1), 2**(E-1) - 1)``,
    exact: ``floor(log2|x|)`` is read with ``frexp`` from the running ``max|x|``. An all-zero
    group takes the minimum exponent.
    """

    def calculate_qparams(self) -> torch.Tensor:
        """Shared exponent per group, int64 ``[G]``."""
        return self._clamp(self.max_exponents())


class KLExponentObserver(ExponentObserverBase):
    """Static BFP KL-divergence search for the offline activation exponent (streaming).

    For every group, with ``ê = ê_max`` the max element exponent:

    1. candidates ``e ∈ {ê, ê-1, ..., ê-candidates+1}`` (kept inside the E-bit range);
    2. reference histogram ``P`` of the float values (bins below);
    3. each candidate's quantized values ``Q_e(x) = 2**l * sat(round_half_even(x * 2**-l))``,
       ``l = e - (M-2)``, ``sat`` to ``±(2**(M-1) - 1)`` (rule Q2), histogrammed on the same bins;
       a candidate is skipped when ``Q_e(max) < lo`` (all quantized values below the histogram)
       or when none of its values land in the histogram;
    4. MXNet smoothing of the counts ``h``: ``h_i += eps`` for empty bins,
       ``h_i -= eps * n_zero / n_nonzero`` for the others (``eps = 1e-4``); then ``p = h/Σh``;
    5. ``KL(p || q_e) = Σ_i p_i (log p_i - log q_e,i)`` (the original's ``F.kl_div`` mean
       reduction only divides by the bin count, the argmin is the same);
    6. ``ê_opt = argmin_e KL``, ties to the larger exponent; ``ê`` when every candidate is
       skipped.

    **Reference bins** (an exact, documented adaptation of the notes' bins of width
    ``(max-min)/128`` over ``[floor(min), ceil(max)]``): width ``W = 2**j`` with
    ``j = floor(log2((max-min)/128))`` (``frexp``, never float ``log2``), raised to the fine-bin
    width ``w`` below, and raised further while there would be more than 4096 bins (so the
    smoothing keeps every count positive); the extent is ``lo = floor(min/U)*U``,
    ``hi = ceil(max/U)*U`` with ``U = max(W, min(1, 2**(ê+1)))``, i.e. the notes' integer extent
    for data reaching ``|x| >= 1`` and the same rule scaled to the data's power of two below;
    ``n = max(1, (hi-lo)/W)`` bins, the last one closed at ``hi`` (as ``torch.histc``); values
    outside ``[lo, hi]`` (only quantized ones can be) are dropped, as ``torch.histc`` does.

    **Streaming.** Nothing but histograms is stored. Per group the observer keeps ``bins = 2**K``
    fine bins of width ``w = 2**(A+2-K)`` over ``[-2**(A+1), 2**(A+1))``, anchored at the running
    max exponent ``A``; bin ``b`` holds ``floor(x / w) = b - 2**(K-1)`` (computed by an exact
    power-of-two scaling and ``floor``). When ``A`` grows by ``d`` the bins are merged
    ``2**d``-wise (``b -> ((b - 2**(K-1)) >> d) + 2**(K-1)``), which is exact because the edges
    align, so streaming batches gives bit-identical statistics to one pass over their
    concatenation. With ``K >= M + candidates``, ``w <= LSB/2`` for every candidate, every
    quantization interval boundary ``(m + 1/2) * LSB`` is a fine-bin edge, and the reference
    bins are unions of fine bins: ``P`` is exact and ``Q_e`` is obtained from the fine
    histogram by quantizing each bin's interior. The single approximation is of measure zero:
    a value *exactly* on a half-LSB tie lies on the lower edge of its fine bin and is counted as
    rounding up instead of half to even. ``calculate_qparams`` is ``O(candidates * bins)`` per
    group.

    If the data exceed the format (``ê_max > 2**(E-1) - 1``) every candidate would saturate, and
    the largest exponent is returned without a search; a group with ``ê_max`` below the range
    (or all zeros) takes the minimum exponent.

    Parameters
    ----------
    fmt, group:
        BFP format and channels per exponent group (``-1``: per tensor).
    candidates:
        number of exponents tried, from ``ê_max`` down (1..8, Static BFP: 3).
    bins:
        fine bins per group, a power of two ``>= 2**(M + candidates)`` (the default).
    eps:
        smoothing constant (MXNet: 1e-4).
    """

    MAX_REF_BINS = 4096

    VARIANTS = ("expand", "paper")

    def __init__(self, fmt: BFPFormat = BFPFormat(), group: int = -1, candidates: int = 3,
                 bins: int | None = None, eps: float = 1e-4, variant: str = "expand") -> None:
        super().__init__(fmt, group)
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, not {variant!r}")
        self.variant = variant
        if isinstance(candidates, bool) or not isinstance(candidates, int) \
                or not 1 <= candidates <= 8:
            raise ValueError(f"candidates must be an integer in [1, 8], not {candidates!r}")
        min_bins = 1 << (fmt.mantissa_bits + candidates)
        if bins is None:
            bins = min_bins
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < min_bins \
                or bins & (bins - 1) or bins > (1 << 26):
            raise ValueError(f"bins must be a power of two in [2**(M + candidates) = {min_bins}, "
                             f"2**26], not {bins!r}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), not {eps!r}")
        self.candidates = candidates
        self.bins = bins
        self.log2_bins = bins.bit_length() - 1
        self.eps = float(eps)
        self.register_buffer("anchor", torch.empty(0, dtype=torch.int64))
        self.register_buffer("histogram", torch.empty(0, 0, dtype=torch.int64))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, candidates={self.candidates}, bins={self.bins}, "
                f"variant={self.variant!r}")

    def _init_state(self, channels: int, n_groups: int, device: torch.device) -> None:
        super()._init_state(channels, n_groups, device)
        self.anchor = torch.full((n_groups,), _ZERO_EXP, dtype=torch.int64, device=device)
        self.histogram = torch.zeros((n_groups, self.bins), dtype=torch.int64, device=device)

    # ------------------------------------------------------------------------ fine histogram
    def _rebin(self, shift: torch.Tensor) -> None:
        """Re-anchor group ``g`` ``shift[g] >= 0`` exponents higher (``2**shift``-wise merge)."""
        half = self.bins // 2
        d = shift.clamp(0, self.log2_bins)
        t = torch.arange(self.bins, device=d.device) - half
        idx = torch.bitwise_right_shift(t[None, :], d[:, None]) + half  # arithmetic: floor
        self.histogram = torch.zeros_like(self.histogram).scatter_add_(1, idx, self.histogram)

    def _batch_histogram(self, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """Fine-bin counts of a batch at the given anchors, int64 ``[G, bins]``."""
        n_groups, half, k = self.num_groups, self.bins // 2, self.log2_bins
        zero = anchor == _ZERO_EXP
        s = torch.where(zero, torch.zeros_like(anchor), k - 2 - anchor)  # y = x * 2**s
        s_list = s.tolist()
        lo_s, hi_s = min(s_list), max(s_list)
        fast = (x.dtype in (torch.float32, torch.float16, torch.bfloat16)
                and 0 <= lo_s <= hi_s <= 126)
        if n_groups == 1:
            scale: Any = 2.0 ** hi_s
            offset: Any = float(half)
        else:
            c = x.shape[1]
            cg = self._channel_group(c, x.device)
            shape = (1, c) + (1,) * (x.dim() - 2)
            sc = s[cg]
            one = torch.ones(c, dtype=torch.float64, device=x.device)
            # 2**s as two exact float64 factors (no overflow for any float64 exponent)
            scale = (torch.ldexp(one, torch.div(sc, 2, rounding_mode="floor").to(torch.float64)),
                     torch.ldexp(one, (sc - torch.div(sc, 2, rounding_mode="floor")
                                       ).to(torch.float64)))
            scale = (scale[0].reshape(shape), scale[1].reshape(shape))
            offset = (cg * self.bins + half).to(torch.float64).reshape(shape)
        total = n_groups * self.bins
        if fast and n_groups == 1 and x.device.type == "cpu":
            return _scaled_floor_histogram(x.to(torch.float32).reshape(-1), scale,
                                           float(half), total).reshape(1, self.bins)
        if fast and total <= (1 << 24):
            # float32 path: x * 2**s is exact (s >= 0: scaling up never rounds, |y| < 2**(K-1)),
            # floor is exact, adding the integer offset (< 2**24) is exact.
            if n_groups > 1:
                scale = (scale[0] * scale[1]).to(torch.float32)
                offset = offset.to(torch.float32)
            y = x.to(torch.float32) * scale
            idx = y.floor_().add_(offset).to(torch.int32)
        else:
            # float64 path (tiny or huge magnitudes, float64 inputs): scale in two exact halves.
            if n_groups == 1:
                s1 = hi_s // 2
                y = x.to(torch.float64) * (2.0 ** s1) * (2.0 ** (hi_s - s1))
            else:
                y = x.to(torch.float64) * scale[0] * scale[1]
            y = y.floor_()
            if lo_s < 0:  # scaling down may flush a tiny negative value to -0: its floor is -1
                y = torch.where((y == 0) & (x < 0), torch.full_like(y, -1.0), y)
            idx = (y + offset).to(torch.int64)
        return torch.bincount(idx.reshape(-1), minlength=total).reshape(n_groups, self.bins)

    def _observe(self, x: torch.Tensor, bmin: torch.Tensor, bmax: torch.Tensor) -> None:
        batch_exp = element_exponent(torch.maximum(-bmin, bmax))
        new_anchor = torch.maximum(self.anchor, batch_exp)
        grow = (new_anchor > self.anchor) & (self.anchor != _ZERO_EXP)
        if bool(grow.any()):
            self._rebin(torch.where(grow, new_anchor - self.anchor, torch.zeros_like(new_anchor)))
        # an all-zero history only has counts in the centre bin, which no re-anchoring moves
        self.anchor.copy_(new_anchor)
        self.histogram.add_(self._batch_histogram(x, new_anchor))

    # ---------------------------------------------------------------------------- KL search
    def _smooth(self, h: torch.Tensor) -> torch.Tensor | None:
        """MXNet smoothing of counts then normalisation; ``None`` when impossible."""
        nonzero = h != 0
        n_nonzero = int(nonzero.sum())
        if n_nonzero == 0:
            return None
        eps1 = self.eps * (h.numel() - n_nonzero) / n_nonzero
        h = torch.where(nonzero, h - eps1, torch.full_like(h, self.eps))
        if bool((h <= 0).any()):
            return None
        return h / h.sum()

    def divergences(self) -> list[dict[int, float]]:
        """``KL(p || q_e)`` of every evaluated candidate ``e``, one dict per group (empty when the
        search does not run: zero group or ``ê_max`` outside the exponent range)."""
        self._require_data()
        with _intra_op_threads(1):
            return [self._dispatch(g)[1] for g in range(self.num_groups)]

    def _dispatch(self, g: int) -> tuple[int, dict[int, float]]:
        return self._search_expand(g) if self.variant == "expand" else self._search(g)

    def _search_expand(self, g: int) -> tuple[int, dict[int, float]]:
        """Level-expansion KL (TensorRT/MXNet entropy calibration, on BFP candidates).

        On the fine bins: ``p`` is the histogram restricted to the candidate's representable
        range ``|m| <= 2**(M-1) - 1`` with the clipped mass added to the two edge bins; ``q``
        spreads each quantization level's mass (of the unclipped slice) uniformly over that
        level's non-empty fine bins. Both are MXNet-smoothed; ``KL(p || q)``, argmin, ties to the
        larger exponent. Unlike the paper's histogram of quantized values (variant ``"paper"``),
        ``q`` is not a comb of isolated spikes, so the comparison stays meaningful at M <= 6.
        The two fine bins around zero, ``[-w, w)``, are left out: every candidate rounds their
        values (exact zeros included) to 0, so they cannot tell the candidates apart, and a
        ReLU's spike at zero would otherwise pull the choice towards needlessly small exponents.
        """
        fmt = self.fmt
        a = int(self.anchor[g])
        if a == _ZERO_EXP or a < fmt.min_exponent:
            return fmt.min_exponent, {}
        if a > fmt.max_exponent:
            return fmt.max_exponent, {}
        w_exp = a + 2 - self.log2_bins
        hist = self.histogram[g].to(torch.float64).clone()
        hist[self.bins // 2 - 1:self.bins // 2 + 1] = 0.0  # [-w, w): zero for every candidate
        t = torch.arange(self.bins, dtype=torch.int64, device=hist.device) - self.bins // 2
        best, best_kl, kls = a, math.inf, {}
        for i in range(self.candidates):
            e = a - i
            if e < fmt.min_exponent:
                break
            step = 1 << (fmt.lsb(e) - w_exp)  # LSB in fine units (>= 2)
            m = torch.div(2 * t + 1 + step, 2 * step, rounding_mode="floor")
            inside = m.abs() <= fmt.max_mantissa
            idx = torch.nonzero(inside).flatten()
            lo, hi = int(idx[0]), int(idx[-1])
            sliced = hist[lo:hi + 1]
            pc = sliced.clone()
            pc[0] += hist[:lo].sum()
            pc[-1] += hist[hi + 1:].sum()
            level = (m[lo:hi + 1] + fmt.max_mantissa).to(torch.int64)
            n_levels = 2 * fmt.max_mantissa + 1
            mass = torch.bincount(level, weights=sliced, minlength=n_levels)
            nonzero = (pc != 0).to(torch.float64)
            count = torch.bincount(level, weights=nonzero, minlength=n_levels)
            q = torch.where(nonzero > 0, mass[level] / count[level].clamp(min=1), torch.zeros_like(pc))
            ps, qs = self._smooth(pc), self._smooth(q)
            if ps is None or qs is None:
                continue
            kl = float((ps * (torch.log(ps) - torch.log(qs))).sum())
            kls[e] = kl
            if kl < best_kl:
                best, best_kl = e, kl
        return best, kls

    def _search(self, g: int) -> tuple[int, dict[int, float]]:
        fmt, k = self.fmt, self.log2_bins
        a = int(self.anchor[g])
        if a == _ZERO_EXP or a < fmt.min_exponent:
            return fmt.min_exponent, {}
        if a > fmt.max_exponent:
            return fmt.max_exponent, {}
        mn, mx = float(self.min_val[g]), float(self.max_val[g])
        w_exp = a + 2 - k  # fine bin width 2**w_exp
        # reference grid, in units of the fine width w (all integers)
        span = mx - mn
        j = int(element_exponent(torch.tensor(span / 128.0, dtype=torch.float64))) \
            if span > 0 else w_exp
        j = max(j, w_exp)
        while True:
            u_exp = max(j, min(0, a + 1))
            lo_u = math.floor(math.ldexp(mn, -u_exp)) << (u_exp - w_exp)
            hi_u = math.ceil(math.ldexp(mx, -u_exp)) << (u_exp - w_exp)
            r = 1 << (j - w_exp)
            n_ref = max(1, (hi_u - lo_u) // r)
            if n_ref <= self.MAX_REF_BINS:
                break
            j += 1
        hist = self.histogram[g].to(torch.float64)
        dev = hist.device
        t = torch.arange(self.bins, dtype=torch.int64, device=dev) - self.bins // 2

        def ref_hist(pos: torch.Tensor) -> torch.Tensor:
            """Counts ``hist`` at fine-unit positions ``pos`` onto the reference bins."""
            off = pos - lo_u
            idx = torch.div(off, r, rounding_mode="floor")
            idx = torch.where(off == n_ref * r, torch.full_like(idx, n_ref - 1), idx)
            ok = (idx >= 0) & (idx < n_ref)
            return torch.bincount(idx[ok], weights=hist[ok], minlength=n_ref)

        p = self._smooth(ref_hist(t))
        if p is None:  # pragma: no cover - the data always fill a bin
            return a, {}
        logp = torch.log(p)
        best, best_kl, kls = a, math.inf, {}
        for i in range(self.candidates):
            e = a - i
            if e < fmt.min_exponent:
                break
            lsb = fmt.lsb(e)
            q_mant = quantize(torch.tensor(mx, dtype=torch.float64), lsb, fmt)
            q_max = math.ldexp(float(q_mant), lsb)  # Q_e is monotone: max of Q_e(x) = Q_e(max)
            if q_max < math.ldexp(lo_u, w_exp):
                continue
            assert lsb - w_exp >= 1, "K >= M + candidates guarantees w <= LSB/2"
            step = 1 << (lsb - w_exp)  # LSB in fine units, even
            # interior t + 1/2 of each fine bin: round((t + 1/2) / L), never a tie (L even)
            m = torch.div(2 * t + 1 + step, 2 * step, rounding_mode="floor")
            m = m.clamp(-fmt.max_mantissa, fmt.max_mantissa)
            q = self._smooth(ref_hist(m * step))
            if q is None:
                continue
            kl = float((p * (logp - torch.log(q))).sum())
            kls[e] = kl
            if kl < best_kl:  # strict: ties keep the larger exponent
                best, best_kl = e, kl
        return best, kls

    def calculate_qparams(self) -> torch.Tensor:
        """KL-optimal shared exponent per group, int64 ``[G]``."""
        self._require_data()
        with _intra_op_threads(1):  # O(bins) work per group: small kernels, no parallel regions
            out = [self._dispatch(g)[0] for g in range(self.num_groups)]
        return torch.tensor(out, dtype=torch.int64, device=self.anchor.device)


def make_observer(cfg: QuantConfig) -> ExponentObserverBase:
    """The activation observer named by ``cfg.method`` ("max" | "kl" | "kl-paper"), with
    ``cfg.activations.group``, ``cfg.fmt`` and ``cfg.kl_candidates``."""
    method = getattr(cfg, "method", None)
    if method == "max":
        return MaxExponentObserver(cfg.fmt, cfg.activations.group)
    if method in ("kl", "kl-paper"):
        return KLExponentObserver(cfg.fmt, cfg.activations.group, candidates=cfg.kl_candidates,
                                  variant="expand" if method == "kl" else "paper")
    raise ValueError(f"unknown activation calibration method {method!r}; "
                     "expected 'max', 'kl' or 'kl-paper'")
