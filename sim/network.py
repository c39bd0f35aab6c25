"""Whole networks on the RTL engine from a deploy folder, checked against the golden model.

>>> res = run_network("build/deploy/resnet20", images)           # doctest: +SKIP
>>> chk = check_network(program, res, images); chk.assert_ok()     # doctest: +SKIP

:func:`run_network` launches the simulator once for all images
(:mod:`dynacc.sim.benches.network_bench`): weights, exponents and shifts are ``$readmemh``'d
from the deploy folder's ``.mem`` files, host steps run in the bench process between layers,
and every engine layer reads the previous RTL outputs. :func:`check_network` compares every
tensor of the run with ``program.run_golden`` (``==``, element by element; the message of
``check_conv_output`` names layer, channel, y, x and both values) and every layer's RTL
cycle counter with ``hw.cycles.conv_cycles``.

A Precision Gating / DFS / Channel Gating deploy (dual-precision layers, ``engine: dual``)
runs on the two-engine top (:mod:`dynacc.sim.net_top`, one simulator process for both
engines): its dual layers run on the dual-precision engine, chained like every other layer,
in the mode ``modes`` gives per image (default: the exported one; a Channel Gating layer,
``dp_mode: cg``, always runs gated). :func:`check_network` then also
compares every gate outcome with the golden model's and each dual layer's RTL cycles with
``DualProgram.cycles`` of the golden gate outcomes of that image.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynacc.hw.config import HwConfig
from dynacc.sw.reader import Deploy, DeployLayer, load_deploy

from . import runner
from .conv import MAKE_VARS, _build_cached, check_conv_output

__all__ = ["NetworkResult", "LayerCheck", "NetworkCheck", "run_network", "check_network",
           "verify_network"]

_log = logging.getLogger(__name__)

#: modes a run may force on a Precision Gating / DFS layer (a Channel Gating layer runs gated)
PG_MODES = ("gated", "msb", "full")

BENCH_MODULE = "dynacc.sim.benches.network_bench"


@dataclasses.dataclass
class NetworkResult:
    deploy: Deploy
    images: int
    acts: dict[str, np.ndarray]        # tensor -> [N, ...] int64 (the RTL-chained run)
    cycles: dict[str, np.ndarray]      # engine layer -> [N] RTL cycle counter
    rtl_wall_s: dict[str, float]       # engine layer -> seconds start -> done, all images
    sim_wall_s: float                  # the simulator process (launch, loads, host steps)
    #: dual-precision layer -> [N, O, Ho, Wo] bool: the RTL gate outcomes
    passed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    #: per image, dual layer -> mode it ran in where it differs from the exported one
    modes: list[dict[str, str]] | None = None
    #: DFS runs: ``decisions`` (what ran) / ``gate_decisions`` (the host gate's picks on the
    #: RTL block outputs) ``[N, n_gated]`` and ``probs`` ``[N, n_gated, n_options]``;
    #: a layer a skipped block did not run has cycles -1 and no gate outcomes for that image
    dfs: dict[str, np.ndarray] | None = None

    @property
    def cycles_per_image(self) -> np.ndarray:
        return np.sum([np.where(c >= 0, c, 0) for c in self.cycles.values()], axis=0)


@dataclasses.dataclass
class LayerCheck:
    name: str
    exact: bool                 # every image equal to the golden model
    bad_images: int
    mismatch: str | None        # the first mismatch (image, layer, channel, y, x, values)
    cycles: int | None          # RTL cycles (engine layers; None if they differ per image)
    model_cycles: int | None    # conv_cycles / DualProgram.cycles (None if they differ per image)
    cycles_ok: bool
    engine: str = "conv"        # conv | dual | host
    gates_exact: bool = True    # dual: every gate outcome equal to the golden model's
    gate_mismatch: str | None = None   # dual: the first differing gate outcome
    passed_fraction: float | None = None  # dual: golden outputs that passed, all images
    rtl_cycles: np.ndarray | None = None  # [N] RTL cycles (engine layers)


@dataclasses.dataclass
class NetworkCheck:
    layers: list[LayerCheck]    # engine layers, in order
    host: list[LayerCheck]      # host steps (input quantization, pooling, ...), in order
    rtl_pred: np.ndarray
    golden_pred: np.ndarray

    @property
    def bit_exact_layers(self) -> int:
        return sum(l.exact for l in self.layers)

    @property
    def total_layers(self) -> int:
        return len(self.layers)

    def failures(self) -> list[str]:
        out = []
        for l in self.layers + self.host:
            if not l.exact:
                out.append(l.mismatch or f"layer {l.name!r} differs")
            if not l.gates_exact:
                out.append(l.gate_mismatch or f"layer {l.name!r}: gate outcomes differ")
            if not l.cycles_ok:
                model = "DualProgram.cycles" if l.engine == "dual" else "conv_cycles model"
                rtl = l.cycles if l.cycles is not None else l.rtl_cycles.tolist()
                out.append(f"layer {l.name!r}: RTL cycles {rtl} != {model} {l.model_cycles}")
        if not np.array_equal(self.rtl_pred, self.golden_pred):
            out.append(f"predictions differ on {int((self.rtl_pred != self.golden_pred).sum())} "
                       "images")
        return out

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` with the first failure (in layer order)."""
        f = self.failures()
        if f:
            raise AssertionError(f[0] + (f" (+{len(f) - 1} more)" if len(f) > 1 else ""))


