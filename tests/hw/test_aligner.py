"""Aligner (rule A2): exact left shift by every d in [0, align_span]."""

from __future__ import annotations

import random

from dynacc.hw.aligner import Aligner


def test_every_shift(pipeline):
    rng = random.Random(1)
    w, span = 20, 15
    dut = Aligner(in_width=w, max_shift=span)
    lo, hi = -(1 << (w - 1)), (1 << (w - 1)) - 1
    cases = [(v, d) for d in range(span + 1) for v in (lo, hi, 0, 1, -1, rng.randint(lo, hi))]
    out = pipeline(dut, [{"i": v, "d": d} for v, d in cases], ["o"], dut.latency)
    for (v, d), r in zip(cases, out):
        assert r["o"] == v << d, (v, d)
