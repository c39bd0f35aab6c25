"""Predictive layer fusion: quantizer, TWN, pruning, masks, integer predictor, fused algebra."""

import math

import pytest
import torch

from dynacc.quant.formats import BFPFormat
from dynacc.quant.fusion import (PredictedUnit, dw3x3, make_predicted, q4_levels, ternarize)
from dynacc.quant.fusion_golden import (accumulator_bounds, block_counts, fold_predicted_unit,
                                        fused_acc, fused_block, level_thresholds, mask_threshold,
                                        predictor_masks, q4_from_mantissa, unfused_acc)
from dynacc.quant.models.fusionet import (FusionUnit, channel_shuffle, fusionet_digits,
                                          mbv2_fusion_digits, shuffle_permutation)
from dynacc.quant.prune import (Pruner, cubic_sparsity, magnitude_mask, prunable_layers,
                                train_pruned)

F8 = BFPFormat(8, 8)


# ----------------------------------------------------------------------------- quantizer
def test_q4_levels_and_half_up_ties():
    x = torch.tensor([0.0, 0.8, 5.6, 5.99, 100.0, -6.4, -100.0, 2.0, -2.0, 0.4, -0.4, 1.2])
    q = q4_levels(x)
    # 2.0/0.8 = 2.5 -> 3 (half up); -2.5 -> -2; saturate to [-8, 7]
    assert q.tolist()[:9] == [0, 1, 7, 7, 7, -8, -8, 3, -2]
    levels = torch.unique(q4_levels(torch.linspace(-10, 10, 2001)))
    assert levels.tolist() == list(range(-8, 8))
    assert torch.allclose(levels * 0.8, torch.arange(-8, 8, dtype=torch.float64) * 0.8)


def test_q4_from_mantissa_matches_float_quantizer():
    m = torch.arange(-127, 128)
    for lsb in (-8, -5, -3, -2, -1, 0, 1, 2, 3, 5):
        want = q4_levels(torch.ldexp(m.double(), torch.tensor(float(lsb)))).to(torch.int64)
        assert torch.equal(q4_from_mantissa(m, lsb), want), lsb
    # exact half-up ties: x = 2 (lsb 1, m 1) -> 2.5 -> 3; x = -2 -> -2
    assert q4_from_mantissa(torch.tensor([1, -1]), 1).tolist() == [3, -2]


