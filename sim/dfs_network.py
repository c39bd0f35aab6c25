"""Whole-network RTL runs of a DFS deploy folder, checked against the DFS golden model.

>>> res = run_network(path, images, dfs=True)                       # doctest: +SKIP
>>> check_dfs_network(program, gate, res, images).assert_ok()       # doctest: +SKIP

:func:`~dynacc.sim.network.run_network` with ``dfs=True`` runs the host gate of the folder on
the RTL's own block outputs and the chosen option per block and image (msb / full on the
dual-precision engine, skip as a host step). :func:`check_dfs_network` replays the run's
decisions in :func:`~dynacc.quant.dfs_program.run_dfs_golden_env` and checks, with ``==``:
every tensor each image computed (and that the RTL ran exactly the layers the golden model
did), every gate outcome of a dual layer (none in ``msb``, all in ``full``), the gate's own
picks on the RTL tensors against its picks on the golden tensors, the predictions, and every
layer's RTL cycles against ``conv_cycles`` / ``DualProgram.cycles`` of that image's mode and
precision.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from dynacc.quant.dfs import SKIP
from dynacc.quant.dfs_program import HostGate, run_dfs_golden_env
from dynacc.sw.reader import DeployLayer

from .network import LayerCheck, NetworkCheck, NetworkResult, _compare

__all__ = ["DfsNetworkCheck", "check_dfs_network"]


@dataclasses.dataclass
class DfsNetworkCheck(NetworkCheck):
    decisions: np.ndarray = None            # [N, n_gated] option indices that ran
    gate_decisions_rtl: np.ndarray = None   # the host gate's picks on the RTL tensors
    gate_decisions_golden: np.ndarray = None  # ... on the golden tensors (same decisions)
    cycles_per_image: np.ndarray = None     # [N] engine cycles (all layers that ran)
    dual_cycles_per_image: np.ndarray = None  # [N] of those, on the dual-precision engine

    def failures(self) -> list[str]:
        out = super().failures()
        if not np.array_equal(self.gate_decisions_rtl, self.gate_decisions_golden):
            i, k = np.argwhere(self.gate_decisions_rtl != self.gate_decisions_golden)[0]
            out.insert(0, f"image {i}: the host gate on the RTL output of block {k} picked "
                          f"option {self.gate_decisions_rtl[i, k]}, on the golden tensors "
                          f"{self.gate_decisions_golden[i, k]}")
        return out


def _choice_of(gate: HostGate, decisions: torch.Tensor) -> dict[str, list[Any]]:
    """Engine layer -> per-image option of its gated block (layers of no gated block absent)."""
    out: dict[str, list[Any]] = {}
    for blk in gate.layout:
        if blk.gated:
            col = [gate.options.choices[int(d)] for d in decisions[:, blk.index - 1]]
            for c in blk.convs:
                out[c] = col
    return out


def check_dfs_network(program: Any, gate: HostGate, result: NetworkResult,
                      images: torch.Tensor | np.ndarray) -> DfsNetworkCheck:
    """Compare a DFS RTL run (``run_network(..., dfs=True)``) with the golden model run on the
    same decisions (see the module docstring)."""
    from dynacc.gen.engine_layers import dual_layer
    from dynacc.hw.cycles import conv_cycles

    if result.dfs is None:
        raise ValueError("not a DFS run: call run_network(..., dfs=True)")
    dep = result.deploy
    x = torch.as_tensor(np.asarray(images))
    n = len(x)
    dec = torch.from_numpy(np.asarray(result.dfs["decisions"], dtype=np.int64))
    gold = run_dfs_golden_env(program, gate, x, dec)
    b = gate.options.act_bits
    choice = _choice_of(gate, dec)
    layers, host = [], []
    dual_total = np.zeros(n, dtype=np.int64)
    progs: dict[tuple[str, str, int], Any] = {}
    for s in dep.steps:
        t = s.output
        ran = gold.ran[t].numpy() if t in gold.ran else np.ones(n, dtype=bool)
        bad, msg = 0, None
        for i in np.nonzero(ran)[0]:
            nb, m = _compare(t, result.acts[t][i:i + 1], gold.env[t][i:i + 1].numpy(), int(i))
            bad += nb
            msg = msg or m
        if not isinstance(s, DeployLayer):
            host.append(LayerCheck(s.name, bad == 0, bad, msg, None, None, True, "host"))
            continue
        cyc = result.cycles[s.name]
        if not np.array_equal(cyc >= 0, ran):
            bad += 1
            msg = msg or (f"layer {s.name!r}: the RTL ran images {np.nonzero(cyc >= 0)[0]}, "
                          f"the golden model {np.nonzero(ran)[0]}")
        if msg is not None and t != s.name:
            msg += f" (tensor {t!r}, written by engine layer {s.name!r})"
        model = np.full(n, -1, dtype=np.int64)
        gbad, gmsg, npass, size = 0, None, 0, 0
        for i in np.nonzero(ran)[0]:
            if s.engine != "dual":
                model[i] = conv_cycles(dep.hw, in_channels=s.in_channels,
                                       out_channels=s.out_channels, out_height=s.out_height,
                                       out_width=s.out_width, kernel_h=s.kernel,
                                       kernel_w=s.kernel)
                continue
            c = choice.get(s.name, [None] * n)[i]
            mode, p = ("full", b) if c in (None, SKIP, b) else ("msb", int(c))
            op = dataclasses.replace(program.op(s.name), dp_mode=mode,
                                     **({"dp_msb_bits": p} if mode == "msb" else {}))
            xin = gold.env[op.inputs[0]][i:i + 1]
            _, gp = program.dual_precision_acc(op, xin)
            gp = gp.numpy()
            key = (s.name, mode, p)
            if key not in progs:
                dl = dual_layer(program, s, mode=mode)
                if mode == "msb":
                    dl = dataclasses.replace(dl, msb_bits=p)
                progs[key] = dl.program(dep.hw)
            model[i] = progs[key].cycles(gp[0])
            dual_total[i] += int(cyc[i]) if cyc[i] >= 0 else 0
            rtl = result.passed.get(s.name)
            if rtl is None:
                nb, m = 1, f"layer {s.name!r}: the run returned no gate outcomes"
            else:
                nb, m = _compare(f"{s.name} (gate outcomes)", rtl[i:i + 1].astype(np.int64),
                                 gp.astype(np.int64), int(i))
            gbad += nb
            gmsg = gmsg or m
            npass += int(gp.sum())
            size += gp.size
        ok = bool((cyc == model).all())
        one = int(cyc[ran][0]) if ran.any() and (cyc[ran] == cyc[ran][0]).all() else None
        mone = int(model[ran][0]) if ran.any() and (model[ran] == model[ran][0]).all() else None
        layers.append(LayerCheck(s.name, bad == 0, bad, msg, one, mone, ok, s.engine,
                                 gbad == 0, gmsg,
                                 npass / size if s.engine == "dual" and size else None, cyc))
    rtl_pred = result.acts[dep.output].reshape(n, -1).argmax(axis=1)
    gold_pred = gold.env[dep.output].reshape(n, -1).numpy().argmax(axis=1)
    return DfsNetworkCheck(layers, host, rtl_pred, gold_pred, dec.numpy(),
                           np.asarray(result.dfs["gate_decisions"]),
                           gold.gate_decisions.numpy(), result.cycles_per_image, dual_total)
