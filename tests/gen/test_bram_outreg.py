"""The block-RAM output-register pass on small hand-made yosys netlists."""

from __future__ import annotations

import copy

from dynacc.gen.bram_outreg import absorb_bram_output_registers


def _netlist(ff_params=None, ff_extra=None, second_load=False, port_load=False):
    ram = {"type": "DP16KD", "parameters": {"REGMODE_A": "NOREG", "REGMODE_B": "NOREG"},
           "port_directions": {"CLKA": "input", "CLKB": "input", "DOA0": "output",
                               "DOA1": "output", "DOB0": "output", "OCEA": "input",
                               "OCEB": "input"},
           "connections": {"CLKA": [2], "CLKB": [2], "DOA0": [10], "DOA1": [11], "DOB0": [12],
                           "OCEA": ["0"], "OCEB": ["1"]}}
    cells = {"ram": ram}
    for i, bit in enumerate((10, 11)):
        p = {"CEMUX": "1 ", "CLKMUX": "CLK", "LSRMUX": "LSR", "REGSET": "RESET",
             "SRMODE": "LSR_OVER_CE", "GSR": "DISABLED", **(ff_params or {})}
        c = {"CLK": [2], "DI": [bit], "LSR": ["0"], "Q": [20 + i], **(ff_extra or {})}
        cells[f"ff{i}"] = {"type": "TRELLIS_FF", "parameters": p,
                           "port_directions": {"CLK": "input", "DI": "input", "LSR": "input",
                                               "CE": "input", "Q": "output"},
                           "connections": c}
    cells["lut"] = {"type": "LUT4", "parameters": {},
                    "port_directions": {"A": "input", "B": "input", "Z": "output"},
                    "connections": {"A": [20], "B": [10 if second_load else 21], "Z": [30]}}
    ports = {"clk": {"direction": "input", "bits": [2]},
             "y": {"direction": "output", "bits": [30] + ([11] if port_load else [])}}
    return {"modules": {"top": {"ports": ports, "cells": cells}}}


def test_converts_ram_whose_outputs_each_feed_one_plain_flip_flop():
    n = _netlist()
    r = absorb_bram_output_registers(n, "top")
    cells = n["modules"]["top"]["cells"]
    assert r == {"converted": ["ram"], "kept": {}, "flip_flops_removed": 2}
    ram = cells["ram"]
    assert ram["parameters"]["REGMODE_A"] == ram["parameters"]["REGMODE_B"] == "OUTREG"
    assert ram["connections"]["DOA0"] == [20] and ram["connections"]["DOA1"] == [21]
    assert ram["connections"]["OCEA"] == ["1"] and "ff0" not in cells and "ff1" not in cells
    assert cells["lut"]["connections"]["A"] == [20]       # the load now reads the RAM register


def test_keeps_ram_when_a_register_is_not_plain():
    for kw, why in ((dict(ff_params={"CEMUX": "CE"}, ff_extra={"CE": [5]}), "clock enable"),
                    (dict(ff_extra={"LSR": [6]}), "set/reset"),
                    (dict(ff_extra={"CLK": [3]}), "another clock"),
                    (dict(second_load=True), "2 loads"),
                    (dict(port_load=True), "module port")):
        n = _netlist(**kw)
        before = copy.deepcopy(n)
        r = absorb_bram_output_registers(n, "top")
        assert r["converted"] == [] and why in r["kept"]["ram"], (kw, r)
        assert n == before