# ----------------------------------------------------------------------------- TWN
def test_ternarize_per_group_slice_and_ties():
    w = torch.tensor([[1.0, -1.0, 0.1, 0.0], [0.2, -0.3, 0.0, 0.0],
                      [4.0, 4.0, -4.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    t, alpha, delta = ternarize(w, 2)
    d0 = 0.7 * (2.1 + 0.5) / 8
    d1 = 0.7 * 12.5 / 8
    assert delta.tolist() == pytest.approx([d0, d1])
    assert t[0].tolist() == [1, -1, 0, 0] and t[1].tolist() == [0, -1, 0, 0]   # Δ0 = 0.2275
    assert t[2].tolist() == [1, 1, -1, 0] and t[3].tolist() == [0, 0, 0, 0]
    assert alpha[:2].tolist() == pytest.approx([2.3 / 3] * 2)
    assert alpha[2:].tolist() == pytest.approx([4.0, 4.0])
    # |w| == delta is ±1 (sign(sign(w+Δ)+sign(w-Δ))) but not in α's mean
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, -3.0, 0.0]])  # mean|w| = 7/6, Δ = 49/60
    t, alpha, delta = ternarize(w, 1)
    assert t.tolist() == [[1, 1, 1, 1, -1, 0]]
    w = torch.tensor([[0.7, -0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # Δ = 0.098, ties none
    t, alpha, _ = ternarize(w, 1)
    assert t.tolist()[0][:3] == [1, -1, 0] and alpha.tolist() == pytest.approx([0.7])
    w = torch.tensor([[0.5, -0.5, 0.5]])   # Δ = 0.35 < 0.5 everywhere
    assert ternarize(w, 1)[0].tolist() == [[1, -1, 1]]
    z = torch.zeros(1, 4)
    t, alpha, _ = ternarize(z, 1)
    assert t.abs().sum() == 0 and alpha.tolist() == [0.0]
    with pytest.raises(ValueError, match="slices"):
        ternarize(torch.ones(6, 2), 4)


# ----------------------------------------------------------------------------- pruning
def test_cubic_schedule_and_magnitude_ties():
    assert cubic_sparsity(0, 10, 0.8) == 0.0 and cubic_sparsity(10, 10, 0.8) == 0.8
    assert cubic_sparsity(5, 10, 0.8) == pytest.approx(0.8 - 0.8 * 0.125)
    assert cubic_sparsity(20, 10, 0.7) == 0.7
    w = torch.tensor([0.1, -0.2, 0.3, -0.3, 0.3, 0.05, 0.0, 1.0, -0.4, 0.25])
    m = magnitude_mask(w, 0.5)                   # prune 5: threshold = 6th smallest = 0.3
    assert m.tolist() == [False, False, True, True, True, False, False, True, True, False]
    assert magnitude_mask(w, 0.0).all() and not magnitude_mask(w, 1.0).any()
    net = fusionet_digits()
    layers = {n: s for n, _, s in prunable_layers(net)}
    assert "stem" not in layers and layers["units.0.dw"] == 0.7
    assert layers["units.0.expand"] == 0.8 and layers["head"] == 0.8 and len(layers) == 10
    pr = Pruner(net)
    pr.update(10, 10)
    pr.apply()
    sp = pr.sparsity()
    assert sp["units.2.expand"] == pytest.approx(0.8, abs=1e-3)
    assert sp["units.1.dw"] == pytest.approx(0.7, abs=2e-3)


def _dead_expand_channels(net):
    w = net.units[0].expand.weight.detach().reshape(net.units[0].mid, -1)
    return (w == 0).all(dim=1)


@pytest.mark.parametrize("recalibrate", [False, True])
def test_pruned_bn_statistics_of_dead_channels(recalibrate):
    """A channel whose weights are all pruned outputs 0; without recalibration its running
    statistics only decay (eval mode adds a spurious constant), with it they are exactly 0
    (recalibrated on max_batches · batch = 16 images)."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.rand(48, 1, 16, 16, generator=g), torch.randint(0, 10, (48,), generator=g))
    torch.manual_seed(0)
    net = fusionet_digits()
    train_pruned(net, DataLoader(ds, batch_size=16), 1, 1, 0.05, progress=False,
                 max_batches=1, recalibrate=recalibrate)
    assert not net.training
    dead = _dead_expand_channels(net)
    assert dead.sum() > 0                       # 4 weights per filter, 80 % pruned
    bn = net.units[0].bn1
    stale = bn.running_mean[dead].abs().max() > 0 or bn.running_var[dead].max() > 0
    assert bool(stale) != recalibrate
    if recalibrate:                             # population statistics of the 16 images
        x = torch.stack([ds[i][0] for i in range(16)])
        with torch.no_grad():
            h = net.units[0].expand(torch.relu(net.stem_bn(net.stem(x))))
        assert torch.allclose(bn.running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-3, atol=1e-5)


def test_channel_shuffle_permutation():
    x = torch.arange(2 * 8 * 2 * 2.0).reshape(2, 8, 2, 2)
    assert torch.equal(channel_shuffle(x, 4), x[:, shuffle_permutation(8, 4)])
    assert shuffle_permutation(8, 4).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


# ----------------------------------------------------------------------------- helpers
def _random_unit(cin=8, cout=8, e=4, stride=1, seed=0, dyadic=False, groups=4):
    torch.manual_seed(seed)
    u = FusionUnit(cin, cout, e, stride, groups).eval()
    for bn in (u.bn1, u.bn2, u.bn3):
        c = bn.num_features
        if dyadic:   # every predictor constant a small dyadic rational: exact float64 math
            bn.running_mean.copy_(torch.randint(-4, 5, (c,)) / 8.0)
            bn.eps = 0.0
            bn.running_var.fill_(1.0)               # √(σ²+ε) = 1
            bn.weight.data.copy_(torch.randint(1, 5, (c,)) * torch.tensor([1.0, -1.0]).repeat(c // 2) / 4)
            bn.bias.data.copy_(torch.randint(-4, 5, (c,)) / 8.0)
        else:
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.normal_(1, 0.5)
            bn.bias.data.normal_(0, 0.3)
    return u


def _exact_unit(u):
    """A PredictedUnit whose α·0.8 is exactly 1/2 (so k, b are dyadic)."""
    pu = PredictedUnit(u)
    with torch.no_grad():
        pu.t1_w.copy_(torch.randint(-1, 2, pu.t1_w.shape) * 0.625)   # α = 0.625, 0.8α = 0.5
        pu.t2_w.copy_(torch.randint(-1, 2, pu.t2_w.shape) * 0.625)
        pu.t1_w.view(-1)[0] = 0.625
        pu.t2_w.view(-1)[0] = 0.625
    return pu


# ----------------------------------------------------------------------------- thresholds
def test_mask_threshold_ties_and_directions():
    # k·acc + b > 0 with k = 0.5, b = -1.5: acc > 3; at acc = 3 the value is 0 -> off
    assert mask_threshold(0.5, -1.5, 100) == (1, 3)
    # k < 0: -0.5·acc + 1.5 > 0 ⟺ acc < 3 ⟺ -acc > -3
    assert mask_threshold(-0.5, 1.5, 100) == (-1, -3)
    assert mask_threshold(0.0, 0.1, 7) == (1, -8) and mask_threshold(0.0, 0.0, 7) == (1, 7)
    assert mask_threshold(1e-9, 5.0, 10) == (1, -11)        # clamped, still always on
    for k in (0.25, -0.75, 3.0, 1 / 3, -2.5e-3):
        for b in (-2.0, -0.5, 0.0, 0.375, 1.0 / 7):
            s, t = mask_threshold(k, b, 50)
            for acc in range(-50, 51):
                exact = (math.fsum([k * acc, b]) > 0) if k * acc == float(k * acc) else None
                from fractions import Fraction as Fr
                want = Fr(k) * acc + Fr(b) > 0
                assert (s * acc > t) == want, (k, b, acc, exact)


def test_level_thresholds_equal_exact_quantizer():
    from fractions import Fraction as Fr
    for k in (0.5, -0.375, 0.1, 2.0):
        for b in (-1.0, 0.25, 3.3):
            ths = level_thresholds(k, b, 40)
            s = 1 if k >= 0 else -1
            for acc in range(-40, 41):
                v = Fr(k) * acc + Fr(b)
                want = min(7, max(0, math.floor(max(v, 0) * Fr(5, 4) + Fr(1, 2))))
                assert sum(int(s * acc > t) for t in ths) == want


# ----------------------------------------------------------------------------- integer predictor
@pytest.mark.parametrize("stride", [1, 2])
def test_integer_predictor_equals_float_predictor_on_exact_cases(stride):
    u = _random_unit(8, 16 if stride == 2 else 8, 4, stride, seed=stride, dyadic=True)
    pu = _exact_unit(u)
    (k1, b1), (k2, b2) = pu.affine()
    assert all(float(v) * 64 == int(float(v) * 64) for v in torch.cat([k1, b1, k2, b2]))
    x_lsb = -4
    blk = fold_predicted_unit(pu, x_lsb, F8)
    x = torch.randint(-127, 128, (3, 8, 6, 6))
    x[0] = 0                                              # an all-zero image
    s1, lv, s2 = predictor_masks(blk, x)
    f1, f2 = pu.exact_predict(torch.ldexp(x.float(), torch.tensor(float(x_lsb))))
    assert torch.equal(s1, f1) and torch.equal(s2, f2)
    # the level thresholds reproduce the float ŷ1 levels
    from dynacc.quant.fusion import q4_levels as ql
    import torch.nn.functional as F
    (t1, _), _ = pu.ternary()
    acc1 = F.conv2d(ql(torch.ldexp(x.double(), torch.tensor(float(x_lsb)))), t1.double(), None, 1, 0, 1, 4)
    v1 = acc1 * k1[None, :, None, None] + b1[None, :, None, None]
    assert torch.equal(lv, ql(torch.relu(v1)).to(torch.int64))
    # ties really occur: some k·acc + b == 0 exactly, and they are mask 0 in both
    assert bool((v1 == 0).any())
    assert not bool(s1[v1 == 0].any())


def test_depthwise_padding_positions_have_mask_zero():
    u = _random_unit(seed=3)
    pu = PredictedUnit(u)
    blk = fold_predicted_unit(pu, -5, F8)
    blk.thr1[:] = -blk.thr1.abs().max() - 10**6       # s1 = 1 everywhere inside the image
    blk.sign1[:] = 1
    x = torch.randint(-100, 100, (1, 8, 4, 4))
    s1, lv, s2 = predictor_masks(blk, x)
    assert s1.all()
    # the depthwise inputs at padding are zeros: a one-hot x on the corner reaches only its
    # neighbours, and the fused A at border pixels only sees in-image taps
    y_f = fused_acc(blk, x, s1, s2)
    y_u, _, _ = unfused_acc(blk, x, s1, s2)
    assert torch.equal(y_f, y_u)
    d = dw3x3(torch.ones(1, 1, 3, 3, dtype=torch.int64), torch.ones(1, 9, dtype=torch.int64))
    assert d[0, 0].tolist() == [[4, 6, 4], [6, 9, 6], [4, 6, 4]]


# ----------------------------------------------------------------------------- fused algebra
@pytest.mark.parametrize("cin,cout,e,stride,seed,groups", [
    (8, 8, 4, 1, 0, 4), (8, 16, 4, 2, 1, 4), (4, 8, 8, 1, 2, 4), (8, 8, 2, 1, 5, 4),
    (8, 8, 6, 1, 6, 1), (8, 16, 6, 2, 7, 1)])       # groups 1: MobileNetV2 inverted residuals
def test_fused_equals_unfused_exact(cin, cout, e, stride, seed, groups):
    u = _random_unit(cin, cout, e, stride, seed, groups=groups)
    pu = PredictedUnit(u)
    blk = fold_predicted_unit(pu, -5, F8)
    torch.manual_seed(seed)
    x = torch.randint(-127, 128, (3, cin, 5, 5))
    x[1] = 0                                               # zero block
    x[2] = 127 * torch.where(torch.rand(cin, 5, 5) > 0.5, 1, -1)   # ±max mantissas
    s1, _, s2 = predictor_masks(blk, x)
    a, h1, h2 = unfused_acc(blk, x, s1, s2)
    b = fused_acc(blk, x, s1, s2)
    assert torch.equal(a, b)
    # random masks too (incl. all-on / all-off)
    for m1, m2 in ((torch.rand(s1.shape) > 0.5, torch.rand(s2.shape) > 0.5),
                   (torch.ones_like(s1), torch.ones_like(s2)),
                   (torch.zeros_like(s1), torch.zeros_like(s2))):
        assert torch.equal(unfused_acc(blk, x, m1, m2)[0], fused_acc(blk, x, m1, m2))
    # worst case fits: bound over |x| <= 127 below 2^62 and above every observed value
    bnd = accumulator_bounds(blk, 127)
    assert float(bnd.max()) < 2.0 ** 62
    assert bool((a.abs().double() <= bnd[blk.perm][None, :, None, None]).all())
    ya, _ = fused_block(blk, x, -3, F8, "unfused")
    yb, _ = fused_block(blk, x, -3, F8, "fused")
    assert torch.equal(ya, yb) and int(ya.abs().max()) <= 127


def test_fused_unfused_match_float_when_all_masks_on():
    """Sanity of the folding: all-on masks and no ReLU = the linear block in float."""
    u = _random_unit(8, 8, 4, 1, seed=7)
    pu = PredictedUnit(u)
    x_lsb = -5
    blk = fold_predicted_unit(pu, x_lsb, BFPFormat(12, 8))
    x = torch.randint(-127, 128, (2, 8, 5, 5))
    s1 = torch.ones(2, u.mid, 5, 5, dtype=torch.bool)
    acc = fused_acc(blk, x, s1, torch.ones_like(s1))
    yf = acc.double() * torch.pow(2.0, blk.acc_lsb[blk.perm].double())[None, :, None, None]
    xf = torch.ldexp(x.double(), torch.tensor(float(x_lsb))).float()
    with torch.no_grad():
        h = u.bn2(u.dw(u.bn1(u.expand(xf))))
        ref = xf + channel_shuffle(u.bn3(u.project(h)), 4)
    assert torch.allclose(yf.float(), ref, atol=0.05 * float(ref.abs().max()))


def test_block_counts():
    u = _random_unit(8, 8, 4, 1, seed=1)
    blk = fold_predicted_unit(PredictedUnit(u), -5, F8)
    s1 = torch.ones(1, 32, 4, 4, dtype=torch.bool)
    c = block_counts(blk, s1, torch.ones(1, 32, 4, 4, dtype=torch.bool))
    assert c["mults_dense"] == 32 * 2 * 16 + 9 * 32 * 16 + 8 * 8 * 16
    assert c["mults_fused"] == 9 * 2 * 8 * 16
    assert c["mults_pruned"] <= c["mults_dense"]
    off = block_counts(blk, s1, torch.zeros(1, 32, 4, 4, dtype=torch.bool))
    assert off["adds_fused_A"] == 0 and c["adds_fused_A"] > 0


@pytest.mark.parametrize("build", [fusionet_digits, mbv2_fusion_digits])
def test_make_predicted_wraps_every_unit(build):
    net = build().eval()
    p = make_predicted(net)
    from dynacc.quant.fusion import predicted_units
    assert len(predicted_units(p)) == 3
    assert not any(q.requires_grad for q in p.stem.parameters())
    assert p(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_mbv2_fusion_units_are_inverted_residuals():
    net = mbv2_fusion_digits().eval()
    for u in net.units:
        assert u.groups == 1 and u.expand.groups == 1 and u.project.groups == 1
        assert u.dw.groups == u.mid == 32 * u.in_channels
    assert [u.use_res for u in net.units] == [True, False, True]
    x = torch.randn(2, 8, 8, 8)
    u = net.units[0]
    with torch.no_grad():       # the shuffle of one group is the identity
        ref = x + u.bn3(u.project(torch.relu(u.bn2(u.dw(torch.relu(u.bn1(u.expand(x))))))))
        assert torch.allclose(u(x), ref)


def test_predictor_keeps_pruned_zeros():
    """Ternary weights stay 0 where the real weights are pruned; no gradient reaches them."""
    u = _random_unit(8, 8, 4, 1, seed=2)
    with torch.no_grad():
        u.expand.weight[::3] = 0
        u.dw.weight[:, :, 0, :] = 0
    pu = PredictedUnit(u)
    pu.exact_masks = False
    with torch.no_grad():
        pu.t1_w.add_(1.0)
        pu.t2_w.add_(1.0)
    pu(torch.randn(2, 8, 4, 4)).square().sum().backward()
    (t1, _), (t2, _) = pu.ternary()
    assert (t1[u.expand.weight == 0] == 0).all() and (t2[u.dw.weight == 0] == 0).all()
    assert (pu.t1_w.grad[u.expand.weight == 0] == 0).all()
    assert (pu.t2_w.grad[u.dw.weight == 0] == 0).all()
    assert pu.t1_w.grad.abs().sum() > 0


def test_drop_orphans_prunes_depthwise_filters_of_empty_expand_channels():
    net = fusionet_digits().eval()
    pr = Pruner(net)
    pr.update(1, 1)
    u = net.units[0]
    dead = (~pr.masks["units.0.expand"].flatten(1).any(dim=1))
    assert dead.any() and pr.masks["units.0.dw"].flatten(1)[dead].any()
    assert pr.drop_orphans(net) > 0
    assert not pr.masks["units.0.dw"].flatten(1)[dead].any()
    assert (u.dw.weight.flatten(1)[dead] == 0).all()
    assert pr.masks["units.0.dw"].flatten(1)[~dead].any()


def test_finetune_masked_keeps_zeros_and_predictor():
    """The real weights move under the predicted masks; pruned zeros and the predictor stay."""
    from torch.utils.data import DataLoader, TensorDataset

    from dynacc.quant.fusion import predicted_units
    from dynacc.quant.train_fusion import finetune_masked

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.rand(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g))
    net = fusionet_digits().eval()
    for bn in net.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.weight.data.fill_(1.0)                # no zero-initialised residual BN
            bn.bias.data.fill_(0.1)
    pr = Pruner(net)
    pr.update(1, 1)
    pr.apply()
    p = make_predicted(net)
    u = predicted_units(p)[0][1]
    zero = u.unit.expand.weight == 0
    before = {n: q.detach().clone() for n, q in p.named_parameters()}
    finetune_masked(p, DataLoader(ds, batch_size=8), 1, lr=1e-2, progress=False)
    after = dict(p.named_parameters())
    assert (u.unit.expand.weight[zero] == 0).all() and (u.unit.dw.weight != 0).any()
    assert not torch.equal(before["units.0.unit.expand.weight"], after["units.0.unit.expand.weight"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    for n in ("units.0.t1_w", "units.0.t2_w", "units.0.bn_p1.weight", "units.2.bn_p2.bias"):
        assert torch.equal(before[n], after[n]) and after[n].requires_grad
    assert not after["fc.weight"].requires_grad and not p.training
