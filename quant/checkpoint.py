"""Calibrated checkpoints: float weights + the whole calibrated integer state, in one file.

A checkpoint is a ``torch.save`` dict with ``format == "dynacc-checkpoint"``, the model name
and constructor arguments, the float ``state_dict``, optional training/evaluation metadata and
the calibrated :class:`~dynacc.quant.program.BFPProgram` (block exponents, mantissas,
alignment shifts, activation exponents). Writes are atomic.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import build_model
from .program import BFPProgram

__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "load_state_dict_checked", "atomic_torch_save"]

FORMAT = "dynacc-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (names the file and the problem)."""


@dataclasses.dataclass
class Checkpoint:
    model_name: str
    model_kwargs: dict[str, Any]
    model: nn.Module
    program: BFPProgram | None
    meta: dict[str, Any]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` into memory, then write a temporary file in the same folder and rename
    it over ``path``: no partial file on failure, and the same object gives the same bytes
    (the archive never sees the random temporary name)."""
    import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getbuffer())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | os.PathLike, model_name: str, model_kwargs: dict[str, Any],
                    model: nn.Module, program: BFPProgram | None = None,
                    meta: dict[str, Any] | None = None) -> None:
    atomic_torch_save({
        "format": FORMAT,
        "version": VERSION,
        "model": model_name,
        "model_kwargs": dict(model_kwargs),
        "state_dict": model.state_dict(),
        "program": program.to_state() if program is not None else None,
        "meta": dict(meta or {}),
    }, path)


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that explains a mismatch: missing/unexpected keys, wrong shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        raise CheckpointError(f"{source} does not fit the model: " + ", ".join(parts))
    model.load_state_dict(state)


def load_checkpoint(path: str | os.PathLike, expect_model: str | None = None,
                    model_kwargs: dict[str, Any] | None = None) -> Checkpoint:
    """Load and validate a checkpoint written by :func:`save_checkpoint`.

    A plain ``state_dict`` file (e.g. a torchvision ResNet-50 checkpoint) is accepted when
    ``expect_model`` names the model (built with ``model_kwargs``); it then has no calibrated
    program.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {exc}") from exc
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj.get("version") != VERSION:
            raise CheckpointError(f"checkpoint {str(path)!r} has version {obj.get('version')!r}, "
                                  f"this dynacc reads version {VERSION}")
        name = obj["model"]
        if expect_model is not None and name != expect_model:
            raise CheckpointError(f"checkpoint {str(path)!r} holds model {name!r}, "
                                  f"not {expect_model!r}")
        model = build_model(name, **obj["model_kwargs"])
        load_state_dict_checked(model, obj["state_dict"], f"checkpoint {str(path)!r}")
        program = BFPProgram.from_state(obj["program"]) if obj.get("program") else None
        return Checkpoint(name, obj["model_kwargs"], model.eval(), program, obj.get("meta", {}))
    if isinstance(obj, dict) and expect_model is not None and all(
            isinstance(v, torch.Tensor) for v in obj.values()):
        model = build_model(expect_model, **(model_kwargs or {}))
        load_state_dict_checked(model, obj, f"state_dict {str(path)!r}")
        return Checkpoint(expect_model, dict(model_kwargs or {}), model.eval(), None, {})
    raise CheckpointError(f"{str(path)!r} is not a dynacc checkpoint")
