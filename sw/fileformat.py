"""The deploy folder format: names, word packing, deterministic files, the manifest checksum.

A deploy folder (written by :mod:`dynacc.sw.export`, read by :mod:`dynacc.sw.reader`)::

    manifest.yaml             format version, BFP spec, hw config, layer program, files + sha256
    model.h                   C header: layer / tensor / step tables, blob offsets
    arrays.npz                raw integer arrays keyed "<layer>/<field>" and "<tensor>/lsb"
    wgt.bin align.bin bias.bin quant.bin
                              every engine layer's memory words, concatenated in layer order,
                              each word little-endian in ceil(bits / 8) bytes
    gate.bin                  only with dual-precision layers: their gate words (thresholds
                              and signs, ``hw/dual_engine.py gate_word_layout``), layer order
    mem/<NNN>_<layer>/<m>.mem the same words as ``$readmemh`` files (hw/types.py layouts),
                              loaded by the RTL unchanged

Everything here is deterministic: same inputs, same bytes (no timestamps, fixed order).
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from amaranth.lib import data

from dynacc.hw.config import HwConfig
from dynacc.hw.dual_engine import gate_word_layout
from dynacc.hw.types import (act_word_layout, align_word_layout, bias_word_layout,
                             quant_word_layout, weight_word_layout)

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "HEADER", "ARRAYS", "WEIGHT_MEMORIES",
    "DUAL_MEMORIES", "memories_of",
    "LAYOUTS", "layout_of", "word_bytes", "bin_name", "mem_name", "bits_to_bytes",
    "bytes_to_bits", "write_npz", "sha256_file", "seal_manifest", "split_manifest",
]

FORMAT = "dynacc-deploy"
FORMAT_VERSION = 1
MANIFEST = "manifest.yaml"
HEADER = "model.h"
ARRAYS = "arrays.npz"
#: the engine memories a deploy folder holds per layer (act / res are per-image inputs)
WEIGHT_MEMORIES = ("wgt", "align", "bias", "quant")
#: the extra per-layer memories of a dual-precision layer (``engine: dual``)
DUAL_MEMORIES = ("gate",)
CHECKSUM_KEY = "manifest_sha256"

#: memory name -> word layout of hw/types.py (what ``$readmemh`` fills)
LAYOUTS: dict[str, Callable[[HwConfig], data.Layout]] = {
    "act": act_word_layout,
    "res": act_word_layout,
    "out": act_word_layout,
    "wgt": weight_word_layout,
    "align": align_word_layout,
    "bias": bias_word_layout,
    "quant": quant_word_layout,
    "gate": gate_word_layout,
}


def memories_of(engine: str) -> tuple[str, ...]:
    """The deploy folder's memories of an engine layer of kind ``engine`` (conv | dual)."""
    if engine == "conv":
        return WEIGHT_MEMORIES
    if engine == "dual":
        return WEIGHT_MEMORIES + DUAL_MEMORIES
    raise ValueError(f"unknown engine {engine!r} (conv | dual)")


def layout_of(mem: str, hw: HwConfig) -> data.Layout:
    return LAYOUTS[mem](hw)


def word_bytes(bits: int) -> int:
    """Bytes of one little-endian word in a ``.bin`` blob."""
    return -(-bits // 8)


def bin_name(mem: str) -> str:
    return f"{mem}.bin"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def mem_name(index: int, layer: str, mem: str) -> str:
    """Relative path of layer ``index``'s ``$readmemh`` file of memory ``mem``."""
    return f"mem/{index:03d}_{_safe(layer)}/{mem}.mem"


def bits_to_bytes(bits: np.ndarray) -> bytes:
    """``[N, width]`` bit matrix (bit 0 first, see ``sim.memfile.pack_words``) -> N
    little-endian words of ``ceil(width / 8)`` bytes each."""
    n, w = bits.shape
    nb = word_bytes(w)
    padded = np.zeros((n, nb * 8), dtype=np.uint8)
    padded[:, :w] = bits
    return np.packbits(padded, axis=1, bitorder="little").tobytes()


def bytes_to_bits(buf: bytes, width: int) -> np.ndarray:
    """Inverse of :func:`bits_to_bytes`."""
    nb = word_bytes(width)
    if len(buf) % nb:
        raise ValueError(f"{len(buf)} bytes is not a whole number of {nb}-byte words")
    raw = np.frombuffer(buf, dtype=np.uint8).reshape(-1, nb)
    return np.unpackbits(raw, axis=1, bitorder="little")[:, :width]


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` with fixed member timestamps and order (``np.savez`` stamps the current
    time into the zip, so two exports would differ). Readable with ``np.load``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_STORED
            zf.writestr(info, buf.getvalue())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seal_manifest(text: str) -> str:
    """Append ``manifest_sha256: <sha256 of everything before that line>``."""
    if not text.endswith("\n"):
        text += "\n"
    return f"{text}{CHECKSUM_KEY}: {hashlib.sha256(text.encode()).hexdigest()}\n"


def split_manifest(raw: bytes) -> tuple[bytes, str | None]:
    """``(body, checksum)``: the bytes the checksum covers and the recorded checksum (None if
    the last line is not a checksum line)."""
    body = raw[:-1] if raw.endswith(b"\n") else raw
    cut = body.rfind(b"\n") + 1
    last = body[cut:].decode(errors="replace")
    prefix = CHECKSUM_KEY + ": "
    if not last.startswith(prefix):
        return raw, None
    return raw[:cut], last[len(prefix):].strip()
