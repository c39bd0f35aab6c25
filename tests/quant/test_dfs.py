"""DFS: truncation quantizer vs the golden split, gate decisions, CP, skips, the integer
program with a host gate, a short training run and the CLI errors."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from dynacc.quant import golden
from dynacc.quant.cli import main
from dynacc.quant.dfs import (DFSResNet, computation_percentage, hard_decision, parse_options,
                              truncate_activation)
from dynacc.quant.dfs_program import (build_dfs_program, load_dfs_checkpoint, run_dfs_golden,
                                      save_dfs_checkpoint)
from dynacc.quant.flow import cached_digits_model, calibration_batches
from dynacc.quant.formats import BFPFormat
from dynacc.quant.functional import dequantize, quantize
from dynacc.quant.train_dfs import dfs_stats, make_dfs_model, train_dfs, train_gate_full

FMT = BFPFormat(9, 8)


@pytest.fixture(scope="module")
def digits():
    model, splits = cached_digits_model("resnet20")
    calib = calibration_batches(splits.train, 64)
    return model, splits, calib


@pytest.fixture(scope="module")
def dfs_program(digits):
    model, splits, calib = digits
    dfs = make_dfs_model(model, "skip,4,8", calib)
    program, gate = build_dfs_program(dfs, calib)
    return dfs, program, gate


# ---------------------------------------------------------------- quantizer
@pytest.mark.parametrize("prec", [1, 2, 4, 7, 8])
def test_truncation_equals_golden_msb_split(prec):
    g = torch.Generator().manual_seed(prec)
    lsb = -5
    # exact grid points, half-LSB ties, and values beyond the clamp
    q = torch.randint(0, 300, (2000,), generator=g).to(torch.float64)
    x = torch.cat([q, q + 0.5, q + 0.25, torch.tensor([0.0, 254.5, 255.5, 1000.0])]) * 2.0 ** lsb
    got = truncate_activation(x, lsb, FMT, 8, prec)
    m = quantize(x, lsb, FMT).clamp(0, 255)  # rule Q2 + the pact clamp (G0)
    if prec < 8:
        hb, _ = golden.split_msb_lsb(m, 8, prec)
        m = torch.bitwise_left_shift(hb, 8 - prec)
    assert torch.equal(got, dequantize(m, lsb).to(torch.float64))
    # the integers behind the float values, exactly
    assert torch.equal(torch.round(got * 2.0 ** -lsb).to(torch.int64), m)


def test_truncation_ties_and_floor():
    lsb = 0
    x = torch.tensor([2.5, 3.5, 37.0, 47.9, 255.5, 300.0, 15.0, 16.0])
    full = truncate_activation(x, lsb, FMT, 8, 8)
    assert full.tolist() == [2.0, 4.0, 37.0, 48.0, 255.0, 255.0, 15.0, 16.0]  # half to even
    top4 = truncate_activation(x, lsb, FMT, 8, 4)
    assert top4.tolist() == [0.0, 0.0, 32.0, 48.0, 240.0, 240.0, 0.0, 16.0]  # floor of the top bits


def test_truncation_gradient_is_straight_through_inside_the_clamp():
    x = torch.tensor([1.3, 100.0, 300.0], requires_grad=True)
    truncate_activation(x, 0, FMT, 8, 4).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]


def test_activation_bits_must_fit_the_mantissa():
    with pytest.raises(ValueError, match="rule G0"):
        truncate_activation(torch.ones(2), 0, BFPFormat(8, 8), 8, 4)


# ---------------------------------------------------------------- gate and CP
def test_argmax_tie_goes_to_lowest_index():
    p = torch.tensor([[0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3]])
    h = hard_decision(p)
    assert h.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
    assert torch.equal(h.sum(1), torch.ones(3))  # never multi-hot


def test_computation_percentage_on_hand_made_decisions():
    costs = parse_options("skip,4,8").costs
    assert costs == (0.0, 0.5, 1.0)
    idx = torch.tensor([[0, 1, 2], [2, 2, 1]])
    cp = computation_percentage(idx, costs)
    assert float(cp) == pytest.approx(100 * (0 + 0.5 + 1 + 1 + 1 + 0.5) / 6)
    assert float(computation_percentage(F.one_hot(idx, 3).float(), costs)) == pytest.approx(float(cp))
    assert parse_options("skip,8").costs == (0.0, 1.0)
    assert parse_options(["skip", 2, 4, 8]).costs == (0.0, 0.25, 0.5, 1.0)


@pytest.mark.parametrize("bad, msg", [("skip,3x,8", "unknown DFS option '3x'"),
                                      ("skip,8,8", "given twice"), ("skip", "at least one"),
                                      ("skip,0,8", "at least 1 bit")])
def test_bad_options_are_named(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_options(bad)


def test_gate_gets_gradient_through_straight_through(digits):
    model, splits, calib = digits
    dfs = make_dfs_model(model, "skip,4,8", calib).train()
    x, y = next(iter(splits.train))
    out = dfs(x[:16])
    # forward value is exactly one-hot
    assert torch.equal(out.decisions.detach().sum(-1), torch.ones(16, dfs.n_gated))
    assert set(out.decisions.detach().unique().tolist()) <= {0.0, 1.0}
    cp = computation_percentage(out.decisions, dfs.options.costs)
    (F.cross_entropy(out.logits, y[:16]) + cp / 100).backward()
    for name, p in dfs.gate.named_parameters():
        if name.startswith("embed.7"):
            continue  # the gate after block 7 decides block 8 only: it still gets a gradient
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- skips
def test_skip_of_a_transition_block_runs_only_its_shortcut(digits):
    model, splits, calib = digits
    dfs = make_dfs_model(model, "skip,4,8", calib)
    k = next(i for i, b in enumerate(dfs.blocks) if b.downsample is not None)
    blk = dfs.blocks[k]
    x = torch.rand(4, blk.conv1.in_channels, 16, 16)
    with torch.no_grad():
        skipped = dfs.run_block(k, x, "skip")
        blk.conv1.weight.mul_(-3.0)
        blk.conv2.weight.zero_()
        assert torch.equal(dfs.run_block(k, x, "skip"), skipped)
        xq = truncate_activation(x, dfs.act_lsb[k, 0], dfs.fmt, 8, 8)
        ref = F.relu(blk.downsample[1](F.conv2d(xq, dfs._w(blk.downsample[0]), None, 2)))
    assert skipped.shape == (4, blk.conv1.out_channels, 8, 8)
    assert torch.allclose(skipped, ref)
    # an identity block's skip is its (quantized) input
    assert torch.equal(dfs.run_block(1, x, "skip"), truncate_activation(x, dfs.act_lsb[1, 0],
                                                                         dfs.fmt, 8, 8))


# ---------------------------------------------------------------- integer program
def test_program_marks_gated_blocks(dfs_program):
    dfs, program, gate = dfs_program
    assert len(gate.layout) == 9 and gate.n_gated == 8
    for blk in gate.layout[1:]:
        for name, which in ((blk.input, 0), (blk.conv1, 1)):
            o = program.op(name)
            assert o.activation == "pact" and torch.equal(o.clamp_max, torch.full_like(o.clamp_max, 255))
            assert torch.equal(program.lsb[name], torch.full_like(program.lsb[name],
                                                                  int(dfs.act_lsb[blk.index, which])))
        for name in blk.convs:
            o = program.op(name)
            assert (o.dp_act_bits, o.dp_msb_bits, o.dp_mode) == (8, 4, "full")
    assert not program.op(gate.layout[0].conv1).dual_precision


def test_golden_all_full_equals_plain_program(digits, dfs_program):
    _, splits, _ = digits
    _, program, gate = dfs_program
    x = next(iter(splits.test))[0][:24]
    full = torch.full((24, gate.n_gated), 2)
    logits, dec = run_dfs_golden(program, gate, x, full)
    assert torch.equal(dec, full)
    assert torch.equal(logits, program.logits(x))
    plain = copy.deepcopy(program)
    plain.ops = [dataclasses.replace(o, dp_act_bits=None, dp_msb_bits=None) for o in plain.ops]
    assert torch.equal(logits, plain.logits(x))


def test_golden_per_image_decisions_equal_batched_runs(digits, dfs_program):
    """Mixed decisions in one batch give each image exactly what a batch of its own gives."""
    _, splits, _ = digits
    _, program, gate = dfs_program
    x = next(iter(splits.test))[0][:6]
    g = torch.Generator().manual_seed(1)
    dec = torch.randint(0, 3, (6, gate.n_gated), generator=g)
    logits, _ = run_dfs_golden(program, gate, x, dec)
    for i in range(6):
        one, _ = run_dfs_golden(program, gate, x[i:i + 1], dec[i:i + 1])
        assert torch.equal(one[0], logits[i])


def test_golden_msb_block_consumes_truncated_inputs(digits, dfs_program):
    """A block at 4 bits equals the full-precision block on inputs truncated to 4 MSBs."""
    _, splits, _ = digits
    dfs, program, gate = dfs_program
    from dynacc.quant.dfs_program import _run_block

    blk = gate.layout[4]
    x = program.run_golden(next(iter(splits.test))[0][:8])[blk.input]
    assert int(x.min()) >= 0 and int(x.max()) <= 255
    msb = _run_block(program, blk, x, 4, 8)[blk.output]
    # by hand: conv1 and conv2 on their inputs' top 4 bits (G1), residual add on the full input
    env = {blk.input: x}
    for name in blk.ops:
        o = dataclasses.replace(program.op(name), dp_act_bits=None, dp_msb_bits=None)
        xs = [env[i] for i in o.inputs]
        if o.kind == "conv":
            xs = [torch.bitwise_left_shift(torch.bitwise_right_shift(xs[0], 4), 4)]
        env[name] = program.golden_op(o, xs)
    assert torch.equal(msb, env[blk.output])


def test_golden_tracks_fake_quant_model(digits, dfs_program):
    _, splits, _ = digits
    dfs, program, gate = dfs_program
    x = next(iter(splits.test))[0][:64]
    for option in (2, 1):
        dec = torch.full((64, gate.n_gated), option)
        logits, _ = run_dfs_golden(program, gate, x, dec)
        with torch.no_grad():
            ref = dfs.eval()(x, dec).logits
        agree = float((logits.argmax(1) == ref.argmax(1)).double().mean())
        assert agree >= 0.85, (option, agree)


def test_training_smoke_and_checkpoint(digits, tmp_path):
    model, splits, calib = digits
    small = DataLoader(Subset(splits.train.dataset, range(96)), batch_size=32)
    dfs = make_dfs_model(model, "skip,4,8", calib)
    train_gate_full(dfs, small, epochs=1, progress=False)
    before = copy.deepcopy(dfs.state_dict())
    hist = train_dfs(dfs, small, target_cp=50, epochs=1, progress=False)
    assert len(hist) == 1 and 0 <= hist[0]["cp"] <= 100
    changed = [k for k, v in dfs.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("gate.") for k in changed) and any(k.startswith("backbone.") for k in changed)
    # BN statistics stay frozen
    assert all(not k.endswith(("running_mean", "running_var")) for k in changed)
    # deterministic for a seed
    again = make_dfs_model(model, "skip,4,8", calib)
    train_gate_full(again, small, epochs=1, progress=False)
    train_dfs(again, small, target_cp=50, epochs=1, progress=False)
    for k, v in dfs.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    test = DataLoader(Subset(splits.test.dataset, range(32)), batch_size=32)
    st = dfs_stats(dfs, test)
    assert st["cp_per_input"].shape == (32,) and len(st["cp_per_block"]) == dfs.n_gated
    program, gate = build_dfs_program(dfs, calib)
    path = tmp_path / "dfs.pt"
    save_dfs_checkpoint(path, "resnet20", {"num_classes": 10, "in_channels": 1}, dfs, program,
                        gate, meta={"note": 1})
    dfs2, program2, gate2, meta = load_dfs_checkpoint(path)
    x = next(iter(test))[0]
    a, da = run_dfs_golden(program, gate, x)
    b, db = run_dfs_golden(program2, gate2, x)
    assert torch.equal(a, b) and torch.equal(da, db) and meta["note"] == 1
    assert torch.equal(dfs2.act_lsb, dfs.act_lsb) and dfs2.options == dfs.options


def test_dfs_model_refuses_bad_backbones(digits):
    model, _, _ = digits
    with pytest.raises(ValueError, match="rule G0"):
        DFSResNet(copy.deepcopy(model), "skip,4,8", BFPFormat(8, 8))
    with pytest.raises(TypeError, match="CIFAR ResNet"):
        DFSResNet(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("argv, msg", [
    (["--options", "skip,3x,8"], "unknown DFS option '3x'"),
    (["--target-cp", "0"], "(0, 100]"),
    (["--target-cp", "150"], "(0, 100]"),
    (["--model", "resnet21"], "unknown model 'resnet21'"),
    (["--model", "digits_net"], "unknown model 'digits_net' for DFS"),
])
def test_cli_errors(argv, msg, capsys):
    args = ["train-dfs", "--model", "resnet20", "--quiet"] + argv
    assert main(args) == 2
    assert msg in capsys.readouterr().err