@functools.lru_cache(maxsize=None)
def _build_net_cached(cfg: HwConfig, waves: bool
                      ) -> tuple[runner.SimBuild, dict[str, dict[str, int]]]:
    """The simulator of :func:`dynacc.sim.net_top.net_sim_top` (built once per cfg and
    source state, reused from ``build/sim``) and its per-engine load bits."""
    from .net_top import net_sim_top

    return runner.cached_top_build(f"net_{cfg.name}", cfg.key(),
                                   ["top.py", "dual_top.py", "net_top.py"],
                                   lambda: net_sim_top(cfg), waves=waves, make_vars=MAKE_VARS)


def build_network_sim(cfg: HwConfig, dual: bool) -> tuple[runner.SimBuild, dict[str, Any]]:
    """The simulator a deploy folder runs on: the conv engine sim top, or with ``dual``
    (the folder has dual-precision layers) the two-engine top. Returns the build and the
    load bits (``{mem: bit}``, or ``{engine: {mem: bit}}`` for the two-engine top)."""
    if dual:
        return _build_net_cached(cfg, runner.waves_enabled())
    return _build_cached(cfg, runner.waves_enabled())


def _poll(progress: Path, total: int, stop: threading.Event, desc: str) -> None:
    from tqdm.auto import tqdm

    done = 0
    with tqdm(total=total, desc=desc, unit="layer-run", dynamic_ncols=True) as bar:
        while True:
            finished = stop.wait(0.5)
            try:
                n = sum(1 for _ in open(progress))
            except OSError:
                n = 0
            if n > done:
                bar.update(n - done)
                done = n
            if finished:
                break


def _modes(dep: Deploy, modes: Any, n: int) -> list[dict[str, str]] | None:
    """``modes`` (None, one ``{layer: mode}`` for every image, or a list of N of them)
    checked against the deploy's dual-precision layers, as a list of N dicts."""
    if modes is None:
        return None
    per = [dict(modes)] * n if isinstance(modes, dict) else [dict(m or {}) for m in modes]
    if len(per) != n:
        raise ValueError(f"modes: {len(per)} entries for {n} images (one {{layer: mode}} per "
                         "image, or one for all)")
    dual = {l.name: l for l in dep.layers if l.engine == "dual"}
    for i, m in enumerate(per):
        for name, mode in m.items():
            if name not in dual:
                raise ValueError(f"modes[{i}]: layer {name!r} is not a dual-precision layer of "
                                 f"{dep.path} (those are: {', '.join(sorted(dual)) or 'none'})")
            if dual[name].dp_mode == "cg":
                raise ValueError(f"modes[{i}]: layer {name!r} is a Channel Gating layer "
                                 "(dp_mode 'cg'): it runs gated only, no mode can be forced")
            if mode not in PG_MODES:
                raise ValueError(f"modes[{i}]: layer {name!r}: mode {mode!r} must be one of "
                                 f"{PG_MODES}")
    return per


