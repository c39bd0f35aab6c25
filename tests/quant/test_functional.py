"""Integer rules of docs/arithmetic.md: rounding, saturation, exponents, weight blocks."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dynacc.quant.formats import BFPFormat, QuantConfig, WeightBlocking
from dynacc.quant.functional import (
    dequantize, div_round_half_even, element_exponent, fake_quantize, quantize, quantize_bias,
    quantize_weight, requantize, saturate, shift_round_half_even, tensor_shared_exponent,
    weight_block_exponents,
)

F8 = BFPFormat(8, 8)


def ref_rhe_shift(v: int, s: int) -> int:
    """Reference with Python's exact rationals: round half to even of v / 2**s."""
    if s <= 0:
        return v << -s
    from fractions import Fraction
    return round(Fraction(v, 1 << s))  # Python's round() is half-to-even on Fractions


@given(st.integers(-(1 << 40), 1 << 40), st.integers(-8, 40))
@settings(max_examples=400, deadline=None)
def test_shift_round_half_even_matches_exact_rationals(v, s):
    assert int(shift_round_half_even(torch.tensor([v]), s)[0]) == ref_rhe_shift(v, s)


def test_shift_rounding_ties_go_to_even():
    v = torch.tensor([-7, -5, -3, -1, 1, 3, 5, 7]) * 4 + 0  # multiples of 4
    ties = torch.tensor([-6, -2, 2, 6, 10, -10])  # x.5 after shift by 2 -> odd/2
    assert shift_round_half_even(ties, 2).tolist() == [-2, 0, 0, 2, 2, -2]
    assert shift_round_half_even(v, 2).tolist() == [-7, -5, -3, -1, 1, 3, 5, 7]
    assert shift_round_half_even(torch.tensor([5, -5, 3, -3]), 1).tolist() == [2, -2, 2, -2]


def test_shift_broadcasts_per_channel():
    v = torch.tensor([[10, 10], [10, 10]])
    s = torch.tensor([[1], [-1]])
    assert shift_round_half_even(v, s).tolist() == [[5, 5], [20, 20]]


@given(st.integers(-(1 << 30), 1 << 30), st.integers(1, 1000))
@settings(max_examples=300, deadline=None)
def test_div_round_half_even(v, n):
    from fractions import Fraction
    assert int(div_round_half_even(torch.tensor([v]), n)[0]) == round(Fraction(v, n))


def test_div_rejects_nonpositive():
    with pytest.raises(ValueError, match="positive"):
        div_round_half_even(torch.tensor([1]), 0)


def test_saturation_is_symmetric_and_never_min_code():
    m = torch.tensor([-1000, -128, -127, 0, 127, 128, 1000])
    assert saturate(m, F8).tolist() == [-127, -127, -127, 0, 127, 127, 127]
    assert requantize(torch.tensor([255, -255, 253]), 1, F8).tolist() == [127, -127, 126]


@pytest.mark.parametrize("m", [2, 4, 5, 8, 12])
def test_format_bounds(m):
    f = BFPFormat(m, 4)
    assert f.max_mantissa == 2 ** (m - 1) - 1
    assert (f.min_exponent, f.max_exponent) == (-8, 7)


def test_format_validation_names_field():
    with pytest.raises(ValueError, match="mantissa_bits"):
        BFPFormat(1, 8)
    with pytest.raises(TypeError, match="exponent_bits"):
        BFPFormat(8, 2.5)
    with pytest.raises(ValueError, match="method"):
        QuantConfig(method="mse")
    with pytest.raises(ValueError, match="unknown quantization config"):
        QuantConfig.from_dict({"mantisa_bits": 8})


def test_element_exponent_uses_exponent_field_not_log2():
    below = np.nextafter(np.float32(1024.0), np.float32(0))  # 1023.99994
    x = torch.tensor([below, 1024.0, 1.0, 0.75, -3.0, 2.0 ** -20], dtype=torch.float32)
    assert element_exponent(x).tolist() == [9, 10, 0, -1, 1, -20]
    # float log2 gets the first one wrong in float32, the pitfall the rule avoids
    assert math.floor(float(torch.log2(torch.tensor(below)))) == 10


def test_element_exponent_just_below_powers_of_two():
    for k in range(-30, 30):
        p = torch.tensor([2.0 ** k], dtype=torch.float64)
        below = torch.nextafter(p, torch.zeros_like(p))
        assert int(element_exponent(below)[0]) == k - 1
        assert int(element_exponent(p)[0]) == k


