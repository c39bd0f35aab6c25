"""The DFS part of a deploy folder: the host gate and the block layout a board's host needs.

A DFS deploy (``train-dfs`` checkpoint) holds, next to the dual-precision layers of any
gated program:

* ``arrays.npz``: the host gate's parameters as float32 arrays ``gate/<state_dict key>``
  (``embed.<i>.weight`` / ``.bias``: the 1x1 embedding after block ``i``; ``lstm.*``: the
  shared LSTM; ``proj.*``: the linear layer before the softmax);
* ``manifest.yaml`` section ``dfs``: ``options`` (``skip`` or a precision in bits),
  ``costs``, ``act_bits`` (``b``), the gate's ``embed_dim`` / ``channels`` / ``arrays`` and
  ``blocks`` (per residual block: ``input`` / ``output`` tensors, ``conv1``, ``conv2``,
  ``shortcut`` engine layers, ``gated``).

The host runs the gate in float on the dequantized output of block ``k`` (``gate.rule``) and
its argmax picks block ``k + 1``'s option: a precision ``p < b`` runs the block's convs in
mode ``msb`` with ``msb_bits = p`` (descriptor ``lsb_bits = b - p``), ``p = b`` in mode
``full``, ``skip`` runs only the shortcut conv (mode ``full``) and requantizes the shortcut
onto the block output (:func:`dynacc.quant.dfs_program.skip_output`).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from dynacc.quant.dfs import SKIP, RecurrentGate, parse_options
from dynacc.quant.dfs_program import BlockLayout, HostGate, block_layout
from dynacc.quant.program import BFPProgram

__all__ = ["GATE_PREFIX", "GATE_RULE", "dfs_section", "check_dfs", "deploy_host_gate"]

#: array-name prefix of the host gate's parameters in ``arrays.npz``
GATE_PREFIX = "gate/"
GATE_RULE = ("after block k: softmax(proj(lstm(embed[k](global_avg_pool(y_k)))), state)); "
             "y_k = float32 dequantized block output (mantissa * 2**lsb); LSTM state zero at "
             "image start; argmax (ties: lowest index) = option of block k + 1; block 0 full")


def dfs_section(program: BFPProgram, dfs: dict[str, Any]
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Manifest section ``dfs`` and the gate arrays of a DFS checkpoint's ``meta['dfs']``
    (see the module docstring). Raises ``ValueError`` naming the missing field."""
    for key in ("options", "costs", "channels", "embed_dim", "gate_state"):
        if key not in dfs:
            raise ValueError(f"DFS checkpoint meta has no field {key!r}")
    opts = parse_options(dfs["options"], dfs["costs"])
    layout = block_layout(program)
    arrays = {f"{GATE_PREFIX}{k}": v.detach().cpu().to(torch.float32).numpy()
              for k, v in sorted(dfs["gate_state"].items())}
    blocks = [{"index": b.index, "prefix": b.prefix, "gated": b.gated, "input": b.input,
               "output": b.output, "conv1": b.conv1, "conv2": b.conv2, "shortcut": b.shortcut}
              for b in layout]
    sec = {
        "options": [c if c == SKIP else int(c) for c in opts.choices],
        "costs": [float(c) for c in opts.costs],
        "act_bits": int(opts.act_bits),
        "gate": {"embed_dim": int(dfs["embed_dim"]),
                 "channels": [int(c) for c in dfs["channels"]],
                 "arrays": sorted(arrays), "dtype": "float32", "rule": GATE_RULE},
        "blocks": blocks,
    }
    return sec, arrays


def _gate_module(sec: dict[str, Any], arrays: dict[str, np.ndarray], n_options: int
                 ) -> RecurrentGate:
    g = sec["gate"]
    gate = RecurrentGate(list(g["channels"]), n_options, int(g["embed_dim"]))
    want = set(gate.state_dict())
    have = {k[len(GATE_PREFIX):] for k in g["arrays"]}
    if want != have:
        missing, extra = sorted(want - have), sorted(have - want)
        raise ValueError(f"field 'dfs.gate.arrays' does not match the gate: missing "
                         f"{missing}, unexpected {extra}")
    state = {}
    for k in sorted(want):
        key = GATE_PREFIX + k
        if key not in arrays:
            raise ValueError(f"missing array {key!r} (listed in dfs.gate.arrays)")
        a = arrays[key]
        if a.dtype != np.float32:
            raise ValueError(f"array {key!r} has dtype {a.dtype}, expected float32")
        ref = gate.state_dict()[k]
        if tuple(a.shape) != tuple(ref.shape):
            raise ValueError(f"array {key!r} has shape {tuple(a.shape)}, expected "
                             f"{tuple(ref.shape)} (embed_dim {g['embed_dim']}, channels "
                             f"{g['channels']}, {n_options} options)")
        state[k] = torch.from_numpy(np.array(a))
    gate.load_state_dict(state)
    return gate.eval()