def run_network(deploy: Deploy | str | Path, images: torch.Tensor | np.ndarray, *,
                integer_input: bool = False, clock: str = "gpi", keep: bool | None = None,
                progress: bool = False, verify: bool = True,
                modes: dict[str, str] | list[dict[str, str]] | None = None,
                dfs: bool = False, decisions: Any = None) -> NetworkResult:
    """Run ``images`` (float ``[N, C, H, W]``, or input mantissas with ``integer_input``)
    through the deploy folder on the RTL, in one simulator process.

    Dual-precision layers (``engine: dual``) run on the dual-precision engine of the
    two-engine top, in their exported mode unless ``modes`` (``{layer: mode}`` for every
    image, or a list with one per image: the host gate's decisions of a DFS run) says
    ``gated`` / ``msb`` / ``full`` for that image; their gate outcomes come back in
    ``NetworkResult.passed``.

    ``dfs`` (a DFS deploy, manifest section ``dfs``): the host gate of the folder decides
    every gated block per image from the RTL's own block outputs
    (:class:`~dynacc.sw.dfs_host.DfsHost`), ``decisions`` (``[N, n_gated]`` option indices,
    -1: the gate decides) overrides it; the decisions come back in ``NetworkResult.dfs``.

    Raises :class:`~dynacc.sw.reader.DeployError` for a bad folder, ``ValueError`` for bad
    ``modes`` and :class:`~dynacc.sim.runner.SimulationError` if the simulation fails.
    """
    dep = deploy if isinstance(deploy, Deploy) else load_deploy(deploy, images=False,
                                                                 verify=verify)
    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    per_image = _modes(dep, modes, len(x))
    if (dfs or decisions is not None) and dep.dfs is None:
        raise ValueError(f"{dep.path}: not a DFS deploy (no manifest section 'dfs')")
    if decisions is not None:
        from dynacc.sw.dfs_host import DfsHost
        DfsHost(dep, len(x), decisions)    # shape / range checked before simulating
        decisions = np.asarray(decisions, dtype=np.int64).tolist()
    dfs_cfg = {"decisions": decisions} if (dfs or decisions is not None) else None
    cfg = dep.hw
    two = any(l.engine == "dual" for l in dep.layers)
    sim, load_bits = build_network_sim(cfg, two)
    run_dir = runner.new_run_dir(f"net_{cfg.name}")
    out = run_dir / "out"
    out.mkdir()
    np.save(run_dir / "images.npy", x)
    prog_file = run_dir / "progress.txt"
    prog_file.write_text("")
    manifest = run_dir / "manifest.json"
    manifest.write_text(json.dumps({
        "deploy": str(Path(dep.path).resolve()), "images": str(run_dir / "images.npy"),
        "integer_input": integer_input, "out": str(out), "progress": str(prog_file),
        "load_bits": load_bits, "engines": two, "modes": per_image, "clock": clock,
        "verify": verify, "dfs": dfs_cfg}))
    err: list[BaseException] = []

    def target() -> None:
        try:
            runner.run(sim, BENCH_MODULE, run_dir=run_dir, extra_env={
                "DYNACC_NET_MANIFEST": str(manifest),
                # cocotb's default ("*.py") makes pytest's assertion rewriter recompile every
                # module the bench imports (torch: ~15 s instead of ~2 s)
                "COCOTB_REWRITE_ASSERTION_FILES": "network_bench.py"})
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            err.append(e)

    t0 = time.perf_counter()
    if progress:
        stop = threading.Event()
        th = threading.Thread(target=_poll, args=(prog_file, len(dep.layers) * len(x), stop,
                                                  f"{dep.model} RTL"), daemon=True)
        th.start()
        try:
            target()
        finally:
            stop.set()
            th.join()
    else:
        target()
    wall = time.perf_counter() - t0
    if err:
        raise err[0]
    res = json.loads((out / "result.json").read_text())
    with np.load(out / "acts.npz") as z:
        acts = {k: z[k].astype(np.int64) for k in z.files}
    with np.load(out / "passed.npz") as z:
        passed = {k: z[k].astype(bool) for k in z.files}
    cycles = {}
    for k, v in res["cycles"].items():   # per image; -1 where a skipped block did not run
        idx = res.get("images", {}).get(k, list(range(len(v))))
        c = np.full(len(x), -1, dtype=np.int64)
        c[idx] = v
        cycles[k] = c
        if k in passed and len(idx) != len(x):
            p = np.zeros((len(x),) + passed[k].shape[1:], dtype=bool)
            p[idx] = passed[k]
            passed[k] = p
    dfs_out = None
    if dfs_cfg is not None:
        with np.load(out / "dfs.npz") as z:
            dfs_out = {k: z[k] for k in z.files}
    result = NetworkResult(dep, len(x), acts, cycles, dict(res["rtl_wall_s"]), wall, passed,
                           per_image, dfs_out)
    if keep or runner.waves_enabled():
        _log.warning("kept the run directory %s", run_dir)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _as3(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape + (1,) * (3 - a.ndim)) if a.ndim < 3 else a


