"""Precision Gating: quantizers, PGConv2d, gate conversion to integers, the integer program,
training smoke run and the ``train-pg`` CLI errors."""

import math

import pytest
import torch
from torch import nn

from dynacc.quant import golden
from dynacc.quant.cli import main
from dynacc.quant.formats import BFPFormat, QuantConfig
from dynacc.quant.functional import quantize_weight
from dynacc.quant.models.pg_resnet import PGResNet, pg_resnet_from_float
from dynacc.quant.models.resnet_cifar import CifarResNet
from dynacc.quant.pg import (PACT, PGConv2d, _GateSTE, gating_loss, pact_clamp_max, pact_lsb,
                             pg_layers, quantize_unsigned)
from dynacc.quant.pg_program import (build_pg_program, gate_constants, pg_gate_stats,
                                     pg_layer_cases, program_pg_stats, to_float_model)
from dynacc.quant.train_pg import pg_stats, train_pg

CFG9 = QuantConfig(fmt=BFPFormat(9, 8), method="max")


# ----------------------------------------------------------------------------- quantizers
def test_pact_lsb_is_exact_ceil_log2():
    assert pact_lsb(7.0, 3) == 0            # 7 / 7 = 1 -> 2^0, exactly at the edge
    assert pact_lsb(math.nextafter(7.0, 8.0), 3) == 1  # just above: next power
    assert pact_lsb(3.5, 3) == -1
    assert pact_lsb(6.0, 3) == 0
    assert pact_lsb(255.0, 8) == 0 and pact_lsb(255.5, 8) == 1
    assert pact_lsb(0.75, 4) == -4          # 15·2^-4 = 0.9375 >= 0.75 > 15·2^-5
    for a in (0.1, 1.0, 2.9, 6.0, 100.0):
        for b in (2, 3, 4, 8):
            l = pact_lsb(a, b)
            assert ((1 << b) - 1) * 2.0 ** l >= a > ((1 << b) - 1) * 2.0 ** (l - 1)
    with pytest.raises(ValueError, match="positive"):
        pact_lsb(0.0, 3)


def test_quantize_unsigned_ties_and_saturation():
    y = torch.tensor([-1.0, 0.0, 0.5, 1.5, 2.5, 3.49, 6.5, 7.0, 7.6, 100.0])
    assert quantize_unsigned(y, 0, 3).tolist() == [0, 0, 0, 2, 2, 3, 6, 7, 7, 7]
    # lsb = -1: y/0.5, ties 0.25 -> 0, 0.75 -> 2 (half to even)
    assert quantize_unsigned(torch.tensor([0.25, 0.75, 1.25, 3.5, 3.75]), -1, 3).tolist() == \
        [0, 2, 2, 7, 7]


def test_pact_quantized_output_and_clamp():
    p = PACT(6.0, act_bits=3)
    x = torch.tensor([-2.0, 0.4, 0.5, 1.5, 5.6, 6.0, 6.4, 9.0])
    y = p(x)
    assert p.lsb() == 0
    assert y.tolist() == [0.0, 0.0, 0.0, 2.0, 6.0, 6.0, 6.0, 6.0]   # clip at α = 6, not 7
    assert pact_clamp_max(6.0, 3) == 6 and pact_clamp_max(7.0, 3) == 7
    assert pact_clamp_max(3.3, 3) == 7 and pact_clamp_max(2.0, 3) == 4    # lsb = -1: 4 levels x 0.5
    # gradients: x straight through on [0, α], α gets the upstream sum where x > α
    x = x.clone().requires_grad_(True)
    g = torch.arange(1.0, 9.0)
    (p(x) * g).sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]
    assert float(p.alpha.grad) == 7.0 + 8.0


def test_float_pact_clip():
    p = PACT(2.0)
    assert p(torch.tensor([-1.0, 1.25, 3.0])).tolist() == [0.0, 1.25, 2.0]
    with pytest.raises(ValueError, match="act_bits"):
        p.lsb()


