"""Fixtures of the deploy tests: small calibrated programs (random weights, seconds to make)
exported once per session."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dynacc.hw.config import load_named
from dynacc.quant.calibrate import calibrate
from dynacc.quant.formats import QuantConfig
from dynacc.quant.models import build_model
from dynacc.sw.export import export_program

HW = load_named("default")


@dataclasses.dataclass
class Exported:
    model: str
    program: object
    shapes: dict
    layer_program: object
    path: object
    images: torch.Tensor


def make_program(model: str, shape: tuple[int, int, int], seed: int = 0):
    """Seeded random weights, BN settled on random images, max calibration."""
    torch.manual_seed(seed)
    m = build_model(model, num_classes=10, in_channels=shape[0])
    g = torch.Generator().manual_seed(seed)
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(8, *shape, generator=g))
    m.eval()
    shapes: dict = {}
    calib = [torch.randn(4, *shape, generator=g)]
    program = calibrate(m, calib, QuantConfig(method="max"), progress=False, shapes=shapes)
    images = torch.randn(3, *shape, generator=g)
    return program, shapes, images


@pytest.fixture(scope="session")
def resnet20_deploy(tmp_path_factory) -> Exported:
    """ResNet-20 at 16x16, one input channel: im2col stem, fused residual adds, FC."""
    program, shapes, images = make_program("resnet20", (1, 16, 16))
    path = tmp_path_factory.mktemp("deploy") / "resnet20"
    lp = export_program(path, program, shapes, HW, model="resnet20", dataset="digits",
                        source={"random_weights": True, "seed": 0})
    return Exported("resnet20", program, shapes, lp, path, images)
