"""Feature Boosting and Suppression: k-WTA (FBS1), FBSConv2d (zeros, stop-gradient, quantized
saliency), the integer FBS conv (FBS2-FBS3) against an element-by-element reference, the MAC
accounting and a training smoke run."""

import itertools
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dynacc.quant import golden
from dynacc.quant.fbs import (ConvGeometry, FBSConv2d, FBSGatedCNN, conv_geometries,
                              fbs_from_dense, fbs_layers, fbs_mac_counts, saliency_l1)
from dynacc.quant.functional import requantize
from dynacc.quant.formats import BFPFormat
from dynacc.quant.models.fbs_cnn import FBSCNN
from dynacc.quant.pg import pact_lsb
from dynacc.quant.train_fbs import density_schedule, fbs_fine_tune, fbs_stats, train_fbs


# ------------------------------------------------------------------------------ k-WTA
def test_kwta_ties_are_inactive():
    g = torch.tensor([[5, 3, 3, 1], [4, 4, 4, 4], [7, 6, 6, 6]])
    # d = 0.5 -> k = 2, tau = 3rd largest
    assert golden.fbs_active(g, 0.5).tolist() == [
        [True, False, False, False],      # tau = 3: the tie at 3 loses both
        [False, False, False, False],     # all equal: nothing beats tau
        [True, False, False, False]]
    # d = 0.75 -> k = 3, tau = 4th largest
    assert golden.fbs_active(g, 0.75).tolist() == [
        [True, True, True, False], [False] * 4, [True, False, False, False]]


def test_kwta_zero_never_active_and_k_equals_c():
    g = torch.tensor([[0, 0, 2, 0], [0, 0, 0, 0]])
    assert golden.fbs_active(g, 0.75).tolist() == [[False, False, True, False], [False] * 4]
    # k = C: no gating, even zeros are "active" (their output is the bias path)
    assert golden.fbs_active(g, 1.0).all()
    # ceil: d = 0.3 of 4 channels -> k = 2; d = 0.25 -> k = 1
    h = torch.tensor([[9, 8, 7, 6]])
    assert golden.fbs_active(h, 0.3).tolist() == [[True, True, False, False]]
    assert golden.fbs_active(h, 0.25).tolist() == [[True, False, False, False]]
    assert int(golden.fbs_active(torch.arange(1, 17)[None], 0.375).sum()) == 6
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="density"):
            golden.fbs_active(h, bad)


def test_kwta_at_most_k_random():
    torch.manual_seed(0)
    g = torch.randint(0, 6, (200, 16))
    for d in (0.25, 0.5, 0.75):
        a = golden.fbs_active(g, d)
        k = math.ceil(d * 16)
        assert int(a.sum(dim=1).max()) <= k
        # every active channel beats every inactive one
        for row, act in zip(g, a):
            if act.any() and (~act).any():
                assert int(row[act].min()) > int(row[~act].max())


# ------------------------------------------------------------------------- FBSConv2d
def _conv(density=0.5, seed=0):
    torch.manual_seed(seed)
    m = FBSConv2d(4, 8, 3, 1, 1, density=density)
    with torch.no_grad():
        m.phi.normal_(0.0, 1.0)
        m.rho.uniform_(0.0, 1.0)
    return m


def test_inactive_channels_exactly_zero():
    m = _conv(0.5).train()
    x = torch.rand(6, 4, 5, 5) * 2
    y = m(x)
    act = m.last_active.bool()
    assert int(act.sum(dim=1).max()) <= 4
    assert bool((y[~act] == 0).all())
    assert bool((y[act].abs().sum(dim=(1, 2)) > 0).any())
    # unsigned 8-bit on the PACT's static scale
    q = torch.ldexp(y.detach().double(), torch.tensor(float(-m.act.lsb())))
    assert torch.equal(q, q.round()) and float(q.min()) >= 0 and float(q.max()) <= 255


def test_decisions_are_the_integer_kwta_of_the_quantized_saliency():
    m = _conv(0.5).eval()
    m.saliency_max.fill_(0.0)
    x = torch.rand(5, 4, 6, 6)
    m(x)
    g = m.saliency(x).detach()
    lsb = pact_lsb(float(g.max()), 8)
    g_q = torch.round(torch.ldexp(g.double(), torch.tensor(float(-lsb)))).clamp(0, 255).long()
    assert torch.equal(m.last_active.bool(), golden.fbs_active(g_q, 0.5))
    assert torch.equal(m.last_saliency.detach().double(),
                       torch.ldexp(g_q.double(), torch.tensor(float(lsb))))