def _compare(name: str, rtl: np.ndarray, gold: np.ndarray, first_image: int) -> tuple[int, str | None]:
    """(number of differing images, message of the first) for ``[n, ...]`` batches."""
    if rtl.shape != gold.shape:
        return len(rtl), (f"layer {name!r}: RTL shape {rtl.shape[1:]} != golden "
                          f"{gold.shape[1:]}")
    bad = np.nonzero((rtl != gold).reshape(len(rtl), -1).any(axis=1))[0]
    if not len(bad):
        return 0, None
    i = int(bad[0])
    try:
        check_conv_output(name, _as3(rtl[i]), _as3(gold[i]))
    except AssertionError as e:
        return len(bad), f"image {first_image + i}: {e}"
    return len(bad), None  # pragma: no cover


def _with_modes(program: Any, modes: dict[str, str] | None) -> Any:
    """``program`` with the dual-precision ops of ``modes`` run in those modes."""
    if not modes:
        return program
    return dataclasses.replace(program, ops=[
        dataclasses.replace(o, dp_mode=modes[o.name]) if o.name in modes else o
        for o in program.ops])


def check_network(program: Any, result: NetworkResult, images: torch.Tensor | np.ndarray, *,
                  integer_input: bool = False, chunk: int = 64) -> NetworkCheck:
    """Compare ``result`` with ``program.run_golden(images)`` (a ``BFPProgram``; per image
    with the modes the run used), every tensor the run produced, the gate outcomes of every
    dual-precision layer, and the RTL cycles with ``conv_cycles`` (conv layers) or
    ``DualProgram.cycles`` of the golden gate outcomes (dual layers)."""
    from dynacc.gen.engine_layers import dual_layer
    from dynacc.hw.cycles import conv_cycles

    dep = result.deploy
    x = torch.as_tensor(np.asarray(images))
    n = len(x)
    names = [s.output for s in dep.steps]
    duals = [s for s in dep.layers if s.engine == "dual"]
    bad = {t: 0 for t in names}
    first: dict[str, str | None] = {t: None for t in names}
    gbad = {s.name: 0 for s in duals}
    gfirst: dict[str, str | None] = {s.name: None for s in duals}
    passed_sum = {s.name: 0 for s in duals}
    model_dual: dict[str, list[int]] = {s.name: [] for s in duals}
    progs: dict[tuple[str, str], Any] = {}
    if result.modes and any(result.modes):
        groups = [(i, i + 1, result.modes[i]) for i in range(n)]
    else:
        groups = [(a, min(a + chunk, n), None) for a in range(0, n, chunk)]
    gold_out = []
    for a, b, modes in groups:
        prog = _with_modes(program, modes)
        env = prog.run_golden(x[a:b], integer_input=integer_input)
        for t in names:
            nb, msg = _compare(t, result.acts[t][a:b], env[t].numpy(), a)
            bad[t] += nb
            if first[t] is None:
                first[t] = msg
        for s in duals:
            op = prog.op(s.name)
            _, gp = prog.dual_precision_acc(op, env[op.inputs[0]])
            gp = gp.numpy()
            rtl = result.passed.get(s.name)
            if rtl is None:
                nb, msg = b - a, f"layer {s.name!r}: the run returned no gate outcomes"
            else:
                nb, msg = _compare(f"{s.name} (gate outcomes)", rtl[a:b].astype(np.int64),
                                   gp.astype(np.int64), a)
            gbad[s.name] += nb
            if gfirst[s.name] is None:
                gfirst[s.name] = msg
            passed_sum[s.name] += int(gp.sum())
            key = (s.name, op.dp_mode)
            if key not in progs:
                progs[key] = dual_layer(prog, s, mode=op.dp_mode).program(dep.hw)
            model_dual[s.name] += [progs[key].cycles(p) for p in gp]
        gold_out.append(env[dep.output].numpy())
    gold = np.concatenate(gold_out)
    layers, host = [], []
    for s in dep.steps:
        if isinstance(s, DeployLayer):
            cyc = result.cycles[s.name]
            one = int(cyc[0]) if len(cyc) and (cyc == cyc[0]).all() else None
            msg = first[s.output]
            if msg is not None and s.output != s.name:
                msg += f" (tensor {s.output!r}, written by engine layer {s.name!r})"
            if s.engine == "dual":
                mc = np.asarray(model_dual[s.name], dtype=np.int64)
                ok = len(cyc) == n and bool((cyc == mc).all())
                mone = int(mc[0]) if len(mc) and (mc == mc[0]).all() else None
                size = s.out_channels * s.out_height * s.out_width * n
                layers.append(LayerCheck(
                    s.name, bad[s.output] == 0, bad[s.output], msg, one, mone, ok, "dual",
                    gbad[s.name] == 0, gfirst[s.name], passed_sum[s.name] / max(size, 1),
                    cyc))
                continue
            model = conv_cycles(dep.hw, in_channels=s.in_channels, out_channels=s.out_channels,
                                out_height=s.out_height, out_width=s.out_width,
                                kernel_h=s.kernel, kernel_w=s.kernel)
            ok = len(cyc) == n and bool((cyc == model).all()) and model == s.cycles
            layers.append(LayerCheck(s.name, bad[s.output] == 0, bad[s.output], msg, one,
                                     model, ok, rtl_cycles=cyc))
        else:
            host.append(LayerCheck(s.name, bad[s.output] == 0, bad[s.output], first[s.output],
                                   None, None, True, "host"))
    return NetworkCheck(layers, host, result.acts[dep.output].reshape(n, -1).argmax(axis=1),
                        gold.reshape(n, -1).argmax(axis=1))


def verify_network(program: Any, deploy: Deploy | str | Path, images: torch.Tensor, *,
                   integer_input: bool = False, progress: bool = False,
                   modes: dict[str, str] | list[dict[str, str]] | None = None
                   ) -> tuple[NetworkResult, NetworkCheck]:
    """:func:`run_network` + :func:`check_network`, asserting bit-exactness at every layer,
    equal gate outcomes, equal predictions and exact cycles for every layer."""
    res = run_network(deploy, images, integer_input=integer_input, progress=progress,
                      modes=modes)
    chk = check_network(program, res, images, integer_input=integer_input)
    chk.assert_ok()
    return res, chk
