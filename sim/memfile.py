"""Memory images as ``$readmemh`` / ``$writememh`` hex files, packed with numpy.

A word is described by its Amaranth layout; :func:`leaves` lists the leaf fields (offset,
width, signed) in a fixed order (array elements in index order, struct fields in declaration
order, recursively), and a numpy array ``[words, n_leaves]`` holds one integer per leaf.
This is the vectorised twin of ``layout.const(...).as_bits()`` (tests check they agree).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from amaranth.hdl import Shape
from amaranth.lib import data

__all__ = ["Leaf", "leaves", "pack_words", "unpack_words", "write_mem", "read_mem", "word_width"]

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


class Leaf(NamedTuple):
    offset: int
    width: int
    signed: bool


def leaves(layout: data.Layout | Shape) -> list[Leaf]:
    """Leaf fields of ``layout`` in packing order."""
    out: list[Leaf] = []

    def walk(lay, base: int) -> None:
        if isinstance(lay, data.ArrayLayout):
            ew = Shape.cast(lay.elem_shape).width
            for i in range(lay.length):
                walk(lay.elem_shape, base + i * ew)
        elif isinstance(lay, data.Layout):
            for _name, field in lay:
                walk(field.shape, base + field.offset)
        else:
            s = Shape.cast(lay)
            out.append(Leaf(base, s.width, s.signed))
    walk(layout, 0)
    return out


def word_width(layout: data.Layout | Shape) -> int:
    return Shape.cast(layout).width


def pack_words(values: np.ndarray, layout: data.Layout | Shape) -> np.ndarray:
    """``[N, n_leaves]`` integers -> ``[N, width]`` bit matrix (uint8, bit 0 first).

    Raises ``ValueError`` if a value does not fit its leaf.
    """
    lv = leaves(layout)
    values = np.asarray(values, dtype=np.int64).reshape(-1, len(lv))
    n = values.shape[0]
    bits = np.zeros((n, word_width(layout)), dtype=np.uint8)
    for j, leaf in enumerate(lv):
        v = values[:, j]
        lo, hi = (-(1 << (leaf.width - 1)), (1 << (leaf.width - 1)) - 1) if leaf.signed \
            else (0, (1 << leaf.width) - 1)
        if n and (v.min() < lo or v.max() > hi):
            bad = v[(v < lo) | (v > hi)][0]
            raise ValueError(f"value {int(bad)} does not fit leaf {j} ({leaf})")
        u = v.astype(np.uint64) & np.uint64((1 << leaf.width) - 1)
        sh = np.arange(leaf.width, dtype=np.uint64)
        bits[:, leaf.offset:leaf.offset + leaf.width] = ((u[:, None] >> sh) & np.uint64(1))
    return bits


def unpack_words(bits: np.ndarray, layout: data.Layout | Shape) -> np.ndarray:
    """Inverse of :func:`pack_words`: ``[N, width]`` bits -> ``[N, n_leaves]`` int64."""
    lv = leaves(layout)
    out = np.zeros((bits.shape[0], len(lv)), dtype=np.int64)
    for j, leaf in enumerate(lv):
        b = bits[:, leaf.offset:leaf.offset + leaf.width].astype(np.int64)
        v = (b << np.arange(leaf.width, dtype=np.int64)).sum(axis=1)
        if leaf.signed:
            v = np.where(v >= (1 << (leaf.width - 1)), v - (1 << leaf.width), v)
        out[:, j] = v
    return out


def _bits_to_hex(bits: np.ndarray) -> bytes:
    n, w = bits.shape
    nd = -(-w // 4)
    padded = np.zeros((n, nd * 4), dtype=np.uint8)
    padded[:, :w] = bits
    nib = padded.reshape(n, nd, 4) @ np.array([1, 2, 4, 8], dtype=np.uint8)
    chars = np.empty((n, nd + 1), dtype=np.uint8)
    chars[:, :nd] = _HEX[nib[:, ::-1]]
    chars[:, nd] = ord("\n")
    return chars.tobytes()


def write_mem(path: str | Path, values: np.ndarray, layout: data.Layout | Shape) -> None:
    """Write ``values`` (``[N, n_leaves]``) as a ``$readmemh`` file, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(_bits_to_hex(pack_words(values, layout)))
    os.replace(tmp, path)


def read_mem(path: str | Path, layout: data.Layout | Shape) -> np.ndarray:
    """Read a ``$writememh`` file (comments and address marks are not expected) as
    ``[N, n_leaves]`` int64."""
    w = word_width(layout)
    nd = -(-w // 4)
    rows = [ln.strip() for ln in Path(path).read_bytes().splitlines()]
    rows = [r for r in rows if r and not r.startswith(b"//")]
    if any(r.startswith(b"@") for r in rows):
        raise ValueError(f"{path}: address marks are not supported")
    if not rows:
        return np.zeros((0, len(leaves(layout))), dtype=np.int64)
    buf = np.frombuffer(b"".join(r.rjust(nd, b"0") for r in rows), dtype=np.uint8)
    buf = buf.reshape(len(rows), -1)
    if buf.shape[1] != nd:
        raise ValueError(f"{path}: expected {nd} hex digits per word, got {buf.shape[1]}")
    lut = np.full(256, 255, dtype=np.uint8)
    for i, c in enumerate(b"0123456789abcdef"):
        lut[c] = i
    for i, c in enumerate(b"ABCDEF"):
        lut[c] = 10 + i
    nib = lut[buf][:, ::-1]
    if (nib == 255).any():
        raise ValueError(f"{path}: non-hex digit (x/z?) in a word")
    bits = ((nib[:, :, None] >> np.arange(4, dtype=np.uint8)) & 1).reshape(len(rows), -1)[:, :w]
    return unpack_words(bits, layout)
