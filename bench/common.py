"""Shared helpers of the benchmark scripts: atomic JSON results under build/bench/."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

BENCH_DIR = Path(os.environ.get("DYNACC_BENCH_DIR", "build/bench"))


def write_result(name: str, obj: Any) -> Path:
    """Write ``build/bench/<name>`` atomically (temp file + rename) and return its path."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / name
    fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=BENCH_DIR)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path
