"""MacTree: the exact K-term dot product, for several lane counts and tree stagings."""

from __future__ import annotations

import gc
import random
import warnings

import pytest

from dynacc.hw.mac_tree import MacTree, mac_tree_latency


@pytest.mark.parametrize("lanes, mbits, lps", [(16, 8, 2), (5, 6, 1), (1, 8, 2), (8, 4, 3)])
def test_dot_product(pipeline, lanes, mbits, lps):
    rng = random.Random(lanes * 100 + mbits)
    dut = MacTree(lanes, mantissa_bits=mbits, levels_per_stage=lps)
    m = (1 << (mbits - 1)) - 1
    vecs = [([m] * lanes, [m] * lanes), ([-m] * lanes, [m] * lanes), ([0] * lanes, [m] * lanes)]
    vecs += [([rng.randint(-m, m) for _ in range(lanes)], [rng.randint(-m, m) for _ in range(lanes)])
             for _ in range(300)]
    out = pipeline(dut, [{"x": x, "w": w} for x, w in vecs], ["o"], dut.latency)
    for (x, w), r in zip(vecs, out):
        assert r["o"] == sum(a * b for a, b in zip(x, w)), (x, w)


@pytest.mark.parametrize("lanes, mbits, lps, split", [(16, 8, 2, True), (4, 8, 2, False),
                                                      (5, 7, 1, True), (3, 2, 1, True)])
def test_two_stage_products(pipeline, lanes, mbits, lps, split):
    """product_stages=2, split (two half-width products) or not: same exact sums, full range
    including the most negative mantissa."""
    rng = random.Random(lanes * 7 + mbits)
    dut = MacTree(lanes, mantissa_bits=mbits, levels_per_stage=lps, product_stages=2, split=split)
    lo, hi = -(1 << (mbits - 1)), (1 << (mbits - 1)) - 1
    vecs = [([lo] * lanes, [lo] * lanes), ([hi] * lanes, [lo] * lanes), ([lo] * lanes, [hi] * lanes)]
    vecs += [([rng.randint(lo, hi) for _ in range(lanes)], [rng.randint(lo, hi) for _ in range(lanes)])
             for _ in range(300)]
    out = pipeline(dut, [{"x": x, "w": w} for x, w in vecs], ["o"], dut.latency)
    assert dut.latency == mac_tree_latency(lanes, lps, 2)
    for (x, w), r in zip(vecs, out):
        assert r["o"] == sum(a * b for a, b in zip(x, w)), (x, w)


def test_latency_formula():
    assert mac_tree_latency(16, 2) == 4
    assert mac_tree_latency(16, 1) == 6
    assert mac_tree_latency(1, 2) == 2
    assert mac_tree_latency(16, 2, 2) == 5


def test_bad_params():
    # the half-built components would warn "created but never used" when collected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="lanes must be in"):
            MacTree(0, mantissa_bits=8)
        with pytest.raises(TypeError, match="mantissa_bits must be an integer, not '8'"):
            MacTree(4, mantissa_bits="8")
        gc.collect()
