"""Input-adaptive models that ``make gen`` trains on digits itself when no checkpoint is given:
``pg_resnet20`` (Precision Gating, ``train-pg`` defaults), ``dfs_resnet20`` (Dynamic
Fractional Skipping, ``train-dfs`` defaults), ``cg_resnet20`` (Channel Gating, ``train-cg``
defaults); also ``fbs_net`` (FBS on ``fbs_cnn``, ``train-fbs`` defaults) for the FBS
co-simulation and bench, ``fusion_net`` (``train-fusion`` defaults) for the fused-block engine.

Each is trained once per cache folder with the ``python -m dynacc.quant`` command of its
technique (same code path a user runs) and kept as a checkpoint that holds the integer program
with its dual-precision layers; concurrent callers serialize on a lock file.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

__all__ = ["GATED_MODELS", "TRAINED_MODELS", "gated_checkpoint", "backbone", "model_checkpoint",
           "stored_dual_program", "default_hw"]

#: gen model name -> (backbone model name, quant CLI arguments that train it on digits)
GATED_MODELS: dict[str, tuple[str, list[str]]] = {
    "pg_resnet20": ("resnet20", ["train-pg", "--model", "resnet20", "--data", "digits"]),
    "dfs_resnet20": ("resnet20", ["train-dfs", "--model", "resnet20", "--data", "digits"]),
    "cg_resnet20": ("resnet20", ["train-cg", "--model", "resnet20", "--data", "digits"]),
}

def default_hw(model: str) -> str:
    """The hardware config of ``model`` when none is given (``make gen``, ``make fpga``): the
    dual-precision engine's ``configs/hw/dual.yaml`` for gated models, else the default."""
    return "configs/hw/dual.yaml" if model in GATED_MODELS else "configs/hw/default.yaml"


#: every digits-trained model :func:`gated_checkpoint` can make: the ``make gen`` models above
#: and ``fbs_net`` (FBS on ``fbs_cnn``), whose layers are compacted per image by the host
#: (``hw/fbs_layer.py``) and run by ``sim/`` and ``bench/cg_fbs.py``, not mapped by ``make gen``;
#: ``fusion_net`` / ``fusion_mbv2`` (predictive layer fusion on ``fusionet_digits`` /
#: ``mbv2_fusion_digits``, ``train-fusion`` defaults)
TRAINED_MODELS: dict[str, tuple[str, list[str]]] = {
    **GATED_MODELS,
    "fbs_net": ("fbs_cnn", ["train-fbs", "--model", "fbs_cnn", "--data", "digits"]),
    "fusion_net": ("fusionet_digits", ["train-fusion", "--model", "fusionet_digits", "--data",
                                       "digits"]),
    "fusion_mbv2": ("mbv2_fusion_digits", ["train-fusion", "--model", "mbv2_fusion_digits",
                                           "--data", "digits"]),
}


def gated_checkpoint(name: str, cache_dir: str | Path = "build/cache") -> Path:
    """Path of the digits-trained checkpoint of gated model ``name`` (trained on first use)."""
    if name not in TRAINED_MODELS:
        raise ValueError(f"unknown gated model {name!r}; known: {', '.join(TRAINED_MODELS)}")
    from dynacc.quant.cli import main as quant_main

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{name}-digits.pt"
    with open(cache / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            rc = quant_main(TRAINED_MODELS[name][1] + ["--out", str(path)])
            if rc != 0 or not path.exists():
                raise RuntimeError(f"training {name} on digits failed (python -m dynacc.quant "
                                   f"{' '.join(TRAINED_MODELS[name][1])} exited with {rc})")
    return path


def backbone(model: str) -> str:
    """Zoo model under a gen / deploy model name (``pg_resnet20`` -> ``resnet20``)."""
    return GATED_MODELS[model][0] if model in GATED_MODELS else model


def model_checkpoint(model: str, checkpoint: str | Path | None) -> str | None:
    """The checkpoint a gen / deploy run of ``model`` uses: the given one, else for a gated
    model its digits-trained checkpoint (trained on first use), else None (random weights)."""
    if checkpoint is not None:
        return str(checkpoint)
    return str(gated_checkpoint(model)) if model in GATED_MODELS else None


def stored_dual_program(ck):  # noqa: ANN001, ANN201 - quant.checkpoint.Checkpoint -> BFPProgram
    """The checkpoint's stored program when it has dual-precision ops (a PG / DFS / CG
    program: its gates and PACT exponents come from training, so it is used as is, never
    recalibrated), else None."""
    if ck.program is not None and any(op.dual_precision for op in ck.program.ops):
        return ck.program
    return None
