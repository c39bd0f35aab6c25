"""Every engine layer of the digits-trained, KL-calibrated ResNet-20, on real test images.

The layer program maps the calibrated integer program onto the default engine (the stem has
C = 1 < K input channels, so it runs as a 1×1 conv over host-im2col'ed input, C' = 9; the nine
residual adds are fused into their convs), each layer's inputs are the golden activations of a
real digit, and the RTL output of every layer must equal (``==``) both the engine-level golden
and the network golden at that tensor.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dynacc.gen.engine_layers import conv_layer
from dynacc.gen.layer_program import build_layer_program
from dynacc.hw.config import load_named
from dynacc.quant.calibrate import calibrate
from dynacc.quant.flow import cached_digits_model, calibration_batches
from dynacc.quant.formats import QuantConfig
from dynacc.sim.conv import check_conv_output, verify_conv_layers

HW = load_named("default")


@pytest.fixture(scope="module")
def calibrated():
    model, splits = cached_digits_model("resnet20")
    shapes: dict[str, tuple[int, ...]] = {}
    prog = calibrate(model, calibration_batches(splits.train, 100), QuantConfig(method="kl"),
                     progress=False, shapes=shapes)
    images = torch.stack([splits.test.dataset[i][0] for i in (0, 7)])
    return prog, shapes, images


def test_every_resnet20_layer_bit_exact_on_real_digits(calibrated):
    prog, shapes, images = calibrated
    lp = build_layer_program("resnet20", prog, shapes, HW)
    engine = lp.engine_layers
    assert len(engine) == 22 and engine[0].im2col and engine[-1].kind == "linear"
    assert sum(1 for l in engine if l.residual) == 9  # every residual add fused
    env = prog.run_golden(images)
    layers, expected = [], []
    for i in range(images.shape[0]):
        acts = {name: t[i] for name, t in env.items()}
        for l in engine:
            cl = conv_layer(prog, l, acts)
            cl = dataclasses.replace(cl, name=f"img{i}/{l.name}")
            layers.append(cl)
            expected.append(acts[l.output])
    results = verify_conv_layers(layers, HW)  # == vs engine golden + cycles == model
    for cl, r, want in zip(layers, results, expected):
        want = want.numpy()
        if want.ndim == 1:
            want = want[:, None, None]
        check_conv_output(cl.name, r.out, want)  # and vs the network golden
    nonzero = sum(int(np.count_nonzero(r.out)) for r in results)
    assert nonzero > 0.2 * sum(r.out.size for r in results)  # real, not all-zero, activations
