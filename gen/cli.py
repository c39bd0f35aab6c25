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

from .gated_models import GATED_MODELS
from .layer_program import MappingError
from .pipeline import STEPS, GenOptions, run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynacc.gen",
                                description="Generate RTL, layer program and reports for a model.")
    p.add_argument("--model", required=True, metavar="NAME",
                   help=f"one of: {', '.join(list_models() + list(GATED_MODELS))}")
    p.add_argument("--hw", default=None, metavar="YAML",
                   help="hardware config (default: configs/hw/default.yaml; "
                        f"configs/hw/dual.yaml for {', '.join(GATED_MODELS)})")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="calibrated dynacc checkpoint or float state_dict (default: random weights)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: build/<model>)")
    p.add_argument("--method", default="kl", choices=["kl", "max"],
                   help="activation exponent method (default: %(default)s)")
    p.add_argument("--calib-images", type=int, default=4, help="calibration images (default: %(default)s)")
    p.add_argument("--dataset", default=None, help="input geometry of this dataset (default: the model's)")
    p.add_argument("--steps", default=None, metavar="A,B",
                   help=f"only these steps (default: all of {','.join(n for n, _ in STEPS)})")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        if args.model not in list_models() + list(GATED_MODELS):
            raise ValueError(f"unknown model {args.model!r}; known: "
                             f"{', '.join(list_models() + list(GATED_MODELS))}")
        hw = HwConfig.from_yaml(args.hw or ("configs/hw/dual.yaml" if args.model in GATED_MODELS
                                            else "configs/hw/default.yaml"))
        opts = GenOptions(model=args.model, hw=hw,
                          out_dir=Path(args.out or f"build/{args.model}"),
                          checkpoint=args.checkpoint, method=args.method,
                          calib_images=args.calib_images, seed=args.seed, dataset=args.dataset)
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
