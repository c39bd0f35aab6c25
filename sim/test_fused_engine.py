"""The fused-block engine on random blocks: every mask bit, predicted level and output element
``==`` the golden model (rules F1-F9), and the RTL cycles == ``fused_cycles``.

Cases: stride 1 with the residual and stride 2; 1, 2 and 4 groups; several tiles per group and
a tile with idle lanes; mids that do not fill a whole chunk; predictor thresholds on values
the sums take (exact ties: mask off) and input LSBs that take every F1 path (rounding right
shifts with ties, no shift, left shifts that saturate); masks all on and all off; an all-zero
input; requantization ties (shift 1 on small sums); saturation; and the worst-case
accumulation (every weight +127, every input −128, every mask on) near the accumulator width.
"""

from __future__ import annotations

import numpy as np
import torch

from dynacc.hw.fused_config import FusedConfig
from dynacc.hw.fused_program import FusedLayer
from dynacc.quant.fusion_golden import accumulator_bounds, predictor_masks
from dynacc.sim.fused import verify_fused_layers
from dynacc.sim.fused_blocks import random_fused_block, random_fused_layer

CFG = FusedConfig()


def _ties(layer: FusedLayer) -> tuple[int, int]:
    """Predictor sums equal to their threshold (s1, s2) in this layer."""
    import torch.nn.functional as F

    from dynacc.quant.fusion import dw3x3
    from dynacc.quant.fusion_golden import q4_from_mantissa
    blk = layer.block
    x = torch.as_tensor(layer.x)[None]
    acc1 = F.conv2d(q4_from_mantissa(x, blk.x_lsb), blk.t1[:, :, None, None], None, 1, 0, 1,
                    blk.groups)
    t1 = int((blk.sign1[None, :, None, None] * acc1 == blk.thr1[None, :, None, None]).sum())
    _, level, _ = predictor_masks(blk, x)
    acc2 = dw3x3(level, blk.t2, blk.stride)
    t2 = int((blk.sign2[None, :, None, None] * acc2 == blk.thr2[None, :, None, None]).sum())
    return t1, t2


def _with_x(layer: FusedLayer, x: np.ndarray) -> FusedLayer:
    return FusedLayer(layer.name, layer.block, x, layer.out_lsb)


def _all(layer: FusedLayer, on: bool, name: str) -> FusedLayer:
    """Every mask on (thresholds below every reachable sum) or off (at the bound)."""
    blk = layer.block
    b1 = 8 * blk.t1.abs().sum(1)
    b2 = 7 * blk.t2.abs().sum(1)
    blk.thr1 = -b1 - 1 if on else b1
    blk.thr2 = -b2 - 1 if on else b2
    return FusedLayer(name, blk, layer.x, layer.out_lsb)


def _edge_x(shape, seed) -> np.ndarray:
    """Random mantissas mixed with ±(2^k − 1), −2^k and the extremes."""
    g = np.random.default_rng(seed)
    specials = np.array([127, -127, -128, 63, -64, 31, -32, 15, 7, 1, -1, 0])
    x = g.integers(-128, 128, size=shape)
    pick = g.random(shape) < 0.3
    return np.where(pick, g.choice(specials, size=shape), x)


def test_random_blocks_bit_exact():
    layers = [
        random_fused_layer("s1_res_g2", 8, 8, 32, 2, 1, (5, 6), seed=1, x_lsb=-3),
        random_fused_layer("s2_g2_two_tiles", 8, 32, 32, 2, 2, (7, 6), seed=2, x_lsb=-5),
        random_fused_layer("g4_idle_lanes_pad_mids", 8, 8, 24, 4, 1, (4, 4), seed=3, x_lsb=-1),
        random_fused_layer("g1_wide", 8, 8, 64, 1, 1, (4, 5), seed=4, x_lsb=0, p1=0.3, p2=0.7),
        random_fused_layer("lsb2_no_shift", 8, 16, 32, 2, 2, (5, 5), seed=5, x_lsb=2),
        random_fused_layer("lsb5_left_shift", 16, 16, 48, 4, 1, (3, 4), seed=6, x_lsb=5,
                           x=_edge_x((16, 3, 4), 6)),
    ]
    for layer in layers:
        t1, t2 = _ties(layer)
        assert t1 > 0 and t2 > 0, f"{layer.name}: no threshold ties ({t1}, {t2})"
    results = verify_fused_layers(layers, CFG)
    for layer, r in zip(layers, results):
        gold = layer.golden(CFG.fmt)
        assert 0 < gold.s1.mean() < 1 and 0 < gold.s2.mean() < 1, layer.name
        assert r.cycles > 0


