"""``python -m dynacc.quant calibrate``: a real (small) run and its error messages."""

import torch

from dynacc.quant.checkpoint import load_checkpoint
from dynacc.quant.cli import main


def test_calibrate_digits_net_end_to_end(tmp_path, capsys):
    out = tmp_path / "dn.pt"
    rc = main(["calibrate", "--model", "digits_net", "--data", "digits", "--epochs", "2",
               "--mantissa", "8", "--method", "kl", "--calib-images", "64", "--out", str(out),
               "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "FP" in text and "BFP M=8 kl" in text and str(out) in text
    ck = load_checkpoint(out)
    assert ck.program is not None and ck.meta["dataset"] == "digits"
    assert ck.meta["quant"]["mantissa_bits"] == 8 and ck.meta["quant"]["method"] == "kl"
    assert ck.meta["fp_acc"] > 50 and abs(ck.meta["fp_acc"] - ck.meta["bfp_acc"]) < 5
    # recalibrate from the saved float weights with another format
    out2 = tmp_path / "dn6.pt"
    assert main(["calibrate", "--model", "digits_net", "--checkpoint", str(out), "--mantissa",
                 "6", "--method", "max", "--out", str(out2), "--quiet"]) == 0
    ck2 = load_checkpoint(out2)
    for a, b in zip(ck.model.state_dict().values(), ck2.model.state_dict().values()):
        assert torch.equal(a, b)
    assert ck2.program.fmt.mantissa_bits == 6


def test_unknown_model_is_named(capsys):
    assert main(["calibrate", "--model", "resnet21"]) == 2
    assert "unknown model 'resnet21'" in capsys.readouterr().err


def test_missing_dataset_path_is_named(tmp_path, capsys):
    assert main(["calibrate", "--model", "resnet20", "--data", "cifar10",
                 "--data-root", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_checkpoint_that_does_not_fit(tmp_path, capsys):
    from dynacc.quant.models import build_model
    bad = tmp_path / "r20.pt"
    torch.save(build_model("resnet20").state_dict(), bad)  # 3 input channels, digits needs 1
    assert main(["calibrate", "--model", "resnet20", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "r20.pt" in err and "does not fit" in err


def test_bad_format_option(capsys):
    assert main(["calibrate", "--model", "digits_net", "--mantissa", "1"]) == 2
    assert "mantissa_bits" in capsys.readouterr().err
