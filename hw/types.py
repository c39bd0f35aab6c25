"""Amaranth shapes and layouts of the BFP conv engine, derived from :class:`HwConfig`.

This is the only place where datapath widths are computed; components and the sim wrapper
read them from here.
"""

from __future__ import annotations

from amaranth.hdl import Shape, signed, unsigned
from amaranth.lib import data, enum

from .config import HwConfig, bits_for, clog2

__all__ = [
    "ActMode",
    "mantissa_shape",
    "product_shape",
    "tree_shape",
    "align_shift_shape",
    "aligned_shape",
    "acc_shape",
    "shift_shape",
    "act_word_layout",
    "weight_word_layout",
    "align_word_layout",
    "bias_word_layout",
    "requant_params_layout",
    "quant_word_layout",
    "desc_layout",
    "addr_width",
]


class ActMode(enum.Enum, shape=2):
    """Activation after requantization (rule R4)."""

    NONE = 0
    RELU = 1
    RELU6 = 2


def addr_width(depth: int) -> int:
    """Address bits of a memory of ``depth`` words."""
    return max(1, clog2(depth))


def mantissa_shape(cfg: HwConfig) -> Shape:
    """``signed(M)``."""
    return signed(cfg.mantissa_bits)


def product_shape(cfg: HwConfig) -> Shape:
    """``signed(2M)``: one M×M product."""
    return signed(2 * cfg.mantissa_bits)


def tree_shape(cfg: HwConfig) -> Shape:
    """Sum of K products: ``signed(2M + ceil(log2 K))``."""
    return signed(2 * cfg.mantissa_bits + clog2(cfg.lanes))


def align_shift_shape(cfg: HwConfig) -> Shape:
    """Alignment shift d in ``[0, align_span]``."""
    return unsigned(bits_for(cfg.align_span))


def aligned_shape(cfg: HwConfig) -> Shape:
    """Tree sum shifted left by at most ``align_span``."""
    return signed(tree_shape(cfg).width + cfg.align_span)


def acc_shape(cfg: HwConfig) -> Shape:
    """``signed(acc_bits)``: accumulator and bias."""
    return signed(cfg.acc_bits)


def shift_shape(cfg: HwConfig) -> Shape:
    """Signed requantization shift."""
    return signed(cfg.shift_bits)


def act_word_layout(cfg: HwConfig) -> data.ArrayLayout:
    """Activation / output / residual word: K mantissas, lane c at bits ``[c*M, (c+1)*M)``."""
    return data.ArrayLayout(mantissa_shape(cfg), cfg.lanes)


def weight_word_layout(cfg: HwConfig) -> data.ArrayLayout:
    """Weight word ``[o][c]``: output lane o, input lane c at bits ``[(o*K + c)*M, ...)``."""
    return data.ArrayLayout(data.ArrayLayout(mantissa_shape(cfg), cfg.lanes), cfg.lanes)


def align_word_layout(cfg: HwConfig) -> data.ArrayLayout:
    """Alignment word (address ``t*CW + cw``): d of each output lane."""
    return data.ArrayLayout(align_shift_shape(cfg), cfg.lanes)


def bias_word_layout(cfg: HwConfig) -> data.ArrayLayout:
    """Bias word (address t): the bias of each output lane on its accumulator LSB."""
    return data.ArrayLayout(acc_shape(cfg), cfg.lanes)


def requant_params_layout(cfg: HwConfig) -> data.StructLayout:
    """Per-output-channel requantization shifts.

    ``acc``: accumulator -> output (or -> joint LSB of a fused residual add),
    ``res``: residual -> joint LSB, ``out``: joint sum -> output (0 without residual).
    """
    return data.StructLayout({
        "acc": shift_shape(cfg),
        "res": shift_shape(cfg),
        "out": shift_shape(cfg),
    })


def quant_word_layout(cfg: HwConfig) -> data.ArrayLayout:
    """Requantization word (address t)."""
    return data.ArrayLayout(requant_params_layout(cfg), cfg.lanes)


def desc_layout(cfg: HwConfig) -> data.StructLayout:
    """Layer descriptor, held on the ``desc`` port while the engine runs."""
    dim = unsigned(bits_for(cfg.max_dim))
    k = unsigned(bits_for(cfg.max_kernel))
    return data.StructLayout({
        "height": dim,                                         # H
        "width": dim,                                          # W
        "out_height": dim,                                     # Ho
        "out_width": dim,                                      # Wo
        "in_words": unsigned(bits_for(cfg.max_in_words)),      # CW = ceil(C / K)
        "out_tiles": unsigned(bits_for(cfg.max_tiles)),        # T = ceil(O / K)
        "kernel_h": k,
        "kernel_w": k,
        "stride": unsigned(bits_for(cfg.max_stride)),
        "pad": k,                                              # top/left zero padding
        "act": ActMode,
        "clamp_max": unsigned(cfg.mantissa_bits - 1),          # relu6 bound on the output LSB
        "residual": unsigned(1),                               # fused residual add
    })
