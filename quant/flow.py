"""The quantization flow as library calls: prepare a float model, calibrate, evaluate.

Used by the ``python -m dynacc.quant`` CLI and by the benchmarks, so both do the same thing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import data as datasets
from .calibrate import calibrate
from .checkpoint import load_checkpoint
from .formats import QuantConfig
from .models import DATASET_NUM_CLASSES, build_model, input_shape
from .program import BFPProgram
from .train import accuracy_of, evaluate, train_float

__all__ = ["DataSplits", "load_data", "prepare_float_model", "calibration_batches",
           "calibrate_and_evaluate"]


@dataclasses.dataclass
class DataSplits:
    train: DataLoader
    test: DataLoader
    shape: tuple[int, int, int]
    num_classes: int


def load_data(model_name: str, dataset: str, root: str | os.PathLike | None = None,
              batch_size: int = 64, seed: int = 0) -> DataSplits:
    """Train/test loaders for ``dataset`` shaped for ``model_name`` (digits upsampled as the
    model needs). CIFAR-10/ImageNet read local files and fail clearly without them."""
    shape = input_shape(model_name, dataset)
    if dataset == "digits":
        train, test = datasets.load_digits_split(size=shape[1], channels=shape[0], seed=seed)
    elif dataset in ("cifar10", "imagenet"):
        train = datasets.get_dataset(dataset, root, train=True)
        test = datasets.get_dataset(dataset, root, train=False)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; known: digits, cifar10, imagenet")
    g = torch.Generator().manual_seed(seed)
    return DataSplits(DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
                      DataLoader(test, batch_size=256, shuffle=False), shape,
                      DATASET_NUM_CLASSES[dataset])


def prepare_float_model(model_name: str, splits: DataSplits, checkpoint: str | None = None,
                        epochs: int = 15, seed: int = 0, progress: bool = True
                        ) -> tuple[nn.Module, dict[str, Any]]:
    """Load float weights from ``checkpoint`` or train from scratch on ``splits.train``."""
    kwargs = {"num_classes": splits.num_classes, "in_channels": splits.shape[0]}
    if checkpoint is not None:
        ck = load_checkpoint(checkpoint, expect_model=model_name, model_kwargs=kwargs)
        if ck.model_kwargs and ck.model_kwargs != kwargs:
            raise ValueError(f"checkpoint {checkpoint!r} was made for {ck.model_kwargs}, "
                             f"the data needs {kwargs}")
        return ck.model, kwargs
    torch.manual_seed(seed)
    model = build_model(model_name, **kwargs)
    train_float(model, splits.train, epochs=epochs, seed=seed, progress=progress)
    return model, kwargs


def calibration_batches(loader: DataLoader, images: int, batch_size: int = 50
                        ) -> list[torch.Tensor]:
    """The first ``images`` images of ``loader``'s dataset, in fixed order (no shuffle)."""
    ds = loader.dataset
    n = min(images, len(ds))
    fixed = DataLoader(Subset(ds, range(n)), batch_size=batch_size, shuffle=False)
    return [x for x, _ in fixed]


def golden_predict(program: BFPProgram) -> Any:
    return lambda x: program.logits(x)


def calibrate_and_evaluate(model: nn.Module, splits: DataSplits, cfg: QuantConfig,
                           calib_images: int = 100, progress: bool = True
                           ) -> tuple[BFPProgram, dict[str, float]]:
    """Calibrate ``model`` and measure FP and BFP (integer golden) test accuracy."""
    program = calibrate(model, calibration_batches(splits.train, calib_images), cfg, progress)
    fp = evaluate(model, splits.test)
    bfp = accuracy_of(golden_predict(program), splits.test)
    return program, {"fp_acc": fp, "bfp_acc": bfp}


def iter_test_images(splits: DataSplits) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    yield from splits.test


def cached_digits_model(model_name: str, cache_dir: str | os.PathLike = "build/cache",
                        epochs: int = 6, seed: int = 0, progress: bool = False
                        ) -> tuple[nn.Module, DataSplits]:
    """A digits-trained float model, trained once and cached as a checkpoint.

    Concurrent callers (pytest-xdist workers) serialize on a lock file, so the model is
    trained once per cache folder; the cache key includes the epochs and seed.
    """
    import fcntl
    from pathlib import Path

    from .checkpoint import save_checkpoint

    splits = load_data(model_name, "digits", seed=seed)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{model_name}-digits-e{epochs}-s{seed}.pt"
    with open(cache / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return load_checkpoint(path, expect_model=model_name).model, splits
        model, kwargs = prepare_float_model(model_name, splits, epochs=epochs, seed=seed,
                                            progress=progress)
        save_checkpoint(path, model_name, kwargs, model, meta={"epochs": epochs, "seed": seed})
    return model, splits