def test_split_is_exact_and_matches_golden():
    conv = PGConv2d(1, 1, 1, act_bits=3, msb_bits=2, cfg=CFG9)
    q = torch.arange(8, dtype=torch.int64).reshape(1, 1, 2, 4)
    for lsb in (0, -2, 3):
        x = torch.ldexp(q.double(), torch.tensor(float(lsb))).float()
        hb, lb = conv.split(x, lsb)
        ghb, glb = golden.split_msb_lsb(q, 3, 2)
        assert torch.equal(torch.ldexp(hb.double(), torch.tensor(float(-lsb))).long(), ghb << 1)
        assert torch.equal(torch.ldexp(lb.double(), torch.tensor(float(-lsb))).long(), glb)
    with pytest.raises(ValueError, match="outside"):
        conv.split(torch.full((1, 1, 1, 1), 8.0), 0)


def test_gate_ste_gradients_and_sparse_bp():
    d = torch.tensor([-1.0, 0.0, 0.5], requires_grad=True)
    m = _GateSTE.apply(d, 5.0, False)
    assert m.tolist() == [0.0, 0.0, 1.0]      # strict: d = 0 is closed
    m.sum().backward()
    s = torch.sigmoid(5.0 * d.detach())
    assert torch.allclose(d.grad, 5.0 * s * (1 - s))
    d.grad = None
    _GateSTE.apply(d, 5.0, True).sum().backward()
    assert d.grad[0] == 0 and d.grad[1] == 0 and d.grad[2] > 0


def test_gating_loss_is_unsquared_l2():
    model = PGResNet(1, num_classes=10, in_channels=1, act_bits=3, msb_bits=2, cfg=CFG9)
    for i, (_, m) in enumerate(pg_layers(model)):
        m.threshold.data.fill_(float(i))
    want = sum(math.sqrt(m.out_channels) * abs(i - 1.5) for i, (_, m) in
               enumerate(pg_layers(model)))
    assert math.isclose(float(gating_loss(model, 1.5, 1e-3).detach()), 1e-3 * want, rel_tol=1e-6)


def test_bad_bits_are_named():
    with pytest.raises(ValueError, match="msb_bits"):
        PGConv2d(4, 4, 3, act_bits=3, msb_bits=3)
    with pytest.raises(ValueError, match="M=9"):
        PGConv2d(4, 4, 3, act_bits=9, msb_bits=4, cfg=CFG9)


# ----------------------------------------------------------------------- gate to integers
def _dual(x_q, x_lsb, w, bn, delta, act_bits, msb_bits):
    """Integer gate of conv(x, w) -> BN, via the BN-folded BFP weights and gate_constants."""
    k = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    wf = w.double() * k.reshape(-1, 1, 1, 1)
    m, _, w_lsb = quantize_weight(wf, CFG9.fmt, CFG9.weights)
    acc_lsb, shift = golden.conv_alignment(x_lsb, w_lsb)
    thr, sign = gate_constants(delta, bn, acc_lsb)
    acc, passed, _ = golden.dual_precision_conv2d(x_q, x_lsb, m, w_lsb, None, act_bits=act_bits,
                                                  msb_bits=msb_bits, threshold=thr, sign=sign,
                                                  padding=1)
    return passed, thr, sign, acc_lsb


def test_float_gate_equals_integer_gate_when_exact():
    torch.manual_seed(0)
    conv = PGConv2d(3, 4, 3, padding=1, act_bits=3, msb_bits=1, cfg=CFG9)
    conv.weight.data = torch.randint(-24, 25, conv.weight.shape).float() / 16   # exact in BFP
    bn = nn.BatchNorm2d(4, eps=0.0).eval()
    bn.running_var.fill_(0.25)                      # k = γ / 0.5 = 2γ, a power of two
    bn.weight.data = torch.tensor([1.0, -1.0, 0.5, -2.0])   # negative k: reversed direction
    x_lsb = -1
    q = torch.randint(0, 8, (2, 3, 6, 6))
    x = torch.ldexp(q.double(), torch.tensor(float(x_lsb))).float()
    a_hb, _ = conv.split(x, x_lsb)
    o_hb = torch.nn.functional.conv2d(a_hb, conv.quantized_weight(), None, 1, 1).double()
    # thresholds: some exactly at an O_hb value (tie -> not passed), others in between
    vals = o_hb[0, :, 2, 3]
    conv.threshold.data = torch.stack([vals[0], vals[1] - 0.3, vals[2] + 0.7, vals[3]]).float()
    float_gate = o_hb > conv.threshold.double()[None, :, None, None]
    passed, thr, sign, _ = _dual(q, x_lsb, conv.weight.detach(), bn, conv.threshold, 3, 1)
    assert sign.tolist() == [1, -1, 1, -1]
    assert torch.equal(passed, float_gate)
    assert not bool(passed[0, 0, 2, 3]) and not bool(passed[0, 3, 2, 3])   # ties closed
    assert 0 < int(passed.sum()) < passed.numel()