def test_edge_cases_bit_exact():
    base = random_fused_layer("base", 8, 8, 32, 2, 1, (4, 4), seed=11, x_lsb=-2)
    zero = _with_x(random_fused_layer("zero", 8, 8, 32, 2, 1, (4, 4), seed=12), np.zeros((8, 4, 4)))
    # requantization ties: tiny weights and no biases give small sums; shift 1 halves them
    tiny = random_fused_layer("requant_ties", 8, 8, 32, 2, 1, (4, 4), seed=13, wmax=2,
                              bias_scale=0, shift_max=0, use_res=False, density=0.8)
    tiny.out_lsb = int(tiny.block.acc_lsb.max()) + 1
    sat = random_fused_layer("saturate", 8, 8, 32, 2, 2, (5, 5), seed=14)
    sat.out_lsb -= 6
    layers = [_all(base, True, "all_on"), _all(random_fused_layer("b2", 8, 8, 32, 2, 1, (4, 4),
                                                                  seed=15), False, "all_off"),
              zero, tiny, sat]
    results = verify_fused_layers(layers, CFG)
    golds = [l.golden(CFG.fmt) for l in layers]
    assert golds[0].s1.all() and golds[0].s2.all()
    assert not golds[1].s1.any() and not golds[1].s2.any()
    # all off: only b3 (and the residual) reach the output; the V tap alone scans the chunks
    assert results[1].cycles < results[0].cycles
    g3 = golds[3]
    from dynacc.quant.fusion_golden import unfused_acc
    x = torch.as_tensor(tiny.x)[None]
    acc, _, _ = unfused_acc(tiny.block, x, torch.as_tensor(g3.s1)[None],
                            torch.as_tensor(g3.s2)[None])
    assert int((acc % 2 != 0).sum()) > 10, "no requantization ties"
    assert (np.abs(golds[4].out) == 127).mean() > 0.3, "saturation case does not saturate"


def test_worst_case_accumulation():
    """Every weight +127, every input −128, all masks on, large biases: |y| reaches its bound
    (rule F7), close to the accumulator width, and still matches."""
    blk = random_fused_block(8, 8, 32, 2, 1, seed=21, density=1.0, shift_max=6,
                             bias_scale=1 << 14, use_res=True)
    blk.w1 = torch.full_like(blk.w1, 127)
    blk.d = torch.full_like(blk.d, 127)
    blk.w2 = torch.full_like(blk.w2, 127)
    blk.shift = torch.full_like(blk.shift, 6)
    blk.b1 = torch.full_like(blk.b1, 1 << 10)
    blk.b2 = torch.full_like(blk.b2, 1 << 16)
    blk.b3 = torch.full_like(blk.b3, -(1 << 30))
    layer = _all(FusedLayer("worst", blk, np.full((8, 5, 5), -128), 0), True, "worst_case")
    bound = float(accumulator_bounds(blk, 128).max())
    assert 2.0 ** 40 < bound < 2.0 ** (CFG.acc_bits - 1)
    x = torch.as_tensor(layer.x)[None]
    from dynacc.quant.fusion_golden import unfused_acc
    s1, _, s2 = predictor_masks(blk, x)
    acc, _, _ = unfused_acc(blk, x, s1, s2)
    assert float(acc.abs().max()) > bound / 2
    layer.out_lsb = int(blk.acc_lsb.max()) + 30
    verify_fused_layers([layer], CFG)
