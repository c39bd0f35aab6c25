"""The integer FBS program: golden output vs a direct recomputation, the calibrated saliency
scale, ``fbs_layer_cases`` consistency, checkpoint round trip and the ``train-fbs`` CLI."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dynacc.quant import golden
from dynacc.quant.checkpoint import CheckpointError, save_checkpoint
from dynacc.quant.cli import main
from dynacc.quant.fbs import fbs_from_dense
from dynacc.quant.fbs_program import (FBS_QUANT_CONFIG, build_fbs_program, fbs_golden_stats,
                                      fbs_layer_cases, fbs_model_from_checkpoint,
                                      run_fbs_golden, save_fbs_checkpoint)
from dynacc.quant.formats import WeightBlocking
from dynacc.quant.functional import shift_round_half_even
from dynacc.quant.models.fbs_cnn import FBSCNN

CASE_KEYS = {"name", "x", "x_lsb", "w", "w_lsb", "bias", "scale", "scale_lsb", "active_in",
             "active_out", "out_lsb", "stride", "padding", "activation", "clamp_max", "act_bits",
             "expected"}


@pytest.fixture(scope="module")
def fbs_setup():
    """An untrained but non-trivial FBS model (spread saliencies, real BN statistics)."""
    torch.manual_seed(0)
    calib = torch.randn(48, 1, 16, 16)
    model = fbs_from_dense(FBSCNN(10, 1).eval(), calib, density=0.5)
    with torch.no_grad():
        for m in model.convs():
            m.phi.normal_(0.0, 0.5)
            m.rho.uniform_(0.5, 1.5)
            m.beta.uniform_(-0.2, 0.3)
        model.train()
        for _ in range(3):
            model(calib)                      # BN_na statistics of this model
    model.eval()
    return model, build_fbs_program(model, calib), calib


def test_program_structure_and_scales(fbs_setup):
    model, fp, calib = fbs_setup
    prog = fp.program
    assert [g.name for g in fp.gates] == [f"conv{i}" for i in range(1, 9)]
    assert [g.input for g in fp.gates] == ["input"] + [f"conv{i}" for i in range(1, 8)]
    run = run_fbs_golden(fp, calib)
    for g, m in zip(fp.gates, model.convs()):
        op = prog.op(g.name)
        assert op.activation == "pact" and int(op.clamp_max.max()) <= 255
        assert op.out_lsb.unique().tolist() == [m.act.lsb()]
        assert bool((op.w_lsb == op.w_lsb[:, :1]).all())       # whole-filter blocks
        top = float(run.saliency[g.name].max())                 # calibrated on these images
        assert 255 * 2.0 ** g.scale_lsb >= top > 255 * 2.0 ** (g.scale_lsb - 1)
        assert g.density == 0.5
    assert prog.lsb["input"].unique().tolist() == [model.input_act.lsb()]
    assert int(run.env["input"].min()) >= 0 and int(run.env["input"].max()) <= 255


def test_golden_equals_direct_recomputation(fbs_setup):
    model, fp, calib = fbs_setup
    prog = fp.program
    x = calib[:6]
    run = run_fbs_golden(fp, x)
    for g in fp.gates:
        op = prog.op(g.name)
        xi = run.env[g.input]
        x_lsb = int(prog.lsb[g.input][0])
        s = xi.double().mean(dim=(2, 3)) * 2.0 ** x_lsb
        sal = torch.relu(s @ g.phi.T + g.rho)
        assert torch.allclose(sal, run.saliency[g.name], rtol=1e-12, atol=1e-12)
        g_q = torch.round(run.saliency[g.name] / 2.0 ** g.scale_lsb).clamp(0, 255).long()
        assert torch.equal(g_q, run.scale[g.name])
        act = golden.fbs_active(g_q, g.density)
        assert torch.equal(act, run.active[g.name])
        assert int(act.sum(dim=1).max()) <= -(-op.weight.shape[0] // 2)
        # the conv in plain int64 with explicit alignment (A1-A3), then FBS3, R3 and the clamp
        acc_lsb = (x_lsb + op.w_lsb).amin(dim=1)
        w_al = op.weight << (x_lsb + op.w_lsb - acc_lsb[:, None])[:, :, None, None]
        acc = F.conv2d(xi, w_al, None, op.stride, op.padding)
        beta_q = torch.round(g.beta / 2.0 ** (acc_lsb + g.scale_lsb).double()).long()
        assert torch.equal(beta_q, g.beta_q)
        bias = g_q * op.bias + beta_q
        acc_s = torch.where(act[:, :, None, None],
                            acc * g_q[:, :, None, None] + bias[:, :, None, None], 0)
        shift = (op.out_lsb - acc_lsb - g.scale_lsb)[None, :, None, None]
        m = shift_round_half_even(acc_s, shift).clamp(-255, 255)
        y = torch.minimum(m.clamp(min=0), op.clamp_max[None, :, None, None])
        assert torch.equal(y, run.env[g.name]), g.name
        assert bool((y[~act] == 0).all())


def test_golden_tracks_the_float_model(fbs_setup):
    model, fp, calib = fbs_setup
    run = run_fbs_golden(fp, calib)
    model = copy.deepcopy(model)
    for g, m in zip(fp.gates, model.convs()):       # the float model on the program's scales
        m.saliency_max.fill_(255 * 2.0 ** g.scale_lsb)
        assert m.saliency_lsb(run.saliency[g.name]) == g.scale_lsb
    with torch.no_grad():
        logits = model(calib)
        q = model.quantize_input(calib)
    lsb = model.input_act.lsb()
    assert torch.equal(torch.round(q.double() * 2.0 ** -lsb).long(), run.env["input"])
    agree = [float((m.last_active.bool() == run.active[g.name]).double().mean())
             for g, m in zip(fp.gates, model.convs())]
    assert min(agree) > 0.9
    # an untrained net has near-tied logits: compare values, not argmax
    corr = torch.corrcoef(torch.stack([logits.flatten().double(), run.logits.flatten().double()]))
    assert float(corr[0, 1]) > 0.9
    st = fbs_golden_stats(fp, [(calib, run.logits.argmax(1))])
    assert st["acc"] == 100.0 and st["mac_reduction"] > 3.0 and max(st["density"]) <= 0.5
    assert st["predictor_macs"] > 0


def test_layer_cases_are_consistent(fbs_setup):
    _, fp, calib = fbs_setup
    cases = fbs_layer_cases(fp, calib[3])
    run = run_fbs_golden(fp, calib[3:4])
    assert [c["name"] for c in cases] == [g.name for g in fp.gates]
    prev = None
    for c, g in zip(cases, fp.gates):
        assert set(c) == CASE_KEYS
        assert torch.equal(c["expected"], run.env[g.name][0])
        assert torch.equal(c["x"], run.env[g.input][0]) and c["x"].dtype == torch.int64
        assert int(c["x"].min()) >= 0 and int(c["x"].max()) <= 255
        assert bool((c["x"][~c["active_in"]] == 0).all())          # inactive inputs are zero
        assert bool((c["expected"][~c["active_out"]] == 0).all())
        if prev is None:
            assert bool(c["active_in"].all())
        else:
            assert torch.equal(c["active_in"], prev["active_out"])
        assert c["active_in"].dtype == torch.bool and c["active_out"].dtype == torch.bool
        assert isinstance(c["x_lsb"], int) and isinstance(c["out_lsb"], int)
        assert isinstance(c["clamp_max"], int) and c["act_bits"] == 8
        assert c["activation"] == "pact" and c["scale_lsb"] == g.scale_lsb
        # the hardware's view: the case fields alone reproduce the expected output
        acc_s, acc_lsb = golden.fbs_conv2d(c["x"][None], c["x_lsb"], c["w"], c["w_lsb"],
                                           c["bias"], active=c["active_out"][None],
                                           scale=c["scale"][None], stride=c["stride"],
                                           padding=c["padding"])
        m = shift_round_half_even(acc_s, (c["out_lsb"] - acc_lsb - c["scale_lsb"])
                                  [None, :, None, None]).clamp(-255, 255)
        y = golden.apply_activation(m, "pact", c["clamp_max"])[0]
        assert torch.equal(y, c["expected"])
        prev = c
    with pytest.raises(ValueError, match="one image"):
        fbs_layer_cases(fp, calib[:2])


def test_with_density_and_errors(fbs_setup):
    model, fp, calib = fbs_setup
    dense = fp.with_density(1.0)
    run = run_fbs_golden(dense, calib[:4])
    assert all(bool(a.all()) for a in run.active.values())
    assert fp.gates[0].density == 0.5                            # the original is unchanged
    with pytest.raises(ValueError, match="weight group -1"):
        build_fbs_program(model, calib, dataclasses.replace(FBS_QUANT_CONFIG,
                                                            weights=WeightBlocking(group=8)))
    with pytest.raises(ValueError, match="FBSGatedCNN"):
        build_fbs_program(FBSCNN(10, 1), calib)
    with pytest.raises(ValueError, match="density"):
        fp.with_density(0.0)


def test_checkpoint_round_trip(fbs_setup, tmp_path):
    model, fp, calib = fbs_setup
    path = tmp_path / "fbs.pt"
    save_fbs_checkpoint(path, model, fp, meta={"dataset": "digits"})
    model2, fp2, meta = fbs_model_from_checkpoint(path)
    assert meta["technique"] == "fbs" and meta["dataset"] == "digits"
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    r1, r2 = run_fbs_golden(fp, calib[:8]), run_fbs_golden(fp2, calib[:8])
    for k in r1.env:
        assert torch.equal(r1.env[k], r2.env[k]), k
    assert [g.scale_lsb for g in fp2.gates] == [g.scale_lsb for g in fp.gates]
    plain = tmp_path / "plain.pt"
    save_checkpoint(plain, "fbs_cnn", {"num_classes": 10, "in_channels": 1}, FBSCNN(10, 1))
    with pytest.raises(CheckpointError, match="train-fbs"):
        fbs_model_from_checkpoint(plain)


# ----------------------------------------------------------------------------------- CLI
def test_train_fbs_cli_tiny_run(tmp_path, capsys):
    torch.manual_seed(0)
    dense = tmp_path / "dense.pt"        # an untrained backbone: the run is about the plumbing
    save_checkpoint(dense, "fbs_cnn", {"num_classes": 10, "in_channels": 1}, FBSCNN(10, 1))
    out = tmp_path / "fbs.pt"
    rc = main(["train-fbs", "--model", "fbs_cnn", "--data", "digits", "--checkpoint", str(dense),
               "--density", "0.75", "--warmup-epochs", "1", "--epochs", "1", "--max-batches",
               "2", "--calib-images", "32", "--out", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "FBS d=0.75" in text and "MAC reduction" in text and str(out) in text
    model, fp, meta = fbs_model_from_checkpoint(out)
    assert meta["train"]["steps"] == [1.0, 0.75] and fp.gates[0].density == 0.75
    assert meta["mac_reduction"] > 1.5 and max(meta["layer_density"]) <= 0.75
    assert 0 <= meta["bfp_acc"] <= 100
    assert meta["quant"]["weight_group"] == -1 and meta["quant"]["mantissa_bits"] == 9


@pytest.mark.parametrize("argv, msg", [
    (["--model", "fbs_cnn", "--density", "0"], "density must be in (0, 1]"),
    (["--model", "fbs_cnn", "--density", "1.5"], "density must be in (0, 1]"),
    (["--model", "resnet20"], "unknown model 'resnet20' for FBS"),
    (["--model", "fbs_cnn", "--mantissa", "8"], "does not fit the M=8"),
    (["--model", "fbs_cnn", "--epochs", "0"], "--epochs must be >= 1"),
    (["--model", "fbs_cnn", "--max-batches", "0"], "--max-batches must be >= 1"),
])
def test_train_fbs_cli_errors(argv, msg, capsys):
    assert main(["train-fbs", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_train_fbs_cli_rejects_other_checkpoints(tmp_path, capsys):
    from dynacc.quant.models import build_model

    bad = tmp_path / "r20.pt"
    save_checkpoint(bad, "resnet20", {"num_classes": 10, "in_channels": 1},
                    build_model("resnet20", num_classes=10, in_channels=1))
    assert main(["train-fbs", "--model", "fbs_cnn", "--checkpoint", str(bad)]) == 2
    assert "not 'fbs_cnn'" in capsys.readouterr().err
