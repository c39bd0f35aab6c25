"""Aligner (rule A2): exact left shift by every d in [0, align_span]."""

from __future__ import annotations

import gc
import random
import warnings

import pytest

from dynacc.hw.aligner import Aligner


@pytest.mark.parametrize("w, span, stages", [(20, 15, 1), (20, 15, 2), (9, 7, 2), (12, 1, 2),
                                             (12, 0, 1), (12, 0, 2), (16, 31, 2)])
def test_every_shift(pipeline, w, span, stages):
    rng = random.Random(1)
    dut = Aligner(in_width=w, max_shift=span, stages=stages)
    assert dut.latency == stages
    lo, hi = -(1 << (w - 1)), (1 << (w - 1)) - 1
    cases = [(v, d) for d in range(span + 1) for v in (lo, hi, 0, 1, -1, rng.randint(lo, hi))]
    out = pipeline(dut, [{"i": v, "d": d} for v, d in cases], ["o"], dut.latency)
    for (v, d), r in zip(cases, out):
        assert r["o"] == v << d, (v, d)


def test_bad_stages():
    # the half-built component would warn "created but never used" when collected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="stages"):
            Aligner(in_width=8, max_shift=3, stages=3)
        gc.collect()
