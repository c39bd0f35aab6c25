"""Host side of the fused-block engine (no simulator): config checks, refusals that name the
layer and field, memory images, the unpacking of dumps and the cycle model on hand-counted
cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynacc.hw.fused_config import FusedConfig
from dynacc.hw.fused_engine import FusedEngine
from dynacc.hw.fused_program import FusedLayer, FusedProgram, fused_cycles, fused_geometry
from dynacc.sim.fused_blocks import random_fused_block, random_fused_layer
from dynacc.sim.memfile import pack_words, unpack_words

CFG = FusedConfig()


def test_config_checks():
    with pytest.raises(ValueError, match="'a_bits' must be in"):
        FusedConfig(t_bits=40, a_bits=36)
    with pytest.raises(TypeError, match="'lanes' must be an integer"):
        FusedConfig(lanes=2.0)
    assert FusedConfig().key() != FusedConfig(chunk=8).key()


def test_refuses_blocks_that_do_not_fit():
    layer = random_fused_layer("too_many_inputs", 16, 16, 32, 1, 1, (3, 3), seed=31)
    with pytest.raises(ValueError, match="'too_many_inputs'.*C_in/G = 16 > group_in 8"):
        FusedProgram(layer, CFG)
    blk = random_fused_block(8, 8, 32, 2, 1, seed=32, density=1.0, shift_max=20)
    with pytest.raises(ValueError, match="'overflow'.*need more than t_bits 38"):
        FusedProgram(FusedLayer("overflow", blk, np.zeros((8, 3, 3)), 0), CFG)
    big = random_fused_layer("big_map", 8, 8, 32, 2, 1, (17, 16), seed=33)
    with pytest.raises(ValueError, match="'big_map'.*act_depth 256"):
        FusedProgram(big, CFG)
    with pytest.raises(ValueError, match="'bad_x'.*x must be \\[in_ch=8"):
        FusedLayer("bad_x", blk, np.zeros((4, 3, 3)), 0)


def test_images_pack_and_masks_unpack():
    layer = random_fused_layer("pack", 8, 16, 24, 4, 2, (5, 4), seed=41)   # mids padded
    prog = FusedProgram(layer, CFG)
    lay = FusedEngine.layouts(CFG)
    imgs = prog.images()
    for mem, img in imgs.items():                   # every image fits its word layout
        assert (unpack_words(pack_words(img, lay[mem]), lay[mem]) == img).all(), mem
    geo = prog.geo
    assert geo["chunks_g"] == 1 and geo["chunks"] == 4 and geo["tiles"] == 4
    # a dump built from the golden masks unpacks to them
    gold = layer.golden(CFG.fmt)
    h, w, ho, wo = geo["h"], geo["w"], geo["ho"], geo["wo"]
    mids = np.full((geo["groups"], CFG.chunk), -1)
    mids[:, :geo["mid_g"]] = np.arange(layer.block.mid).reshape(geo["groups"], -1)
    mids = mids.reshape(-1)
    s1 = np.zeros((h * w, mids.size, 2), dtype=np.int64)
    s1[:, mids >= 0, 0] = gold.s1.reshape(layer.block.mid, -1).T
    s1[:, mids >= 0, 1] = gold.level.reshape(layer.block.mid, -1).T
    s2 = np.zeros((ho * wo, mids.size), dtype=np.int64)
    s2[:, mids >= 0] = gold.s2.reshape(layer.block.mid, -1).T
    out = np.zeros((ho * wo, CFG.channels), dtype=np.int64)
    out[:, :16] = gold.out.reshape(16, -1).T
    back = prog.unpack(out, s1.reshape(h * w * geo["chunks"], -1),
                       s2.reshape(ho * wo * geo["chunks"], -1))
    for what in ("out", "s1", "level", "s2"):
        assert np.array_equal(getattr(back, what), getattr(gold, what)), what


def test_cycle_model_hand_counts():
    blk = random_fused_block(8, 8, 32, 2, 1, seed=51)
    geo = fused_geometry(blk, 3, 3, CFG)        # 2 groups × 1 chunk, 1 tile per group
    s1 = np.zeros((32, 3, 3), dtype=bool)
    s2 = np.zeros((32, 3, 3), dtype=bool)
    p1 = 9 * 2 + 1
    p2 = 9 * 2 * 9 + 1
    # all off: per tile, an in-image tap (or the V tap) is 3 + (1 + 1) = 5 cycles, a padding
    # tap 1; per tile + 8 (2 + the requantizer's 6 stages), per pixel + 1
    taps_in = sum(sum(0 <= y + dy < 3 and 0 <= x + dx < 3 for dy in (-1, 0, 1)
                      for dx in (-1, 0, 1)) for y in range(3) for x in range(3))
    per_tile_taps = taps_in * 5 + (81 - taps_in) + 9 * 5
    expect = p1 + p2 + 9 + 2 * (per_tile_taps + 9 * 8)
    assert fused_cycles(geo, 1, s1, s2, CFG.chunk) == expect
    # one surviving mid at the centre pixel for the centre and V taps of group 0: + 0 each
    # (max(1, 1) = 1); a second one adds one cycle per tap
    s1[3, 1, 1] = s2[3, 1, 1] = True
    assert fused_cycles(geo, 1, s1, s2, CFG.chunk) == expect
    s1[5, 1, 1] = s2[5, 1, 1] = True
    assert fused_cycles(geo, 1, s1, s2, CFG.chunk) == expect + 2
