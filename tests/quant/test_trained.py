"""Golden vs fake-quant vs float on a digits-trained, KL-calibrated ResNet-20."""

import pytest
import torch

from dynacc.quant.calibrate import calibrate
from dynacc.quant.flow import cached_digits_model, calibration_batches
from dynacc.quant.formats import QuantConfig


@pytest.fixture(scope="module")
def trained():
    model, splits = cached_digits_model("resnet20")
    x = torch.cat([b for b, _ in splits.test])
    y = torch.cat([t for _, t in splits.test])
    return model, splits, x, y


@pytest.mark.parametrize("method", ["kl", "max"])
def test_golden_matches_fake_quant_and_float_on_test_split(trained, method):
    model, splits, x, y = trained
    prog = calibrate(model, calibration_batches(splits.train, 100), QuantConfig(method=method),
                     progress=False)
    env = prog.run_golden(x)
    fq = prog.fake_quant(x, torch.float64)
    for op in prog.ops:  # float64 fake-quant reproduces every integer exactly
        got = prog.dequantize_output(op.name, env[op.name]).double()
        assert torch.equal(got, fq[op.name].double()), op.name
    # float32 fake-quant (the training path) agrees within one output LSB on >= 99.9 %
    fq32 = prog.fake_quant(x, torch.float32)
    out = prog.output
    gold = prog.dequantize_output(out, env[out]).double()
    step = 2.0 ** prog.lsb[out].double()
    close = ((fq32[out].double() - gold).abs() <= step).float().mean()
    assert close >= 0.999
    assert torch.equal(gold.argmax(1), fq[out].argmax(1))
    fp = model(x).argmax(1)
    fp_acc = float((fp == y).float().mean())
    bfp_acc = float((gold.argmax(1) == y).float().mean())
    assert fp_acc > 0.9
    assert abs(fp_acc - bfp_acc) <= 0.02  # M = 8: within 2 points on 450 images


def test_low_mantissa_degrades_gracefully(trained):
    model, splits, x, y = trained
    accs = []
    for m in (4, 8):
        prog = calibrate(model, calibration_batches(splits.train, 100),
                         QuantConfig.from_dict({"mantissa_bits": m}), progress=False)
        accs.append(float((prog.logits(x).argmax(1) == y).float().mean()))
    assert accs[0] <= accs[1] + 0.01
