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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynacc.sw.reader import Deploy, DeployLayer, load_deploy

from . import runner
from .conv import _build_cached, check_conv_output

__all__ = ["NetworkResult", "LayerCheck", "NetworkCheck", "run_network", "check_network",
           "verify_network"]

_log = logging.getLogger(__name__)

BENCH_MODULE = "dynacc.sim.benches.network_bench"


@dataclasses.dataclass
class NetworkResult:
    deploy: Deploy
    images: int
    acts: dict[str, np.ndarray]        # tensor -> [N, ...] int64 (the RTL-chained run)
    cycles: dict[str, np.ndarray]      # engine layer -> [N] RTL cycle counter
    rtl_wall_s: dict[str, float]       # engine layer -> seconds start -> done, all images
    sim_wall_s: float                  # the simulator process (launch, loads, host steps)

    @property
    def cycles_per_image(self) -> np.ndarray:
        return np.sum([c for c in self.cycles.values()], axis=0)


@dataclasses.dataclass
class LayerCheck:
    name: str
    exact: bool                 # every image equal to the golden model
    bad_images: int
    mismatch: str | None        # the first mismatch (image, layer, channel, y, x, values)
    cycles: int | None          # RTL cycles (engine layers; None if they differ per image)
    model_cycles: int | None    # hw.cycles.conv_cycles
    cycles_ok: bool


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
            if not l.cycles_ok:
                out.append(f"layer {l.name!r}: RTL cycles {l.cycles} != conv_cycles model "
                           f"{l.model_cycles}")
        if not np.array_equal(self.rtl_pred, self.golden_pred):
            out.append(f"predictions differ on {int((self.rtl_pred != self.golden_pred).sum())} "
                       "images")
        return out

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` with the first failure (in layer order)."""
        f = self.failures()
        if f:
            raise AssertionError(f[0] + (f" (+{len(f) - 1} more)" if len(f) > 1 else ""))


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


def run_network(deploy: Deploy | str | Path, images: torch.Tensor | np.ndarray, *,
                integer_input: bool = False, clock: str = "gpi", keep: bool | None = None,
                progress: bool = False, verify: bool = True) -> NetworkResult:
    """Run ``images`` (float ``[N, C, H, W]``, or input mantissas with ``integer_input``)
    through the deploy folder on the RTL, in one simulator process.

    Raises :class:`~dynacc.sw.reader.DeployError` for a bad folder and
    :class:`~dynacc.sim.runner.SimulationError` if the simulation fails.
    """
    dep = deploy if isinstance(deploy, Deploy) else load_deploy(deploy, images=False,
                                                                 verify=verify)
    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    cfg = dep.hw
    sim, load_bits = _build_cached(cfg, runner.waves_enabled())
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
        "load_bits": load_bits, "clock": clock, "verify": verify}))
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
    result = NetworkResult(dep, len(x), acts,
                           {k: np.asarray(v, dtype=np.int64) for k, v in res["cycles"].items()},
                           dict(res["rtl_wall_s"]), wall)
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


def check_network(program: Any, result: NetworkResult, images: torch.Tensor | np.ndarray, *,
                  integer_input: bool = False, chunk: int = 64) -> NetworkCheck:
    """Compare ``result`` with ``program.run_golden(images)`` (a ``BFPProgram``), every
    tensor the run produced, and the RTL cycles with ``conv_cycles``."""
    from dynacc.hw.cycles import conv_cycles

    dep = result.deploy
    x = torch.as_tensor(np.asarray(images))
    n = len(x)
    names = [s.output for s in dep.steps]
    bad = {t: 0 for t in names}
    first: dict[str, str | None] = {t: None for t in names}
    gold_out = []
    for a in range(0, n, chunk):
        env = program.run_golden(x[a:a + chunk], integer_input=integer_input)
        for t in names:
            nb, msg = _compare(t, result.acts[t][a:a + chunk], env[t].numpy(), a)
            bad[t] += nb
            if first[t] is None:
                first[t] = msg
        gold_out.append(env[dep.output].numpy())
    gold = np.concatenate(gold_out)
    layers, host = [], []
    for s in dep.steps:
        if isinstance(s, DeployLayer):
            cyc = result.cycles[s.name]
            model = conv_cycles(dep.hw, in_channels=s.in_channels, out_channels=s.out_channels,
                                out_height=s.out_height, out_width=s.out_width,
                                kernel_h=s.kernel, kernel_w=s.kernel)
            one = int(cyc[0]) if len(cyc) and (cyc == cyc[0]).all() else None
            ok = len(cyc) == n and bool((cyc == model).all()) and model == s.cycles
            msg = first[s.output]
            if msg is not None and s.output != s.name:
                msg += f" (tensor {s.output!r}, written by engine layer {s.name!r})"
            layers.append(LayerCheck(s.name, bad[s.output] == 0, bad[s.output], msg, one,
                                     model, ok))
        else:
            host.append(LayerCheck(s.name, bad[s.output] == 0, bad[s.output], first[s.output],
                                   None, None, True))
    return NetworkCheck(layers, host, result.acts[dep.output].reshape(n, -1).argmax(axis=1),
                        gold.reshape(n, -1).argmax(axis=1))


def verify_network(program: Any, deploy: Deploy | str | Path, images: torch.Tensor, *,
                   integer_input: bool = False, progress: bool = False
                   ) -> tuple[NetworkResult, NetworkCheck]:
    """:func:`run_network` + :func:`check_network`, asserting bit-exactness at every layer,
    equal predictions and ``cycles == conv_cycles`` for every layer."""
    res = run_network(deploy, images, integer_input=integer_input, progress=progress)
    chk = check_network(program, res, images, integer_input=integer_input)
    chk.assert_ok()
    return res, chk
