"""Calibration speed: our streaming KL exponent observer vs torch.ao's HistogramObserver.

ResNet-50 (``dynacc.quant.models``, random init) with BatchNorm statistics settled on random
images, then ``--images`` random 224x224 images in batches of ``--batch`` through the model in
eval mode. Forward hooks on every ``BatchNorm2d`` output and on the ``fc`` output feed each
hooked tensor to one :class:`dynacc.quant.observers.KLExponentObserver` per layer (M = 8) and to
one ``torch.ao.quantization.HistogramObserver`` per layer (default settings: the reference, used
here only as a yardstick; the ``dynacc`` package never imports it). Each side is timed
separately with ``time.perf_counter`` around its observer calls, plus its ``calculate_qparams``
at the end; the model's own forward time is excluded.

Writes ``build/bench/calibration_speed.json`` (atomically) with ``ours_s``, ``reference_s``,
``ratio`` (ours / reference, target <= 1), ``images``, ``layers`` and a breakdown.

    python bench/calibration_speed.py [--images 32] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dynacc.quant.formats import BFPFormat
from dynacc.quant.models import build_model
from dynacc.quant.observers import KLExponentObserver

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "build" / "bench" / "calibration_speed.json"


def _reference_observer_class():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import HistogramObserver
    return HistogramObserver


@torch.no_grad()
def settle_batchnorm(model: nn.Module, passes: int, batch: int, gen: torch.Generator) -> None:
    """Replace the BN running statistics by their cumulative average over ``passes``
    train-mode forwards of random 224x224 images (``momentum=None``), then switch to eval."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for _ in tqdm(range(passes), desc="settle BN", leave=False):
        model(torch.randn(batch, 3, 224, 224, generator=gen))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="calibration images (default 32)")
    ap.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    ap.add_argument("--settle", type=int, default=2,
                    help="train-mode passes that settle the BN statistics (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.images < 1 or args.batch < 1:
        ap.error("--images and --batch must be >= 1")

    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = build_model("resnet50")
    settle_batchnorm(model, args.settle, args.batch, gen)

    hooked = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    hooked.append(("fc", model.fc))
    fmt = BFPFormat(8, 8)
    reference_cls = _reference_observer_class()
    ours = {name: KLExponentObserver(fmt) for name, _ in hooked}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = {name: reference_cls() for name, _ in hooked}
    clock = {"ours": 0.0, "reference": 0.0}
    elements = [0]

    def hook_for(name: str):
        def hook(_module, _inputs, out):
            elements[0] += out.numel()
            t0 = time.perf_counter()
            ours[name](out)
            t1 = time.perf_counter()
            reference[name](out)
            t2 = time.perf_counter()
            clock["ours"] += t1 - t0
            clock["reference"] += t2 - t1
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in hooked]
    n_batches = -(-args.images // args.batch)
    t_model = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = 0
        for _ in tqdm(range(n_batches), desc="calibrate", unit="batch"):
            n = min(args.batch, args.images - done)
            model(torch.randn(n, 3, 224, 224, generator=gen))
            done += n
    wall = time.perf_counter() - t_model
    for h in handles:
        h.remove()
    observe = dict(clock)

    t0 = time.perf_counter()
    ours_exp = {name: int(obs.calculate_qparams()[0]) for name, obs in ours.items()}
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obs in reference.values():
            obs.calculate_qparams()
    t2 = time.perf_counter()
    clock["ours"] += t1 - t0
    clock["reference"] += t2 - t1

    max_exp = {name: int(obs.max_exponents()[0]) for name, obs in ours.items()}
    below = sum(ours_exp[n] < max_exp[n] for n in ours)
    result = {
        "ours_s": round(clock["ours"], 4),
        "reference_s": round(clock["reference"], 4),
        "ratio": round(clock["ours"] / clock["reference"], 4),
        "images": args.images,
        "layers": len(hooked),
        "batch": args.batch,
        "elements_observed": elements[0],
        "ours_observe_s": round(observe["ours"], 4),
        "ours_qparams_s": round(t1 - t0, 4),
        "reference_observe_s": round(observe["reference"], 4),
        "reference_qparams_s": round(t2 - t1, 4),
        "calibration_wall_s": round(wall, 2),
        "kl_below_max_layers": below,
        "model": "resnet50",
        "ours": "dynacc KLExponentObserver(M=8, E=8, group=-1, candidates=3, bins=2048)",
        "reference": "torch.ao.quantization.HistogramObserver() defaults",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"calibration_speed: ours {result['ours_s']:.2f} s,"
          f" reference {result['reference_s']:.2f} s, ratio {result['ratio']:.3f}"
          f" ({args.images} images, {len(hooked)} layers, KL < max on {below}) -> {out}")
    return result


if __name__ == "__main__":
    main()
