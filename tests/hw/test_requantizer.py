"""Requantizer vs functional.requantize (rule R3): exhaustive at small widths, seeded random
and hypothesis at the engine's widths."""

from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynacc.hw.requantizer import Requantizer
from dynacc.quant.formats import BFPFormat
from dynacc.quant.functional import requantize


def _golden(vals, shifts, fmt):
    v = torch.tensor(vals, dtype=torch.int64)
    s = torch.tensor(shifts, dtype=torch.int64)
    return requantize(v, s, fmt).tolist()


def _golden_defined(v: int, s: int) -> bool:
    """functional.shift_round_half_even works in int64: right shifts up to 63, left shifts
    only while ``v << -s`` fits (beyond that it wraps instead of saturating; reported)."""
    return s <= 63 and (s > 0 or abs(v) << -s < (1 << 63))


def _check(pipeline, fmt, in_width, shift_bits, pairs):
    pairs = [(v, s) for v, s in pairs if _golden_defined(v, s)]
    dut = Requantizer(fmt, in_width=in_width, shift_bits=shift_bits)
    out = pipeline(dut, [{"i": v, "shift": s} for v, s in pairs], ["o"], dut.latency)
    got = [r["o"] for r in out]
    exp = _golden([v for v, _ in pairs], [s for _, s in pairs], fmt)
    bad = [(p, g, e) for p, g, e in zip(pairs, got, exp) if g != e]
    assert not bad, f"{len(bad)} mismatches, first (value, shift), rtl, golden: {bad[0]}"


def test_exhaustive_small(pipeline):
    fmt = BFPFormat(4)
    w, sb = 7, 4   # every 7-bit value × every shift in [-8, 7] (right shifts beyond the width)
    pairs = [(v, s) for s in range(-(1 << (sb - 1)), 1 << (sb - 1))
             for v in range(-(1 << (w - 1)), 1 << (w - 1))]
    _check(pipeline, fmt, w, sb, pairs)


def test_ties_and_extremes_acc_width(pipeline):
    fmt = BFPFormat(8)
    w, sb = 48, 8
    lo, hi = -(1 << (w - 1)), (1 << (w - 1)) - 1
    pairs = []
    for s in range(1, 50):
        half = 1 << (s - 1)
        for q in (-3, -2, -1, 0, 1, 2, 3, 126, 127, -127, -128):
            base = q << s
            for v in (base + half, base - half, base + half + 1, base + half - 1):
                if lo <= v <= hi:
                    pairs.append((v, s))
    pairs += [(v, s) for v in (lo, hi, 0, 1, -1)
              for s in (-128, -15, -8, -7, -1, 0, 1, 46, 47, 48, 63, 127)]
    _check(pipeline, fmt, w, sb, pairs)


def test_random_engine_widths(pipeline):
    rng = random.Random(0)
    fmt = BFPFormat(8)
    w, sb = 48, 8
    pairs = []
    for _ in range(3000):
        bits = rng.randrange(1, w)
        v = rng.randrange(-(1 << (bits - 1)), 1 << (bits - 1))
        pairs.append((v, rng.randrange(-12, 40)))
    _check(pipeline, fmt, w, sb, pairs)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 10), w=st.integers(2, 24), sb=st.integers(2, 7),
       data=st.data())
def test_hypothesis_widths(pipeline, m, w, sb, data):
    """Any mantissa / input / shift widths: 40 random (value, shift) pairs each."""
    fmt = BFPFormat(m)
    vals = st.integers(-(1 << (w - 1)), (1 << (w - 1)) - 1)
    shifts = st.integers(-(1 << (sb - 1)), (1 << (sb - 1)) - 1)
    pairs = data.draw(st.lists(st.tuples(vals, shifts), min_size=1, max_size=40))
    _check(pipeline, fmt, w, sb, pairs)
