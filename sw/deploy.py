"""``python sw/deploy.py``: export weights, exponents and the layer program of a model.

    python sw/deploy.py --model resnet20 --checkpoint ckpt.pt --out deploy/resnet20
    python sw/deploy.py --model resnet50 --out deploy/resnet50      # random weights (said so)
    python sw/deploy.py --model pg_resnet20                         # PG: dual-precision layers
    python sw/deploy.py --model cg_resnet20                         # Channel Gating (dp_mode cg)

The checkpoint is a calibrated dynacc checkpoint (``python -m dynacc.quant calibrate``) or a
trained Precision Gating / DFS / Channel Gating one (``train-pg`` / ``train-dfs`` /
``train-cg``), whose stored program is exported as is; a gated model name (``pg_resnet20``,
``cg_resnet20``) means its backbone with the digits-trained checkpoint of ``make gen`` and
the hardware config ``configs/hw/dual.yaml``.

The folder format is described in ``dynacc.sw.fileformat``; read it with
``dynacc.sw.reader.load_deploy``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynacc.gen.gated_models import GATED_MODELS
from dynacc.gen.layer_program import MappingError
from dynacc.hw.config import HwConfig, load_named
from dynacc.quant.checkpoint import CheckpointError
from dynacc.quant.graph import UnsupportedLayerError
from dynacc.quant.models import list_models
from dynacc.sw.export import ExportError, deploy_model

__all__ = ["main"]

DEFAULT_HW = "configs/hw/default.yaml"
#: hardware config of the gated models (their dual-precision layers need the dual engine)
GATED_HW = "configs/hw/dual.yaml"


def _hw_config(arg: str) -> HwConfig:
    """A YAML path, or the name of a config of this checkout (``default``, ``small``)."""
    p = Path(arg)
    if p.exists() or p.suffix in (".yaml", ".yml"):
        if not p.exists() and p in (Path(DEFAULT_HW), Path(GATED_HW)):
            return load_named(p.stem)   # run from outside the checkout
        return HwConfig.from_yaml(p)
    return load_named(arg)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python sw/deploy.py",
        description="Export a calibrated BFP model (weights, exponents, layer program) as a "
                    "deploy folder that the RTL benches and a host load.")
    p.add_argument("--model", required=True, metavar="NAME",
                   help=f"one of: {', '.join(list_models() + list(GATED_MODELS))}")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="calibrated dynacc checkpoint (python -m dynacc.quant calibrate); "
                        "without it: seeded random weights, calibrated like `make gen`")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="deploy folder (default: build/deploy/<model>)")
    p.add_argument("--hw", default=None, metavar="YAML",
                   help=f"hardware config: a YAML file or a config name (default: {DEFAULT_HW}; "
                        f"{GATED_HW} for {', '.join(GATED_MODELS)})")
    p.add_argument("--dataset", default=None,
                   help="input geometry (default: the checkpoint's dataset, else the model's)")
    p.add_argument("--method", default="kl", choices=["kl", "max"],
                   help="calibration of random weights (default: %(default)s)")
    p.add_argument("--calib-images", type=int, default=4,
                   help="random calibration images for random weights (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        known = list_models() + list(GATED_MODELS)
        if args.model not in known:
            raise ExportError(f"unknown model {args.model!r}; known: {', '.join(known)}")
        hw = _hw_config(args.hw or (GATED_HW if args.model in GATED_MODELS else DEFAULT_HW))
        out = args.out or f"build/deploy/{args.model}"
        res = deploy_model(args.model, out, hw, checkpoint=args.checkpoint,
                           dataset=args.dataset, method=args.method,
                           calib_images=args.calib_images, seed=args.seed,
                           log=lambda m: print(m, file=sys.stderr))
    except (ExportError, MappingError, CheckpointError, FileNotFoundError, ValueError,
            TypeError, UnsupportedLayerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    layers = res.layer_program.engine_layers
    cycles = sum(l.cycles for l in layers)
    dual = [l for l in layers if l.engine == "dual"]
    floor = cycles - sum(l.cycles - (l.cycles_msb or 0) for l in dual)
    gated = (f" ({len(dual)} dual-precision: {floor:,} cycles/image if no output passes a "
             "gate)" if dual else "")
    print(f"{args.model} ({res.dataset}{', RANDOM weights' if res.random_weights else ''}) for "
          f"hw {hw.name!r}: {len(layers)} engine layers{gated}, "
          f"{len(res.layer_program.steps) - len(layers)} host steps, {cycles:,} cycles/image "
          f"-> {res.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
