"""Move the engine's first register after each block RAM into the RAM's output register.

yosys maps every inferred memory onto ECP5 ``DP16KD`` cells with ``REGMODE = "NOREG"``: the
read data leaves the RAM combinationally, so a RAM read costs the RAM's clock-to-output
(about 5.8 ns in nextpnr's speed-grade-6 model) plus the routing to the first flip-flop. The
engine registers every read word before any logic uses it (``hw/conv_engine.py``,
``READ_DELAY``), so each used output bit of a read RAM drives exactly one flip-flop. This pass
rewrites the synthesized netlist (yosys JSON) so that such a RAM uses its own output register
(``REGMODE = "OUTREG"``, the register clocked by the same clock, always enabled, never reset)
and the fabric flip-flops disappear: the same cycle-for-cycle behaviour, with the RAM's
clock-to-output replaced by the output register's.

A RAM is converted only when every used ``DO`` bit drives exactly one ``TRELLIS_FF`` on its
``DI`` pin, nothing else (no module port, no second load), and that flip-flop has the RAM's
read clock, a constant-1 clock enable (``CEMUX = "1"``) and a constant-0 ``LSR``; otherwise
the RAM is left as it is. Both ports' register modes are set (in the 36-bit pseudo-dual-port
mapping the read word comes out of both halves) and their output clock enables tied to 1.
"""

from __future__ import annotations

import collections
from typing import Any

__all__ = ["absorb_bram_output_registers"]


def _is_const(bits: list[Any] | None, value: str) -> bool:
    return bits is not None and len(bits) == 1 and str(bits[0]).strip() == value


def absorb_bram_output_registers(netlist: dict[str, Any], top: str) -> dict[str, Any]:
    """Rewrite ``netlist`` (yosys ``write_json`` output) in place; returns ``{"converted":
    [ram names], "kept": {ram name: reason}, "flip_flops_removed": n}``."""
    mod = netlist["modules"][top]
    cells = mod["cells"]
    port_bits = {b for p in mod["ports"].values() for b in p["bits"]}
    loads: dict[Any, list[tuple[str, str]]] = collections.defaultdict(list)
    for name, c in cells.items():
        dirs = c.get("port_directions", {})
        for pin, bits in c["connections"].items():
            if dirs.get(pin) == "input":
                for b in bits:
                    loads[b].append((name, pin))
    converted: list[str] = []
    kept: dict[str, str] = {}
    removed = 0
    for name in sorted(n for n, c in cells.items() if c["type"] == "DP16KD"):
        ram = cells[name]
        conn = ram["connections"]
        params = ram["parameters"]
        if params.get("REGMODE_A", "NOREG") != "NOREG" or params.get("REGMODE_B", "NOREG") != "NOREG":
            kept[name] = "already registered"
            continue
        moves: list[tuple[str, str]] = []          # (DO pin, flip-flop cell)
        reason = None if conn.get("CLKA") == conn.get("CLKB") else "two clocks"
        clk = conn.get("CLKB")
        for pin in sorted(p for p in conn if p.startswith("DO")):
            if reason is not None:
                break
            bit = conn[pin][0]
            users = loads.get(bit, [])
            if bit in port_bits:
                reason = f"{pin} drives a module port"
                break
            if not users:
                continue
            if len(users) != 1:
                reason = f"{pin} has {len(users)} loads"
                break
            ff_name, ff_pin = users[0]
            ff = cells[ff_name]
            fp = ff["parameters"]
            fc = ff["connections"]
            if ff["type"] != "TRELLIS_FF" or ff_pin != "DI":
                reason = f"{pin} feeds {ff['type']}.{ff_pin}"
                break
            if fc.get("CLK") != clk:
                reason = f"{pin}: flip-flop on another clock"
                break
            if str(fp.get("CEMUX", "")).strip() != "1" and not _is_const(fc.get("CE"), "1"):
                reason = f"{pin}: flip-flop with a clock enable"
                break
            if not _is_const(fc.get("LSR"), "0") and fc.get("LSR") is not None:
                reason = f"{pin}: flip-flop with a set/reset"
                break
            moves.append((pin, ff_name))
        if reason is not None or not moves:
            kept[name] = reason or "no registered output"
            continue
        for pin, ff_name in moves:
            conn[pin] = list(cells[ff_name]["connections"]["Q"])
            del cells[ff_name]
            removed += 1
        params["REGMODE_A"] = params["REGMODE_B"] = "OUTREG"
        conn["OCEA"] = conn["OCEB"] = ["1"]
        converted.append(name)
    return {"converted": converted, "kept": kept, "flip_flops_removed": removed}
