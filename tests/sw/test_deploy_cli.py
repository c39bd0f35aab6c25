"""``python sw/deploy.py``: checkpoint and random-weight exports, clear CLI errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynacc.quant.checkpoint import save_checkpoint
from dynacc.quant.models import build_model
from dynacc.sw.deploy import main
from dynacc.sw.reader import load_deploy

REPO = Path(__file__).resolve().parents[2]
HW_YAML = str(REPO / "configs/hw/default.yaml")


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A calibrated digits_net checkpoint as `python -m dynacc.quant calibrate` writes it."""
    from dynacc.quant.calibrate import calibrate
    from dynacc.quant.formats import QuantConfig

    torch.manual_seed(0)
    model = build_model("digits_net", num_classes=10, in_channels=1).eval()
    g = torch.Generator().manual_seed(1)
    program = calibrate(model, [torch.randn(4, 1, 8, 8, generator=g)], QuantConfig(method="max"),
                        progress=False)
    d = tmp_path_factory.mktemp("ckpt")
    path = d / "digits_net-digits-m8-max.pt"
    kw = {"num_classes": 10, "in_channels": 1}
    save_checkpoint(path, "digits_net", kw, model, program, meta={"dataset": "digits"})
    float_only = d / "float.pt"
    save_checkpoint(float_only, "digits_net", kw, model)
    return path, float_only, program


def test_checkpoint_export(digits_ckpt, tmp_path, capsys):
    ckpt, _, program = digits_ckpt
    out = tmp_path / "dep"
    assert main(["--model", "digits_net", "--checkpoint", str(ckpt), "--out", str(out),
                 "--hw", HW_YAML]) == 0
    assert "digits_net (digits) for hw 'default'" in capsys.readouterr().out
    dep = load_deploy(out, "default")
    assert dep.manifest["random_weights"] is False and dep.manifest["dataset"] == "digits"
    assert dep.manifest["source"]["checkpoint_sha256"]
    assert dep.input_shape == (1, 8, 8)
    conv1 = program.op("conv1")
    assert torch.equal(torch.from_numpy(dep.arrays["conv1/weight"]).long(), conv1.weight)


def test_random_weights_are_announced(tmp_path, capsys):
    out = tmp_path / "dep"
    assert main(["--model", "digits_net", "--out", str(out), "--hw", HW_YAML,
                 "--calib-images", "1"]) == 0
    cap = capsys.readouterr()
    assert "RANDOM weights" in cap.err and "RANDOM weights" in cap.out
    dep = load_deploy(out, images=False)
    assert dep.manifest["random_weights"] is True and dep.manifest["source"]["seed"] == 0


def test_unknown_model(tmp_path, capsys):
    assert main(["--model", "resnet9000", "--out", str(tmp_path / "x")]) == 2
    assert "error: unknown model 'resnet9000'; known: " in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["--model", "resnet20", "--checkpoint", str(tmp_path / "nope.pt"),
                 "--out", str(tmp_path / "x"), "--hw", HW_YAML]) == 2
    assert f"error: checkpoint '{tmp_path / 'nope.pt'}' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_checkpoint_without_program(digits_ckpt, tmp_path, capsys):
    _, float_only, _ = digits_ckpt
    assert main(["--model", "digits_net", "--checkpoint", str(float_only),
                 "--out", str(tmp_path / "x"), "--hw", HW_YAML]) == 2
    assert "holds no calibrated program" in capsys.readouterr().err


def test_checkpoint_of_another_model(digits_ckpt, tmp_path, capsys):
    ckpt, _, _ = digits_ckpt
    assert main(["--model", "resnet20", "--checkpoint", str(ckpt),
                 "--out", str(tmp_path / "x"), "--hw", HW_YAML]) == 2
    assert "holds model 'digits_net', not 'resnet20'" in capsys.readouterr().err


def test_missing_hw_config(tmp_path, capsys):
    assert main(["--model", "digits_net", "--hw", str(tmp_path / "nope.yaml"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "hardware config" in capsys.readouterr().err


def test_runs_as_a_script_from_the_repo_root(tmp_path):
    r = subprocess.run([sys.executable, "sw/deploy.py", "--model", "nope"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "error: unknown model 'nope'" in r.stderr, r.stderr
