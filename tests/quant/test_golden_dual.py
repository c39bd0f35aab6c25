"""Rules G0-G4: the dual-precision conv (Precision Gating, DFS precisions) in integers."""

import pytest
import torch

from dynacc.quant import golden


def _layer(seed: int, c: int = 5, o: int = 4, b: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 1 << b, (2, c, 6, 6), generator=g)
    w = torch.randint(-255, 256, (o, c, 3, 3), generator=g)
    w_lsb = torch.randint(-3, 1, (o, c), generator=g)   # exercises the alignment shifts
    bias = torch.randint(-1000, 1000, (o,), generator=g)
    return x, w, w_lsb, bias


def _ref(x, w, w_lsb, bias, b, hb, passed_fn):
    """Straight from the rules, one output element at a time."""
    lsb = b - hb
    acc_lsb, shift = golden.conv_alignment(0, w_lsb)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    n, c, h, wd = x.shape
    out = torch.zeros(n, w.shape[0], h, wd, dtype=torch.int64)
    for i in range(n):
        for o in range(w.shape[0]):
            for y in range(h):
                for z in range(wd):
                    hi = lo = 0
                    for ch in range(c):
                        for ky in range(3):
                            for kx in range(3):
                                v = int(xp[i, ch, y + ky, z + kx])
                                p = int(w[o, ch, ky, kx]) << int(shift[o, ch])
                                hi += (v >> lsb) * p
                                lo += (v & ((1 << lsb) - 1)) * p
                    hb_acc = hi << lsb
                    out[i, o, y, z] = hb_acc + (lo if passed_fn(o, hb_acc) else 0) + int(bias[o])
    return out


@pytest.mark.parametrize("b,hb", [(3, 2), (4, 2), (8, 4), (8, 1)])
def test_gated_conv_matches_elementwise_rules(b, hb):
    x, w, w_lsb, bias = _layer(b * 10 + hb, b=b)
    thr = torch.tensor([0, 500, -700, 1 << 20])
    sign = torch.tensor([1, -1, 1, -1])
    acc, passed, _ = golden.dual_precision_conv2d(x, 0, w, w_lsb, bias, act_bits=b, msb_bits=hb,
                                                  threshold=thr, sign=sign, padding=1)
    ref = _ref(x, w, w_lsb, bias, b, hb, lambda o, v: int(sign[o]) * v > int(thr[o]))
    assert torch.equal(acc, ref)
    assert 0 < int(passed.sum()) < passed.numel()


def test_full_mode_is_the_plain_conv_and_msb_mode_truncates():
    x, w, w_lsb, bias = _layer(3, b=8)
    full, p_full, _ = golden.dual_precision_conv2d(x, 0, w, w_lsb, bias, act_bits=8, msb_bits=4,
                                                   mode="full", padding=1)
    plain, _ = golden.conv2d_acc(x, 0, w, w_lsb, bias, 1, 1)
    assert torch.equal(full, plain) and bool(p_full.all())
    msb, p_msb, _ = golden.dual_precision_conv2d(x, 0, w, w_lsb, bias, act_bits=8, msb_bits=4,
                                                 mode="msb", padding=1)
    trunc, _ = golden.conv2d_acc((x >> 4) << 4, 0, w, w_lsb, bias, 1, 1)
    assert torch.equal(msb, trunc) and not bool(p_msb.any())


def test_threshold_hit_exactly_does_not_pass():
    x, w, w_lsb, _ = _layer(5, b=4)
    acc, _, _ = golden.dual_precision_conv2d(x, 0, w, w_lsb, None, act_bits=4, msb_bits=2,
                                             mode="msb", padding=1)
    v = int(acc[0, 1, 2, 3])                      # = acc_hb << L of that output
    thr = torch.tensor([1 << 40, v, 1 << 40, 1 << 40])
    _, passed, _ = golden.dual_precision_conv2d(x, 0, w, w_lsb, None, act_bits=4, msb_bits=2,
                                                threshold=thr, padding=1)
    assert not bool(passed[0, 1, 2, 3])
    _, passed, _ = golden.dual_precision_conv2d(x, 0, w, w_lsb, None, act_bits=4, msb_bits=2,
                                                threshold=thr - 1, padding=1)
    assert bool(passed[0, 1, 2, 3])
    # sign -1 flips the direction: -v > -v - 1 passes, -v > -v does not
    sgn = -torch.ones(4, dtype=torch.int64)
    _, passed, _ = golden.dual_precision_conv2d(x, 0, w, w_lsb, None, act_bits=4, msb_bits=2,
                                                threshold=-thr - 1, sign=sgn, padding=1)
    assert bool(passed[0, 1, 2, 3])
    _, passed, _ = golden.dual_precision_conv2d(x, 0, w, w_lsb, None, act_bits=4, msb_bits=2,
                                                threshold=-thr, sign=sgn, padding=1)
    assert not bool(passed[0, 1, 2, 3])


def test_worst_case_accumulation_is_exact():
    b = 8
    x = torch.full((1, 64, 3, 3), (1 << b) - 1)
    w = torch.full((2, 64, 3, 3), 255)
    w[1] = -255
    w_lsb = torch.zeros(2, 64, dtype=torch.int64)
    acc, passed, _ = golden.dual_precision_conv2d(x, 0, w, w_lsb, None, act_bits=b, msb_bits=4,
                                                  mode="full")
    assert int(acc[0, 0, 0, 0]) == 255 * 255 * 64 * 9
    assert int(acc[0, 1, 0, 0]) == -255 * 255 * 64 * 9


def test_zero_input_gives_bias_and_nothing_passes_a_zero_threshold():
    _, w, w_lsb, bias = _layer(7)
    x = torch.zeros(1, 5, 4, 4, dtype=torch.int64)
    acc, passed, _ = golden.dual_precision_conv2d(x, 0, w, w_lsb, bias, act_bits=4, msb_bits=2,
                                                  threshold=torch.zeros(4), padding=1)
    assert torch.equal(acc, bias[None, :, None, None].expand_as(acc))
    assert not bool(passed.any())


@pytest.mark.parametrize("kwargs,msg", [
    (dict(act_bits=3, msb_bits=3), "msb_bits"),
    (dict(act_bits=3, msb_bits=0), "msb_bits"),
    (dict(act_bits=2, msb_bits=1), "outside"),
    (dict(act_bits=3, msb_bits=1, mode="half"), "mode"),
    (dict(act_bits=3, msb_bits=1), "threshold"),
])
def test_bad_arguments_are_named(kwargs, msg):
    x, w, w_lsb, _ = _layer(1, b=3)
    with pytest.raises(ValueError, match=msg):
        golden.dual_precision_conv2d(x, 0, w, w_lsb, None, padding=1, **kwargs)


def test_split_is_exact_below_powers_of_two():
    x = torch.tensor([0, 1, 3, 4, 7, 8, 15, 127, 128, 255])
    hb, lb = golden.split_msb_lsb(x, 8, 5)
    assert torch.equal((hb << 3) + lb, x)
    assert hb.tolist() == [0, 0, 0, 0, 0, 1, 1, 15, 16, 31]
