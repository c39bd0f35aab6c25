"""Parameter checks shared by the components (style rule 1: coerce with ``operator.index``,
quote the bad value)."""

from __future__ import annotations

import operator
from typing import Any

__all__ = ["check_int"]


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {value!r}") from None
    if v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}, not {value!r}")
    return v