def test_threshold_equality_is_not_passed():
    # 1x1 conv, one filter of weight 1 (mantissa 128, lsb -7) on x = 5 (b = 3, msb 2, L = 1):
    # x >> 1 = 2, acc_hb = 2·128 = 256, acc_hb << 1 = 512
    x = torch.tensor([[[[5]]]])
    w = torch.tensor([[[[128]]]])
    w_lsb = torch.tensor([[-7]])
    for thr, sign, want in ((512, 1, False), (511, 1, True), (-512, -1, False),
                            (-513, -1, True)):
        acc, passed, _ = golden.dual_precision_conv2d(
            x, 0, w, w_lsb, None, act_bits=3, msb_bits=2, threshold=torch.tensor([thr]),
            sign=torch.tensor([sign]))
        assert bool(passed) is want
        assert int(acc) == (640 if want else 512)
    # gate_constants lands exactly on such a T: k = 2, δ = 2 on acc_lsb = -7 -> T = 512
    bn = nn.BatchNorm2d(1, eps=0.0).eval()
    bn.running_var.fill_(0.25)
    thr, sign = gate_constants(torch.tensor([2.0]), bn, torch.tensor([-7]))
    assert thr.tolist() == [512] and sign.tolist() == [1]
    bn.weight.data.fill_(-1.0)
    thr, sign = gate_constants(torch.tensor([2.0]), bn, torch.tensor([-7]))
    assert thr.tolist() == [512] and sign.tolist() == [-1]
    # floor for a non-integer threshold, clamp to the accumulator bound
    thr, _ = gate_constants(torch.tensor([-0.3]), bn, torch.tensor([0]), torch.tensor([10]))
    assert thr.tolist() == [-1]
    thr, _ = gate_constants(torch.tensor([1e9, -1e9]), nn.BatchNorm2d(2).eval(),
                            torch.tensor([0, 0]), torch.tensor([10, 10]))
    assert thr.tolist() == [10, -11]


# -------------------------------------------------------------------------- the program
@pytest.fixture(scope="module")
def tiny_program():
    torch.manual_seed(1)
    pg = PGResNet(1, num_classes=10, in_channels=1, act_bits=3, msb_bits=2, cfg=CFG9,
                  alpha=3.0)
    with torch.no_grad():
        for m in pg.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.0, 1.5)     # some negative k_c
        for _, m in pg_layers(pg):
            m.threshold.uniform_(-0.5, 1.5)
    pg.eval()
    x = torch.randn(8, 1, 16, 16)
    return pg, build_pg_program(pg, [x[:4], x[4:]], CFG9), x


def test_program_pact_inputs_and_gates(tiny_program):
    pg, program, x = tiny_program
    dp = [o for o in program.ops if o.dual_precision]
    assert [o.name for o in dp] == ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]
    for o in dp:
        prod = program.op(o.inputs[0])
        assert prod.activation == "pact"
        assert int(prod.clamp_max.max()) <= 7
        assert (o.dp_act_bits, o.dp_msb_bits, o.dp_mode) == (3, 2, "gated")
        assert set(o.dp_sign.tolist()) <= {-1, 1}
    assert program.lsb["conv1"].unique().tolist() == [pg.relu.lsb()] == [-1]   # 7·2^-1 >= 3
    cases = pg_layer_cases(program, x[0])
    assert [c["name"] for c in cases] == [o.name for o in dp]
    for c in cases:
        assert c["x_int"].shape[0] == 1 and int(c["x_int"].min()) >= 0
        assert int(c["x_int"].max()) <= 7
    st = pg_gate_stats(program, x)
    for o in dp:
        assert 0 <= st[o.name]["passed"] <= st[o.name]["total"]
    with pytest.raises(ValueError, match="one image"):
        pg_layer_cases(program, x[:2])


