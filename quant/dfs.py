"""Dynamic Fractional Skipping (DFS): a CIFAR ResNet whose blocks a recurrent gate runs per
image at one of several precisions, or skips.

The model (algorithms.md §1, made deployable on the dual-precision datapath, rules G0-G4):

* Backbone: a zoo :class:`~dynacc.quant.models.resnet_cifar.CifarResNet` (kept as a plain
  module, so the integer flow can trace it unchanged). Block 0 always runs at full precision;
  every later block is *gated*.
* Gate (:class:`RecurrentGate`): after block ``i`` (``i = 0 .. n_blocks - 2``) a per-block
  embedding ``Conv1x1(C -> 10)(global average pool(y_i))`` feeds one shared ``LSTM(10, 10)``
  (state reset per forward), ``Linear(10 -> n_options)`` and a softmax ``p``. The decision is
  the hard one-hot of ``argmax p`` (ties: lowest index, never multi-hot) with a straight-through
  gradient ``h + (p - sg(p))`` (forward value exactly ``h``). The decision after block ``i``
  controls block ``i + 1``.
* Options (:class:`DFSOptions`, default ``("skip", 4, 8)``): ``"skip"`` = the block output is
  its shortcut path (its input, or ``relu(downsample(x))`` in a transition block, the
  downsample running at full precision); precision ``p`` = every conv of the block consumes its
  input as unsigned ``b``-bit integers (``b`` = the largest option) truncated to their top ``p``
  bits, ``floor(q / 2**(b-p)) * 2**(b-p)`` - exactly what the dual-precision conv computes in
  mode ``msb`` (``msb_bits = p``) or ``full`` (``p = b``).
* Activation quantizer (:func:`truncate_activation`): deterministic round-half-to-even onto a
  *static* power-of-two LSB per tensor, then clamp to ``[0, 2**b - 1]`` (the "pact" clamp of
  rule G0), then the top-``p``-bit floor; straight-through gradient inside the clamp range. The
  LSB is calibrated once on the float backbone (:meth:`DFSResNet.calibrate_activations`):
  ``lsb = floor(log2 max) - (b - 1)`` so the calibration maximum fits ``b`` bits (rule Q1
  exponent extraction), and stays frozen during training (no dynamic ranges, and none of the
  original code's stochastic rounding).
* Weights: BFP fake-quant with the project quantizer (:func:`~dynacc.quant.functional.
  quantize_weight`, default M = 9 bits, i.e. sign + 8 magnitude bits), straight-through.
* BatchNorm layers stay in eval mode with frozen statistics (affine parameters still train):
  the candidates of a block do not mix their statistics (a pitfall of the original code) and
  the integer program folds exactly the statistics training used.
* Cost of an option in passes of the digit-serial datapath: skip 0, precision ``p`` costs
  ``p / b`` (msb-only 4 of 8 bits = 0.5, full = 1.0); overridable. The computation percentage
  CP = 100 * mean over gated blocks and images of the cost: blocks are *unweighted* (as the
  original; a transition block's skip counts 0 although its 1x1 downsample still runs).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .formats import BFPFormat, WeightBlocking
from .functional import dequantize, element_exponent, fake_quantize, quantize, quantize_weight
from .models.resnet_cifar import BasicBlock, CifarResNet

__all__ = ["SKIP", "DFSOptions", "parse_options", "truncate_activation", "RecurrentGate",
           "DFSOutput", "DFSResNet", "computation_percentage", "hard_decision"]

SKIP = "skip"


@dataclasses.dataclass(frozen=True)
class DFSOptions:
    """The per-block choices of the gate and their cost.

    ``choices``: ``"skip"`` or an activation precision ``p`` (bits, ``1 <= p <= b``) each;
    ``act_bits`` ``b`` is the largest precision. ``costs``: datapath passes per option
    (default ``p / b``, skip 0).
    """

    choices: tuple
    costs: tuple

    @property
    def act_bits(self) -> int:
        return max(c for c in self.choices if c != SKIP)

    @property
    def precisions(self) -> list[int]:
        return [c for c in self.choices if c != SKIP]

    @property
    def low_precision(self) -> int | None:
        """The smallest precision below ``b`` (the ``msb_bits`` of the datapath), if any."""
        low = [c for c in self.precisions if c < self.act_bits]
        return min(low) if low else None

    def __len__(self) -> int:
        return len(self.choices)

    def label(self, j: int) -> str:
        c = self.choices[j]
        return SKIP if c == SKIP else f"{c}b"


def parse_options(options: str | Sequence[str | int], costs: Sequence[float] | None = None
                  ) -> DFSOptions:
    """Validate gate options: ``"skip,4,8"`` or ``("skip", 4, 8)``.

    Raises ``ValueError`` naming the bad entry (unknown word, non-positive or duplicate
    precision, no precision at all, cost count mismatch or negative cost).
    """
    items = options.split(",") if isinstance(options, str) else list(options)
    out: list = []
    for raw in items:
        s = str(raw).strip().lower()
        if s == SKIP:
            c = SKIP
        else:
            try:
                c = int(s)
            except ValueError:
                raise ValueError(f"unknown DFS option {str(raw).strip()!r}: use 'skip' or a "
                                 "bit width such as 4 or 8") from None
            if c < 1:
                raise ValueError(f"DFS precision option {c} must be at least 1 bit")
        if c in out:
            raise ValueError(f"DFS option {str(raw).strip()!r} is given twice")
        out.append(c)
    if not any(c != SKIP for c in out):
        raise ValueError("DFS options need at least one precision (e.g. 'skip,8')")
    b = max(c for c in out if c != SKIP)
    if costs is None:
        cost = tuple(0.0 if c == SKIP else c / b for c in out)
    else:
        cost = tuple(float(v) for v in costs)
        if len(cost) != len(out):
            raise ValueError(f"{len(cost)} costs given for {len(out)} DFS options")
        if any(v < 0 for v in cost):
            raise ValueError(f"DFS option costs must be >= 0, got {cost}")
    return DFSOptions(tuple(out), cost)


class _TruncateSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lsb, fmt, act_bits, prec):  # type: ignore[override]
        q = quantize(x.detach(), lsb, fmt).clamp(0, (1 << act_bits) - 1)
        if prec < act_bits:
            q = torch.bitwise_left_shift(torch.bitwise_right_shift(q, act_bits - prec),
                                         act_bits - prec)
        top = float(dequantize(torch.tensor((1 << act_bits) - 1), lsb))
        ctx.save_for_backward((x >= 0) & (x <= top))
        return dequantize(q, lsb).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None, None, None


def truncate_activation(x: torch.Tensor, lsb: int | torch.Tensor, fmt: BFPFormat, act_bits: int,
                        prec: int) -> torch.Tensor:
    """Fake-quantized unsigned activation, truncated to its top ``prec`` bits.

    ``q = clamp(round_half_even(x * 2**-lsb), 0, 2**act_bits - 1)`` (rule Q2 then the pact
    clamp of G0), then ``q_hb = q >> (act_bits - prec)`` (rule G1, floor); returns
    ``(q_hb << (act_bits - prec)) * 2**lsb`` as ``x``'s dtype. Gradient: identity where
    ``0 <= x <= (2**act_bits - 1) * 2**lsb``, zero outside (PACT-style clamp).
    """
    if not 1 <= prec <= act_bits:
        raise ValueError(f"precision {prec} outside [1, {act_bits}]")
    if act_bits > fmt.mantissa_bits - 1:
        raise ValueError(f"{act_bits}-bit unsigned activations do not fit the "
                         f"{fmt.mantissa_bits}-bit mantissa (rule G0 needs act_bits <= M - 1)")
    return _TruncateSTE.apply(x, torch.as_tensor(lsb, dtype=torch.int64), fmt, act_bits, prec)


def hard_decision(p: torch.Tensor) -> torch.Tensor:
    """One-hot of ``argmax p`` along the last axis (ties: the lowest index, never multi-hot)."""
    return F.one_hot(p.argmax(dim=-1), p.shape[-1]).to(p.dtype)


class RecurrentGate(nn.Module):
    """The DFS controller: per-block embedding conv, one shared LSTM, linear + softmax.

    ``channels[i]`` is the channel count of block ``i``'s output (one embedding per gated
    decision, i.e. for blocks ``0 .. n_blocks - 2``).
    """

    def __init__(self, channels: Sequence[int], n_options: int, embed_dim: int = 10) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.embed = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in channels)
        self.lstm = nn.LSTM(embed_dim, embed_dim)
        self.proj = nn.Linear(embed_dim, n_options)

    def init_state(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros(1, n, self.embed_dim, dtype=like.dtype, device=like.device)
        return z, z.clone()

    def step(self, i: int, y: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Gate after block ``i`` on its output ``y [N, C, H, W]``: softmax ``[N, n_options]``
        and the new LSTM state."""
        e = self.embed[i](F.adaptive_avg_pool2d(y, 1)).flatten(1)
        h, state = self.lstm(e[None], state)
        return F.softmax(self.proj(h[0]), dim=-1), state


