"""Channel Gating: CGConv2d semantics, the golden two-phase conv against an element-by-element
reference, the integer gate against the float decision, the integer program, the FLOP
accounting, a training smoke run and the ``train-cg`` CLI."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynacc.quant import golden
from dynacc.quant.cg import (CG_GATE_SLOPE, CGConv2d, cg_flop_summary, cg_gating_loss, cg_layers,
                             check_cg_partitions)
from dynacc.quant.cg_program import (build_cg_program, cg_gate_constants, cg_gate_stats,
                                     cg_layer_cases, cg_model_from_checkpoint, program_cg_stats,
                                     to_float_model)
from dynacc.quant.cli import main
from dynacc.quant.formats import BFPFormat, QuantConfig
from dynacc.quant.functional import quantize_weight
from dynacc.quant.models.cg_resnet import CGResNet, cg_resnet_from_float
from dynacc.quant.models.resnet_cifar import CifarResNet
from dynacc.quant.program import BFPProgram
from dynacc.quant.train_cg import cg_stats, train_cg

CFG9 = QuantConfig(fmt=BFPFormat(9, 8), method="max")


def _exact_conv(c_in=4, c_out=4, p=2, seed=0):
    """A CG conv in eval mode whose weights, gate BN and inputs are exactly representable
    (dyadic), so every float value below is exact."""
    torch.manual_seed(seed)
    conv = CGConv2d(c_in, c_out, 3, padding=1, partitions=p, act_bits=3, cfg=CFG9,
                    sparse_bp=False, threshold_init=0.0)
    conv.weight.data = torch.randint(-24, 25, conv.weight.shape).float() / 16
    conv.bn_gate.eps = 0.0
    conv.bn_gate.running_var.fill_(0.25)          # √var = 0.5
    conv.bn_gate.running_mean.copy_(torch.arange(c_out) / 4.0 - 0.5)
    x = torch.randint(0, 8, (2, c_in, 5, 5)).float() / 2     # 3-bit integers on 2^-1
    return conv.eval(), x


def _parts(conv, x):
    w = conv.quantized_weight().detach()
    m = golden.cg_base_mask(*w.shape[:2], conv.partitions)[:, :, None, None]
    base = F.conv2d(x, w * m, None, 1, 1)
    rest = F.conv2d(x, w * ~m, None, 1, 1)
    z = (base - conv.bn_gate.running_mean[None, :, None, None]) / 0.5
    return base, rest, z


# ------------------------------------------------------------------------- CGConv2d
def test_gated_off_outputs_keep_the_partial_sum():
    conv, x = _exact_conv()
    base, rest, z = _parts(conv, x)
    conv.threshold.data = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    with torch.no_grad():
        out = conv(x, -1)
    d = z > conv.threshold[None, :, None, None]
    assert 0 < int(d.sum()) < d.numel()
    assert torch.equal(out, torch.where(d, base + rest, base))
    assert conv.last_gate == (int(d.sum()), d.numel())
    full = F.conv2d(x, conv.quantized_weight(), None, 1, 1)
    assert torch.equal(out[d], full[d])                  # passed: the whole conv
    with pytest.raises(ValueError, match="outside"):
        conv(x + 4.0, -1)                                # 3-bit input range on 2^-1


def test_threshold_equality_is_closed_both_directions():
    conv, x = _exact_conv()
    base, rest, z = _parts(conv, x)
    # thresholds exactly at z of one output per channel: that output is closed ...
    at = z[0, :, 2, 2]
    conv.threshold.data = at.clone()
    with torch.no_grad():
        out = conv(x, -1)
    assert torch.equal(out[0, :, 2, 2], base[0, :, 2, 2])
    # ... and opens when the threshold is lowered by the smallest step below it
    conv.threshold.data = torch.nextafter(at, torch.full_like(at, -math.inf))
    with torch.no_grad():
        out = conv(x, -1)
    assert torch.equal(out[0, :, 2, 2], (base + rest)[0, :, 2, 2])


@pytest.mark.parametrize("sparse_bp", [False, True])
def test_gate_gradient_is_the_sigmoid_ste(sparse_bp):
    conv, x = _exact_conv()
    conv.sparse_bp = sparse_bp
    base, rest, z = _parts(conv, x)
    conv.threshold.data = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    conv(x, -1).sum().backward()
    u = z - conv.threshold.detach()[None, :, None, None]
    s = torch.sigmoid(CG_GATE_SLOPE * u)
    g = -CG_GATE_SLOPE * s * (1 - s) * rest           # ∂out/∂Δ through the STE
    if sparse_bp:
        g = g * (u > 0)                               # no gradient where the gate is closed
    assert torch.allclose(conv.threshold.grad, g.sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_base_weight_is_the_golden_mask():
    conv = CGConv2d(16, 32, 3, padding=1, partitions=4)
    w = conv.weight.detach()
    m = golden.cg_base_mask(32, 16, 4)[:, :, None, None]
    x = torch.rand(1, 16, 6, 6)
    assert torch.allclose(F.conv2d(x, conv.base_weight(w), None, 1, 1, groups=4),
                          F.conv2d(x, w * m, None, 1, 1), atol=1e-6)


def test_gating_loss_is_squared():
    model = CGResNet(1, num_classes=10, in_channels=1, partitions=2, cfg=CFG9)
    for i, (_, m) in enumerate(cg_layers(model)):
        m.threshold.data.fill_(float(i))
    want = sum(m.out_channels * (i - 1.5) ** 2 for i, (_, m) in enumerate(cg_layers(model)))
    assert math.isclose(float(cg_gating_loss(model, 1.5).detach()), 1e-4 * want, rel_tol=1e-6)


def test_bad_partitions_are_named():
    with pytest.raises(ValueError, match=r"'layer1.0.conv1' \(C=16 inputs, O=16 outputs\)"):
        CGResNet(1, in_channels=1, partitions=3)
    with pytest.raises(ValueError, match=r"'layer3.0.conv1' \(C=32 inputs, O=64 outputs\)"):
        check_cg_partitions(64, [("layer3.0.conv1", 32, 64)])
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="integer >= 1"):
            check_cg_partitions(bad, [])
    with pytest.raises(ValueError, match="M=9"):
        CGConv2d(4, 4, 3, partitions=2, act_bits=9, cfg=CFG9)


# --------------------------------------------------------- golden two-phase conv
def _reference_cg(x, x_lsb, w, w_lsb, bias, p, thr, sign, stride, pad):
    """Element-by-element CG1-CG3 with Python integers (aligned by left shifts, A1-A3)."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    prod = [[x_lsb[ci] + int(w_lsb[oi, ci]) for ci in range(c)] for oi in range(o)]
    lo = [min(r) for r in prod]
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    acc = torch.zeros(n, o, ho, wo, dtype=torch.int64)
    passed = torch.zeros(n, o, ho, wo, dtype=torch.bool)
    for ni in range(n):
        for oi in range(o):
            for yi in range(ho):
                for xi in range(wo):
                    base = rest = 0
                    for ci in range(c):
                        part = 0
                        for ky in range(k):
                            for kx in range(k):
                                yy, xx = yi * stride + ky - pad, xi * stride + kx - pad
                                if 0 <= yy < h and 0 <= xx < wd:
                                    part += int(x[ni, ci, yy, xx]) * int(w[oi, ci, ky, kx])
                        part <<= prod[oi][ci] - lo[oi]
                        if oi // (o // p) == ci // (c // p):
                            base += part
                        else:
                            rest += part
                    on = sign[oi] * base > thr[oi]
                    passed[ni, oi, yi, xi] = on
                    acc[ni, oi, yi, xi] = base + (rest if on else 0) + int(bias[oi])
    return acc, passed


