"""Accumulator: bias preload on ``first``, exact accumulation, hold when not enabled."""

from __future__ import annotations

import random

from dynacc.hw.accumulator import Accumulator


def test_sequences(pipeline):
    rng = random.Random(2)
    dut = Accumulator(in_width=35, acc_bits=48)
    ins, exp = [], []
    acc = 0
    for _ in range(400):
        first = rng.random() < 0.2
        en = rng.random() < 0.9
        v = rng.randint(-(1 << 34), (1 << 34) - 1)
        b = rng.randint(-(1 << 40), 1 << 40)
        ins.append({"i": v, "bias": b, "first": int(first), "en": int(en)})
        if en:
            acc = (b if first else acc) + v
        exp.append(acc)
    out = pipeline(dut, ins, ["o"], dut.latency)
    assert [r["o"] for r in out] == exp
