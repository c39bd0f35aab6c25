"""Command-line front-end of the quantization flow (thin argparse over :mod:`.flow`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import CheckpointError, save_checkpoint
from .flow import calibrate_and_evaluate, load_data, prepare_float_model
from .formats import QuantConfig
from .models import list_models

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dynacc.quant",
                                description="Static block-floating-point quantization.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibrate", help="train or load a float model, calibrate BFP "
                                         "exponents offline, evaluate FP vs BFP, save")
    c.add_argument("--model", required=True, metavar="NAME",
                   help=f"model name, one of: {', '.join(list_models())}")
    c.add_argument("--data", default="digits", metavar="NAME",
                   help="dataset: digits | cifar10 | imagenet (default: %(default)s)")
    c.add_argument("--data-root", default=None, metavar="DIR",
                   help="local folder of cifar10/imagenet (nothing is downloaded)")
    c.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="float weights to start from (dynacc checkpoint or a state_dict); "
                        "without it the model is trained on --data")
    c.add_argument("--epochs", type=int, default=15, help="training epochs (default: %(default)s)")
    c.add_argument("--mantissa", type=int, default=8, help="mantissa bits M (default: %(default)s)")
    c.add_argument("--exponent-bits", type=int, default=8,
                   help="shared exponent bits E (default: %(default)s)")
    c.add_argument("--method", default="kl", choices=["kl", "max"],
                   help="activation exponent method (default: %(default)s)")
    c.add_argument("--weight-group", type=int, default=64,
                   help="input channels per weight block, -1 = whole filter (default: %(default)s)")
    c.add_argument("--act-group", type=int, default=-1,
                   help="channels per activation exponent, -1 = per tensor (default: %(default)s)")
    c.add_argument("--calib-images", type=int, default=100,
                   help="calibration images (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    c.add_argument("--out", default=None, metavar="FILE",
                   help="output checkpoint (default: build/<model>/<model>-<data>-m<M>-<method>.pt)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.model not in list_models():
            raise ValueError(f"unknown model {args.model!r}; known: {', '.join(list_models())}")
        cfg = QuantConfig.from_dict({"mantissa_bits": args.mantissa,
                                     "exponent_bits": args.exponent_bits,
                                     "weight_group": args.weight_group,
                                     "activation_group": args.act_group,
                                     "method": args.method})
        splits = load_data(args.model, args.data, args.data_root, seed=args.seed)
        model, kwargs = prepare_float_model(args.model, splits, args.checkpoint, args.epochs,
                                            args.seed, progress=not args.quiet)
        program, acc = calibrate_and_evaluate(model, splits, cfg, args.calib_images,
                                              progress=not args.quiet)
        out = Path(args.out or f"build/{args.model}/{args.model}-{args.data}-m{args.mantissa}"
                               f"-{args.method}.pt")
        save_checkpoint(out, args.model, kwargs, model, program,
                        meta={"dataset": args.data, **acc, "quant": cfg.to_dict(),
                              "calib_images": args.calib_images})
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model} on {args.data}: FP {acc['fp_acc']:.2f} %  "
          f"BFP M={args.mantissa} {args.method} {acc['bfp_acc']:.2f} %  "
          f"(loss {acc['fp_acc'] - acc['bfp_acc']:+.2f} points)")
    print(f"saved {out}")
    return 0