def check_dfs(where: str, man: dict[str, Any], arrays: dict[str, np.ndarray], layers: dict,
              host_kinds: dict[str, str], fail: Callable[[str, str], Exception]) -> None:
    """Validate manifest section ``dfs`` and the gate arrays. ``layers``: engine layer name ->
    :class:`~dynacc.sw.reader.DeployLayer`; ``host_kinds``: tensor -> kind of the host step
    that produces it. Raises ``fail(where, message)`` naming the field."""
    sec = man["dfs"]
    if not isinstance(sec, dict):
        raise fail(where, "field 'dfs' is not a mapping")
    for key in ("options", "costs", "act_bits", "gate", "blocks"):
        if key not in sec:
            raise fail(where, f"missing field 'dfs.{key}'")
    try:
        opts = parse_options(sec["options"], sec["costs"])
    except (ValueError, TypeError) as exc:
        raise fail(where, f"field 'dfs.options' / 'dfs.costs': {exc}") from None
    b = opts.act_bits
    if sec["act_bits"] != b:
        raise fail(where, f"field 'dfs.act_bits' = {sec['act_bits']!r} != the largest "
                          f"precision option {b}")
    blocks = sec["blocks"]
    if not isinstance(blocks, list) or len(blocks) < 2:
        raise fail(where, "field 'dfs.blocks' must list at least two residual blocks")
    tensors = man["tensors"]
    for i, blk in enumerate(blocks):
        at = f"dfs.blocks[{i}]"
        for key in ("index", "gated", "input", "output", "conv1", "conv2", "shortcut"):
            if key not in blk:
                raise fail(where, f"missing field '{at}.{key}'")
        if blk["index"] != i or blk["gated"] != (i > 0):
            raise fail(where, f"field '{at}': index {blk['index']!r} / gated {blk['gated']!r} "
                              f"(expected {i} / {i > 0}: block 0 is never gated)")
        for key in ("input", "output"):
            if blk[key] not in tensors:
                raise fail(where, f"field '{at}.{key}' = {blk[key]!r} is not a tensor of the "
                                  "deploy")
        convs = [("conv1", blk["input"]), ("conv2", blk["conv1"])]
        if blk["shortcut"] is not None:
            convs.append(("shortcut", blk["input"]))
        for key, src in convs:
            l = layers.get(blk[key])
            if l is None:
                raise fail(where, f"field '{at}.{key}' = {blk[key]!r} is not an engine layer")
            if l.input != src:
                raise fail(where, f"field '{at}.{key}': layer {l.name!r} reads {l.input!r}, "
                                  f"the block layout says {src!r}")
            if blk["gated"] and opts.low_precision is not None and (
                    l.engine != "dual" or l.act_bits != b):
                raise fail(where, f"field '{at}.{key}': gated layer {l.name!r} must be a "
                                  f"dual-precision layer with act_bits {b} (it is engine "
                                  f"{l.engine!r}, act_bits {l.act_bits!r})")
        if blk["gated"] and host_kinds.get(blk["output"]) != "add":
            raise fail(where, f"field '{at}.output' = {blk['output']!r}: a gated block's output "
                              "must be a host residual add (a skipped block replaces it)")
    g = sec["gate"]
    for key in ("embed_dim", "channels", "arrays"):
        if key not in g:
            raise fail(where, f"missing field 'dfs.gate.{key}'")
    if len(g["channels"]) != len(blocks) - 1:
        raise fail(where, f"field 'dfs.gate.channels' has {len(g['channels'])} entries for "
                          f"{len(blocks)} blocks (needs {len(blocks) - 1})")
    for k, c in enumerate(g["channels"]):
        have = tensors[blocks[k]["output"]]["shape"][0]
        if c != have:
            raise fail(where, f"field 'dfs.gate.channels[{k}]' = {c} != channels {have} of "
                              f"block output {blocks[k]['output']!r}")
    extra = sorted(k for k in arrays if k.startswith(GATE_PREFIX) and k not in g["arrays"])
    if extra:
        raise fail(where, f"arrays {extra} are not listed in dfs.gate.arrays")
    try:
        _gate_module(sec, arrays, len(opts))
    except ValueError as exc:
        raise fail(where, str(exc)) from None


def deploy_host_gate(dep: Any) -> HostGate:
    """The host gate of a validated DFS deploy (:class:`~dynacc.sw.reader.Deploy`), with
    its block layout (``ops``: the block's engine layers and its output step)."""
    sec = dep.manifest.get("dfs")
    if sec is None:
        raise ValueError(f"{dep.path}: not a DFS deploy (no manifest section 'dfs')")
    opts = parse_options(sec["options"], sec["costs"])
    layout = []
    for blk in sec["blocks"]:
        sc = blk["shortcut"]
        ops = ((sc,) if sc else ()) + (blk["conv1"], blk["conv2"], blk["output"])
        layout.append(BlockLayout(blk["index"], blk.get("prefix", f"block{blk['index']}"),
                                  blk["input"], ops, blk["conv1"], blk["conv2"], sc,
                                  blk["output"]))
    return HostGate(_gate_module(sec, dep.arrays, len(opts)), opts, layout)