def test_program_full_mode_equals_plain_conv(tiny_program):
    _, program, x = tiny_program
    env = program.run_golden(x)
    for o in program.ops:
        if not o.dual_precision:
            continue
        xin = env[o.inputs[0]]
        full, passed = program.dual_precision_acc(o, xin, mode="full")
        plain, _ = golden.conv2d_acc(xin, program.lsb[o.inputs[0]], o.weight, o.w_lsb, o.bias,
                                     o.stride, o.padding)
        assert bool(passed.all()) and torch.equal(full, plain)
        gated, gp = program.dual_precision_acc(o, xin)
        msb, _ = program.dual_precision_acc(o, xin, mode="msb")
        assert torch.equal(gated, torch.where(gp, full, msb))
        assert 0 < int(gp.sum()) < gp.numel()


def test_program_tracks_float_pg_model(tiny_program):
    pg, program, x = tiny_program
    # the PACT output feeding layer1.0.conv1 is the same integer in float and golden
    env = program.run_golden(x)
    with torch.no_grad():
        y = pg.relu(pg.bn1(pg.conv1(x)))
    q = torch.round(torch.ldexp(y.double(), torch.tensor(float(-pg.relu.lsb())))).long()
    agree = (q == env["conv1"]).double().mean()
    assert agree > 0.97       # only BFP rounding of the stem differs
    # float and integer gates agree on most outputs
    fs = pg_stats(pg, [(x, torch.zeros(len(x), dtype=torch.long))])
    gs = program_pg_stats(program, [(x, torch.zeros(len(x), dtype=torch.long))])
    assert abs(fs["update_sparsity"] - gs["update_sparsity"]) < 0.05
    fm = to_float_model(pg)
    assert set(fm.state_dict()) == set(CifarResNet(1, 10, 1).state_dict())


# ------------------------------------------------------------------------------ training
def test_train_pg_smoke_lowers_loss_and_is_deterministic():
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, Subset

    from dynacc.quant.data import load_digits_split

    train, _ = load_digits_split(size=16, channels=1, seed=0)
    splits = SimpleNamespace(train=DataLoader(Subset(train, range(128)), batch_size=32))
    x, y = next(iter(DataLoader(train, batch_size=64)))

    def run():
        torch.manual_seed(0)
        fm = CifarResNet(1, num_classes=10, in_channels=1)
        pg = pg_resnet_from_float(fm, act_bits=3, msb_bits=2, cfg=CFG9, alpha=4.0)
        with torch.no_grad():   # train-mode loss (batch statistics) on one fixed batch
            before = float(nn.functional.cross_entropy(pg.train()(x), y))
        train_pg(pg, splits, epochs=1, lr=0.05, gate_target=1.0, sigma_g=0.05,
                 threshold_lr_scale=100.0, seed=3, progress=False)
        with torch.no_grad():
            after = float(nn.functional.cross_entropy(pg.train()(x), y))
        return pg.eval(), before, after

    pg, before, after = run()
    assert after < before
    thr = torch.cat([m.threshold.detach() for _, m in pg_layers(pg)])
    assert float(thr.mean()) > 0.0                     # pulled towards the target
    pg2, _, after2 = run()
    assert after2 == after
    for (k, a), b in zip(pg.state_dict().items(), pg2.state_dict().values()):
        assert torch.equal(a, b), k
    st = pg_stats(pg, [(x, y)])
    assert 0.0 <= st["update_sparsity"] <= 1.0
    assert st["avg_bits"] == pytest.approx(2 + (1 - st["update_sparsity"]))


# ----------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv, msg", [
    (["--model", "resnet20", "--act-bits", "3", "--msb-bits", "3"], "msb_bits"),
    (["--model", "resnet20", "--act-bits", "9", "--msb-bits", "4"], "does not fit the M=9"),
    (["--model", "resnet20", "--act-bits", "5", "--msb-bits", "2", "--mantissa", "5"],
     "M-1 = 4"),
    (["--model", "resnet21"], "unknown model 'resnet21'"),
    (["--model", "digits_net"], "unknown model 'digits_net'"),
])
def test_train_pg_cli_errors(argv, msg, capsys):
    assert main(["train-pg", *argv]) == 2
    assert msg in capsys.readouterr().err