@dataclasses.dataclass
class DFSOutput:
    """``logits [N, classes]``; ``decisions [N, n_gated, n_options]``, straight-through one-hot
    (forward value exactly 0/1); ``probs`` the gate's softmax, same shape."""

    logits: torch.Tensor
    decisions: torch.Tensor
    probs: torch.Tensor


def computation_percentage(decisions: torch.Tensor, costs: Sequence[float]) -> torch.Tensor:
    """CP in percent: ``100 * mean`` over images and gated blocks of the chosen option's cost.

    ``decisions``: one-hot ``[N, n_gated, n_options]`` or option indices ``[N, n_gated]``.
    Differentiable in a one-hot (straight-through) input.
    """
    c = torch.as_tensor(costs, dtype=torch.float32)
    if decisions.dim() == 2:
        return 100.0 * c[decisions.long()].mean()
    return 100.0 * (decisions * c.to(decisions.dtype)).sum(-1).mean()


def _blocks(backbone: CifarResNet) -> list[BasicBlock]:
    return [b for stage in (backbone.layer1, backbone.layer2, backbone.layer3) for b in stage]


class DFSResNet(nn.Module):
    """A CIFAR ResNet with a DFS gate (see the module docstring).

    ``full_execution=True`` (stage 1 of training) runs every gated block at full precision
    whatever the gate says; the gate is still evaluated so its cost term can train it.
    """

    def __init__(self, backbone: CifarResNet, options: DFSOptions | str | Sequence = ("skip", 4, 8),
                 fmt: BFPFormat = BFPFormat(9, 8),
                 weight_blocking: WeightBlocking = WeightBlocking(),
                 embed_dim: int = 10) -> None:
        super().__init__()
        if not isinstance(backbone, CifarResNet):
            raise TypeError(f"DFS needs a CIFAR ResNet backbone, not {type(backbone).__name__}")
        self.options = options if isinstance(options, DFSOptions) else parse_options(options)
        if self.options.act_bits > fmt.mantissa_bits - 1:
            raise ValueError(f"largest DFS precision {self.options.act_bits} bits does not fit "
                             f"M = {fmt.mantissa_bits} (rule G0: act_bits <= M - 1)")
        self.backbone = backbone
        self.fmt = fmt
        self.weight_blocking = weight_blocking
        blocks = _blocks(backbone)
        if len(blocks) < 2:
            raise ValueError("DFS needs at least two residual blocks")
        self.gate = RecurrentGate([b.conv2.out_channels for b in blocks[:-1]], len(self.options),
                                  embed_dim)
        #: static activation LSB exponents per block: [input of the block, output of conv1]
        self.register_buffer("act_lsb", torch.zeros(len(blocks), 2, dtype=torch.int64))
        self.register_buffer("calibrated", torch.tensor(False))
        self.full_execution = False

    # ------------------------------------------------------------------ structure
    @property
    def blocks(self) -> list[BasicBlock]:
        return _blocks(self.backbone)

    @property
    def n_gated(self) -> int:
        return len(self.blocks) - 1

    def train(self, mode: bool = True) -> "DFSResNet":
        """Train mode everywhere except BatchNorm, whose statistics stay frozen."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate_activations(self, batches: Iterable[torch.Tensor], candidates: int = 3
                              ) -> torch.Tensor:
        """Fix the static LSBs of the gated convs' inputs (block input, conv1 output) from
        float full-precision runs of the backbone.

        Per tensor, the candidates are ``lsb = e_max - (b - 1) - s``, ``s = 0 .. candidates-1``
        (``e_max = floor(log2 max)``, rule Q1: ``s = 0`` fits the calibration maximum in
        ``b`` bits); the one with the least squared error summed over every precision option
        (truncation plus clamp) wins, so the low-precision options get a useful range at the
        cost of clipping a few outliers. Returns the ``[n_blocks, 2]`` LSBs.
        """
        b = self.options.act_bits
        seen: list[list[list[torch.Tensor]]] = [[[], []] for _ in self.blocks]
        was = self.training
        self.eval()
        for x in batches:
            y = self._stem(x)
            for k, blk in enumerate(self.blocks):
                seen[k][0].append(y)
                seen[k][1].append(F.relu(blk.bn1(blk.conv1(y))))
                y = blk(y)
        self.train(was)
        if not seen[0][0]:
            raise ValueError("activation calibration needs at least one batch")
        for k in range(len(self.blocks)):
            for which in (0, 1):
                t = torch.cat(seen[k][which]).to(torch.float64)
                peak = float(t.max())
                e = int(element_exponent(torch.tensor(peak))) if peak > 0 else 0
                errs = []
                for s in range(candidates):
                    lsb = e - (b - 1) - s
                    errs.append(sum(float(((truncate_activation(t, lsb, self.fmt, b, p) - t) ** 2)
                                          .sum()) for p in self.options.precisions))
                self.act_lsb[k, which] = e - (b - 1) - min(range(candidates), key=errs.__getitem__)
        self.calibrated.fill_(True)
        return self.act_lsb.clone()

    # ------------------------------------------------------------------ forward pieces
    def _w(self, layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
        """BFP fake-quantized weights of a conv or linear layer (straight-through)."""
        w = layer.weight
        _, _, lsb = quantize_weight(w.detach(), self.fmt, self.weight_blocking)
        return fake_quantize(w, lsb.reshape(lsb.shape + (1,) * (w.dim() - 2)), self.fmt)

    def _conv(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self._w(conv), conv.bias, conv.stride, conv.padding, 1, conv.groups)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        return F.relu(bb.bn1(self._conv(bb.conv1, x)))

    def _shortcut(self, blk: BasicBlock, x_conv: torch.Tensor, x_id: torch.Tensor) -> torch.Tensor:
        if blk.downsample is None:
            return x_id
        return blk.downsample[1](self._conv(blk.downsample[0], x_conv))

    def _quant(self, x: torch.Tensor, k: int, which: int, prec: int) -> torch.Tensor:
        return truncate_activation(x, self.act_lsb[k, which], self.fmt, self.options.act_bits, prec)

    def run_block(self, k: int, x: torch.Tensor, choice) -> torch.Tensor:
        """Block ``k`` on input ``x`` with option ``choice`` (``"skip"``, a precision, or
        ``None`` = float, unquantized activations, used for block 0)."""
        blk = self.blocks[k]
        b = self.options.act_bits
        if choice is None:
            x_in = x_id = x
            q2 = lambda t: t  # noqa: E731
        else:
            x_id = self._quant(x, k, 0, b)
            x_in = x_id if choice in (SKIP, b) else self._quant(x, k, 0, choice)
            q2 = lambda t: self._quant(t, k, 1, choice)  # noqa: E731
        if choice == SKIP:
            return F.relu(self._shortcut(blk, x_id, x_id))
        h = F.relu(blk.bn1(self._conv(blk.conv1, x_in)))
        h = blk.bn2(self._conv(blk.conv2, q2(h)))
        return F.relu(h + self._shortcut(blk, x_in, x_id))

    def forward(self, x: torch.Tensor, decisions: torch.Tensor | None = None) -> DFSOutput:
        """Run the network. ``decisions`` (option indices ``[N, n_gated]``) overrides the gate
        (the gate still runs, its probabilities are returned)."""
        if not bool(self.calibrated):
            raise RuntimeError("DFSResNet: call calibrate_activations() before running it")
        n_opt = len(self.options)
        y = self.run_block(0, self._stem(x), None)
        state = self.gate.init_state(x.shape[0], y)
        hs, ps = [], []
        for k in range(1, len(self.blocks)):
            p, state = self.gate.step(k - 1, y, state)
            if decisions is not None:
                h = F.one_hot(decisions[:, k - 1].long(), n_opt).to(p.dtype)
            else:
                h = hard_decision(p.detach())
            h = h + (p - p.detach())  # straight-through: value h, gradient of p
            hs.append(h)
            ps.append(p)
            if self.full_execution:
                y = self.run_block(k, y, self.options.act_bits)
                continue
            used = h.detach().sum(0) > 0
            mix = 0
            for j, c in enumerate(self.options.choices):
                if self.training or bool(used[j]):
                    mix = mix + h[:, j, None, None, None] * self.run_block(k, y, c)
            y = mix
        bb = self.backbone
        logits = F.linear(torch.flatten(bb.avgpool(y), 1), self._w(bb.fc), bb.fc.bias)
        return DFSOutput(logits, torch.stack(hs, 1), torch.stack(ps, 1))
