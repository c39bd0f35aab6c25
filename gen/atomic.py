"""Atomic replacement of an output folder (``make gen``, ``sw/deploy.py``): outputs are built
in a temporary sibling folder and moved onto their place in one ``os.replace``, so a reader
never sees a half-written folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["replace_dir"]


def replace_dir(work: Path, out: Path) -> None:
    """Move the finished folder ``work`` onto ``out``; the previous ``out`` is removed after
    the move, or put back if the move fails."""
    work, out = Path(work), Path(out)
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    work.chmod(0o755)  # mkdtemp makes it private
    try:
        os.replace(work, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)      # put the previous folder back
        raise
    if old.exists():
        shutil.rmtree(old)
