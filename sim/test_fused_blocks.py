"""The three fused blocks of the digits-trained predicted FusioNet (``train-fusion``
defaults, trained once into build/cache) on the fused-block engine, on real test digits:
every mask bit, predicted level and output element ``==`` the golden model, cycles == the
model.

Each block's input is the golden activation of a real digit; since every block's RTL output
equals the next block's golden input, the RTL chain of blocks equals the integer golden
network (checked). One trained block also runs with its predictor thresholds moved onto
sums its real input produces, so exact threshold ties occur on trained weights.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dynacc.gen.gated_models import gated_checkpoint
from dynacc.hw.fused_config import FusedConfig
from dynacc.hw.fused_program import FusedLayer
from dynacc.quant.fusion_program import fusion_program_from_checkpoint
from dynacc.sim.fused import network_block_layers, verify_fused_layers
from dynacc.sim.fused_blocks import place_thresholds

CFG = FusedConfig()
#: digits test images whose blocks run on the RTL
IMAGES = (0, 7)


@pytest.fixture(scope="module")
def trained():
    program, splits = fusion_program_from_checkpoint(gated_checkpoint("fusion_net"))
    images = torch.stack([splits.test.dataset[i][0] for i in IMAGES])
    _logits, infos = program.run(images)
    return program, infos


def test_trained_blocks_bit_exact_and_chained(trained):
    program, infos = trained
    cases = network_block_layers(program, infos, [f"digit{i}" for i in IMAGES])
    results = verify_fused_layers([layer for layer, _n, _b in cases], CFG)
    for (_layer, n, b), r in zip(cases, results):
        s1, s2 = infos[b]["s1"][n], infos[b]["s2"][n]
        assert 0.02 < float(s1.double().mean()) < 0.98 and 0.02 < float(s2.double().mean()) < 0.98
        if b + 1 < len(program.blocks):     # the RTL output is the next block's input
            assert np.array_equal(r.rtl.out, infos[b + 1]["x"][n].numpy())


def test_trained_block_threshold_ties(trained):
    program, infos = trained
    blk = copy.deepcopy(program.blocks[1])
    x = infos[1]["x"][:1]
    place_thresholds(blk, x, p1=0.4, p2=0.6, seed=3)
    layer = FusedLayer("units.1/ties", blk, x[0].numpy(), program.block_lsb[1])
    import torch.nn.functional as F

    from dynacc.quant.fusion_golden import q4_from_mantissa
    acc1 = F.conv2d(q4_from_mantissa(x, blk.x_lsb), blk.t1[:, :, None, None], None, 1, 0, 1,
                    blk.groups)
    assert int((blk.sign1[None, :, None, None] * acc1 == blk.thr1[None, :, None, None]).sum()) > 0
    verify_fused_layers([layer], CFG)