@pytest.mark.parametrize("stride", [1, 2])
def test_golden_channel_gated_conv_matches_reference(stride):
    torch.manual_seed(stride)
    c, o, p = 4, 4, 2
    x = torch.randint(0, 256, (2, c, 5, 5))
    w = torch.randint(-255, 256, (o, c, 3, 3))
    w_lsb = torch.randint(-12, -8, (o, c))             # alignment shifts up to 3
    x_lsb = [-3, -2, -3, -1]
    bias = torch.randint(-1000, 1000, (o,))
    sign = [1, -1, 1, -1]
    acc0, _ = golden.conv2d_acc(x, torch.tensor(x_lsb), w * golden.cg_base_mask(o, c, p)[
        :, :, None, None], w_lsb, None, stride, 1)
    thr = [int(acc0[0, 0, 1, 1]), -int(acc0[1, 1, 0, 2]), int(acc0[0, 2].median()), 0]   # ties
    acc, passed, acc_lsb = golden.channel_gated_conv2d(
        x, torch.tensor(x_lsb), w, w_lsb, bias, partitions=p, threshold=torch.tensor(thr),
        sign=torch.tensor(sign), stride=stride, padding=1)
    ref_acc, ref_passed = _reference_cg(x, x_lsb, w, w_lsb, bias, p, thr, sign, stride, 1)
    assert torch.equal(passed, ref_passed) and torch.equal(acc, ref_acc)
    assert not bool(passed[0, 0, 1, 1]) and not bool(passed[1, 1, 0, 2])   # ties are closed
    assert 0 < int(passed.sum()) < passed.numel()


