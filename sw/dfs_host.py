"""The host side of a DFS deploy at run time: the gate's decisions and the skipped blocks.

:class:`DfsHost` plugs into :func:`dynacc.sw.runtime.chain` (``dfs=``). The layer program is
walked layer by layer, so when a block's output tensor is complete for every image the host
gate (:func:`dynacc.sw.dfs_deploy.deploy_host_gate`, float) runs on it, dequantized, and
picks the next block's option per image. Each of that block's engine jobs then gets its mode
(``msb`` with ``msb_bits = p`` for a precision ``p < b``, ``full`` for ``b``), or is dropped
(``skip``: conv1 / conv2 do not run; a transition block's shortcut conv still runs in mode
``full``), and the block's residual add is replaced by the skip rule
(:func:`dynacc.quant.dfs_program.skip_output`) for the skipped images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dynacc.quant.dfs import SKIP
from dynacc.quant.dfs_program import BlockLayout, skip_output

from .dfs_deploy import deploy_host_gate

__all__ = ["DfsHost", "SKIP"]


class DfsHost:
    """Per-image DFS decisions for ``n`` images of deploy ``dep``.

    ``decisions``: optional ``[n, n_gated]`` option indices that override the gate (``-1``:
    the gate decides). After the run, ``decisions`` holds what ran, ``gate_decisions`` what
    the gate picked and ``probs`` its softmax ``[n, n_gated, n_options]``.
    """

    def __init__(self, dep: Any, n: int, decisions: Any = None) -> None:
        from .runtime import host_program

        self.gate = deploy_host_gate(dep)
        self.options = self.gate.options
        self.act_bits = self.options.act_bits
        self.n = n
        g = self.gate.n_gated
        if decisions is None:
            forced = torch.full((n, g), -1, dtype=torch.int64)
        else:
            forced = torch.as_tensor(np.asarray(decisions), dtype=torch.int64)
            if tuple(forced.shape) != (n, g):
                raise ValueError(f"DFS decisions must be [{n}, {g}] (images x gated blocks), "
                                 f"got {tuple(forced.shape)}")
            if int(forced.min()) < -1 or int(forced.max()) >= len(self.options):
                raise ValueError(f"DFS decision indices must be in [0, {len(self.options) - 1}]"
                                 " (or -1: the gate decides)")
        self.forced = forced
        self.decisions = torch.full((n, g), -1, dtype=torch.int64)
        self.gate_decisions = torch.full((n, g), -1, dtype=torch.int64)
        self.probs = torch.zeros((n, g, len(self.options)), dtype=torch.float32)
        self._state = None
        self._hp = host_program(dep)
        layout = self.gate.layout
        self._by_conv = {c: blk for blk in layout if blk.gated for c in blk.convs}
        self._by_output = {blk.output: blk for blk in layout}

    def choice(self, blk: BlockLayout, image: int) -> Any:
        """Option (``"skip"`` or bits) of gated block ``blk`` for ``image``."""
        d = int(self.decisions[image, blk.index - 1])
        if d < 0:
            raise RuntimeError(f"block {blk.prefix!r}: no decision yet for image {image} (the "
                               f"output of block {blk.index - 1} was not seen)")
        return self.options.choices[d]

    def job(self, layer: str, image: int) -> Any:
        """How engine layer ``layer`` runs for ``image``: ``None`` (as exported),
        ``"skip"`` (not at all) or ``(mode, msb_bits)`` (``msb_bits`` None: unchanged)."""
        blk = self._by_conv.get(layer)
        if blk is None:
            return None
        c = self.choice(blk, image)
        if c == SKIP:
            return ("full", None) if layer == blk.shortcut else SKIP
        if c == self.act_bits:
            return ("full", None)
        return ("msb", int(c))

    def skipped(self, tensor: str, image: int) -> bool:
        """Whether ``tensor`` is the output of a gated block that ``image`` skips."""
        blk = self._by_output.get(tensor)
        return blk is not None and blk.gated and self.choice(blk, image) == SKIP

    def skip_output(self, tensor: str, image: int, acts: dict[str, torch.Tensor]
                    ) -> torch.Tensor:
        """The skipped block's output for ``image``: its shortcut tensor (block input or the
        shortcut conv's engine output) requantized and clamped by the block's add."""
        blk = self._by_output[tensor]
        src = blk.shortcut or blk.input
        add = self._hp.op(blk.output)
        return skip_output(self._hp.fmt, acts[src][image][None], self._hp.lsb[src],
                           add.out_lsb, add.activation, add.clamp_max)[0]

    def observe(self, tensor: str, y: torch.Tensor) -> None:
        """Tensor ``tensor`` is complete (``[n, ...]``): after a block output, run the gate
        and fix the next block's options."""
        blk = self._by_output.get(tensor)
        if blk is None or blk.index >= self.gate.n_gated:
            return
        yf = self._hp.dequantize_output(tensor, y)
        choice, p, self._state = self.gate.decide(blk.index, yf, self._state)
        k = blk.index
        self.gate_decisions[:, k] = choice
        self.probs[:, k] = p.to(torch.float32)
        f = self.forced[:, k]
        self.decisions[:, k] = torch.where(f >= 0, f, choice)
