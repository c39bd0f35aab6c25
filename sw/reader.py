"""Read and validate a deploy folder (:mod:`dynacc.sw.export`): ``load_deploy(path, hw)``.

Every check refuses with a :class:`DeployError` whose message names the file and the field:
the format version, the manifest's own checksum, every listed file's presence, size and
sha256, the hardware config the folder was made for (against the ``hw`` given), finite floats,
exponents inside the format's E-bit range, mantissas inside ``±(2**(M-1) - 1)``, shifts inside
their hardware ranges, and the consistency of descriptors and ``.mem`` / ``.bin`` words. A
dual-precision layer (``engine: dual``) also has its ``act_bits`` / ``msb_bits`` / mode (a
Channel Gating layer, ``dp_mode: cg``: its ``partitions`` and the descriptor's ``base_words`` /
``chunk_tiles``), its thresholds inside the comparator range, its ±1 signs and its gate words
checked. A DFS
deploy (manifest section ``dfs``) has its options, block layout and host gate arrays checked
(:mod:`dynacc.sw.dfs_deploy`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

from dynacc.hw.config import HwConfig, load_named
from dynacc.quant.formats import BFPFormat, QuantConfig

from . import fileformat as ff

__all__ = ["DeployError", "DeployLayer", "DeployHostStep", "Deploy", "load_deploy"]


class DeployError(ValueError):
    """A deploy folder that cannot be used (names the file and the field)."""


@dataclasses.dataclass(frozen=True)
class DeployLayer:
    """One engine layer of the layer table (shapes as the engine sees them)."""

    index: int
    name: str
    kind: str
    input: str
    output: str
    residual: str | None
    in_channels: int
    height: int
    width: int
    out_channels: int
    out_height: int
    out_width: int
    kernel: int
    stride: int
    padding: int
    im2col: dict[str, int] | None      # kernel / stride / padding of the host im2col
    in_words: int
    tiles: int
    act_words: int
    out_words: int
    activation: str | None
    in_lsb: int
    out_lsb: int
    joint_lsb: int | None
    residual_lsb: int | None
    macs: int
    cycles: int
    ideal_cycles: int
    descriptor: dict[str, int]
    descriptor_bits: int
    files: dict[str, Path]            # memory -> absolute path of its .mem file
    memories: dict[str, dict[str, Any]]  # memory -> {file, words, bin, offset, size}
    engine: str = "conv"              # "conv" (ConvEngine) | "dual" (DualEngine, rules G0-G4)
    act_bits: int | None = None       # dual: unsigned input bits b
    msb_bits: int | None = None       # dual: MSB-phase bits (L = act_bits - msb_bits)
    dp_mode: str | None = None        # dual: gated | msb | full | cg, as exported
    cycles_msb: int | None = None     # dual: cycles when no output passes (cycles: all pass)
    partitions: int | None = None     # dual, dp_mode cg: Channel Gating partitions p


@dataclasses.dataclass(frozen=True)
class DeployHostStep:
    name: str
    kind: str
    inputs: list[str]
    output: str
    kernel: int | None = None
    stride: int | None = None
    padding: int | None = None
    activation: str | None = None


@dataclasses.dataclass
class Deploy:
    """A validated deploy folder."""

    path: Path
    manifest: dict[str, Any]
    hw: HwConfig
    quant: QuantConfig
    steps: list[DeployLayer | DeployHostStep]
    tensors: dict[str, dict[str, Any]]
    arrays: dict[str, np.ndarray]
    #: layer name -> memory -> ``[words, leaves]`` int64, as ``$readmemh`` loads them
    #: (``None`` when loaded with ``images=False``)
    images: dict[str, dict[str, np.ndarray]] | None

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def fmt(self) -> BFPFormat:
        return self.quant.fmt

    @property
    def output(self) -> str:
        return self.manifest["output"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input_shape"])

    @property
    def layers(self) -> list[DeployLayer]:
        return [s for s in self.steps if isinstance(s, DeployLayer)]

    def layer(self, name: str) -> DeployLayer:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(f"{self.path}: no engine layer named {name!r}")

    def w_lsb(self, name: str) -> np.ndarray:
        """Per-(filter, input channel) weight LSBs ``[O, C/groups]`` of layer ``name``, from
        its block exponents and the weight block geometry (rule W1)."""
        w = self.arrays[f"{name}/weight"]
        blk = self.arrays[f"{name}/block_exp"].astype(np.int64)
        c = w.shape[1]
        g = c if self.quant.weights.group == -1 else self.quant.weights.group
        return np.repeat(blk, g, axis=1)[:, :c] - self.fmt.lsb_offset

    @property
    def dfs(self) -> dict[str, Any] | None:
        """Manifest section ``dfs`` (options, block layout, host gate) of a DFS deploy."""
        return self.manifest.get("dfs")

    def host_program(self):  # noqa: ANN201 - BFPProgram
        """The host steps as a (weight-less) BFPProgram, for ``gen.engine_layers.run_host_step``."""
        from .runtime import host_program
        return host_program(self)


# ----------------------------------------------------------------------------- helpers
def _fail(where: str, msg: str) -> DeployError:
    return DeployError(f"{where}: {msg}")


def _floats(obj: Any, where: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(obj, float):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _floats(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _floats(v, f"{where}[{i}]")


def _resolve_hw(hw: HwConfig | str | os.PathLike | None) -> HwConfig | None:
    if hw is None or isinstance(hw, HwConfig):
        return hw
    p = Path(hw)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return HwConfig.from_yaml(p)
    return load_named(str(hw))


def _check_hw(where: str, made: HwConfig, given: HwConfig) -> None:
    a, b = made.to_dict(), given.to_dict()
    diff = [f"{k} ({a[k]} vs {b[k]})" for k in a if k != "name" and a[k] != b.get(k)]
    if diff:
        raise _fail(where, f"made for hardware config {made.name!r}, which differs from the "
                           f"given config {given.name!r} in " + ", ".join(diff)
                    + " (re-export it with --hw for this hardware)")


def _range(where: str, key: str, a: np.ndarray, lo: int, hi: int, what: str) -> None:
    if a.size == 0:
        return
    amin, amax = int(a.min()), int(a.max())
    if amin < lo or amax > hi:
        bad = amin if amin < lo else amax
        raise _fail(where, f"{key!r} holds {what} {bad} outside [{lo}, {hi}]")


# ----------------------------------------------------------------------------- loading
def _read_manifest(root: Path) -> dict[str, Any]:
    mpath = root / ff.MANIFEST
    where = str(mpath)
    if not mpath.is_file():
        raise DeployError(f"{root}: no {ff.MANIFEST} (not a deploy folder, or an incomplete one)")
    raw = mpath.read_bytes()
    body, recorded = ff.split_manifest(raw)
    if recorded is None:
        raise _fail(where, f"no {ff.CHECKSUM_KEY} line at the end (truncated or not written "
                           "by dynacc.sw.export)")
    import hashlib
    actual = hashlib.sha256(body).hexdigest()
    if actual != recorded:
        raise _fail(where, f"checksum mismatch ({ff.CHECKSUM_KEY} {recorded[:16]}..., content "
                           f"{actual[:16]}...): the manifest is corrupted or was edited")
    try:
        man = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise _fail(where, f"cannot be parsed: {exc}") from None
    if not isinstance(man, dict):
        raise _fail(where, "is not a mapping")
    if man.get("format") != ff.FORMAT:
        raise _fail(where, f"format {man.get('format')!r} is not {ff.FORMAT!r}")
    if man.get("format_version") != ff.FORMAT_VERSION:
        raise _fail(where, f"format_version {man.get('format_version')!r}: this dynacc reads "
                           f"version {ff.FORMAT_VERSION} (re-export with this version)")
    for key in ("model", "input_shape", "output", "bfp", "hw", "blobs", "steps", "tensors",
                "files"):
        if key not in man:
            raise _fail(where, f"missing field {key!r}")
    for field, v in _floats(man):
        if not math.isfinite(v):
            raise _fail(where, f"float field {field} is {v} (NaN/Inf are not allowed)")
    return man


def _check_files(root: Path, man: dict[str, Any], verify: bool) -> None:
    files = man["files"]
    required = [ff.ARRAYS, ff.HEADER] + [b["file"] for b in man["blobs"].values()]
    for s in man["steps"]:
        if "engine" in s:
            required += [m["file"] for m in s["engine"]["memories"].values()]
    for rel in required:
        if rel not in files:
            raise _fail(str(root / ff.MANIFEST), f"file {rel!r} is not listed in 'files'")
    for rel, info in files.items():
        p = root / rel
        if not p.is_file():
            raise _fail(str(p), f"missing (listed in {ff.MANIFEST})")
        size = p.stat().st_size
        if size != info["size"]:
            raise _fail(str(p), f"size {size} bytes, the manifest says {info['size']} "
                                "(truncated or corrupted)")
        if verify:
            sha = ff.sha256_file(p)
            if sha != info["sha256"]:
                raise _fail(str(p), f"sha256 mismatch (manifest {info['sha256'][:16]}..., file "
                                    f"{sha[:16]}...): the file is corrupted or was modified")


def _layer(root: Path, e: dict[str, Any]) -> DeployLayer:
    return DeployLayer(
        index=e["index"], name=e["name"], kind=e["kind"], input=e["input"], output=e["output"],
        residual=e["residual"], in_channels=e["in_channels"], height=e["height"],
        width=e["width"], out_channels=e["out_channels"], out_height=e["out_height"],
        out_width=e["out_width"], kernel=e["kernel"], stride=e["stride"], padding=e["padding"],
        im2col=e["im2col"], in_words=e["in_words"], tiles=e["tiles"],
        act_words=e["act_words"], out_words=e["out_words"], activation=e["activation"],
        in_lsb=e["in_lsb"], out_lsb=e["out_lsb"], joint_lsb=e["joint_lsb"],
        residual_lsb=e["residual_lsb"], macs=e["macs"], cycles=e["cycles"],
        ideal_cycles=e["ideal_cycles"], descriptor=dict(e["descriptor"]),
        descriptor_bits=int(e["descriptor_bits"], 16),
        files={m: root / v["file"] for m, v in e["memories"].items()},
        memories={m: dict(v) for m, v in e["memories"].items()},
        engine=e.get("engine", "conv"), act_bits=e.get("act_bits"),
        msb_bits=e.get("msb_bits"), dp_mode=e.get("dp_mode"), cycles_msb=e.get("cycles_msb"),
        partitions=e.get("partitions"))


#: dual-precision modes a deploy folder may hold (an FBS layer is compacted per image by the
#: host, so it has no static program)
DEPLOY_DP_MODES = ("gated", "msb", "full", "cg")


def _check_dual_layer(where: str, s: DeployLayer, hw: HwConfig) -> None:
    """The manifest fields of a dual-precision layer (rules G0-G4 / CG1-CG3, descriptor
    agreement)."""
    from dynacc.hw.cycles import cg_base_words
    from dynacc.hw.dual_program import MODE_CODES

    m = hw.mantissa_bits
    b, mb = s.act_bits, s.msb_bits
    if not isinstance(b, int) or not 2 <= b <= m - 1:
        raise _fail(where, f"layer {s.name!r}: field 'act_bits' = {b!r} must be an integer in "
                           f"[2, {m - 1}]")
    if s.dp_mode not in DEPLOY_DP_MODES:
        raise _fail(where, f"layer {s.name!r}: field 'dp_mode' = {s.dp_mode!r} must be one of "
                           f"{DEPLOY_DP_MODES}")
    if s.dp_mode == "cg":
        if mb is not None:
            raise _fail(where, f"layer {s.name!r}: field 'msb_bits' = {mb!r} must be null in "
                               "dp_mode 'cg' (both phases use the whole activation)")
        try:
            nb = cg_base_words(hw, in_channels=s.in_channels, out_channels=s.out_channels,
                               partitions=s.partitions)
        except ValueError as exc:
            raise _fail(where, f"layer {s.name!r}: field 'partitions': {exc}") from None
        mb = b      # L = 0
        for f, want in (("base_words", nb), ("chunk_tiles", s.tiles // s.partitions)):
            if s.descriptor.get(f) != want:
                raise _fail(where, f"layer {s.name!r}: descriptor field {f!r} = "
                                   f"{s.descriptor.get(f)!r} != {want} of partitions "
                                   f"{s.partitions}")
    elif not isinstance(mb, int) or not 1 <= mb < b:
        raise _fail(where, f"layer {s.name!r}: field 'msb_bits' = {mb!r} must be an integer in "
                           f"[1, act_bits - 1 = {b - 1}]")
    elif s.partitions is not None:
        raise _fail(where, f"layer {s.name!r}: field 'partitions' = {s.partitions!r} is only "
                           "used in dp_mode 'cg'")
    if s.residual is not None:
        raise _fail(where, f"layer {s.name!r}: field 'residual' = {s.residual!r}: the "
                           "dual-precision engine has no fused residual add")
    if s.descriptor.get("mode") != MODE_CODES[s.dp_mode]:
        raise _fail(where, f"layer {s.name!r}: descriptor field 'mode' = "
                           f"{s.descriptor.get('mode')!r} != code {MODE_CODES[s.dp_mode]} of "
                           f"dp_mode {s.dp_mode!r}")
    if s.descriptor.get("lsb_bits") != b - mb:
        raise _fail(where, f"layer {s.name!r}: descriptor field 'lsb_bits' = "
                           f"{s.descriptor.get('lsb_bits')!r} != act_bits - msb_bits = {b - mb}"
                           + (" (dp_mode 'cg': 0)" if s.dp_mode == "cg" else ""))
    if not isinstance(s.cycles_msb, int) or not 0 < s.cycles_msb <= s.cycles:
        raise _fail(where, f"layer {s.name!r}: field 'cycles_msb' = {s.cycles_msb!r} must be in "
                           f"[1, cycles = {s.cycles}]")


def _check_layers(where: str, man: dict[str, Any], steps: list, hw: HwConfig,
                  fmt: BFPFormat) -> None:
    from dynacc.hw.dual_sequencer import dual_desc_layout
    from dynacc.hw.types import desc_layout

    lo_e, hi_e = fmt.min_exponent, fmt.max_exponent
    layouts = {"conv": desc_layout(hw), "dual": dual_desc_layout(hw)}
    for s in steps:
        if not isinstance(s, DeployLayer):
            continue
        if s.engine not in layouts:
            raise _fail(where, f"layer {s.name!r}: field 'engine' = {s.engine!r} must be one of "
                               f"{tuple(layouts)}")
        want = ff.memories_of(s.engine)
        if set(s.memories) != set(want):
            raise _fail(where, f"layer {s.name!r}: field 'memories' lists "
                               f"{sorted(s.memories)}, an engine: {s.engine} layer has "
                               f"{sorted(want)}")
        if s.engine == "dual":
            _check_dual_layer(where, s, hw)
        dl = layouts[s.engine]
        for f in ("in_lsb", "out_lsb", "joint_lsb", "residual_lsb"):
            v = getattr(s, f)
            if v is not None and not lo_e <= v + fmt.lsb_offset <= hi_e:
                raise _fail(where, f"layer {s.name!r}: {f} = {v} is exponent "
                                   f"{v + fmt.lsb_offset}, outside the {fmt.exponent_bits}-bit "
                                   f"range [{lo_e}, {hi_e}]")
        try:
            bits = int(dl.const(s.descriptor).as_bits())
        except Exception as exc:  # noqa: BLE001 - amaranth raises several types
            raise _fail(where, f"layer {s.name!r}: descriptor {s.descriptor} does not fit "
                               f"the engine: {exc}") from None
        if bits != s.descriptor_bits:
            raise _fail(where, f"layer {s.name!r}: descriptor_bits {s.descriptor_bits:#x} != "
                               f"packed descriptor fields {bits:#x}")
    for t, d in man["tensors"].items():
        exps = d.get("exponent")
        for e in (exps if isinstance(exps, list) else [exps]):
            if e is not None and not lo_e <= e <= hi_e:
                raise _fail(where, f"tensors.{t}.exponent = {e} outside the "
                                   f"{fmt.exponent_bits}-bit range [{lo_e}, {hi_e}]")


def _check_arrays(where: str, arrays: dict[str, np.ndarray], man: dict[str, Any],
                  steps: list, hw: HwConfig, fmt: BFPFormat) -> None:
    for k, a in arrays.items():
        if a.dtype.kind == "f":
            if not np.isfinite(a).all():
                raise _fail(where, f"{k!r} holds NaN/Inf")
        elif a.dtype.kind not in "iu":
            raise _fail(where, f"{k!r} has dtype {a.dtype}, expected integers")
    m = fmt.max_mantissa
    lo_e, hi_e = fmt.min_exponent, fmt.max_exponent
    acc_max = (1 << (hw.acc_bits - 1)) - 1

    def need(key: str) -> np.ndarray:
        if key not in arrays:
            raise _fail(where, f"missing array {key!r}")
        a = arrays[key]
        if a.dtype.kind not in "iu":
            raise _fail(where, f"{key!r} has dtype {a.dtype}, expected integers")
        return a.astype(np.int64)

    for s in steps:
        if isinstance(s, DeployLayer):
            n = s.name
            w = need(f"{n}/weight")
            _range(where, f"{n}/weight", w, -m, m, "mantissa")
            o = w.shape[0]
            blk = need(f"{n}/block_exp")
            _range(where, f"{n}/block_exp", blk, lo_e, hi_e, f"{fmt.exponent_bits}-bit exponent")
            al = need(f"{n}/align_shift")
            _range(where, f"{n}/align_shift", al, 0, hw.align_span, "alignment shift")
            if al.shape != w.shape[:2] or blk.shape[0] != o:
                raise _fail(where, f"{n!r}: align_shift {al.shape} / block_exp {blk.shape} do "
                                   f"not match weight {w.shape}")
            b = need(f"{n}/bias")
            _range(where, f"{n}/bias", b, -acc_max, acc_max, f"{hw.acc_bits}-bit bias")
            need(f"{n}/acc_lsb")
            out_lsb = need(f"{n}/out_lsb")
            _range(where, f"{n}/out_lsb", out_lsb + fmt.lsb_offset, lo_e, hi_e,
                   f"{fmt.exponent_bits}-bit exponent (lsb + {fmt.lsb_offset})")
            for sh in ("acc", "res", "out"):
                _range(where, f"{n}/shift_{sh}", need(f"{n}/shift_{sh}"), hw.shift_min,
                       hw.shift_max, f"{hw.shift_bits}-bit shift")
            for key in (f"{n}/bias", f"{n}/acc_lsb", f"{n}/out_lsb"):
                if arrays[key].shape != (o,):
                    raise _fail(where, f"{key!r} has shape {arrays[key].shape}, expected ({o},)")
            if f"{n}/clamp_max" in arrays:
                _range(where, f"{n}/clamp_max", need(f"{n}/clamp_max"), 0, m, "mantissa")
            if s.engine == "dual":
                _check_dual_arrays(where, s, o, need, hw)
        elif s.kind == "add":
            need(f"{s.name}/joint_lsb")
    for t, d in man["tensors"].items():
        if d["lsb"] is None:
            continue
        a = need(f"{t}/lsb")
        _range(where, f"{t}/lsb", a + fmt.lsb_offset, lo_e, hi_e,
               f"{fmt.exponent_bits}-bit exponent (lsb + {fmt.lsb_offset})")
        want = d["lsb"] if isinstance(d["lsb"], list) else [d["lsb"]] * a.size
        if a.tolist() != want:
            raise _fail(where, f"{t + '/lsb'!r} disagrees with manifest tensors.{t}.lsb")


def _check_dual_arrays(where: str, s: DeployLayer, o: int, need: Any, hw: HwConfig) -> None:
    """``threshold`` / ``sign`` / ``act_bits`` / ``msb_bits`` (dp_mode ``cg``:
    ``partitions``) / ``mode`` of dual layer ``s``."""
    from dynacc.hw.dual_program import MODE_CODES

    n = s.name
    acc = 1 << (hw.acc_bits - 1)
    thr = need(f"{n}/threshold")
    sgn = need(f"{n}/sign")
    for key, a in ((f"{n}/threshold", thr), (f"{n}/sign", sgn)):
        if a.shape != (o,):
            raise _fail(where, f"{key!r} has shape {a.shape}, expected ({o},)")
    _range(where, f"{n}/threshold", thr, -acc, acc - 1, "threshold")  # acc_bits comparator
    if not np.isin(sgn, (-1, 1)).all():
        raise _fail(where, f"{n + '/sign'!r} holds {sorted(set(sgn.tolist()) - {-1, 1})}: a "
                           "gate sign is +1 or -1")
    digit = ("partitions", s.partitions) if s.dp_mode == "cg" else ("msb_bits", s.msb_bits)
    for field, want in (("act_bits", s.act_bits), digit, ("mode", MODE_CODES[s.dp_mode])):
        a = need(f"{n}/{field}")
        if a.shape != (1,) or int(a[0]) != want:
            raise _fail(where, f"{n + '/' + field!r} = {a.tolist()} disagrees with the "
                               f"manifest ({field} {want}"
                               + (f", dp_mode {s.dp_mode!r})" if field == "mode" else ")"))


def _check_gate_words(root: Path, path: Path, img: np.ndarray, l: DeployLayer,
                      arrays: dict[str, np.ndarray]) -> None:
    """The gate words hold the layer's thresholds and signs (gated mode; other modes ignore
    the gate memory and export zero thresholds)."""
    pairs = np.asarray(img).reshape(-1, 2)[: l.out_channels]
    thr = arrays[f"{l.name}/threshold"].astype(np.int64)
    neg = arrays[f"{l.name}/sign"].astype(np.int64) < 0
    if not (np.array_equal(pairs[:, 0], thr) and np.array_equal(pairs[:, 1].astype(bool), neg)):
        raise _fail(str(path), f"gate words of layer {l.name!r} disagree with "
                               f"{l.name}/threshold, {l.name}/sign of {root / ff.ARRAYS}")


def _load_images(root: Path, layers: list[DeployLayer], hw: HwConfig, fmt: BFPFormat,
                 arrays: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    from dynacc.sim.memfile import pack_words, read_mem

    blobs = {m: (root / ff.bin_name(m)).read_bytes()
             for m in {m for l in layers for m in l.memories}}
    out: dict[str, dict[str, np.ndarray]] = {}
    for l in layers:
        imgs = {}
        for mem, path in l.files.items():
            lay = ff.layout_of(mem, hw)
            try:
                img = read_mem(path, lay)
            except ValueError as exc:
                raise _fail(str(path), str(exc)) from None
            info = l.memories[mem]
            if len(img) != info["words"]:
                raise _fail(str(path), f"{len(img)} words, the manifest says {info['words']}")
            if mem == "wgt":
                _range(str(path), "weight word", img, -fmt.max_mantissa, fmt.max_mantissa,
                       "mantissa")
            elif mem == "align":
                _range(str(path), "alignment word", img, 0, hw.align_span, "alignment shift")
            elif mem == "gate":
                _check_gate_words(root, path, img, l, arrays)
            blob = blobs[mem][info["offset"]:info["offset"] + info["size"]]
            if ff.bits_to_bytes(pack_words(img, lay)) != blob:
                raise _fail(str(root / info["bin"]), f"bytes [{info['offset']}, "
                            f"{info['offset'] + info['size']}) differ from {path.name} of layer "
                            f"{l.name!r}")
            imgs[mem] = img
        out[l.name] = imgs
    return out


def load_deploy(path: str | os.PathLike, hw: HwConfig | str | os.PathLike | None = None, *,
                images: bool = True, verify: bool = True) -> Deploy:
    """Load the deploy folder ``path`` and check it (see the module docstring).

    ``hw``: the hardware it must have been made for (a :class:`HwConfig`, a config name or a
    YAML path); ``None`` accepts the recorded one. ``images=False`` skips reading the
    ``.mem`` files (the RTL reads them itself); ``verify=False`` skips the sha256s (sizes are
    still checked).
    """
    root = Path(path)
    if not root.is_dir():
        raise DeployError(f"deploy folder {str(root)!r} does not exist")
    man = _read_manifest(root)
    where = str(root / ff.MANIFEST)
    try:
        made = HwConfig.from_dict(man["hw"])
        quant = QuantConfig.from_dict(man["bfp"]["quant_config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise _fail(where, f"invalid hw / bfp section: {exc}") from None
    given = _resolve_hw(hw)
    if given is not None:
        _check_hw(where, made, given)
    fmt = quant.fmt
    if fmt.mantissa_bits != made.mantissa_bits:
        raise _fail(where, f"bfp.mantissa_bits {fmt.mantissa_bits} != hw.mantissa_bits "
                           f"{made.mantissa_bits}")
    _check_files(root, man, verify)
    steps: list[DeployLayer | DeployHostStep] = []
    try:
        for s in man["steps"]:
            if "engine" in s:
                steps.append(_layer(root, s["engine"]))
            else:
                h = s["host"]
                steps.append(DeployHostStep(h["name"], h["kind"], list(h["inputs"]), h["output"],
                                            h.get("kernel"), h.get("stride"), h.get("padding"),
                                            h.get("activation")))
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(where, f"invalid step entry: {exc!r}") from None
    _check_layers(where, man, steps, made, fmt)
    apath = root / ff.ARRAYS
    try:
        with np.load(apath, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - zip / npy errors
        raise _fail(str(apath), f"cannot be read: {exc}") from None
    _check_arrays(str(apath), arrays, man, steps, made, fmt)
    if "dfs" in man:
        from .dfs_deploy import check_dfs
        kinds = {s.output: s.kind for s in steps if isinstance(s, DeployHostStep)}
        try:
            check_dfs(where, man, arrays, {l.name: l for l in steps
                                           if isinstance(l, DeployLayer)}, kinds, _fail)
        except (KeyError, TypeError, IndexError) as exc:
            raise _fail(where, f"invalid field 'dfs': {exc!r}") from None
    layers = [s for s in steps if isinstance(s, DeployLayer)]
    imgs = _load_images(root, layers, made, fmt, arrays) if images else None
    return Deploy(root, man, made, quant, steps, dict(man["tensors"]), arrays, imgs)