def test_golden_channel_gated_worst_case_accumulation():
    # every product at its maximum: 255 · (±255) over 8 channels x 3x3, shifted by up to 4
    c, o, p = 8, 4, 4
    x = torch.full((1, c, 3, 3), 255)
    w = torch.full((o, c, 3, 3), 255) * torch.tensor([1, -1, 1, -1])[:, None, None, None]
    w_lsb = torch.tensor([[0, 4, 0, 4, 0, 4, 0, 4]] * o)
    x_lsb = torch.zeros(c, dtype=torch.int64)
    bias = torch.zeros(o, dtype=torch.int64)
    huge = 10 ** 12
    for mode, thr in (("full", None), ("msb", None), ("gated", torch.tensor([0, 0, huge, -huge]))):
        acc, passed, _ = golden.channel_gated_conv2d(x, x_lsb, w, w_lsb, bias, partitions=p,
                                                     threshold=thr if thr is not None else 0,
                                                     mode=mode, padding=0)
        ref, ref_passed = _reference_cg(x, x_lsb.tolist(), w, w_lsb, bias, p,
                                        [-(1 << 62)] * o if mode == "full" else
                                        [1 << 62] * o if mode == "msb" else thr.tolist(),
                                        [1] * o, 1, 0)
        assert torch.equal(acc, ref) and torch.equal(passed, ref_passed), mode
    full_sum = 255 * 255 * 9 * 4 * (1 + 16)
    bound = golden.accumulator_bound(w, golden.conv_alignment(x_lsb, w_lsb)[1], bias, 255)
    assert bound.tolist() == [full_sum] * o
    assert int(ref.abs().max()) == full_sum            # the A4 bound is reached, not exceeded


# ---------------------------------------------------------- integer gate == float gate
def test_integer_gate_equals_float_decision_when_exact():
    conv, x = _exact_conv(c_in=4, c_out=4, p=2, seed=3)
    base, _, z = _parts(conv, x)
    bn = nn.BatchNorm2d(4, eps=0.0).eval()
    bn.running_var.fill_(0.25)                         # k = γ / 0.5 = 2γ, powers of two
    bn.weight.data = torch.tensor([1.0, -1.0, 0.5, -2.0])  # negative k: reversed direction
    # thresholds at a z value (tie -> closed in both models) or between values
    conv.threshold.data = torch.stack([z[0, 0, 2, 3], z[0, 1, 1, 1] - 0.25, z[1, 2, 0, 0] + 0.5,
                                       z[1, 3, 4, 4]])
    float_gate = z > conv.threshold.detach()[None, :, None, None]
    # the integer model: BN folded into the weights (B0), exact BFP, CG4 constants
    k = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    m, _, w_lsb = quantize_weight(conv.weight.detach().double() * k.reshape(-1, 1, 1, 1),
                                  CFG9.fmt, CFG9.weights)
    x_lsb = -1
    xq = (x * 2).long()
    acc_lsb, _ = golden.conv_alignment(x_lsb, w_lsb)
    thr, sign = cg_gate_constants(conv, bn, acc_lsb)
    acc, passed, _ = golden.channel_gated_conv2d(xq, x_lsb, m, w_lsb, None, partitions=2,
                                                 threshold=thr, sign=sign, padding=1)
    assert sign.tolist() == [1, -1, 1, -1]
    assert torch.equal(passed, float_gate)
    assert not bool(passed[0, 0, 2, 3]) and not bool(passed[1, 3, 4, 4])   # ties closed
    assert 0 < int(passed.sum()) < passed.numel()
    # the gated-off integer output is the BN-folded partial sum
    scaled = torch.ldexp(acc.double(), acc_lsb.double()[None, :, None, None])
    full = F.conv2d(x.double(), conv.weight.detach().double(), None, 1, 1)
    want = torch.where(float_gate, full, base.double()) * k[None, :, None, None]
    assert torch.equal(scaled, want)


# -------------------------------------------------------------------------- the program
@pytest.fixture(scope="module")
def tiny_program():
    torch.manual_seed(1)
    cg = CGResNet(1, num_classes=10, in_channels=1, partitions=2, cfg=CFG9, alpha=3.0,
                  threshold_init=0.0)
    with torch.no_grad():
        for m in cg.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.0, 1.5)           # some negative k_c
        for _, m in cg_layers(cg):
            m.threshold.uniform_(-0.5, 0.5)
            m.bn_gate.momentum = None                  # running statistics = one batch's
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        cg.train()(x)
    cg.eval()
    return cg, build_cg_program(cg, [x[:4], x[4:]], CFG9), x


