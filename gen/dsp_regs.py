"""Move the MAC trees' operand and product registers into the ECP5 multipliers.

yosys maps a ``$mul`` onto a ``MULT18X18D`` with every register mode ``NONE``: nextpnr then
times the multiplier as one combinational block (about 3.9 ns at speed grade 6) between the
fabric flip-flops around it. The MAC tree (``hw/mac_tree.py``) registers both operands right
before each product and the product right after it, so a DSP lane's multiplier sits between
flip-flops that feed, or are fed by, nothing else. This pass rewrites the synthesized netlist
(yosys JSON) so that such a multiplier uses its own input registers (``REG_INPUTA/B``) and,
when every used product bit drives exactly one plain flip-flop, its output register
(``REG_OUTPUT``), all on ``CLK0`` with ``CE0 = 1`` and ``RST0 = 0``: the same cycle-for-cycle
behaviour, with the multiplier's delay inside the registered DSP.

A multiplier's inputs are converted only when every ``A``/``B`` pin is driven by a constant or
by a ``TRELLIS_FF`` whose output reaches no other cell than this multiplier's ``A``/``B`` pins
(the sign bit fans out to the sign-extension pins), with a constant-1 clock enable, a constant-0
``LSR`` and one common clock. The output register is added only on top of registered inputs.
"""

from __future__ import annotations

import collections
from typing import Any

__all__ = ["absorb_multiplier_registers"]


def _const(bits: list[Any] | None, value: str) -> bool:
    return bits is not None and len(bits) == 1 and str(bits[0]).strip() == value


def _plain_ff(cell: dict[str, Any]) -> bool:
    p, c = cell["parameters"], cell["connections"]
    ce_ok = str(p.get("CEMUX", "")).strip() == "1" or _const(c.get("CE"), "1")
    lsr_ok = c.get("LSR") is None or _const(c.get("LSR"), "0")
    return cell["type"] == "TRELLIS_FF" and ce_ok and lsr_ok


def absorb_multiplier_registers(netlist: dict[str, Any], top: str) -> dict[str, Any]:
    """Rewrite ``netlist`` in place; returns ``{"inputs": n, "outputs": n, "kept": {name:
    reason}, "flip_flops_removed": n}`` (multipliers whose inputs / outputs were registered)."""
    mod = netlist["modules"][top]
    cells = mod["cells"]
    port_bits = {b for p in mod["ports"].values() for b in p["bits"]}
    driver: dict[Any, str] = {}
    loads: dict[Any, list[tuple[str, str]]] = collections.defaultdict(list)
    for name, c in cells.items():
        dirs = c.get("port_directions", {})
        for pin, bits in c["connections"].items():
            for b in bits:
                if dirs.get(pin) == "output":
                    driver[b] = name
                elif dirs.get(pin) == "input":
                    loads[b].append((name, pin))
    n_in = n_out = removed = 0
    kept: dict[str, str] = {}
    for name in sorted(n for n, c in cells.items() if c["type"] == "MULT18X18D"):
        mul = cells[name]
        conn, params = mul["connections"], mul["parameters"]
        if any(str(params.get(k, "NONE")) != "NONE"
               for k in ("REG_INPUTA_CLK", "REG_INPUTB_CLK", "REG_OUTPUT_CLK")):
            kept[name] = "already registered"
            continue
        in_pins = sorted(p for p in conn if p[:1] in "AB" and p[1:].isdigit())
        ffs: dict[str, str] = {}        # flip-flop -> its D net (as a bit list key)
        clock = None
        reason = None
        for pin in in_pins:
            bit = conn[pin][0]
            if isinstance(bit, str):
                continue                # constant
            ff_name = driver.get(bit)
            if ff_name is None or bit in port_bits:
                reason = f"{pin} is not driven by a flip-flop"
                break
            ff = cells[ff_name]
            if not _plain_ff(ff):
                reason = f"{pin} driven by {ff['type']} {ff_name} (not a plain flip-flop)"
                break
            if any(user != name or p[:1] not in "AB" for user, p in loads[bit]):
                reason = f"{pin}: {ff_name} also feeds other cells"
                break
            clk = ff["connections"]["CLK"]
            if clock is not None and clk != clock:
                reason = f"{pin}: operand registers on several clocks"
                break
            clock = clk
            ffs[ff_name] = pin
        if reason is None and clock is None:
            reason = "constant operands"
        if reason is not None:
            kept[name] = reason
            continue
        # inputs: each pin now reads the removed flip-flop's D net
        for pin in in_pins:
            bit = conn[pin][0]
            if not isinstance(bit, str) and driver.get(bit) in ffs:
                conn[pin] = list(cells[driver[bit]]["connections"]["DI"])
        for ff_name in ffs:
            del cells[ff_name]
            removed += 1
        conn.update({"CLK0": list(clock), "CE0": ["1"], "RST0": ["0"]})
        mul.setdefault("port_directions", {}).update(
            {"CLK0": "input", "CE0": "input", "RST0": "input"})
        for port in ("A", "B"):
            params[f"REG_INPUT{port}_CLK"] = "CLK0"
            params[f"REG_INPUT{port}_CE"] = "CE0"
            params[f"REG_INPUT{port}_RST"] = "RST0"
        n_in += 1
        # output register: every used product bit drives exactly one plain flip-flop
        outs = [p for p in conn if p.startswith("P") and p[1:].isdigit()]
        moves = []
        ok = True
        for pin in outs:
            bit = conn[pin][0]
            users = loads.get(bit, [])
            if not users:
                continue
            if bit in port_bits or len(users) != 1:
                ok = False
                break
            ff_name, ff_pin = users[0]
            ff = cells.get(ff_name)
            if ff is None or ff_pin != "DI" or not _plain_ff(ff) or ff["connections"]["CLK"] != clock:
                ok = False
                break
            moves.append((pin, ff_name))
        if ok and moves:
            for pin, ff_name in moves:
                conn[pin] = list(cells[ff_name]["connections"]["Q"])
                del cells[ff_name]
                removed += 1
            params["REG_OUTPUT_CLK"] = "CLK0"
            params["REG_OUTPUT_CE"] = "CE0"
            params["REG_OUTPUT_RST"] = "RST0"
            n_out += 1
    return {"inputs": n_in, "outputs": n_out, "kept": kept, "flip_flops_removed": removed}
