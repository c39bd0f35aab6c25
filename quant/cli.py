"""Command-line front-end of the quantization flow (thin argparse over :mod:`.flow`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError, save_checkpoint
from .flow import DataSplits, calibrate_and_evaluate, load_data, prepare_float_model
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
    _add_train_pg(sub)
    _add_train_dfs(sub)
    _add_train_cg(sub)
    _add_train_fbs(sub)
    _add_train_fusion(sub)
    return p


def _add_backbone_args(c: argparse.ArgumentParser,
                       models: str = "resnet20 | resnet38 | resnet74") -> None:
    """Arguments of the float backbone (``models``) that train-pg / train-dfs / train-fbs
    start from."""
    c.add_argument("--model", required=True, metavar="NAME", help=f"float backbone: {models}")
    c.add_argument("--data", default="digits", metavar="NAME",
                   help="dataset: digits | cifar10 (default: %(default)s)")
    c.add_argument("--data-root", default=None, metavar="DIR",
                   help="local folder of cifar10 (nothing is downloaded)")
    c.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="float weights to start from; without it digits use the cached trained "
                        "model and other data train one for --float-epochs")
    c.add_argument("--float-epochs", type=int, default=15,
                   help="float training epochs when there is no checkpoint (default: %(default)s)")


def _add_program_args(c: argparse.ArgumentParser, method_help: str | None) -> None:
    """Arguments of the integer program train-pg / train-dfs build (M = 9 by default, so
    unsigned 8-bit activations fit the activation word); no ``--method`` when
    ``method_help`` is None (every exponent fixed, as in train-fbs)."""
    c.add_argument("--mantissa", type=int, default=9,
                   help="mantissa bits M, sign included (default: %(default)s)")
    c.add_argument("--exponent-bits", type=int, default=8,
                   help="shared exponent bits E (default: %(default)s)")
    if method_help is not None:
        c.add_argument("--method", default="max", choices=["kl", "max"],
                       help=method_help + " (default: %(default)s)")
    c.add_argument("--calib-images", type=int, default=200,
                   help="calibration images (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")


#: the float backbones train-pg / train-dfs / train-cg gate (CIFAR ResNets, option-B shortcuts)
_GATED_BACKBONES = ("resnet20", "resnet38", "resnet74")


def _check_backbone(args: argparse.Namespace, technique: str) -> None:
    if args.model not in _GATED_BACKBONES:
        raise ValueError(f"unknown model {args.model!r} for {technique}; known: "
                         f"{', '.join(_GATED_BACKBONES)}")


def _load_backbone(args: argparse.Namespace
                   ) -> tuple[torch.nn.Module, DataSplits, dict[str, int], float]:
    """The float backbone of :func:`_add_backbone_args`: the cached digits model, else
    ``--checkpoint`` (or ``--float-epochs`` of training) on ``--data``. Returns ``(model,
    splits, model kwargs, float test accuracy in percent)``."""
    from .flow import cached_digits_model
    from .train import evaluate

    if args.data == "digits" and args.checkpoint is None:
        float_model, splits = cached_digits_model(args.model, seed=args.seed,
                                                  progress=not args.quiet)
    else:
        splits = load_data(args.model, args.data, args.data_root, seed=args.seed)
        float_model, _ = prepare_float_model(args.model, splits, args.checkpoint,
                                             args.float_epochs, args.seed,
                                             progress=not args.quiet)
    kwargs = {"num_classes": splits.num_classes, "in_channels": splits.shape[0]}
    return float_model, splits, kwargs, evaluate(float_model, splits.test)


def _add_gate_training_args(c: argparse.ArgumentParser, technique: str, sigma_help: str,
                            target_flags: tuple[str, ...] = ("--gate-target",),
                            gate_target: float = 1.0, sigma_g: float = 0.05,
                            threshold_lr_scale: float = 100.0, epochs: int = 3,
                            lr: float = 0.01) -> None:
    """Fine-tuning arguments of train-pg / train-cg: a gating loss pulls the thresholds to a
    target; the defaults fine-tune a trained float backbone for a few epochs."""
    c.add_argument(*target_flags, dest="gate_target", type=float, default=gate_target,
                   help="gating-loss target of the thresholds (default: %(default)s)")
    c.add_argument("--sigma-g", type=float, default=sigma_g, help=sigma_help)
    c.add_argument("--threshold-lr-scale", type=float, default=threshold_lr_scale,
                   help="learning-rate multiplier of the thresholds (default: %(default)s)")
    c.add_argument("--no-sparse-bp", action="store_true", help="dense gate back-propagation")
    c.add_argument("--alpha", type=float, default=6.0, help="initial PACT clip (default: %(default)s)")
    c.add_argument("--epochs", type=int, default=epochs,
                   help=f"{technique} fine-tuning epochs (default: %(default)s)")
    c.add_argument("--lr", type=float, default=lr, help="learning rate (default: %(default)s)")


def _add_train_pg(sub: argparse._SubParsersAction) -> None:
    """``train-pg``: Precision Gating fine-tuning -> dual-precision integer program."""
    c = sub.add_parser("train-pg", help="fine-tune a float CIFAR ResNet with Precision Gating, "
                                        "build its dual-precision integer program, save")
    c.set_defaults(handler=_train_pg)
    _add_backbone_args(c)
    c.add_argument("--act-bits", type=int, default=3, help="PG activation bits b (default: %(default)s)")
    c.add_argument("--msb-bits", type=int, default=2,
                   help="MSB bits of the prediction phase (default: %(default)s)")
    _add_gate_training_args(c, "PG", "gating-loss weight σ_g (default: %(default)s; PG's 1e-3 "
                                     "needs ~200 epochs)")
    _add_program_args(c, "exponent method of the non-PG tensors")
    c.add_argument("--out", default=None, metavar="FILE",
                   help="output checkpoint (default: build/<model>/<model>-<data>-pg<b>-<msb>.pt)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_pg(args: argparse.Namespace) -> int:
    from .flow import calibration_batches
    from .formats import BFPFormat
    from .models.pg_resnet import pg_resnet_from_float
    from .pg import check_pg_bits
    from .pg_program import build_pg_program, program_pg_stats, to_float_model
    from .train_pg import pg_stats, train_pg

    try:
        _check_backbone(args, "Precision Gating")
        cfg = QuantConfig(fmt=BFPFormat(args.mantissa, args.exponent_bits), method=args.method)
        check_pg_bits(args.act_bits, args.msb_bits, cfg.fmt)
        float_model, splits, kwargs, fp_acc = _load_backbone(args)
        settings = {"act_bits": args.act_bits, "msb_bits": args.msb_bits, "alpha": args.alpha,
                    "sparse_bp": not args.no_sparse_bp}
        pg = pg_resnet_from_float(float_model, cfg=cfg, **settings)
        train_pg(pg, splits, epochs=args.epochs, lr=args.lr, gate_target=args.gate_target,
                 sigma_g=args.sigma_g, sparse_bp=not args.no_sparse_bp, seed=args.seed,
                 progress=not args.quiet, threshold_lr_scale=args.threshold_lr_scale)
        program = build_pg_program(pg, calibration_batches(splits.train, args.calib_images),
                                   cfg, progress=not args.quiet)
        st = pg_stats(pg, splits.test)
        gst = program_pg_stats(program, splits.test)
        gold_acc = gst["acc"]
        res = {"fp_acc": fp_acc, "pg_acc": st["acc"], "bfp_acc": gold_acc,
               "update_sparsity": gst["update_sparsity"], "avg_bits": gst["avg_bits"],
               "pg_update_sparsity": st["update_sparsity"]}
        out = Path(args.out or f"build/{args.model}/{args.model}-{args.data}-pg{args.act_bits}"
                               f"-{args.msb_bits}.pt")
        save_checkpoint(out, args.model, kwargs, to_float_model(pg), program,
                        meta={"dataset": args.data, **res, "quant": cfg.to_dict(),
                              "calib_images": args.calib_images, "technique": "pg",
                              "pg": {**settings, "gate_target": args.gate_target,
                                     "sigma_g": args.sigma_g, "epochs": args.epochs,
                                     "lr": args.lr, "seed": args.seed,
                                     "threshold_lr_scale": args.threshold_lr_scale},
                              "pg_state_dict": pg.state_dict()})
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model} on {args.data}, PG a{args.act_bits}/msb{args.msb_bits} "
          f"M={args.mantissa}: FP {fp_acc:.2f} %  PG (fake-quant) {st['acc']:.2f} %  "
          f"golden integer {gold_acc:.2f} %  update sparsity {100 * gst['update_sparsity']:.1f} %  "
          f"avg bits {gst['avg_bits']:.3f}")
    print(f"saved {out}")
    return 0


def _add_train_dfs(sub: argparse._SubParsersAction) -> None:
    """``train-dfs``: Dynamic Fractional Skipping -> integer program with a host gate."""
    from .train_dfs import DFS_DEFAULTS

    c = sub.add_parser("train-dfs", help="train a DFS gate (skip / low / full precision per "
                                         "block and image) on a float CIFAR ResNet, build its "
                                         "integer program, save")
    c.set_defaults(handler=_train_dfs)
    _add_backbone_args(c)
    c.add_argument("--options", default="skip,4,8",
                   help="gate options, 'skip' and bit widths; the largest is the full "
                        "precision b (default: %(default)s; skip-only baseline: skip,8)")
    c.add_argument("--target-cp", type=float, default=50.0,
                   help="target computation percentage in (0, 100] (default: %(default)s)")
    c.add_argument("--epochs", type=int, default=6,
                   help="stage-2 (joint) epochs (default: %(default)s)")
    c.add_argument("--gate-epochs", type=int, default=2,
                   help="stage-1 (gate -> full execution) epochs (default: %(default)s)")
    c.add_argument("--beta", type=float, default=DFS_DEFAULTS["beta"],
                   help="weight of the per-image, per-block cost term (default: %(default)s)")
    c.add_argument("--lr", type=float, default=DFS_DEFAULTS["lr"],
                   help="backbone learning rate (default: %(default)s)")
    c.add_argument("--gate-lr", type=float, default=DFS_DEFAULTS["gate_lr"],
                   help="gate learning rate, Adam (default: %(default)s)")
    _add_program_args(c, "exponent method of the tensors DFS does not pin")
    c.add_argument("--out", default=None, metavar="FILE",
                   help="output checkpoint (default: build/<model>/<model>-<data>-dfs-<options>"
                        "-cp<target>.pt)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_dfs(args: argparse.Namespace) -> int:
    from .dfs import parse_options
    from .dfs_program import build_dfs_program, dfs_golden_stats, save_dfs_checkpoint
    from .flow import calibration_batches
    from .formats import BFPFormat
    from .train_dfs import dfs_stats, make_dfs_model, train_dfs, train_gate_full

    try:
        _check_backbone(args, "DFS")
        opts = parse_options(args.options)
        if not 0 < args.target_cp <= 100:
            raise ValueError(f"--target-cp must be in (0, 100], got {args.target_cp:g}")
        if args.epochs < 1 or args.gate_epochs < 0:
            raise ValueError("--epochs must be >= 1 and --gate-epochs >= 0")
        cfg = QuantConfig(fmt=BFPFormat(args.mantissa, args.exponent_bits), method=args.method)
        if opts.act_bits > cfg.fmt.mantissa_bits - 1:
            raise ValueError(f"option {opts.act_bits} bits does not fit --mantissa "
                             f"{args.mantissa} (needs b <= M - 1)")
        float_model, splits, kwargs, fp_acc = _load_backbone(args)
        calib = calibration_batches(splits.train, args.calib_images)
        model = make_dfs_model(float_model, opts, calib, cfg.fmt, args.seed)
        if args.gate_epochs:
            train_gate_full(model, splits.train, args.gate_epochs, seed=args.seed,
                            progress=not args.quiet)
        train_dfs(model, splits.train, args.target_cp, args.epochs, lr=args.lr,
                  gate_lr=args.gate_lr, beta=args.beta, seed=args.seed, progress=not args.quiet)
        st = dfs_stats(model, splits.test)
        program, gate = build_dfs_program(model, calib, cfg, progress=not args.quiet)
        gst = dfs_golden_stats(program, gate, splits.test, progress=not args.quiet)
        res = {"fp_acc": fp_acc, "dfs_acc": st["acc"], "cp": st["cp"],
               "cp_per_block": st["cp_per_block"], "golden_acc": gst["acc"],
               "golden_cp": gst["cp"], "golden_cp_per_block": gst["cp_per_block"]}
        tag = "-".join(str(c) for c in opts.choices)
        out = Path(args.out or f"build/{args.model}/{args.model}-{args.data}-dfs-{tag}"
                               f"-cp{args.target_cp:g}.pt")
        save_dfs_checkpoint(out, args.model, kwargs, model, program, gate,
                            meta={"dataset": args.data, **res, "quant": cfg.to_dict(),
                                  "calib_images": args.calib_images, "technique": "dfs",
                                  "train": {"target_cp": args.target_cp, "epochs": args.epochs,
                                            "gate_epochs": args.gate_epochs, "beta": args.beta,
                                            "lr": args.lr, "gate_lr": args.gate_lr,
                                            "seed": args.seed}})
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    per = " ".join(f"{v:.0f}" for v in st["cp_per_block"])
    gper = " ".join(f"{v:.0f}" for v in gst["cp_per_block"])
    print(f"{args.model} on {args.data}, DFS options {args.options} target CP {args.target_cp:g} %: "
          f"FP {fp_acc:.2f} %  DFS (fake-quant) {st['acc']:.2f} % at CP {st['cp']:.1f} %  "
          f"golden integer {gst['acc']:.2f} % at CP {gst['cp']:.1f} %")
    print(f"CP per gated block (fake-quant): {per}")
    print(f"CP per gated block (golden):     {gper}")
    q = torch.quantile(st["cp_per_input"].double(), torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0],
                                                                 dtype=torch.float64))
    print("CP per input (fake-quant, test split): min {:.1f}, p10 {:.1f}, median {:.1f}, "
          "p90 {:.1f}, max {:.1f} %".format(*q.tolist()))
    print(f"saved {out}")
    return 0


def _add_train_cg(sub: argparse._SubParsersAction) -> None:
    """``train-cg``: Channel Gating fine-tuning -> channel-gated integer program."""
    from .train_cg import CG_TRAIN_DEFAULTS as d

    c = sub.add_parser("train-cg", help="fine-tune a float CIFAR ResNet with Channel Gating, "
                                        "build its channel-gated integer program, save")
    c.set_defaults(handler=_train_cg)
    _add_backbone_args(c)
    c.add_argument("--partitions", type=int, default=4,
                   help="partitions p: the base phase reads C/p of the C input channels "
                        "(default: %(default)s)")
    c.add_argument("--act-bits", type=int, default=8,
                   help="unsigned input bits of the CG convs (default: %(default)s)")
    c.add_argument("--threshold-init", type=float, default=d["threshold_init"],
                   help="initial threshold Δ, CG's -gi (default: %(default)s)")
    _add_gate_training_args(c, "CG", "weight of the squared gating loss (default: %(default)s; "
                                     "CG's 1e-4 needs ~250 epochs)",
                            target_flags=("--target", "--gate-target"),
                            **{k: d[k] for k in ("gate_target", "sigma_g", "threshold_lr_scale",
                                                 "epochs", "lr")})
    _add_program_args(c, "exponent method of the non-CG tensors")
    c.add_argument("--eval-images", type=int, default=0,
                   help="test images of the accuracy and gate statistics, 0 = the whole test "
                        "split (default: %(default)s)")
    c.add_argument("--out", default=None, metavar="FILE",
                   help="output checkpoint (default: build/<model>/<model>-<data>-cg-p<p>.pt)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_cg(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader, Subset

    from .cg import check_cg_partitions
    from .cg_program import build_cg_program, program_cg_stats, to_float_model
    from .flow import calibration_batches
    from .formats import BFPFormat
    from .models.cg_resnet import cg_layer_channels, cg_resnet_from_float
    from .pg import check_pg_bits
    from .train_cg import cg_stats, train_cg

    try:
        _check_backbone(args, "Channel Gating")
        blocks = (int(args.model.removeprefix("resnet")) - 2) // 6
        check_cg_partitions(args.partitions, cg_layer_channels(blocks))
        cfg = QuantConfig(fmt=BFPFormat(args.mantissa, args.exponent_bits), method=args.method)
        check_pg_bits(args.act_bits, None, cfg.fmt)
        if args.epochs < 0 or args.eval_images < 0:
            raise ValueError("--epochs and --eval-images must be >= 0")
        float_model, splits, kwargs, fp_acc = _load_backbone(args)
        test = splits.test
        if args.eval_images:
            test = DataLoader(Subset(test.dataset, range(min(args.eval_images, len(test.dataset)))),
                              batch_size=test.batch_size or 64)
        settings = {"partitions": args.partitions, "act_bits": args.act_bits,
                    "alpha": args.alpha, "sparse_bp": not args.no_sparse_bp}
        cg = cg_resnet_from_float(float_model, cfg=cfg, threshold_init=args.threshold_init,
                                  **settings)
        train_cg(cg, splits, epochs=args.epochs, lr=args.lr, gate_target=args.gate_target,
                 sigma_g=args.sigma_g, sparse_bp=not args.no_sparse_bp, seed=args.seed,
                 progress=not args.quiet, threshold_lr_scale=args.threshold_lr_scale)
        program = build_cg_program(cg, calibration_batches(splits.train, args.calib_images),
                                   cfg, progress=not args.quiet)
        st = cg_stats(cg, test)
        gst = program_cg_stats(program, test)
        res = {"fp_acc": fp_acc, "cg_acc": st["acc"], "bfp_acc": gst["acc"],
               "sparsity": gst["sparsity"], "flop_reduction": gst["flop_reduction"],
               "cg_flop_reduction": gst["cg_flop_reduction"], "cg_sparsity": st["sparsity"]}
        out = Path(args.out or f"build/{args.model}/{args.model}-{args.data}-cg-p{args.partitions}.pt")
        save_checkpoint(out, args.model, kwargs, to_float_model(cg), program,
                        meta={"dataset": args.data, **res, "quant": cfg.to_dict(),
                              "calib_images": args.calib_images, "technique": "cg",
                              "cg": {**settings, "threshold_init": args.threshold_init,
                                     "gate_target": args.gate_target, "sigma_g": args.sigma_g,
                                     "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
                                     "threshold_lr_scale": args.threshold_lr_scale,
                                     "eval_images": args.eval_images},
                              "cg_state_dict": cg.state_dict()})
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model} on {args.data}, CG p={args.partitions} a{args.act_bits} M={args.mantissa}: "
          f"FP {fp_acc:.2f} %  CG (fake-quant) {st['acc']:.2f} %  golden integer {gst['acc']:.2f} %  "
          f"update sparsity {100 * gst['sparsity']:.1f} %  FLOP reduction "
          f"{gst['cg_flop_reduction']:.2f}x on the CG layers, {gst['flop_reduction']:.2f}x whole net")
    print(f"saved {out}")
    return 0


def _add_train_fbs(sub: argparse._SubParsersAction) -> None:
    """``train-fbs``: Feature Boosting and Suppression -> integer program with a host
    predictor."""
    from .train_fbs import DENSITY_STEPS

    c = sub.add_parser("train-fbs", help="fine-tune the float fbs_cnn with Feature Boosting and "
                                         "Suppression down to a channel density, build its "
                                         "integer program, save")
    c.set_defaults(handler=_train_fbs)
    _add_backbone_args(c, "fbs_cnn")
    c.add_argument("--density", type=float, default=0.5,
                   help="target channel density d in (0, 1]; fine-tuned in steps "
                        f"{', '.join(f'{d:g}' for d in DENSITY_STEPS)} down to it "
                        "(default: %(default)s)")
    c.add_argument("--warmup-epochs", type=int, default=3,
                   help="warm-up epochs, backbone frozen, d = 1 (default: %(default)s)")
    c.add_argument("--epochs", type=int, default=5,
                   help="fine-tuning epochs per density step (default: %(default)s)")
    c.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    c.add_argument("--gate-lr-scale", type=float, default=10.0,
                   help="learning-rate multiplier of the predictors and β (default: %(default)s)")
    c.add_argument("--l1", type=float, default=0.0,
                   help="weight of the l1 regulariser on the active saliencies (default: "
                        "%(default)s, as FBS's M-CifarNet)")
    c.add_argument("--alpha", type=float, default=6.0, help="initial PACT clip (default: %(default)s)")
    c.add_argument("--max-batches", type=int, default=None, metavar="N",
                   help="at most N batches per epoch (quick runs; default: all)")
    _add_program_args(c, None)
    c.add_argument("--out", default=None, metavar="FILE",
                   help="output checkpoint (default: build/<model>/<model>-<data>-fbs-d<d>.pt)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_fbs(args: argparse.Namespace) -> int:
    import dataclasses

    from .fbs import FBS_ACT_BITS, check_density, fbs_from_dense
    from .fbs_program import (FBS_QUANT_CONFIG, build_fbs_program, fbs_golden_stats,
                              save_fbs_checkpoint)
    from .flow import calibration_batches
    from .formats import BFPFormat
    from .pg import check_pg_bits
    from .train_fbs import density_schedule, fbs_fine_tune, fbs_stats

    try:
        if args.model != "fbs_cnn":
            raise ValueError(f"unknown model {args.model!r} for FBS; known: fbs_cnn")
        density = check_density(args.density, "--density")
        if args.epochs < 1 or args.warmup_epochs < 0:
            raise ValueError("--epochs must be >= 1 and --warmup-epochs >= 0")
        if args.max_batches is not None and args.max_batches < 1:
            raise ValueError(f"--max-batches must be >= 1, not {args.max_batches}")
        cfg = dataclasses.replace(FBS_QUANT_CONFIG,
                                  fmt=BFPFormat(args.mantissa, args.exponent_bits))
        check_pg_bits(FBS_ACT_BITS, None, cfg.fmt, "FBS activations")
        float_model, splits, _, fp_acc = _load_backbone(args)
        calib = torch.cat(calibration_batches(splits.train, args.calib_images))
        model = fbs_from_dense(float_model, calib, alpha=args.alpha)
        steps = density_schedule(density)
        for _ in fbs_fine_tune(model, splits.train, steps, args.warmup_epochs, args.epochs,
                               lr=args.lr, l1=args.l1, gate_lr_scale=args.gate_lr_scale,
                               seed=args.seed, progress=not args.quiet,
                               max_batches=args.max_batches):
            pass
        st = fbs_stats(model, splits.test)
        program = build_fbs_program(model, calib, cfg)
        gst = fbs_golden_stats(program, splits.test, progress=not args.quiet)
        res = {"fp_acc": fp_acc, "fbs_acc": st["acc"], "bfp_acc": gst["acc"],
               "mac_reduction": gst["mac_reduction"], "predictor_macs": gst["predictor_macs"],
               "dense_macs": gst["dense_macs"], "layer_density": gst["density"],
               "fbs_mac_reduction": st["mac_reduction"]}
        out = Path(args.out or f"build/{args.model}/{args.model}-{args.data}-fbs-d{density:g}.pt")
        save_fbs_checkpoint(out, model, program,
                            meta={"dataset": args.data, **res, "quant": cfg.to_dict(),
                                  "calib_images": args.calib_images,
                                  "train": {"density": density, "steps": steps,
                                            "warmup_epochs": args.warmup_epochs,
                                            "epochs": args.epochs, "lr": args.lr,
                                            "gate_lr_scale": args.gate_lr_scale, "l1": args.l1,
                                            "alpha": args.alpha, "seed": args.seed}})
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dens = " ".join(f"{v:.3f}" for v in gst["density"])
    print(f"{args.model} on {args.data}, FBS d={density:g} M={args.mantissa}: FP {fp_acc:.2f} %  "
          f"FBS (float) {st['acc']:.2f} %  golden integer {gst['acc']:.2f} %  MAC reduction "
          f"{gst['mac_reduction']:.2f}x  (predictor {gst['predictor_macs']:.0f} MACs/image)")
    print(f"realised density per conv (golden): {dens}")
    print(f"saved {out}")
    return 0


def _add_train_fusion(sub: argparse._SubParsersAction) -> None:
    """``train-fusion``: vanilla -> pruned -> ReLU predictor -> fused integer golden model."""
    from .train_fusion import FUSION_DEFAULTS as D

    c = sub.add_parser("train-fusion", help="train a FusioNet (vanilla, pruned, ReLU predictor), "
                                            "build the integer golden model of the fused "
                                            "network, report accuracy, mask errors and "
                                            "multiplication counts, save")
    c.set_defaults(handler=_train_fusion)
    c.add_argument("--model", default="fusionet_digits", metavar="NAME",
                   help="network of fusion units: fusionet_digits or mbv2_fusion_digits "
                        "(default: %(default)s)")
    c.add_argument("--data", default="digits", metavar="NAME",
                   help="dataset: digits (default: %(default)s)")
    c.add_argument("--float-epochs", type=int, default=D["float_epochs"],
                   help="vanilla training epochs (default: %(default)s)")
    c.add_argument("--prune-epochs", type=int, default=D["prune_epochs"],
                   help="epochs on the cubic pruning schedule (default: %(default)s)")
    c.add_argument("--recover-epochs", type=int, default=D["recover_epochs"],
                   help="recovery epochs with frozen masks (default: %(default)s)")
    c.add_argument("--pred-epochs", type=int, default=D["pred_epochs"],
                   help="predictor training epochs (default: %(default)s)")
    c.add_argument("--lr", type=float, default=D["lr"], help="vanilla learning rate (default: %(default)s)")
    c.add_argument("--prune-lr", type=float, default=D["prune_lr"],
                   help="pruning learning rate (default: %(default)s)")
    c.add_argument("--pred-lr", type=float, default=D["pred_lr"],
                   help="predictor learning rate (default: %(default)s)")
    c.add_argument("--batch-size", type=int, default=64, help="training batch (default: %(default)s)")
    c.add_argument("--max-batches", type=int, default=None,
                   help="cap batches per epoch (smoke runs)")
    c.add_argument("--eval-images", type=int, default=None,
                   help="first N test images only (default: the whole test split)")
    c.add_argument("--calib-images", type=int, default=D["calib_images"],
                   help="calibration images of the activation exponents (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    c.add_argument("--out", default=None, metavar="FILE",
                   help="output checkpoint (default: build/<model>/<model>-<data>-fusion.pt)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_fusion(args: argparse.Namespace) -> int:
    from .train_fusion import FUSION_MODELS, run_fusion, save_fusion_checkpoint

    try:
        if args.model not in FUSION_MODELS:
            raise ValueError(f"unknown model {args.model!r} for train-fusion; known: "
                             f"{', '.join(FUSION_MODELS)}")
        if args.data != "digits":
            raise ValueError(f"train-fusion supports --data digits, not {args.data!r}")
        for name in ("float_epochs", "prune_epochs", "recover_epochs", "pred_epochs"):
            if getattr(args, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        splits = load_data(args.model, args.data, batch_size=args.batch_size, seed=args.seed)
        r = run_fusion(splits, args.model, float_epochs=args.float_epochs,
                       prune_epochs=args.prune_epochs, recover_epochs=args.recover_epochs,
                       pred_epochs=args.pred_epochs, lr=args.lr, prune_lr=args.prune_lr,
                       pred_lr=args.pred_lr, calib_images=args.calib_images, seed=args.seed,
                       progress=not args.quiet, max_batches=args.max_batches,
                       eval_images=args.eval_images)
        res = r["results"]
        out = Path(args.out or f"build/{args.model}/{args.model}-{args.data}-fusion.pt")
        kwargs = {"num_classes": splits.num_classes, "in_channels": splits.shape[0]}
        save_fusion_checkpoint(out, args.model, kwargs, r["pruned"], r["predicted"],
                               meta={"dataset": args.data, **res,
                                     "train": {k: getattr(args, k) for k in (
                                         "float_epochs", "prune_epochs", "recover_epochs",
                                         "pred_epochs", "lr", "prune_lr", "pred_lr",
                                         "batch_size", "calib_images", "seed")}})
    except (ValueError, FileNotFoundError, CheckpointError, OverflowError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    e = res["mask_error_rate"]
    print(f"{args.model} on {args.data}: vanilla {res['vanilla_acc']:.2f} %  pruned "
          f"{res['pruned_acc']:.2f} %  predicted (integer golden, fused) "
          f"{res['predicted_acc']:.2f} %  (float predicted {res['predicted_float_acc']:.2f} %)")
    print(f"mask misprediction: s1 {100 * e['s1']:.2f} %  s2 {100 * e['s2']:.2f} %")
    print(f"mults/image over the fused blocks: dense {res['mults_dense']:.0f}  pruned "
          f"{res['mults_pruned']:.0f}  fused {res['mults_fused']:.0f}  reduction "
          f"{res['mult_reduction']:.2f}x (vs pruned {res['mult_reduction_vs_pruned']:.2f}x, "
          f"whole network {res['mult_reduction_network']:.2f}x); adds: dense "
          f"{res['adds_dense']:.0f}  pruned {res['adds_pruned']:.0f}  fused {res['adds_fused']:.0f}")
    print(f"saved {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "handler", None) is not None:
        return args.handler(args)
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