def test_program_marks_channel_gated_layers(tiny_program):
    cg, program, x = tiny_program
    gated = [o for o in program.ops if o.dual_precision]
    assert [o.name for o in gated] == ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]
    for o in gated:
        assert o.channel_gated and (o.cg_partitions, o.dp_msb_bits) == (2, None)
        assert (o.dp_act_bits, o.dp_mode) == (8, "gated")
        prod = program.op(o.inputs[0])
        assert prod.activation == "pact" and int(prod.clamp_max.max()) <= 255
        assert set(o.dp_sign.tolist()) <= {-1, 1}
    assert not any(o.channel_gated for o in program.ops if not o.dual_precision)
    cases = cg_layer_cases(program, x[0])
    assert [c["name"] for c in cases] == [o.name for o in gated]
    for c in cases:
        assert c["x_int"].shape[0] == 1 and 0 <= int(c["x_int"].min())
        assert int(c["x_int"].max()) <= 255
    with pytest.raises(ValueError, match="cg_layer_cases takes one image"):
        cg_layer_cases(program, x[:2])
    st = cg_gate_stats(program, x)
    assert set(st) == {o.name for o in gated}
    assert all(0 < v["passed"] < v["total"] and v["partitions"] == 2 for v in st.values())


def test_program_modes_and_gate_constants(tiny_program):
    cg, program, x = tiny_program
    env = program.run_golden(x)
    for name, blk in [("layer1.0", cg.layer1[0]), ("layer2.0", cg.layer2[0]),
                      ("layer3.0", cg.layer3[0])]:
        o = program.op(f"{name}.conv1")
        xin = env[o.inputs[0]]
        full, fp = program.dual_precision_acc(o, xin, mode="full")
        plain, _ = golden.conv2d_acc(xin, program.lsb[o.inputs[0]], o.weight, o.w_lsb, o.bias,
                                     o.stride, o.padding)
        assert bool(fp.all()) and torch.equal(full, plain)
        base, bp = program.dual_precision_acc(o, xin, mode="msb")
        mask = golden.cg_base_mask(*o.weight.shape[:2], 2)[:, :, None, None]
        want, _ = golden.conv2d_acc(xin, program.lsb[o.inputs[0]], o.weight * mask, o.w_lsb,
                                    o.bias, o.stride, o.padding)
        assert not bool(bp.any()) and torch.equal(base, want)
        gated, gp = program.dual_precision_acc(o, xin)
        assert torch.equal(gated, torch.where(gp, full, base))
        bound = golden.accumulator_bound(o.weight * mask, o.shift, None, 255)
        thr, sign = cg_gate_constants(blk.conv1, blk.bn1, o.acc_lsb, bound)
        assert torch.equal(thr, o.dp_threshold) and torch.equal(sign, o.dp_sign)
        assert bool((thr <= bound).all() and (thr >= -bound - 1).all())
        with pytest.raises(ValueError, match="outside"):
            program.dual_precision_acc(o, xin + 256)


def test_program_round_trip_keeps_channel_gating(tiny_program):
    _, program, x = tiny_program
    back = BFPProgram.from_state(program.to_state())
    for a, b in zip(program.ops, back.ops):
        assert (a.cg_partitions, a.dp_msb_bits, a.dp_act_bits) == \
               (b.cg_partitions, b.dp_msb_bits, b.dp_act_bits)
    ea, eb = program.run_golden(x), back.run_golden(x)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # a state written before Channel Gating existed loads as plain/PG ops
    state = program.to_state()
    for o in state["ops"]:
        o.pop("cg_partitions")
    assert not any(o.channel_gated for o in BFPProgram.from_state(state).ops)


def test_program_tracks_float_cg_model(tiny_program):
    cg, program, x = tiny_program
    labels = torch.zeros(len(x), dtype=torch.long)
    fs = cg_stats(cg, [(x, labels)])
    gs = program_cg_stats(program, [(x, labels)])
    assert abs(fs["sparsity"] - gs["sparsity"]) < 0.05
    for name, v in gs["layers"].items():
        assert abs(v["sparsity"] - fs["layers"][name]["sparsity"]) < 0.08, name
    assert gs["cg_flop_reduction"] > gs["flop_reduction"] > 1.0
    fm = to_float_model(cg)                            # the full conv1, no gate
    assert set(fm.state_dict()) == set(CifarResNet(1, 10, 1).state_dict())
    assert torch.equal(fm.layer2[0].conv1.weight, cg.layer2[0].conv1.weight)
    assert fm.layer2[0].relu2.max_val == float(cg.layer2[0].relu2.alpha.detach())


