"""The multiplier-register pass on small hand-made yosys netlists."""

from __future__ import annotations

import copy

from dynacc.gen.dsp_regs import absorb_multiplier_registers


def _ff(d, q, **extra):
    c = {"CLK": [2], "DI": [d], "LSR": ["0"], "Q": [q]}
    c.update(extra)
    return {"type": "TRELLIS_FF", "parameters": {"CEMUX": "1 ", "LSRMUX": "LSR"},
            "port_directions": {"CLK": "input", "DI": "input", "LSR": "input", "CE": "input",
                                "Q": "output"}, "connections": c}


def _netlist(shared_operand=False, enable=False, second_product_load=False):
    # a 2-bit x 1-bit multiplier: A0 <- ff a0 (Q 10), A1, A2 <- ff a1 (Q 11, sign bit fanned
    # out), B0 <- ff b0 (Q 12); P0 -> ff p0 (Q 30), P1 -> ff p1 (Q 31)
    mul = {"type": "MULT18X18D", "parameters": {},
           "port_directions": {"A0": "input", "A1": "input", "A2": "input", "B0": "input",
                               "B1": "input", "P0": "output", "P1": "output",
                               "SIGNEDA": "input"},
           "connections": {"A0": [10], "A1": [11], "A2": [11], "B0": [12], "B1": ["0"],
                           "P0": [20], "P1": [21], "SIGNEDA": ["1"]}}
    cells = {"mul": mul, "a0": _ff(1, 10), "a1": _ff(3, 11), "b0": _ff(4, 12),
             "p0": _ff(20, 30), "p1": _ff(21, 31)}
    if enable:
        cells["b0"] = _ff(4, 12, CE=[7])
        cells["b0"]["parameters"]["CEMUX"] = "CE"
    cells["lut"] = {"type": "LUT4", "parameters": {},
                    "port_directions": {"A": "input", "B": "input", "Z": "output"},
                    "connections": {"A": [30], "B": [10 if shared_operand else 31], "Z": [40]}}
    if second_product_load:
        cells["lut2"] = {"type": "LUT4", "parameters": {},
                         "port_directions": {"A": "input", "Z": "output"},
                         "connections": {"A": [20], "Z": [41]}}
    ports = {"clk": {"direction": "input", "bits": [2]},
             "y": {"direction": "output", "bits": [40, 41]}}
    return {"modules": {"top": {"ports": ports, "cells": cells}}}


def test_registers_move_into_the_multiplier():
    n = _netlist()
    r = absorb_multiplier_registers(n, "top")
    assert r == {"inputs": 1, "outputs": 1, "kept": {}, "flip_flops_removed": 5}
    cells = n["modules"]["top"]["cells"]
    mul = cells["mul"]
    assert set(cells) == {"mul", "lut"}
    c = mul["connections"]
    assert (c["A0"], c["A1"], c["A2"], c["B0"], c["B1"]) == ([1], [3], [3], [4], ["0"])
    assert (c["P0"], c["P1"]) == ([30], [31]) and c["CLK0"] == [2] and c["CE0"] == ["1"]
    for k in ("REG_INPUTA_CLK", "REG_INPUTB_CLK", "REG_OUTPUT_CLK"):
        assert mul["parameters"][k] == "CLK0"
    assert mul["port_directions"]["CLK0"] == "input"


def test_inputs_only_when_a_product_bit_has_two_loads():
    n = _netlist(second_product_load=True)
    r = absorb_multiplier_registers(n, "top")
    assert r["inputs"] == 1 and r["outputs"] == 0 and r["flip_flops_removed"] == 3
    assert n["modules"]["top"]["cells"]["mul"]["parameters"].get("REG_OUTPUT_CLK") is None


def test_kept_when_an_operand_register_is_shared_or_enabled():
    for kw, why in ((dict(shared_operand=True), "also feeds other cells"),
                    (dict(enable=True), "not a plain flip-flop")):
        n = _netlist(**kw)
        before = copy.deepcopy(n)
        r = absorb_multiplier_registers(n, "top")
        assert r["inputs"] == 0 and why in r["kept"]["mul"], (kw, r)
        assert n == before
