"""Activation-exponent observers: max exactness, KL search, streaming, guards."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from dynacc.quant.formats import ActivationBlocking, BFPFormat, QuantConfig
from dynacc.quant.functional import quantize, tensor_shared_exponent
from dynacc.quant.observers import (
    KLExponentObserver, MaxExponentObserver, make_observer,
)

FMT = BFPFormat(8, 8)
OBSERVERS = [MaxExponentObserver, KLExponentObserver]


def _f32(v: float) -> torch.Tensor:
    return torch.tensor([[v]], dtype=torch.float32)


# ------------------------------------------------------------------------------ max exponent
@pytest.mark.parametrize("cls", OBSERVERS)
@pytest.mark.parametrize("value, expected", [
    (float(np.nextafter(np.float32(2.0), np.float32(0.0))), 0),
    (2.0, 1),
    (-2.0, 1),
    (float(np.nextafter(np.float32(-2.0), np.float32(0.0))), 0),
    (1.0, 0),
    (float(np.nextafter(np.float32(1.0), np.float32(0.0))), -1),
    (0.75, -1),
    (float(np.nextafter(np.float32(8.0), np.float32(0.0))), 2),
])
def test_max_exponent_exact_near_powers_of_two(cls, value, expected) -> None:
    obs = cls(FMT)
    obs(_f32(value))
    assert obs.max_exponents().tolist() == [expected]
    if cls is MaxExponentObserver:
        assert obs.calculate_qparams().tolist() == [expected]
        assert obs.lsb().tolist() == [expected - 6]


def test_max_exponent_clamps_to_format() -> None:
    fmt = BFPFormat(8, 4)  # exponents in [-8, 7]
    for v, e in [(1000.0, 7), (1e-5, -8), (255.0, 7), (3.0, 1)]:
        obs = MaxExponentObserver(fmt)
        obs(_f32(v))
        assert obs.calculate_qparams().tolist() == [e]


def test_max_matches_tensor_shared_exponent() -> None:
    g = torch.Generator().manual_seed(1)
    for scale in [1e-30, 1e-3, 1.0, 7.0, 1e20]:
        x = torch.randn(4, 3, 5, 5, generator=g) * scale
        obs = MaxExponentObserver(FMT)
        obs(x)
        assert obs.calculate_qparams().tolist() == [tensor_shared_exponent(x, FMT)]


def test_subnormal_input() -> None:
    tiny = float(np.float32(2.0 ** -140))
    for cls in OBSERVERS:
        obs = cls(FMT)
        obs(torch.tensor([[tiny, -tiny]]))
        assert obs.max_exponents().tolist() == [-140]
        assert obs.calculate_qparams().tolist() == [FMT.min_exponent]  # -128


@pytest.mark.parametrize("cls", OBSERVERS)
def test_zero_tensor_gives_min_exponent(cls) -> None:
    obs = cls(FMT)
    obs(torch.zeros(2, 3, 4, 4))
    assert obs.calculate_qparams().tolist() == [FMT.min_exponent]
    obs(torch.full((1, 3, 4, 4), 3.0))  # zeros then data: the data decide
    assert obs.calculate_qparams().tolist() == [1]
    if cls is KLExponentObserver:
        assert int(obs.histogram.sum()) == 2 * 48 + 48


@pytest.mark.parametrize("cls", OBSERVERS)
def test_zero_group_among_nonzero_groups(cls) -> None:
    x = torch.zeros(2, 6, 3)
    x[:, :2] = 5.0
    x[:, 4:] = -0.3
    obs = cls(FMT, group=2) if cls is MaxExponentObserver else cls(FMT, group=2, variant="paper")
    obs(x)
    assert obs.max_exponents().tolist() == [2, -(1 << 30), -2]
    if cls is MaxExponentObserver:
        assert obs.calculate_qparams().tolist() == [2, FMT.min_exponent, -2]
        assert obs.per_channel_lsb(6).tolist() == [-4, -4, -134, -134, -8, -8]
    else:
        # 5.0 is exact at every candidate (ties to ê_max); -0.3 is a constant whose fine
        # reference bin (width 2**-11) is hit only by the -0.2998 of candidate ê_max - 2
        assert obs.calculate_qparams().tolist() == [2, FMT.min_exponent, -4]
        assert obs.per_channel_lsb(6).tolist() == [-4, -4, -134, -134, -10, -10]


# ------------------------------------------------------------------------------- group shapes
@pytest.mark.parametrize("cls", OBSERVERS)
@pytest.mark.parametrize("shape, group, n_groups", [
    ((4, 10, 3, 3), -1, 1),
    ((4, 10, 3, 3), 4, 3),     # 4 + 4 + tail of 2
    ((4, 10, 3, 3), 10, 1),
    ((4, 10, 3, 3), 64, 1),    # group larger than C: one group
    ((5, 7), 2, 4),            # FC output [N, C]
    ((5, 7), -1, 1),
])
def test_group_shapes(cls, shape, group, n_groups) -> None:
    c = shape[1]
    x = torch.ones(shape)
    # channel c has magnitude 2**c so each group's exponent is its last channel's index
    x = x * (2.0 ** torch.arange(c, dtype=torch.float32)).reshape((1, c) + (1,) * (len(shape) - 2))
    obs = cls(FMT, group=group)
    obs(x)
    e = obs.calculate_qparams()
    assert e.dtype == torch.int64 and e.shape == (n_groups,)
    g = c if group == -1 else min(group, c)
    expected = [min(c, (i + 1) * g) - 1 for i in range(n_groups)]
    assert obs.max_exponents().tolist() == expected
    if cls is MaxExponentObserver:
        assert e.tolist() == expected
    lsb = obs.per_channel_lsb(c)
    assert lsb.shape == (c,)
    assert lsb.tolist() == [int(e[ch // g]) - 6 for ch in range(c)]
    with pytest.raises(ValueError):
        obs.per_channel_lsb(c + 1)
    with pytest.raises(ValueError):
        obs(torch.ones((2, c + 1) + tuple(shape[2:])))


# ------------------------------------------------------------------------------- guards
@pytest.mark.parametrize("cls", OBSERVERS)
def test_runtime_error_before_data(cls) -> None:
    obs = cls(FMT)
    with pytest.raises(RuntimeError, match="before any data"):
        obs.calculate_qparams()
    obs(torch.empty(0, 3))  # empty input records nothing
    with pytest.raises(RuntimeError):
        obs.lsb()


@pytest.mark.parametrize("cls", OBSERVERS)
def test_forward_is_identity_and_guards(cls) -> None:
    obs = cls(FMT)
    x = torch.randn(2, 3, requires_grad=True)
    y = obs(x)
    assert y is x
    with pytest.raises(ValueError):
        obs(torch.tensor([[1.0, math.inf, 0.0]]))
    with pytest.raises(ValueError):
        obs(torch.tensor([[1.0, math.nan, 0.0]]))
    with pytest.raises(ValueError):
        obs(torch.ones(3))
    with pytest.raises(TypeError):
        obs(torch.ones(2, 3, dtype=torch.int64))
    assert int(obs.num_seen) == 6  # rejected tensors left no trace


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        MaxExponentObserver(FMT, group=0)
    with pytest.raises(TypeError):
        MaxExponentObserver(FMT, group=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        KLExponentObserver(FMT, candidates=0)
    with pytest.raises(ValueError):
        KLExponentObserver(FMT, candidates=3, bins=1024)  # < 2**(8+3)
    with pytest.raises(ValueError):
        KLExponentObserver(FMT, candidates=3, bins=3000)  # not a power of two
    assert KLExponentObserver(FMT, candidates=3).bins == 2048


def test_make_observer() -> None:
    cfg = QuantConfig(method="max", activations=ActivationBlocking(4))
    obs = make_observer(cfg)
    assert type(obs) is MaxExponentObserver and obs.group == 4
    cfg = QuantConfig(method="kl", kl_candidates=2, fmt=BFPFormat(6, 4))
    obs = make_observer(cfg)
    assert type(obs) is KLExponentObserver
    assert obs.candidates == 2 and obs.group == -1 and obs.fmt == BFPFormat(6, 4)
    bad = QuantConfig()
    object.__setattr__(bad, "method", "mse")  # bypass QuantConfig's own validation
    with pytest.raises(ValueError, match="mse"):
        make_observer(bad)
    with pytest.raises(ValueError):
        dataclasses.replace(QuantConfig(), method="entropy")


@pytest.mark.parametrize("cls", OBSERVERS)
def test_state_dict_round_trip(cls) -> None:
    g = torch.Generator().manual_seed(3)
    obs = cls(FMT, group=3)
    for _ in range(3):
        obs(torch.randn(4, 8, 5, generator=g) * 3)
    fresh = cls(FMT, group=3)
    fresh.load_state_dict(obs.state_dict())
    assert torch.equal(fresh.calculate_qparams(), obs.calculate_qparams())
    fresh(torch.randn(1, 8, 5, generator=g))  # continues calibrating
    assert int(fresh.num_seen) == int(obs.num_seen) + 40


# ------------------------------------------------------------------------------- KL search
def _laplace(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).to(torch.float32)


def test_kl_laplacian_with_outliers_goes_below_max() -> None:
    x = _laplace(100_000, 0).reshape(100, 1000)
    x[0, :5] = torch.tensor([60.0, -50.0, 40.0, 33.0, -45.0])  # a few outliers set ê_max = 5
    obs = KLExponentObserver(FMT)
    obs(x)
    assert obs.max_exponents().tolist() == [5]
    e = obs.calculate_qparams().tolist()
    assert e[0] < 5
    kl = obs.divergences()[0]
    assert set(kl) == {5, 4, 3} and kl[e[0]] == min(kl.values())


def test_kl_uniform_keeps_max() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(50, 2000, generator=g) * 2 - 1) * 3.9
    obs = KLExponentObserver(FMT)
    obs(x)
    assert obs.calculate_qparams().tolist() == [1] == obs.max_exponents().tolist()
    kl = obs.divergences()[0]
    assert kl[1] < kl[0] < kl[-1]


def test_kl_constant_and_skip() -> None:
    # All values inside one quantization step: every candidate lands in the data's bin.
    obs = KLExponentObserver(FMT)
    obs(torch.full((4, 4), 3.0))
    assert obs.calculate_qparams().tolist() == [1]
    # Positive data far above the lower candidates' saturation: those candidates are skipped.
    obs = KLExponentObserver(FMT)
    obs(torch.linspace(200.0, 255.0, 1000).reshape(10, 100))
    assert obs.calculate_qparams().tolist() == [7]
    assert set(obs.divergences()[0]) == {7}  # 6 and 5 saturate below min = 200


def test_kl_exponent_out_of_range() -> None:
    fmt = BFPFormat(8, 4)
    obs = KLExponentObserver(fmt)
    obs(torch.tensor([[1000.0, -3.0]]))
    assert obs.calculate_qparams().tolist() == [7] and obs.divergences() == [{}]
    obs = KLExponentObserver(fmt)
    obs(torch.tensor([[1e-4, -3e-5]]))
    assert obs.calculate_qparams().tolist() == [-8]
    # ê_max = -7: only candidates -7 and -8 exist
    obs = KLExponentObserver(fmt)
    obs(torch.randn(10, 100, generator=torch.Generator().manual_seed(0)) * 2.0 ** -8)
    assert int(obs.max_exponents()) == -6 and set(obs.divergences()[0]) <= {-6, -7, -8}


def _brute_force_kl(x: np.ndarray, fmt: BFPFormat, candidates: int, k: int,
                    eps: float = 1e-4) -> dict[int, float]:
    """The documented search, computed directly on the stored values (not streaming)."""
    x = x.astype(np.float64).ravel()
    mn, mx = float(x.min()), float(x.max())
    a = math.frexp(max(-mn, mx))[1] - 1
    w_exp = a + 2 - k
    j = math.frexp((mx - mn) / 128)[1] - 1 if mx > mn else w_exp
    j = max(j, w_exp)
    while True:
        u = max(j, min(0, a + 1))
        lo = math.floor(math.ldexp(mn, -u)) * 2.0 ** u
        hi = math.ceil(math.ldexp(mx, -u)) * 2.0 ** u
        width = 2.0 ** j
        n = max(1, round((hi - lo) / width))
        if n <= 4096:
            break
        j += 1

    def hist(v: np.ndarray) -> np.ndarray:
        idx = np.floor((v - lo) / width).astype(np.int64)
        idx[v == lo + n * width] = n - 1
        idx = idx[(idx >= 0) & (idx < n)]
        return np.bincount(idx, minlength=n).astype(np.float64)

    def smooth(h: np.ndarray) -> np.ndarray | None:
        nz = h != 0
        if not nz.any():
            return None
        h = np.where(nz, h - eps * (~nz).sum() / nz.sum(), eps)
        return h / h.sum()

    p = smooth(hist(x))
    out = {}
    for e in range(a, a - candidates, -1):
        lsb = fmt.lsb(e)
        qv = quantize(torch.from_numpy(x), lsb, fmt).numpy().astype(np.float64) * 2.0 ** lsb
        if qv.max() < lo:
            continue
        q = smooth(hist(qv))
        if q is None:
            continue
        out[e] = float(np.sum(p * (np.log(p) - np.log(q))))
    return out


def _drop_ties(x: np.ndarray, fmt: BFPFormat, a: int, candidates: int) -> np.ndarray:
    """Remove values exactly on a half-LSB rounding tie of some candidate (the documented
    measure-zero approximation of the streaming histogram)."""
    keep = np.ones(x.shape, dtype=bool)
    for e in range(a, a - candidates, -1):
        s = np.ldexp(x.astype(np.float64), -fmt.lsb(e))
        keep &= (s - np.floor(s)) != 0.5
    return x[keep]


@pytest.mark.parametrize("seed, scale, shift", [
    (0, 1.0, 0.0), (1, 0.01, 0.0), (2, 37.0, 5.0), (3, 1.0, 2.5), (4, 3e-7, 1e-6),
])
def test_kl_matches_brute_force(seed, scale, shift) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (_laplace(20_000, seed) * scale + shift).numpy()
    x[:3] = np.float32(scale * 11.0)  # a few outliers
    a = math.frexp(float(np.abs(x).max()))[1] - 1
    x = _drop_ties(x, FMT, a, 3)
    obs = KLExponentObserver(FMT, variant="paper")
    perm = torch.randperm(x.size, generator=g)
    for chunk in torch.from_numpy(x)[perm].reshape(-1, 1).split(4096):
        obs(chunk)
    got = obs.divergences()[0]
    want = _brute_force_kl(x, FMT, 3, obs.log2_bins)
    assert set(got) == set(want)
    for e in want:
        assert got[e] == pytest.approx(want[e], rel=1e-9, abs=1e-12)
    best = min(want, key=lambda e: (want[e], -e))
    assert obs.calculate_qparams().tolist() == [best]


# --------------------------------------------------------------------- streaming == one-shot
def _batches(data, c):
    arrays, sizes = data
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.float32)
    out, start = [], 0
    for n in sizes:
        out.append(torch.from_numpy(flat[start:start + n * c * 2].copy()).reshape(n, c, 2))
        start += n * c * 2
    return out


_finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
_value = st.one_of(_finite32, st.floats(-4, 4, width=32), st.just(0.0))


@settings(max_examples=40, deadline=None)
@given(
    n_batches=st.integers(1, 4),
    data=st.data(),
    group=st.sampled_from([-1, 1, 2]),
    scales=st.lists(st.integers(-30, 30), min_size=4, max_size=4),
)
def test_streaming_equals_one_shot(n_batches, data, group, scales) -> None:
    c = 3
    batches = []
    for i in range(n_batches):
        n = data.draw(st.integers(1, 3))
        arr = data.draw(hnp.arrays(np.float32, (n, c, 2), elements=_value))
        with np.errstate(over="ignore"):
            batches.append(torch.from_numpy(np.ldexp(arr, scales[i]).astype(np.float32)))
    for b in batches:
        if not torch.isfinite(b).all():
            return
    whole = torch.cat(batches)
    for cls in OBSERVERS:
        streamed, once = cls(FMT, group=group), cls(FMT, group=group)
        for b in batches:
            streamed(b)
        once(whole)
        assert torch.equal(streamed.min_val, once.min_val)
        assert torch.equal(streamed.max_val, once.max_val)
        assert torch.equal(streamed.calculate_qparams(), once.calculate_qparams())
        if cls is KLExponentObserver:
            assert torch.equal(streamed.anchor, once.anchor)
            assert torch.equal(streamed.histogram, once.histogram)
            assert streamed.divergences() == once.divergences()
            assert int(streamed.histogram.sum()) == whole.numel()


def test_rebinning_keeps_counts_and_matches_direct() -> None:
    g = torch.Generator().manual_seed(5)
    small = torch.randn(16, 4, 8, generator=g) * 0.01
    big = torch.randn(16, 4, 8, generator=g) * 100.0
    obs = KLExponentObserver(FMT)
    obs(small)
    before = obs.histogram.clone()
    obs(big[:0])  # empty: nothing happens
    assert torch.equal(obs.histogram, before)
    obs._rebin(torch.tensor([3]))
    assert int(obs.histogram.sum()) == small.numel()
    # pairwise merging: new bin = sum of 8 old bins around the centre
    half = obs.bins // 2
    assert int(obs.histogram[0, half]) == int(before[0, half:half + 8].sum())
    assert int(obs.histogram[0, half - 1]) == int(before[0, half - 8:half].sum())

    streamed, once = KLExponentObserver(FMT), KLExponentObserver(FMT)
    streamed(small)
    streamed(big)
    once(torch.cat([small, big]))
    assert int(streamed.histogram.sum()) == small.numel() + big.numel()
    assert torch.equal(streamed.histogram, once.histogram)
    # a jump of more than log2(bins) exponents collapses everything onto the two centre bins
    obs = KLExponentObserver(FMT)
    obs(torch.tensor([[1e-6], [-1e-6], [0.0]]))
    obs(torch.tensor([[1e6]]))
    h = obs.histogram[0]
    assert int(h.sum()) == 4 and int(h[half - 1]) == 1 and int(h[half]) == 2


@pytest.mark.parametrize("cls", OBSERVERS)
def test_joint_calibration_is_concatenation(cls) -> None:
    g = torch.Generator().manual_seed(7)
    a = torch.randn(2, 6, 4, 4, generator=g)
    b = torch.randn(2, 6, 4, 4, generator=g) * 5
    joint, cat = cls(FMT), cls(FMT)
    joint(a)
    joint(b)
    cat(torch.cat([a, b]))
    assert torch.equal(joint.calculate_qparams(), cat.calculate_qparams())


def test_float64_path_matches_float32_path() -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 5, 6, generator=g) * 3
    a, b = KLExponentObserver(FMT, group=2), KLExponentObserver(FMT, group=2)
    a(x)
    b(x.double())  # float64 input takes the float64 path
    assert torch.equal(a.histogram, b.histogram)
    # large anchor (scale-down) with a tiny negative value: floor must stay -1, not -0
    obs = KLExponentObserver(FMT)
    obs(torch.tensor([[1e6], [-1e-30], [1e-30]]))
    half = obs.bins // 2
    assert int(obs.histogram[0, half - 1]) == 1 and int(obs.histogram[0, half]) == 1


# ------------------------------------------------------------------ level-expansion variant
def _expand_brute_force(x: np.ndarray, fmt: BFPFormat, candidates: int, eps: float = 1e-4
                        ) -> dict[int, float]:
    """Direct implementation of the documented level-expansion KL on a fine grid."""
    a = math.frexp(float(np.abs(x).max()))[1] - 1
    k = fmt.mantissa_bits + candidates
    w = 2.0 ** (a + 2 - k)
    t = np.floor(x.astype(np.float64) / w).astype(np.int64)
    out = {}
    for i in range(candidates):
        e = a - i
        lsb = 2.0 ** (e - fmt.mantissa_bits + 2)
        step = int(round(lsb / w))
        tt = np.arange(-(1 << (k - 1)), 1 << (k - 1))
        m = np.floor((2 * tt + 1 + step) / (2 * step)).astype(np.int64)
        inside = np.abs(m) <= fmt.max_mantissa
        lo_t, hi_t = tt[inside][0], tt[inside][-1]
        hist = np.bincount(t - tt[0], minlength=tt.size).astype(np.float64)
        hist[(tt == -1) | (tt == 0)] = 0.0  # values every candidate rounds to zero
        sl = hist[lo_t - tt[0]:hi_t - tt[0] + 1]
        p = sl.copy()
        p[0] += hist[:lo_t - tt[0]].sum()
        p[-1] += hist[hi_t - tt[0] + 1:].sum()
        lev = m[inside]
        q = np.zeros_like(p)
        for L in np.unique(lev):
            sel = lev == L
            nz = sel & (p != 0)
            if nz.any():
                q[nz] = sl[sel].sum() / nz.sum()

        def smooth(h):
            nz = h != 0
            h = np.where(nz, h - eps * (h.size - nz.sum()) / nz.sum(), eps)
            return h / h.sum()
        ps, qs = smooth(p), smooth(q)
        out[e] = float((ps * (np.log(ps) - np.log(qs))).sum())
    return out


@pytest.mark.parametrize("seed, scale", [(0, 1.0), (1, 0.05), (2, 30.0)])
@pytest.mark.parametrize("mbits", [4, 6, 8])
def test_kl_expand_matches_brute_force(seed, scale, mbits) -> None:
    fmt = BFPFormat(mbits, 8)
    x = (_laplace(20_000, seed) * scale).numpy()
    x[:3] = np.float32(scale * 11.0)
    obs = KLExponentObserver(fmt)  # variant "expand" is the default
    for chunk in torch.from_numpy(x).reshape(-1, 1).split(5000):
        obs(chunk)
    got = obs.divergences()[0]
    want = _expand_brute_force(x, fmt, 3)
    assert set(got) == set(want)
    for e in want:
        assert got[e] == pytest.approx(want[e], rel=1e-9, abs=1e-12)
    assert int(obs.calculate_qparams()[0]) == min(want, key=lambda e: (want[e], -e))


def test_kl_expand_known_answers() -> None:
    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(50_000, 1, generator=g) * 2 - 1
    obs = KLExponentObserver(BFPFormat(6, 8))
    obs(uniform)
    assert int(obs.calculate_qparams()[0]) == int(obs.max_exponents()[0])  # nothing to clip
    heavy = _laplace(50_000, 1).reshape(-1, 1)
    heavy[:5] = 60.0  # a handful of far outliers
    obs = KLExponentObserver(BFPFormat(6, 8))
    obs(heavy)
    assert int(obs.calculate_qparams()[0]) < int(obs.max_exponents()[0])


def test_kl_variant_is_validated() -> None:
    with pytest.raises(ValueError, match="variant"):
        KLExponentObserver(FMT, variant="tensorrt")
    assert make_observer(QuantConfig(method="kl-paper")).variant == "paper"
    assert make_observer(QuantConfig(method="kl")).variant == "expand"


def test_kl_expand_ignores_exact_zeros() -> None:
    x = _laplace(20_000, 3).reshape(-1, 1).abs()
    a, b = KLExponentObserver(BFPFormat(6, 8)), KLExponentObserver(BFPFormat(6, 8))
    a(x)
    b(torch.cat([x, torch.zeros(200_000, 1)]))  # a ReLU-style spike at zero
    assert a.divergences() == b.divergences()
