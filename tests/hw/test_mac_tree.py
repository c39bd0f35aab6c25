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


@pytest.mark.parametrize("lanes, mbits, lps, stages, split", [
    (16, 8, 2, 4, True), (16, 8, 1, 4, True), (4, 8, 2, 4, False), (4, 8, 1, 3, False),
    (3, 8, 1, 2, False), (5, 7, 1, 4, True), (3, 2, 1, 4, True), (2, 5, 1, 4, True), (2, 16, 1, 4, True)])
def test_multi_stage_products(pipeline, lanes, mbits, lps, stages, split):
    """product_stages > 1, split (Booth LUT multipliers, odd and even M) or not: same exact
    sums, full range including the most negative mantissa."""
    rng = random.Random(lanes * 7 + mbits)
    dut = MacTree(lanes, mantissa_bits=mbits, levels_per_stage=lps, product_stages=stages,
                  split=split)
    lo, hi = -(1 << (mbits - 1)), (1 << (mbits - 1)) - 1
    vecs = [([lo] * lanes, [lo] * lanes), ([hi] * lanes, [lo] * lanes), ([lo] * lanes, [hi] * lanes)]
    # every weight value against extreme and random activations: all Booth digit patterns
    vecs += [([rng.choice([lo, hi, -1, 1, 0]) for _ in range(lanes)],
              [max(lo, min(hi, v + k)) for k in range(lanes)])
             for v in range(lo, hi + 1, max(1, (hi - lo) // 256))]
    vecs += [([rng.randint(lo, hi) for _ in range(lanes)], [rng.randint(lo, hi) for _ in range(lanes)])
             for _ in range(300)]
    out = pipeline(dut, [{"x": x, "w": w} for x, w in vecs], ["o"], dut.latency)
    assert dut.latency == mac_tree_latency(lanes, lps, stages)
    for (x, w), r in zip(vecs, out):
        assert r["o"] == sum(a * b for a, b in zip(x, w)), (x, w)


def test_dsp_products_register_their_operands_twice():
    """A DSP product with product_stages >= 2 has a second operand register right before the
    multiplier (the block's input registers), fed by the per-tree copy x_op: the shared word
    reaches the blocks in two register hops. With one stage the copy feeds the multiplier."""
    from amaranth.back import rtlil

    text = rtlil.convert(MacTree(2, mantissa_bits=8, levels_per_stage=1, product_stages=4))
    assert "mul0_x" in text and "mul1_w" in text and "x_op" in text
    text = rtlil.convert(MacTree(2, mantissa_bits=8, levels_per_stage=1, product_stages=1))
    assert "mul0_x" not in text


def test_latency_formula():
    assert mac_tree_latency(16, 2) == 4
    assert mac_tree_latency(16, 1) == 6
    assert mac_tree_latency(1, 2) == 2
    assert mac_tree_latency(16, 2, 2) == 5
    assert mac_tree_latency(16, 1, 4) == 9


def test_bad_params():
    # the half-built components would warn "created but never used" when collected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="lanes must be in"):
            MacTree(0, mantissa_bits=8)
        with pytest.raises(TypeError, match="mantissa_bits must be an integer, not '8'"):
            MacTree(4, mantissa_bits="8")
        with pytest.raises(ValueError, match="need product_stages=4"):
            MacTree(4, mantissa_bits=8, product_stages=3, split=True)
        gc.collect()
