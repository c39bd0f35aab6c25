"""The whole digits-trained FBS network (``gated_checkpoint("fbs_net")``, its own density) on
the RTL, one simulator process: every FBS conv is fed by the previous conv's **RTL** output,
the host predictor decides on that output (g_q, decisions, per-image bias), the layer is
compacted, runs in mode ``fbs`` and is expanded; average pool and FC run on the host on the
RTL output. Every tensor, every layer's g_q / decisions / bias and the predictions ``==``
``run_fbs_golden``; every run's RTL cycles == ``dual_conv_cycles`` of its compacted sizes;
the FBS network costs fewer engine cycles than the dense one: the same network at d = 1 (every
channel active), also run on the RTL (one image, bit-exact) for its measured cycles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynacc.gen.gated_models import gated_checkpoint
from dynacc.hw.config import load_named
from dynacc.quant.fbs_program import fbs_model_from_checkpoint
from dynacc.quant.flow import load_data
from dynacc.sim.fbs_network import check_fbs_network, run_fbs_network

HW = load_named("dual")
#: digits test images run through the network
IMAGES = (0, 1, 2)


@pytest.fixture(scope="module")
def fbs_net_run():
    _, fp, _ = fbs_model_from_checkpoint(gated_checkpoint("fbs_net"))
    splits = load_data("fbs_cnn", "digits", seed=0)
    x = torch.stack([splits.test.dataset[i][0] for i in IMAGES])
    labels = [int(splits.test.dataset[i][1]) for i in IMAGES]
    dense = fp.with_density(1.0)
    return (fp, x, labels, run_fbs_network(fp, x, HW), dense,
            run_fbs_network(dense, x[:1], HW))


def test_fbs_net_whole_network_on_rtl(fbs_net_run):
    fp, x, labels, res, fd, rd = fbs_net_run
    chk = check_fbs_network(fp, res, x, HW)
    chk.assert_ok()    # first mismatch: image, layer, channel (y, x), RTL and golden values
    assert chk.tensors == len(res.acts) == len(fp.program.ops)
    np.testing.assert_array_equal(chk.rtl_pred, chk.golden_pred)
    np.testing.assert_array_equal(res.cycles_per_image, chk.cycles_per_image)
    n = len(IMAGES)
    for g in fp.gates:
        a = res.active[g.name]
        assert (0 < a.sum(axis=1)).all() and (a.sum(axis=1) < a.shape[1]).all(), g.name
        y = res.acts[g.name]
        assert all((y[i][~a[i]] == 0).all() for i in range(n)), g.name
    # the dense network (d = 1) on the RTL: bit-exact, every channel computed, its measured
    # cycles the model's dense cycles
    chk_d = check_fbs_network(fd, rd, x[:1], HW)
    chk_d.assert_ok()
    assert all(rd.active[g.name].all() for g in fd.gates)
    dense = int(rd.cycles_per_image[0])
    assert dense == chk.dense_cycles_per_image == chk_d.dense_cycles_per_image
    assert {g: int(c[0]) for g, c in rd.cycles.items()} == chk.dense_cycles
    per = res.cycles_per_image
    assert (per < dense).all()
    print(f"\nFBS network (d = {fp.gates[0].density:g}) on the RTL, images {list(IMAGES)} "
          f"(labels {labels}, predictions {chk.rtl_pred.tolist()}):")
    for g in fp.gates:
        print(f"  {g.name}: compacted in/out per image "
              f"{[tuple(int(v) for v in c) for c in res.compact[g.name]]}, cycles "
              f"{res.cycles[g.name].tolist()} (dense {chk.dense_cycles[g.name]})")
    # FBS7 MAC reduction of the same decisions (conv MACs only), for comparison
    macs = np.zeros((2, n))
    for g in fp.gates:
        w = fp.program.op(g.name).weight
        pix = w.shape[2] * w.shape[3] * np.prod(res.acts[g.name].shape[2:])
        macs[0] += w.shape[0] * w.shape[1] * pix
        macs[1] += res.compact[g.name].prod(axis=1) * pix
    print(f"engine cycles per image: FBS {per.tolist()} vs dense {dense:,} (RTL, d = 1): "
          f"speed-up {', '.join(f'{dense / c:.2f}x' for c in per)}; conv MAC reduction "
          f"{', '.join(f'{r:.2f}x' for r in macs[0] / macs[1])}; simulator "
          f"{res.sim_wall_s:.1f} + {rd.sim_wall_s:.1f} s (engine runs {res.rtl_wall_s:.1f} s)")
