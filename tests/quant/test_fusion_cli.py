"""``python -m dynacc.quant train-fusion``: a tiny real run, its checkpoint round trip and
argument errors."""

import pytest
import torch

from dynacc.quant.cli import main
from dynacc.quant.fusion import predicted_units
from dynacc.quant.train_fusion import load_fusion_checkpoint

TINY = ["--float-epochs", "1", "--prune-epochs", "1", "--recover-epochs", "0", "--pred-epochs",
        "1", "--max-batches", "1", "--batch-size", "16", "--eval-images", "16",
        "--calib-images", "16", "--quiet"]


@pytest.mark.parametrize("model", ["fusionet_digits", "mbv2_fusion_digits"])
def test_train_fusion_tiny_run_and_checkpoint_round_trip(tmp_path, capsys, model):
    out = tmp_path / "f.pt"
    assert main(["train-fusion", "--model", model, "--data", "digits", *TINY,
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "integer golden, fused" in text and "mask misprediction" in text and str(out) in text
    pruned, pred, meta = load_fusion_checkpoint(out)
    assert meta["technique"] == "fusion" and meta["dataset"] == "digits"
    assert meta["model"] == model
    for k in ("vanilla_acc", "pruned_acc", "predicted_acc", "mask_error_rate", "mults_dense",
              "mults_fused", "mult_reduction"):
        assert k in meta
    assert meta["mult_reduction"] > 6
    assert 0.0 <= meta["mask_error_rate"]["s1"] <= 1.0
    assert len(predicted_units(pred)) == 3
    assert float((pruned.units[0].expand.weight == 0).float().mean()) >= 0.79
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        a, b = pred(x), pred(x)
    assert torch.equal(a, b)
    sd = torch.load(out, weights_only=False)["meta"]["predictor_state_dict"]
    for k, v in pred.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_train_fusion_errors(capsys):
    assert main(["train-fusion", "--model", "resnet20", "--quiet"]) == 2
    assert "unknown model 'resnet20' for train-fusion" in capsys.readouterr().err
    assert main(["train-fusion", "--data", "cifar10", "--quiet"]) == 2
    assert "--data digits" in capsys.readouterr().err
    assert main(["train-fusion", "--pred-epochs", "-1", "--quiet"]) == 2
    assert "--pred-epochs must be >= 0" in capsys.readouterr().err
