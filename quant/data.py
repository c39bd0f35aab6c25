"""Datasets for training, calibration and accuracy benches; nothing is downloaded.

* ``digits``   scikit-learn's bundled 8x8 handwritten digits (1797 images),
  optionally bilinearly upsampled (e.g. to 32x32 for the CIFAR ResNets).
* ``cifar10``  the python-pickle CIFAR-10 batches from a local directory.
* ``imagenet`` an ImageFolder-style tree ``root/<split>/<class>/*.JPEG``.
* ``random``   standard-normal images for calibration/throughput benches.

All image tensors are float32 ``(C, H, W)`` (batched ``(N, C, H, W)``);
labels are int64 class indices.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "DATASETS",
    "default_root", "load_digits_split", "digits_loaders", "cifar10_dataset",
    "ImageFolderDataset", "imagenet_folder_dataset", "imagenet_transform",
    "random_images", "get_dataset",
]

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

DATASETS: tuple[str, ...] = ("digits", "cifar10", "imagenet", "random")

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_IMAGE_EXTS = frozenset({".jpeg", ".jpg", ".png"})


def default_root() -> Path:
    """Data root used when ``root`` is None: ``$DYNACC_DATA`` or ``./data``."""
    return Path(os.environ.get("DYNACC_DATA", "data"))


# --------------------------------------------------------------------------- digits


def load_digits_split(size: int = 32, channels: int = 1, seed: int = 0,
                      test_fraction: float = 0.25) -> tuple[TensorDataset, TensorDataset]:
    """Stratified, deterministic train/test split of scikit-learn's digits.

    Pixels (0..16) are divided by 16, then standardised with the scalar mean
    and standard deviation of the *train* split (computed over all train
    pixels, applied to both splits, so no test statistics leak) at 8x8, so
    the upsampled train images have mean 0 and a std slightly below 1. Images are
    ``(N, 1, 8, 8)``, bilinearly upsampled (``align_corners=False``) to
    ``size x size`` when ``size != 8`` and repeated to ``channels`` channels.
    The split is ``train_test_split(random_state=seed, stratify=labels)``.

    Returns ``(train, test)`` TensorDatasets of ``(float32 image, int64 label)``;
    with the default ``test_fraction`` 1347 train and 450 test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if size < 1 or channels < 1:
        raise ValueError(f"size and channels must be >= 1, got size={size}, channels={channels}")
    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean = float(x_tr.mean())
    std = float(x_tr.std())

    def prep(a: np.ndarray) -> Tensor:
        t = (torch.from_numpy(np.ascontiguousarray(a)) - mean) / std
        t = t.reshape(-1, 1, 8, 8)
        if size != 8:
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        if channels != 1:
            t = t.repeat(1, channels, 1, 1)
        return t.contiguous()

    train = TensorDataset(prep(x_tr), torch.from_numpy(y_tr))
    test = TensorDataset(prep(x_te), torch.from_numpy(y_te))
    return train, test


def digits_loaders(batch_size: int = 64, size: int = 32, channels: int = 1,
                   seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """``(train, test)`` DataLoaders over :func:`load_digits_split`.

    The train loader reshuffles every epoch from a generator seeded with
    ``seed`` (reproducible order); the test loader keeps the split order.
    """
    train, test = load_digits_split(size=size, channels=channels, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
            DataLoader(test, batch_size=batch_size, shuffle=False))


# --------------------------------------------------------------------------- CIFAR-10


def _cifar_dir(root: Path) -> Path:
    sub = root / _CIFAR_DIR
    if sub.is_dir():
        return sub
    if (root / _CIFAR_TEST[0]).is_file() or (root / _CIFAR_TRAIN[0]).is_file():
        return root
    return sub


def cifar10_dataset(root: str | os.PathLike | None = None, train: bool = False,
                    normalize: bool = True) -> TensorDataset:
    """CIFAR-10 from the python-pickle batches under ``root``.

    ``root`` may be the directory containing ``cifar-10-batches-py`` or that
    directory itself. Train reads ``data_batch_1..5`` (50000 images), test reads
    ``test_batch`` (10000). Images are float32 ``(N, 3, 32, 32)`` in [0, 1],
    standardised per channel with ``CIFAR10_MEAN``/``CIFAR10_STD`` when
    ``normalize``. Raises ``FileNotFoundError`` if a batch file is missing.
    """
    root_p = Path(root) if root is not None else default_root()
    d = _cifar_dir(root_p)
    names = _CIFAR_TRAIN if train else _CIFAR_TEST
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found at {d}: expected python-pickle batch files "
            f"{', '.join(names)} in {d} (extract cifar-10-python.tar.gz under {root_p}); "
            f"missing {', '.join(missing)}. Nothing is downloaded.")
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for n in names:
        with open(d / n, "rb") as fh:
            batch: dict[Any, Any] = pickle.load(fh, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        if data is None or labels is None:
            raise ValueError(f"{d / n} is not a CIFAR-10 batch (no data/labels entries)")
        xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs)).float().div_(255.0)
    if normalize:
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    return TensorDataset(x, torch.from_numpy(np.concatenate(ys)))