def test_flop_summary_definitions():
    dense = {"a": 1000, "b": 3000, "stem": 500, "fc": 100}
    gates = {"a": {"passed": 25, "total": 100, "partitions": 4},
             "b": {"passed": 0, "total": 100, "partitions": 2}}
    s = cg_flop_summary(dense, gates)
    ra, rb = 0.25 + 0.75 * 0.25, 0.5
    assert s["layers"]["a"]["flop_ratio"] == pytest.approx(ra)
    assert s["layers"]["b"]["sparsity"] == 1.0
    assert s["sparsity"] == pytest.approx(1 - 25 / 200)
    assert s["cg_flop_reduction"] == pytest.approx(4000 / (1000 * ra + 3000 * rb))
    assert s["flop_reduction"] == pytest.approx(4600 / (1000 * ra + 3000 * rb + 600))


# ------------------------------------------------------------------------------ training
def test_train_cg_smoke_moves_thresholds_and_is_deterministic():
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, Subset

    from dynacc.quant.data import load_digits_split

    train, _ = load_digits_split(size=16, channels=1, seed=0)
    splits = SimpleNamespace(train=DataLoader(Subset(train, range(64)), batch_size=32))
    x, y = next(iter(DataLoader(train, batch_size=32)))

    def run():
        torch.manual_seed(0)
        cg = cg_resnet_from_float(CifarResNet(1, num_classes=10, in_channels=1), partitions=2,
                                  cfg=CFG9, alpha=4.0, threshold_init=0.0)
        train_cg(cg, splits, epochs=1, lr=0.05, gate_target=1.0, sigma_g=0.05,
                 threshold_lr_scale=10.0, seed=3, progress=False)
        return cg

    cg = run()
    thr = torch.cat([m.threshold.detach() for _, m in cg_layers(cg)])
    assert float(thr.mean()) > 0.0                     # pulled towards the target
    cg2 = run()
    for (k, a), b in zip(cg.state_dict().items(), cg2.state_dict().values()):
        assert torch.equal(a, b), k
    st = cg_stats(cg, [(x, y)])
    assert 0.0 <= st["sparsity"] <= 1.0 and st["flop_reduction"] >= 1.0
    with pytest.raises(ValueError, match="CGConv2d"):
        train_cg(CifarResNet(1, 10, 1), splits, epochs=1, progress=False)


# ----------------------------------------------------------------------------------- CLI
def test_train_cg_cli_tiny_run(tmp_path, capsys):
    out = tmp_path / "cg.pt"
    assert main(["train-cg", "--model", "resnet20", "--data", "digits", "--partitions", "2",
                 "--epochs", "0", "--calib-images", "20", "--eval-images", "8",
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "CG p=2" in text and "FLOP reduction" in text and str(out) in text
    cg, program, meta = cg_model_from_checkpoint(str(out))
    assert meta["technique"] == "cg" and meta["cg"]["partitions"] == 2
    gated = [o for o in program.ops if o.channel_gated]
    assert len(gated) == 9 and {o.cg_partitions for o in gated} == {2}
    blk, op = cg.layer2[1], program.op("layer2.1.conv1")
    mask = golden.cg_base_mask(32, 32, 2)[:, :, None, None]
    bound = golden.accumulator_bound(op.weight * mask, op.shift, None, 255)
    thr, sign = cg_gate_constants(blk.conv1, blk.bn1, op.acc_lsb, bound)
    assert torch.equal(thr, op.dp_threshold) and torch.equal(sign, op.dp_sign)
    assert 0.0 <= meta["sparsity"] <= 1.0 and meta["flop_reduction"] >= 1.0


@pytest.mark.parametrize("argv, msg", [
    (["--model", "resnet20", "--partitions", "3"],
     "partitions p=3 does not divide the channels of CG layer 'layer1.0.conv1' (C=16 inputs, "
     "O=16 outputs)"),
    (["--model", "resnet20", "--partitions", "32"], "'layer1.0.conv1' (C=16"),
    (["--model", "resnet20", "--partitions", "0"], "integer >= 1"),
    (["--model", "resnet20", "--act-bits", "9"], "does not fit the M=9"),
    (["--model", "resnet21"], "unknown model 'resnet21' for Channel Gating"),
])
def test_train_cg_cli_errors(argv, msg, capsys):
    assert main(["train-cg", *argv]) == 2
    assert msg in capsys.readouterr().err