def test_pi_is_stop_gradient():
    m = _conv(0.5).train()
    x = torch.rand(1, 4, 5, 5)
    y = m(x)
    assert not m.last_active.requires_grad
    y.sum().backward()
    act = m.last_active[0].bool()
    assert bool((m.rho.grad[~act] == 0).all()) and bool((m.phi.grad[~act] == 0).all())
    assert bool((m.beta.grad[~act] == 0).all())
    assert bool((m.rho.grad[act] != 0).any())
    # the gradient of g is the one through the product (π held constant)
    g = m.last_saliency.detach().requires_grad_(True)
    bn = torch.nn.functional.batch_norm(m.conv(x).detach(), None, None, training=True,
                                        eps=m.bn.eps)
    pi = m.last_active.detach()
    pre = (pi * g)[:, :, None, None] * bn + (pi * m.beta.detach())[:, :, None, None]
    m.act(pre).sum().backward()
    assert bool((g.grad[0][~act] == 0).all())


def test_saliency_l1_and_density_schedule():
    m = _conv(0.5).train()
    m(torch.rand(3, 4, 5, 5))
    want = (m.last_saliency * m.last_active).abs().sum(dim=1).mean()
    net = torch.nn.Sequential(m)
    assert torch.allclose(saliency_l1(net), want)
    assert density_schedule(0.5) == [1.0, 0.75, 0.5]
    assert density_schedule(0.4) == [1.0, 0.75, 0.5, 0.4]
    assert density_schedule(1.0) == [1.0]
    with pytest.raises(ValueError, match="density"):
        density_schedule(0.0)