# --------------------------------------------------------------------------- ImageNet


def imagenet_transform(size: int = 224) -> Callable[[Any], Tensor]:
    """PIL image -> normalised float32 ``(3, size, size)`` tensor.

    Standard evaluation preprocessing: resize the shorter side to
    ``round(size * 256 / 224)`` (256 for 224) with bilinear filtering, centre
    crop ``size x size``, scale to [0, 1], standardise with
    ``IMAGENET_MEAN``/``IMAGENET_STD``.
    """
    from PIL import Image

    resize_to = int(round(size * 256 / 224))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def transform(img: Any) -> Tensor:
        img = img.convert("RGB")
        w, h = img.size
        if w <= h:
            nw, nh = resize_to, max(1, int(round(h * resize_to / w)))
        else:
            nw, nh = max(1, int(round(w * resize_to / h))), resize_to
        img = img.resize((nw, nh), Image.BILINEAR)
        left = int(round((nw - size) / 2.0))
        top = int(round((nh - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
        arr = np.asarray(img, dtype=np.uint8).copy()
        t = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
        return (t - mean) / std

    return transform


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` tree; classes sorted by name -> index.

    Items are ``(transform(PIL image), int label)``; ``samples`` lists
    ``(path, label)`` in sorted order, ``classes`` the class names.
    """

    def __init__(self, root: str | os.PathLike,
                 transform: Callable[[Any], Tensor] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist; nothing is downloaded")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = [
            (p, self.class_to_idx[c])
            for c in self.classes
            for p in sorted((self.root / c).iterdir())
            if p.is_file() and p.suffix.lower() in _IMAGE_EXTS
        ]
        if not self.samples:
            raise FileNotFoundError(
                f"no images (*.JPEG, *.jpg, *.png) found under {self.root}/<class>/")
        self.transform = transform if transform is not None else imagenet_transform()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as img:
            return self.transform(img), label


def imagenet_folder_dataset(root: str | os.PathLike | None = None, split: str = "val",
                            size: int = 224) -> ImageFolderDataset:
    """ImageNet-style folder ``root/split/<class>/*.JPEG|jpg|png``.

    Preprocessing is :func:`imagenet_transform` (resize 256, centre crop 224,
    ImageNet normalisation for the default ``size``). Raises
    ``FileNotFoundError`` naming the folder if it does not exist.
    """
    root_p = Path(root) if root is not None else default_root() / "imagenet"
    folder = root_p / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ImageNet folder {folder} not found: expected {folder}/<class>/*.JPEG; "
            f"nothing is downloaded")
    return ImageFolderDataset(folder, transform=imagenet_transform(size))


# --------------------------------------------------------------------------- random / dispatch


def random_images(n: int, shape: tuple[int, ...] = (3, 224, 224), seed: int = 0) -> Tensor:
    """``(n, *shape)`` float32 standard-normal images from a generator seeded ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=gen, dtype=torch.float32)


def get_dataset(name: str, root: str | os.PathLike | None = None, train: bool = False,
                **kwargs: Any) -> Dataset:
    """One split of dataset ``name`` ('digits' | 'cifar10' | 'imagenet' | 'random').

    ``train`` selects the train split (ImageNet: ``split='train'`` vs ``'val'``).
    Extra keyword arguments go to the loader: ``size``, ``channels``, ``seed``,
    ``test_fraction`` for digits; ``normalize`` for cifar10; ``size`` (and
    ``split``, overriding ``train``) for imagenet; ``n`` (default 64),
    ``shape`` (default ``(3, 224, 224)``), ``seed`` and ``num_classes``
    (default 10, labels drawn uniformly) for random. ``root`` is ignored by
    digits and random.
    """
    if name == "digits":
        tr, te = load_digits_split(**kwargs)
        return tr if train else te
    if name == "cifar10":
        return cifar10_dataset(root, train=train, **kwargs)
    if name == "imagenet":
        split = kwargs.pop("split", "train" if train else "val")
        return imagenet_folder_dataset(root, split=split, **kwargs)
    if name == "random":
        n = int(kwargs.pop("n", 64))
        shape = tuple(kwargs.pop("shape", (3, 224, 224)))
        seed = int(kwargs.pop("seed", 0))
        num_classes = int(kwargs.pop("num_classes", 10))
        if kwargs:
            raise TypeError(f"unexpected arguments for 'random': {sorted(kwargs)}")
        x = random_images(n, shape, seed + (1 if train else 0))
        gen = torch.Generator().manual_seed(seed + 7919)
        y = torch.randint(0, num_classes, (n,), generator=gen, dtype=torch.int64)
        return TensorDataset(x, y)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