def test_zero_tensor_takes_min_exponent():
    assert tensor_shared_exponent(torch.zeros(5), F8) == F8.min_exponent
    assert tensor_shared_exponent(torch.tensor([1e300], dtype=torch.float64), F8) == F8.max_exponent


def test_quantize_round_trip_and_ties():
    lsb = -6
    x = torch.tensor([0.5 / 64, 1.5 / 64, 2.5 / 64, -0.5 / 64, -1.5 / 64, 1.9999])
    m = quantize(x, lsb, F8)
    assert m.tolist() == [0, 2, 2, 0, -2, 127]  # ties to even, saturation at 127
    assert torch.equal(dequantize(m, lsb), m.to(torch.float32) / 64)


def test_fake_quantize_straight_through_gradient():
    x = torch.tensor([0.3, -0.7], requires_grad=True)
    y = fake_quantize(x, -3, F8)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(2))
    assert y.tolist() == [0.25, -0.75]  # 2.4 -> 2, -5.6 -> -6 on LSB 1/8


def test_weight_blocks_geometry_and_tail_block():
    w = torch.zeros(2, 70, 3, 3)
    w[0, :64] = 0.9      # block 0: exponent -1
    w[0, 64:] = 3.0      # tail block (6 channels): exponent 1
    w[1, :] = 0.0        # all-zero filter
    w[1, 0, 0, 0] = 0.0
    blk = weight_block_exponents(w, F8, WeightBlocking(group=64, align_span=15))
    assert blk.shape == (2, 2)
    assert blk[0].tolist() == [-1, 1]
    assert blk[1].tolist() == [1, 1]  # all-zero filter takes the layer max
    m, blk2, lsb = quantize_weight(w, F8, WeightBlocking(group=64))
    assert lsb.shape == (2, 70)
    assert lsb[0, 0] == -1 - 6 and lsb[0, 69] == 1 - 6
    assert (m[1] == 0).all()
    assert m[0, 0, 0, 0] == round(0.9 * 2 ** 7) and m[0, 64, 0, 0] == round(3.0 * 2 ** 5)


def test_weight_zero_block_and_align_span():
    w = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    w[0, 0] = 100.0      # exponent 6
    w[0, 1] = 2.0 ** -20  # far below: raised to 6 - span
    blk = weight_block_exponents(w, F8, WeightBlocking(group=1, align_span=4))
    assert blk[0].tolist() == [6, 2, 2]  # zero block raised too
    m, _, _ = quantize_weight(w, F8, WeightBlocking(group=1, align_span=4))
    assert m[0, :, 0, 0].tolist() == [100, 0, 0]


def test_weight_exponent_clamp_small_e():
    f4 = BFPFormat(8, 4)
    w = torch.tensor([[1000.0, 1e-6]]).reshape(2, 1, 1, 1)
    blk = weight_block_exponents(w, f4, WeightBlocking(group=-1))
    assert blk[:, 0].tolist() == [7, -8]
    m, _, _ = quantize_weight(w, f4, WeightBlocking(group=-1))
    assert m.flatten().tolist() == [127, 0]  # saturated / underflow to zero


@given(st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=1, max_size=40))
@settings(max_examples=200, deadline=None)
def test_weight_quant_error_bounded_by_half_lsb_or_saturation(vals):
    w = torch.tensor(vals, dtype=torch.float64).reshape(1, -1, 1, 1)
    m, blk, lsb = quantize_weight(w, F8, WeightBlocking(group=-1))
    err = (dequantize(m, lsb.reshape(1, -1, 1, 1)).double() - w).abs()
    step = 2.0 ** float(lsb[0, 0])
    # max element maps to [64, 128): rounding can reach 128 -> saturates to 127
    assert float(err.max()) <= step / 2 + step + 1e-12
    assert int(m.abs().max()) <= 127


def test_bias_on_accumulator_lsb():
    b = torch.tensor([1.0, -0.375, 2.0 ** 40], dtype=torch.float64)
    acc_lsb = torch.tensor([-4, -2, -20])
    q = quantize_bias(b, acc_lsb, acc_bits=32)
    assert q.tolist() == [16, -2, 2 ** 31 - 1]  # -1.5 -> -2 (tie to even); saturation


def test_requantize_extreme_shifts_do_not_wrap():
    assert requantize(torch.tensor([(1 << 47) - 1, -(1 << 47), 3]), 127, F8).tolist() == [0, 0, 0]
    assert requantize(torch.tensor([-(1 << 47), 1, 0]), -128, F8).tolist() == [-127, 127, 0]
    assert requantize(torch.tensor([1 << 60]), 62, F8).tolist() == [0]  # 2**60 / 2**62 = 0.25
