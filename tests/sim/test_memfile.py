"""sim.memfile: numpy packing equals Amaranth's ``layout.const(...).as_bits()``; hex round trip."""

from __future__ import annotations

import numpy as np

from dynacc.hw.config import load_named
from dynacc.hw.types import quant_word_layout, weight_word_layout
from dynacc.sim.memfile import leaves, read_mem, write_mem


def _as_int(bits_row):
    return sum(int(b) << i for i, b in enumerate(bits_row))


def test_pack_matches_layout_const(tmp_path):
    cfg = load_named("small")
    rng = np.random.default_rng(0)
    for lay, mk in ((weight_word_layout(cfg), lambda: rng.integers(-31, 32, (3, 16))),
                    (quant_word_layout(cfg), lambda: rng.integers(-32, 32, (3, 12)))):
        vals = mk()
        path = tmp_path / "m.mem"
        write_mem(path, vals, lay)
        lines = path.read_text().split()
        for row, line in zip(vals, lines):
            if len(leaves(lay)) == 16:
                ref = lay.const([list(map(int, row[i * 4:(i + 1) * 4])) for i in range(4)])
            else:
                ref = lay.const([dict(zip(("acc", "res", "out"), map(int, row[i * 3:(i + 1) * 3])))
                                 for i in range(4)])
            assert int(line, 16) == ref.as_bits()
        np.testing.assert_array_equal(read_mem(path, lay), vals)
