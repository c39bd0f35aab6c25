"""Command line of the generator (``make gen MODEL=resnet50 [HW=configs/hw/default.yaml]``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dynacc.hw.config import HwConfig
from dynacc.quant.checkpoint import CheckpointError
from dynacc.quant.graph import UnsupportedLayerError
from dynacc.quant.models import list_models

from .fused_gen import FUSED_MODELS
from .gated_models import GATED_MODELS, default_hw
from .layer_program import MappingError
from .fused_gen import STEPS as FUSED_STEPS
from .pipeline import STEPS, GenOptions, run

__all__ = ["main"]


def _known() -> list[str]:
    return list_models() + list(GATED_MODELS) + list(FUSED_MODELS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynacc.gen",
                                description="Generate RTL, layer program and reports for a model.")
    p.add_argument("--model", required=True, metavar="NAME",
                   help=f"one of: {', '.join(_known())}")
    p.add_argument("--hw", default=None, metavar="YAML",
                   help="hardware config (default: configs/hw/default.yaml; "
                        f"configs/hw/dual.yaml for {', '.join(GATED_MODELS)}; for "
                        f"{', '.join(FUSED_MODELS)}: the conv engine of the stem and head, and "
                        "of the unfused blocks it is compared with)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="calibrated dynacc checkpoint or float state_dict (default: random "
                        "weights; the digits-trained checkpoint for "
                        f"{', '.join(list(GATED_MODELS) + list(FUSED_MODELS))}, a fusion "
                        f"checkpoint for {', '.join(FUSED_MODELS)})")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: build/<model>)")
    p.add_argument("--method", default=None, choices=["kl", "max"],
                   help="activation exponent method (default: kl; "
                        f"{', '.join(FUSED_MODELS)}: max only, as train-fusion)")
    p.add_argument("--calib-images", type=int, default=None,
                   help="calibration images (default: 4; "
                        f"{', '.join(FUSED_MODELS)}: the checkpoint's train-fusion count)")
    p.add_argument("--dataset", default=None, help="input geometry of this dataset (default: the model's)")
    p.add_argument("--steps", default=None, metavar="A,B",
                   help=f"only these steps (default: all of {','.join(n for n, _ in STEPS)}; "
                        f"{', '.join(FUSED_MODELS)}: {','.join(n for n, _ in FUSED_STEPS)})")
    p.add_argument("--seed", type=int, default=0,
                   help=f"seed (default: %(default)s; {', '.join(FUSED_MODELS)}: the digits split "
                        "seed when the checkpoint records no training seed)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        if args.model not in _known():
            raise ValueError(f"unknown model {args.model!r}; known: {', '.join(_known())}")
        if args.model in FUSED_MODELS:
            return _fused(args)
        hw = HwConfig.from_yaml(args.hw or default_hw(args.model))
        opts = GenOptions(model=args.model, hw=hw,
                          out_dir=Path(args.out or f"build/{args.model}"),
                          checkpoint=args.checkpoint, method=args.method or "kl",
                          calib_images=4 if args.calib_images is None else args.calib_images,
                          seed=args.seed, dataset=args.dataset)
        st = run(opts, args.steps.split(",") if args.steps else None)
    except (ValueError, FileNotFoundError, CheckpointError, MappingError,
            UnsupportedLayerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t = st.layer_program.engine_layers if st.layer_program else []
    cyc = sum(l.cycles for l in t)
    ideal = sum(l.ideal_cycles for l in t)
    print(f"{args.model}: {len(t)} engine layers, {cyc:,} cycles (ideal {ideal:,}, "
          f"utilization {100 * ideal / max(cyc, 1):.1f} %) -> {st.work}/report.md "
          f"[{', '.join(f'{k} {v:.1f}s' for k, v in st.timings.items())}]")
    return 0


def _fused(args: argparse.Namespace) -> int:
    """``--model fusion_net``: the fused-block gen (``gen/fused_gen.py``); errors raise to
    :func:`main`, which prints them and exits with 2."""
    from . import fused_gen

    if args.method not in (None, "max"):
        raise ValueError(f"{args.model}: activation exponents use the max rule (as train-fusion "
                         f"builds the program), not --method {args.method}")
    if args.dataset not in (None, "digits"):
        raise ValueError(f"{args.model} is a digits model, not --dataset {args.dataset}")
    hw = HwConfig.from_yaml(args.hw or "configs/hw/default.yaml")
    opts = fused_gen.FusedGenOptions(model=args.model, hw=hw,
                                     out_dir=Path(args.out or f"build/{args.model}"),
                                     checkpoint=args.checkpoint, calib_images=args.calib_images,
                                     seed=args.seed)
    st = fused_gen.run(opts, args.steps.split(",") if args.steps else None)
    print(fused_gen.summary(st))
    return 0
