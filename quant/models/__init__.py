"""Model zoo: plain ``torch.nn`` CNNs that ``torch.fx.symbolic_trace`` can trace.

Models
    ``digits_net``                      small CNN for 8x8 scikit-learn digits
    ``fbs_cnn``                         plain 8-conv CNN, the dense backbone of FBS (digits)
    ``fusionet_digits``                 small FusioNet (fusable bottlenecks, large expansion; digits)
    ``mbv2_fusion_digits``              MobileNetV2-style inverted residuals modified for fusion (digits)
    ``resnet20``/``resnet38``/``resnet74``  CIFAR ResNets (16/32/64 channels)
    ``resnet18``/``resnet50``           ImageNet ResNets, torchvision state_dict layout
    ``mobilenet_v2``                    ImageNet MobileNetV2, torchvision state_dict layout

Every builder accepts ``num_classes`` and ``in_channels`` keyword arguments.

Input geometry (``input_shape(name, dataset)`` -> ``(C, H, W)``):

============  ==================  ==============================
dataset       digits_net          every other model
============  ==================  ==============================
``digits``    ``(1, 8, 8)``       ``(1, 16, 16)`` (bilinear upsample)
``cifar10``   ``(3, 32, 32)``     ``(3, 32, 32)``
``imagenet``  ``(3, 224, 224)``   ``(3, 224, 224)``
============  ==================  ==============================

``dataset=None`` picks the model's home dataset (``DEFAULT_DATASET``).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .digits_net import DigitsNet, digits_net
from .fbs_cnn import FBSCNN, fbs_cnn
from .fusionet import FusioNetDigits, fusionet_digits, mbv2_fusion_digits
from .mobilenetv2 import MobileNetV2, mobilenet_v2
from .resnet_cifar import CifarResNet, resnet20, resnet38, resnet74
from .resnet_imagenet import ResNet, resnet18, resnet50

__all__ = [
    "MODELS", "DEFAULT_DATASET", "DATASET_NUM_CLASSES",
    "build_model", "list_models", "input_shape",
    "DigitsNet", "FBSCNN", "FusioNetDigits", "CifarResNet", "ResNet", "MobileNetV2",
    "digits_net", "fbs_cnn", "fusionet_digits", "mbv2_fusion_digits", "resnet20", "resnet38", "resnet74", "resnet18", "resnet50",
    "mobilenet_v2",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_net": digits_net,
    "fbs_cnn": fbs_cnn,
    "fusionet_digits": fusionet_digits,
    "mbv2_fusion_digits": mbv2_fusion_digits,
    "resnet20": resnet20,
    "resnet38": resnet38,
    "resnet74": resnet74,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
}

#: The dataset each model is designed for.
DEFAULT_DATASET: dict[str, str] = {
    "digits_net": "digits",
    "fbs_cnn": "digits",
    "fusionet_digits": "digits",
    "mbv2_fusion_digits": "digits",
    "resnet20": "cifar10",
    "resnet38": "cifar10",
    "resnet74": "cifar10",
    "resnet18": "imagenet",
    "resnet50": "imagenet",
    "mobilenet_v2": "imagenet",
}

#: Number of classes per dataset (pass as ``num_classes`` to ``build_model``).
DATASET_NUM_CLASSES: dict[str, int] = {"digits": 10, "cifar10": 10, "imagenet": 1000}

_DATASET_SHAPE: dict[str, tuple[int, int, int]] = {
    "digits": (1, 16, 16),  # 2x upsampled: stages at 16, 8, 4 px
    "cifar10": (3, 32, 32),
    "imagenet": (3, 224, 224),
}


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")


def list_models() -> list[str]:
    """Sorted names accepted by :func:`build_model`."""
    return sorted(MODELS)


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate model ``name`` (e.g. ``num_classes=10, in_channels=1``)."""
    _check_name(name)
    return MODELS[name](**kwargs)


def input_shape(name: str, dataset: str | None = None) -> tuple[int, int, int]:
    """Default ``(C, H, W)`` input of model ``name`` on ``dataset``.

    Digits are native 8x8 for ``digits_net`` and upsampled to 32x32 for every
    other model; CIFAR-10 is 32x32 RGB, ImageNet 224x224 RGB.
    """
    _check_name(name)
    ds = DEFAULT_DATASET[name] if dataset is None else dataset
    if ds not in _DATASET_SHAPE:
        raise ValueError(f"unknown dataset {ds!r}; known: {', '.join(sorted(_DATASET_SHAPE))}")
    if ds == "digits" and name == "digits_net":
        return (1, 8, 8)
    return _DATASET_SHAPE[ds]
