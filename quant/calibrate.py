"""Offline calibration: float model -> calibrated :class:`~dynacc.quant.program.BFPProgram`.

BN is folded, every quantization point gets an observer (``cfg.method``: max exponent or the
Static BFP KL search), calibration images run through the float graph, and the chosen shared
exponents are frozen into the integer program. Residual-add operands share one observer, so
both are calibrated jointly.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .formats import QuantConfig
from .graph import FloatGraph, trace
from .observers import make_observer
from .program import BFPProgram, build_program, iter_observed, quant_points

__all__ = ["calibrate_graph", "calibrate"]


@torch.no_grad()
def calibrate_graph(graph: FloatGraph, batches: Iterable[torch.Tensor], cfg: QuantConfig,
                    progress: bool = True, shapes: dict[str, tuple[int, ...]] | None = None,
                    overrides: dict[str, torch.Tensor] | None = None) -> BFPProgram:
    """Observe every quantization point of ``graph`` on ``batches`` and build the program.
    ``shapes`` (if given) receives every tensor's per-image shape. ``overrides`` fixes the
    shared exponents of some points instead of the observers' (e.g. the static PACT scale of
    a Precision Gating input); an unknown point name is an error."""
    # rule R6: the network output always takes the max exponent (as the Static BFP code)
    observers = {p: make_observer(cfg if p != graph.output else
                                  dataclasses.replace(cfg, method="max"))
                 for p in quant_points(graph)}
    it = tqdm(batches, desc=f"calibrate ({cfg.method})", unit="batch", disable=not progress,
              leave=False)
    channels = iter_observed(graph, it, lambda p, t: observers[p](t), shapes)
    if not channels:
        raise ValueError("calibration needs at least one batch of images")
    exps = {p: obs.calculate_qparams().to(torch.int64) for p, obs in observers.items()}
    for p, e in (overrides or {}).items():
        if p not in exps:
            raise ValueError(f"exponent override for unknown quantization point {p!r}")
        exps[p] = torch.as_tensor(e, dtype=torch.int64).reshape(-1).expand_as(exps[p]).clone()
    return build_program(graph, cfg, exps, channels)


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], cfg: QuantConfig,
              progress: bool = True, shapes: dict[str, tuple[int, ...]] | None = None
              ) -> BFPProgram:
    """Trace ``model`` (eval mode, BN folded) and calibrate it on ``batches``."""
    return calibrate_graph(trace(model), batches, cfg, progress, shapes)
