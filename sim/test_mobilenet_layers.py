"""MobileNetV2 layers on the engine: depthwise convs as block-diagonal dense convs, ReLU6,
the im2col stem (3×3, stride 2) and a projection with a fused residual, on the golden activations of a
calibrated (random-weight) network. Every element ``==`` the network golden."""

from __future__ import annotations

import dataclasses

import torch

from dynacc.gen.engine_layers import conv_layer
from dynacc.gen.layer_program import build_layer_program
from dynacc.hw.config import load_named
from dynacc.quant.calibrate import calibrate
from dynacc.quant.data import random_images
from dynacc.quant.formats import QuantConfig
from dynacc.quant.models import build_model
from dynacc.sim.conv import check_conv_output, verify_conv_layers

HW = load_named("default")


def test_mobilenet_v2_first_blocks_bit_exact():
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", num_classes=10)
    model.train()
    with torch.no_grad():
        model(random_images(4, (3, 32, 32), seed=1))
    shapes: dict[str, tuple[int, ...]] = {}
    prog = calibrate(model.eval(), [random_images(2, (3, 32, 32), seed=2)],
                     QuantConfig(method="kl"), progress=False, shapes=shapes)
    big = dataclasses.replace(HW, name="big_weights", wgt_depth=1 << 16)
    lp = build_layer_program("mobilenet_v2", prog, shapes, big)
    eng = lp.engine_layers[:9]  # stem, block 1, block 2 and block 3 (with residual)
    assert any(l.groups > 1 for l in eng) and any(l.residual for l in eng)
    assert any(l.activation == "relu6" for l in eng) and eng[0].im2col
    env = prog.run_golden(random_images(1, (3, 32, 32), seed=3))
    acts = {k: v[0] for k, v in env.items()}
    layers = [conv_layer(prog, l, acts) for l in eng]
    # the small-weight-depth default build is reused: these layers fit it
    results = verify_conv_layers(layers, HW)
    for l, r in zip(eng, results):
        check_conv_output(l.name, r.out, acts[l.output].numpy())
