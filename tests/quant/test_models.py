"""Model zoo: shapes, torchvision state_dict compatibility, FX traceability."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dynacc.quant.models import (
    DEFAULT_DATASET, MODELS, build_model, input_shape, list_models,
)

# Small test inputs (C, H, W) per model: ImageNet models at 64x64 for speed.
TEST_INPUT = {
    "digits_net": (1, 8, 8),
    "fbs_cnn": (1, 16, 16),
    "fusionet_digits": (1, 16, 16),
    "mbv2_fusion_digits": (1, 16, 16),
    "resnet20": (3, 32, 32),
    "resnet38": (3, 32, 32),
    "resnet74": (3, 32, 32),
    "resnet18": (3, 64, 64),
    "resnet50": (3, 64, 64),
    "mobilenet_v2": (3, 64, 64),
}

_CACHE: dict[str, nn.Module] = {}


def _model(name: str) -> nn.Module:
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = build_model(name).eval()
    return _CACHE[name]


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_all_models() -> None:
    assert list_models() == sorted(TEST_INPUT)
    assert set(MODELS) == set(DEFAULT_DATASET)


@pytest.mark.parametrize("name", sorted(TEST_INPUT))
def test_forward_shape(name: str) -> None:
    m = _model(name)
    x = torch.randn(2, *TEST_INPUT[name])
    with torch.no_grad():
        y = m(x)
    expected = 1000 if DEFAULT_DATASET[name] == "imagenet" else 10
    assert y.shape == (2, expected)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(TEST_INPUT))
def test_num_classes_and_in_channels(name: str) -> None:
    torch.manual_seed(0)
    m = build_model(name, num_classes=7, in_channels=1).eval()
    _, h, w = TEST_INPUT[name]
    with torch.no_grad():
        assert m(torch.randn(1, 1, h, w)).shape == (1, 7)


@pytest.mark.parametrize("name", sorted(TEST_INPUT))
def test_fx_traceable_and_equivalent(name: str) -> None:
    m = _model(name)
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(2, *TEST_INPUT[name])
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x))
    ops = {n.op for n in gm.graph.nodes}
    assert "call_module" in ops


@pytest.mark.parametrize("name", ["resnet20", "digits_net", "mobilenet_v2"])
def test_backward_runs(name: str) -> None:
    torch.manual_seed(0)
    m = build_model(name).train()
    x = torch.randn(2, *TEST_INPUT[name])
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("name,count", [
    ("resnet18", 11_689_512),
    ("resnet50", 25_557_032),
    ("mobilenet_v2", 3_504_872),
    ("resnet20", 272_474),
])
def test_parameter_count(name: str, count: int) -> None:
    assert _nparams(_model(name)) == count


# Samples of torchvision's state_dict (key -> shape) and total key counts.
TV_KEYS = {
    "resnet18": (122, {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.weight": (64,),
        "bn1.running_mean": (64,),
        "bn1.num_batches_tracked": (),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.1.bn2.running_var": (64,),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "layer3.1.conv2.weight": (256, 256, 3, 3),
        "layer4.0.downsample.0.weight": (512, 256, 1, 1),
        "layer4.1.bn2.bias": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    }),
    "resnet50": (320, {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.bn3.weight": (256,),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.weight": (256,),
        "layer1.2.conv1.weight": (64, 256, 1, 1),
        "layer2.0.conv1.weight": (128, 256, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "layer2.3.bn3.running_var": (512,),
        "layer3.5.conv3.weight": (1024, 256, 1, 1),
        "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
        "layer4.2.bn3.weight": (2048,),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }),
    "mobilenet_v2": (314, {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.weight": (32,),
        "features.0.1.num_batches_tracked": (),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.0.1.running_mean": (32,),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.weight": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.running_var": (24,),
        "features.14.conv.0.0.weight": (576, 96, 1, 1),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "features.18.1.bias": (1280,),
        "classifier.1.weight": (1000, 1280),
        "classifier.1.bias": (1000,),
    }),
}


@pytest.mark.parametrize("name", sorted(TV_KEYS))
def test_torchvision_state_dict_layout(name: str) -> None:
    n_keys, sample = TV_KEYS[name]
    sd = _model(name).state_dict()
    assert len(sd) == n_keys
    for key, shape in sample.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key


def test_resnet_structure_details() -> None:
    r18 = _model("resnet18")
    assert r18.layer1[0].downsample is None
    r50 = _model("resnet50")
    # v1.5: stride on the 3x3 conv, not on the first 1x1.
    assert r50.layer2[0].conv1.stride == (1, 1)
    assert r50.layer2[0].conv2.stride == (2, 2)
    assert r50.layer2[0].downsample[0].stride == (2, 2)
    # Bias-free convs, BN init 1/0, kaiming fan_out.
    assert r50.conv1.bias is None
    assert torch.all(r50.bn1.weight == 1) and torch.all(r50.bn1.bias == 0)
    w = r50.layer3[0].conv2.weight
    expected_std = math.sqrt(2.0 / (w.shape[0] * 9))
    assert abs(w.std().item() / expected_std - 1) < 0.05


def test_cifar_resnet_structure() -> None:
    for name, n in [("resnet20", 3), ("resnet38", 6), ("resnet74", 12)]:
        m = _model(name)
        assert m.depth == 6 * n + 2
        assert len(m.layer1) == len(m.layer2) == len(m.layer3) == n
    m = _model("resnet20")
    assert m.layer1[0].downsample is None
    ds = m.layer2[0].downsample
    assert isinstance(ds[0], nn.Conv2d) and ds[0].kernel_size == (1, 1) and ds[0].stride == (2, 2)
    assert isinstance(ds[1], nn.BatchNorm2d)
    assert [m.layer1[0].conv1.out_channels, m.layer2[0].conv1.out_channels,
            m.layer3[0].conv1.out_channels] == [16, 32, 64]
    assert m.fc.in_features == 64


def test_mobilenet_residual_flags_and_width() -> None:
    m = _model("mobilenet_v2")
    assert not m.features[1].use_res_connect  # 32 -> 16
    assert not m.features[2].use_res_connect  # stride 2
    assert m.features[3].use_res_connect      # 24 -> 24, stride 1
    assert isinstance(m.features[18][2], nn.ReLU6)
    assert isinstance(m.classifier[0], nn.Dropout) and m.classifier[0].p == 0.2
    half = build_model("mobilenet_v2", width_mult=0.5)
    assert half.features[0][0].out_channels == 16 and half.last_channel == 1280


def test_unknown_model_error() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'vgg16'; known: .*resnet20"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="unknown model"):
        input_shape("vgg16", "cifar10")


def test_input_shape() -> None:
    assert input_shape("digits_net", "digits") == (1, 8, 8)
    assert input_shape("digits_net") == (1, 8, 8)
    assert input_shape("resnet20", "digits") == (1, 16, 16)
    assert input_shape("resnet20") == (3, 32, 32)
    assert input_shape("resnet74", "cifar10") == (3, 32, 32)
    assert input_shape("resnet50") == (3, 224, 224)
    assert input_shape("mobilenet_v2", "imagenet") == (3, 224, 224)
    with pytest.raises(ValueError, match="unknown dataset"):
        input_shape("resnet20", "mnist")
