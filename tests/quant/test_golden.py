"""The integer golden ops against independent references (exact rationals / float64)."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from dynacc.quant import golden
from dynacc.quant.formats import BFPFormat
from dynacc.quant.functional import requantize

F8 = BFPFormat(8, 8)


def _rand_conv(seed, c=6, o=4, k=3, groups=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, (2, c, 7, 7), generator=g)
    w = torch.randint(-127, 128, (o, c // groups, k, k), generator=g)
    w_lsb = torch.randint(-12, -6, (o, c // groups), generator=g)
    bias = torch.randint(-5000, 5000, (o,), generator=g)
    return x, w, w_lsb, bias


def _reference_acc(x, x_lsb, w, w_lsb, bias, stride, padding, groups):
    """Value of the accumulator in units of acc_lsb, via exact rationals of the dequantized conv."""
    acc_lsb, _ = golden.conv_alignment(x_lsb, w_lsb, groups)
    xf = x.double() * 2.0 ** x_lsb
    wf = w.double() * torch.pow(2.0, w_lsb.double())[:, :, None, None]
    y = F.conv2d(xf, wf, None, stride, padding, 1, groups)  # exact: small integers * 2^k
    y = y / torch.pow(2.0, acc_lsb.double())[None, :, None, None]
    assert torch.equal(y, torch.round(y)), "reference must be an integer"
    return y.to(torch.int64) + bias[None, :, None, None], acc_lsb


@pytest.mark.parametrize("seed,stride,padding,groups", [(0, 1, 1, 1), (1, 2, 1, 1), (2, 1, 0, 2),
                                                        (3, 2, 3, 3)])
def test_conv_acc_matches_dequantized_float_reference(seed, stride, padding, groups):
    x, w, w_lsb, bias = _rand_conv(seed, c=6, o=6, groups=groups)
    acc, acc_lsb = golden.conv2d_acc(x, -3, w, w_lsb, bias, stride, padding, groups)
    ref, ref_lsb = _reference_acc(x, -3, w, w_lsb, bias, stride, padding, groups)
    assert torch.equal(acc_lsb, ref_lsb)
    assert torch.equal(acc, ref)


def test_alignment_shifts_are_relative_to_min():
    w_lsb = torch.tensor([[-10, -8, -10], [-5, -5, -5]])
    acc_lsb, shift = golden.conv_alignment(torch.tensor([-2, -2, -4]), w_lsb)
    assert acc_lsb.tolist() == [-14, -9]
    assert shift.tolist() == [[2, 4, 0], [2, 2, 0]]


def test_conv_requantize_matches_exact_rounding():
    x, w, w_lsb, bias = _rand_conv(5)
    out = golden.conv2d(x, -3, w, w_lsb, bias, -2, F8, 1, 1)
    acc, acc_lsb = golden.conv2d_acc(x, -3, w, w_lsb, bias, 1, 1)
    for o in range(w.shape[0]):
        s = -2 - int(acc_lsb[o])
        for v, q in zip(acc[:, o].flatten().tolist()[:50], out[:, o].flatten().tolist()[:50]):
            exact = round(Fraction(v, 2 ** s)) if s > 0 else v << -s
            assert q == max(-127, min(127, exact))


def test_worst_case_accumulation_is_exact_beyond_float53():
    # all inputs and weights at +-max, large shifts: the bound exceeds 2**53, int64 path used
    c, k = 512, 3
    x = torch.full((1, c, 3, 3), 127)
    w = torch.full((2, c, k, k), -127)
    w_lsb = torch.zeros(2, c, dtype=torch.int64)
    w_lsb[:, ::2] = 30  # shift 30 on half of the channels
    bias = torch.tensor([0, 1])
    acc, acc_lsb = golden.conv2d_acc(x, 0, w, w_lsb, bias, 1, 0)
    expected = -127 * 127 * k * k * (c // 2) * (2 ** 30 + 1)
    assert -expected > 2 ** 53
    assert acc.flatten().tolist() == [expected, expected + 1]
    bound = golden.accumulator_bound(w, golden.conv_alignment(0, w_lsb)[1], bias, 127)
    assert bound.tolist() == [-expected, -expected + 1]


def test_relu6_clamps_on_output_lsb():
    m = torch.tensor([-5, 3, 100, 127])
    assert golden.apply_activation(m, "relu6", 96).tolist() == [0, 3, 96, 96]
    assert golden.apply_activation(m, "relu").tolist() == [0, 3, 100, 127]
    with pytest.raises(ValueError, match="unknown activation"):
        golden.apply_activation(m, "gelu")


def test_add_joint_exponent_no_alignment_and_carry():
    a = torch.tensor([[100, -100, 127, 1]])
    b = torch.tensor([[100, -27, 127, 1]])
    # same exponent, output one LSB coarser: (a+b)/2 rounded half even, then relu
    y = golden.add(a, -4, b, -4, -4, -3, F8, "relu")
    assert y.tolist() == [[100, 0, 127, 1]]
    # operand on another exponent is requantized onto the joint one first
    y2 = golden.add(a, -4, b, -5, -4, -4, F8)
    assert y2.tolist() == [[127, -114, 127, 1]]  # b/2: 50, -14 (tie -13.5), 64 (tie 63.5), 0 (tie 0.5)


def test_concat_realigns_each_branch():
    a = torch.tensor([[[[10]]]])
    b = torch.tensor([[[[10]]]])
    y = golden.concat([a, b], [-3, -5], -4, F8)
    assert y.flatten().tolist() == [20, 5]


def test_max_pool_padding_never_wins():
    x = -torch.ones(1, 1, 2, 2, dtype=torch.int64) * 5
    assert golden.max_pool2d(x, 3, 2, 1).flatten().tolist() == [-5]


def test_global_avg_pool_rounds_half_even():
    x = torch.tensor([1, 2, 2, 2, 3, 4, 2, 0, 2]).reshape(1, 1, 3, 3)  # sum 18 / 9 = 2
    assert golden.global_avg_pool(x).tolist() == [[2]]
    x = torch.tensor([1, 2, 0, 2]).reshape(1, 1, 2, 2)  # 5/4 = 1.25 -> 1
    y = torch.tensor([3, 3, 0, 4]).reshape(1, 1, 2, 2)  # 10/4 = 2.5 -> 2
    assert golden.global_avg_pool(torch.cat([x, y], 1)).tolist() == [[1, 2]]


def test_linear_raw_accumulator_output():
    x = torch.tensor([[1, 2, 3]])
    w = torch.tensor([[1, 1, 1], [2, 0, -1]])
    y, lsb = golden.linear(x, -2, w, torch.full((2, 3), -3), torch.tensor([1, 0]), None, F8)
    assert y.tolist() == [[7, -1]] and lsb.tolist() == [-5, -5]
    y, lsb = golden.linear(x, -2, w, torch.full((2, 3), -3), torch.tensor([1, 0]), -4, F8)
    assert y.tolist() == [[4, 0]]  # 7/2 = 3.5 -> 4, -1/2 = -0.5 -> 0 (ties to even)


def test_accumulator_beyond_int64_is_refused_not_wrapped():
    x = torch.full((1, 64, 1, 1), 127)
    w = torch.full((1, 64, 1, 1), 127)
    w_lsb = torch.zeros(1, 64, dtype=torch.int64)
    w_lsb[0, 0] = 60
    with pytest.raises(OverflowError, match="accumulator"):
        golden.conv2d_acc(x, 0, w, w_lsb)