def test_from_dense_copies_the_backbone():
    torch.manual_seed(0)
    dense = FBSCNN(10, 1).eval()
    x = torch.randn(8, 1, 16, 16)
    fbs = fbs_from_dense(dense, x)
    assert float(fbs.input_offset) == pytest.approx(-float(x.min()))
    assert float(fbs.input_act.alpha) == pytest.approx(float((x - x.min()).max()))
    assert torch.equal(fbs.conv3.conv.weight, dense.conv3.weight)
    assert torch.equal(fbs.conv3.bn.running_var, dense.bn3.running_var)
    assert torch.equal(fbs.fc.weight, dense.fc.weight)
    assert [n for n, _ in fbs_layers(fbs)] == [f"conv{i}" for i in range(1, 9)]
    torch.randn(5)                                   # another global RNG state: same model
    again = fbs_from_dense(dense, x)
    for (k, a), b in zip(fbs.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(fbs_from_dense(dense, x, seed=1).conv1.phi, fbs.conv1.phi)
    with pytest.raises(ValueError, match="fbs_cnn"):
        fbs_from_dense(torch.nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="density"):
        fbs.set_density(1.2)


# ------------------------------------------------------------- integer FBS conv (FBS2-FBS3)
def _reference(x, x_lsb, w, w_lsb, bias, active, scale, stride, padding):
    """Element by element in Python integers (rules A1-A3, FBS2-FBS3)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    out = torch.zeros(n, o, ho, wo, dtype=torch.int64)
    for f in range(o):
        acc_lsb = min(x_lsb + int(w_lsb[f, ci]) for ci in range(c))
        for b, yy, xx in itertools.product(range(n), range(ho), range(wo)):
            if not bool(active[b, f]):
                continue
            acc = 0
            for ci, ky, kx in itertools.product(range(c), range(kh), range(kw)):
                iy, ix = yy * stride + ky - padding, xx * stride + kx - padding
                if 0 <= iy < h and 0 <= ix < wd:
                    sh = x_lsb + int(w_lsb[f, ci]) - acc_lsb
                    acc += (int(x[b, ci, iy, ix]) * int(w[f, ci, ky, kx])) << sh
            out[b, f, yy, xx] = acc * int(scale[b, f]) + int(bias[b, f])
    return out


def test_fbs_conv2d_matches_element_reference():
    torch.manual_seed(3)
    n, c, o = 2, 3, 4
    x = torch.randint(0, 256, (n, c, 5, 5))
    x[:, 1] = 0                                   # an inactive (zero) input channel
    w = torch.randint(-255, 256, (o, c, 3, 3))
    w[2] = 0                                      # an all-zero filter
    w_lsb = torch.tensor([-9, -7, -12, -8])[:, None].expand(o, c).clone()   # whole filter
    scale = torch.randint(0, 256, (n, o))
    bias = torch.randint(-10**6, 10**6, (n, o))
    active = torch.tensor([[True, False, True, True], [False, True, True, False]])
    for stride in (1, 2):
        got, acc_lsb = golden.fbs_conv2d(x, -3, w, w_lsb, bias, active=active, scale=scale,
                                         stride=stride, padding=1)
        assert acc_lsb.tolist() == [-12, -10, -15, -11]
        assert torch.equal(got, _reference(x, -3, w, w_lsb, bias, active, scale, stride, 1))
        assert bool((got[~active] == 0).all())


def test_fbs_conv2d_worst_case_accumulation():
    # every product at its maximum: 255 * 255 * C * 9 * 255 (scale) + bias, exact in int64
    c, o = 64, 2
    x = torch.full((1, c, 3, 3), 255)
    w = torch.full((o, c, 3, 3), 255)
    w[1] = -255
    w_lsb = torch.full((o, c), -8)
    scale = torch.full((1, o), 255)
    bias = torch.tensor([[2**40, -2**40]])
    got, _ = golden.fbs_conv2d(x, -8, w, w_lsb, bias, active=torch.ones(1, o, dtype=torch.bool),
                               scale=scale, padding=0)
    full = 255 * 255 * c * 9
    assert got[0, :, 0, 0].tolist() == [full * 255 + 2**40, -full * 255 - 2**40]
    # requantize it (R3) on a narrow output: saturates at ±255 (M = 9)
    m = requantize(got, torch.tensor([30, 30])[None, :, None, None], BFPFormat(9, 8))
    assert m[0, :, 0, 0].tolist() == [255, -255]
    with pytest.raises(ValueError, match="unsigned"):
        golden.fbs_conv2d(x, -8, w, w_lsb, None, active=torch.ones(1, o, dtype=torch.bool),
                          scale=-scale)


# ------------------------------------------------------------------------------ MACs
def test_mac_accounting():
    geoms = [ConvGeometry("a", 1, 4, 9, 16), ConvGeometry("b", 4, 2, 9, 4)]
    a1 = torch.tensor([[True, True, False, False], [True, True, True, True]])
    a2 = torch.tensor([[True, False], [False, False]])
    st = fbs_mac_counts(geoms, [a1, a2])
    dense = 1 * 4 * 9 * 16 + 4 * 2 * 9 * 4
    img0 = 1 * 4 * 9 * 16 * (2 / 4) + 4 * 2 * 9 * 4 * (2 / 4) * (1 / 2)
    img1 = 1 * 4 * 9 * 16 * 1.0 + 0.0
    assert st["dense_macs"] == dense
    assert st["fbs_macs"] == pytest.approx((img0 + img1) / 2)
    assert st["mac_reduction"] == pytest.approx(dense / ((img0 + img1) / 2))
    pred0 = 1 * 4 + 2 * 16 + 2 * 2 + 1 * 4
    pred1 = 1 * 4 + 4 * 16 + 4 * 2 + 0
    assert st["predictor_macs"] == pytest.approx((pred0 + pred1) / 2)
    assert st["density"] == [0.75, 0.25]
    with pytest.raises(ValueError, match="'b'"):
        fbs_mac_counts(geoms, [a1, a1])
    model = FBSGatedCNN(10, 1)
    g = conv_geometries(model, (1, 16, 16))
    assert [x.out_pixels for x in g] == [256, 256, 64, 64, 64, 16, 16, 16]
    assert sum(x.macs for x in g) == 3_575_808


# ---------------------------------------------------------------------------- training
def test_train_fbs_smoke_frozen_warmup_and_schedule():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 16, 16)
    y = torch.randint(0, 10, (64,))
    train = DataLoader(TensorDataset(x, y), batch_size=32)
    model = fbs_from_dense(FBSCNN(10, 1).eval(), x)
    w0 = model.conv2.conv.weight.detach().clone()
    rho0 = model.conv2.rho.detach().clone()
    train_fbs(model, train, 1, freeze_base=True, seed=1, progress=False)
    assert torch.equal(model.conv2.conv.weight, w0)           # backbone frozen
    assert not torch.equal(model.conv2.rho, rho0)             # predictor learns
    assert float(model.conv2.saliency_max) > 0
    done = list(fbs_fine_tune(model, train, [0.75, 0.5], warmup_epochs=0, epochs=1,
                              progress=False, max_batches=1))
    assert done == [0.75, 0.5] and model.conv8.density == 0.5
    assert not torch.equal(model.conv2.conv.weight, w0)
    st = fbs_stats(model, [(x, y)])
    assert max(st["density"]) <= 0.5 and st["mac_reduction"] > 3.0
    with pytest.raises(ValueError, match="must not increase"):
        next(fbs_fine_tune(model, train, [0.5, 0.75], warmup_epochs=0, epochs=0))
    with pytest.raises(ValueError, match="FBSConv2d"):
        train_fbs(torch.nn.Linear(2, 2), train, 1)
