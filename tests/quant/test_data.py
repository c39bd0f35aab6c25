"""Data loaders: digits split, CIFAR-10 pickles, ImageNet folders, dispatch."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dynacc.quant.data import (
    IMAGENET_MEAN, IMAGENET_STD, cifar10_dataset, digits_loaders, get_dataset,
    imagenet_folder_dataset, load_digits_split, random_images,
)


@pytest.fixture(scope="module")
def digits32():
    return load_digits_split(size=32, channels=1, seed=0)


def test_digits_split_sizes_and_dtypes(digits32) -> None:
    train, test = digits32
    assert len(train) == 1347 and len(test) == 450
    x, y = train.tensors
    assert x.shape == (1347, 1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert test.tensors[0].shape == (450, 1, 32, 32)
    assert set(y.tolist()) == set(range(10))


def test_digits_deterministic(digits32) -> None:
    train, test = digits32
    train2, test2 = load_digits_split(size=32, channels=1, seed=0)
    assert torch.equal(train.tensors[0], train2.tensors[0])
    assert torch.equal(test.tensors[1], test2.tensors[1])
    other, _ = load_digits_split(size=32, channels=1, seed=1)
    assert not torch.equal(train.tensors[1], other.tensors[1])


def test_digits_stratified(digits32) -> None:
    train, test = digits32
    tr = np.bincount(train.tensors[1].numpy(), minlength=10)
    te = np.bincount(test.tensors[1].numpy(), minlength=10)
    total = tr + te
    # Each class's test share is within one image of the global 25 % fraction.
    assert np.all(np.abs(te - 0.25 * total) <= 1.0)


def test_digits_native_normalisation_and_channels() -> None:
    train, test = load_digits_split(size=8, channels=3, seed=0)
    x = train.tensors[0]
    assert x.shape == (1347, 3, 8, 8)
    assert torch.equal(x[:, 0], x[:, 2])
    assert abs(x.mean().item()) < 1e-4
    assert abs(x.std().item() - 1.0) < 1e-3
    # Same pixels as the 32x32 version before upsampling.
    up, _ = load_digits_split(size=32, channels=1, seed=0)
    ref = torch.nn.functional.interpolate(x[:5, :1], size=(32, 32), mode="bilinear",
                                          align_corners=False)
    torch.testing.assert_close(up.tensors[0][:5], ref)


def test_digits_loaders() -> None:
    tr1, te1 = digits_loaders(batch_size=100, size=16, channels=1, seed=3)
    tr2, _ = digits_loaders(batch_size=100, size=16, channels=1, seed=3)
    xb, yb = next(iter(tr1))
    assert xb.shape == (100, 1, 16, 16) and yb.dtype == torch.int64
    assert torch.equal(yb, next(iter(tr2))[1])  # seeded shuffle
    _, test = load_digits_split(size=16, channels=1, seed=3)
    assert torch.equal(next(iter(te1))[1], test.tensors[1][:100])  # not shuffled


def _write_cifar_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    with open(path, "wb") as fh:
        pickle.dump({b"batch_label": b"fake", b"data": data, b"labels": labels}, fh)
    return data, labels


def test_cifar10_missing_path_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        cifar10_dataset(tmp_path, train=False)
    msg = str(exc.value)
    assert str(tmp_path) in msg
    assert "test_batch" in msg and "cifar-10-batches-py" in msg
    assert "Nothing is downloaded" in msg
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        cifar10_dataset(tmp_path, train=True)


def test_cifar10_fake_batches(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    test_data, test_labels = _write_cifar_batch(d / "test_batch", 4, seed=0)
    for i in range(1, 6):
        _write_cifar_batch(d / f"data_batch_{i}", 3, seed=i)

    ds = cifar10_dataset(tmp_path, train=False, normalize=False)
    x, y = ds.tensors
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == test_labels and y.dtype == torch.int64
    raw = torch.from_numpy(test_data.reshape(4, 3, 32, 32)).float() / 255
    torch.testing.assert_close(x, raw)

    norm = cifar10_dataset(d, train=False)  # batches dir given directly
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm.tensors[0], (raw - mean) / std)

    train = cifar10_dataset(tmp_path, train=True)
    assert len(train) == 15
    via_dispatch = get_dataset("cifar10", root=tmp_path, train=False)
    assert len(via_dispatch) == 4


def _make_image_folder(root: Path) -> None:
    from PIL import Image

    (root / "val" / "ant").mkdir(parents=True)
    (root / "val" / "bee").mkdir(parents=True)
    Image.new("RGB", (300, 260), (255, 0, 0)).save(root / "val" / "ant" / "a1.png")
    Image.new("RGB", (256, 320), (0, 255, 0)).save(root / "val" / "ant" / "a2.JPEG", quality=100)
    Image.new("L", (240, 240), 128).save(root / "val" / "bee" / "b1.jpg")
    (root / "val" / "bee" / "notes.txt").write_text("ignored")


def test_imagenet_folder(tmp_path: Path) -> None:
    _make_image_folder(tmp_path)
    ds = imagenet_folder_dataset(tmp_path, split="val")
    assert ds.classes == ["ant", "bee"]
    assert len(ds) == 3
    labels = [label for _, label in ds.samples]
    assert labels == [0, 0, 1]
    x, y = ds[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0
    # Solid red PNG: exact normalised values survive resize + crop.
    expected = torch.tensor([(1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0],
                             (0.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
                             (0.0 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]])
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
    gray, y2 = ds[2]  # greyscale converted to 3 channels
    assert gray.shape == (3, 224, 224) and y2 == 1
    small = imagenet_folder_dataset(tmp_path, split="val", size=32)
    assert small[1][0].shape == (3, 32, 32)
    assert len(get_dataset("imagenet", root=tmp_path, split="val", size=32)) == 3


def test_imagenet_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        imagenet_folder_dataset(tmp_path, split="val")
    assert str(tmp_path / "val") in str(exc.value)


def test_random_images() -> None:
    a = random_images(4, (3, 16, 16), seed=1)
    b = random_images(4, (3, 16, 16), seed=1)
    c = random_images(4, (3, 16, 16), seed=2)
    assert a.shape == (4, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_get_dataset_dispatch() -> None:
    test = get_dataset("digits", size=8)
    assert len(test) == 450 and test[0][0].shape == (1, 8, 8)
    assert len(get_dataset("digits", train=True, size=8)) == 1347
    rnd = get_dataset("random", n=5, shape=(1, 8, 8), seed=0)
    x, y = rnd.tensors
    assert x.shape == (5, 1, 8, 8) and y.dtype == torch.int64
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; known: digits, cifar10"):
        get_dataset("mnist")
