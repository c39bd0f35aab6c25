"""``sim.fbs_network.fbs_chain`` (the host side of the whole-network FBS RTL run) driven by
the compacted layers' golden outputs instead of the RTL: it must reproduce ``run_fbs_golden``
(every tensor, g_q, decisions, bias), so the co-simulation checks only the engine;
``fbs_host_step`` equals the golden host step."""

import pytest
import torch

from dynacc.hw.config import load_named
from dynacc.quant.fbs import fbs_from_dense
from dynacc.quant.fbs_program import build_fbs_program, fbs_host_step, run_fbs_golden
from dynacc.quant.models.fbs_cnn import FBSCNN
from dynacc.sim.fbs_network import fbs_chain

HW = load_named("dual")


@pytest.fixture(scope="module")
def fbs_program():
    torch.manual_seed(0)
    calib = torch.randn(32, 1, 16, 16)
    model = fbs_from_dense(FBSCNN(10, 1).eval(), calib, density=0.5)
    with torch.no_grad():
        for m in model.convs():
            m.phi.normal_(0.0, 0.5)
            m.rho.uniform_(0.5, 1.5)
            m.beta.uniform_(-0.2, 0.3)
        model.train()
        for _ in range(3):
            model(calib)
    model.eval()
    return build_fbs_program(model, calib), calib[:3]


def _golden_engine(fp, x):  # noqa: ANN001, ANN202
    gen = fbs_chain(fp, x)
    jobs = []
    try:
        job = next(gen)
        while True:
            jobs.append(job)
            job = gen.send(job.layer.golden(HW.fmt)[0])
    except StopIteration as stop:
        return stop.value, jobs


@pytest.mark.parametrize("density", [0.5, 1.0])
def test_chain_reproduces_golden(fbs_program, density):
    fp, x = fbs_program
    fp = fp.with_density(density)
    out, jobs = _golden_engine(fp, x)
    gold = run_fbs_golden(fp, x)
    assert out.env.keys() == gold.env.keys()
    for t in gold.env:
        assert torch.equal(out.env[t], gold.env[t]), t
    for g in fp.gates:
        for f in ("scale", "active", "bias"):
            assert torch.equal(getattr(out, f)[g.name], getattr(gold, f)[g.name]), (g.name, f)
        assert [j.image for j in jobs if j.gate == g.name] == list(range(len(x)))
        for i, layer in enumerate(out.layers[g.name]):
            assert layer.out_channels == int(gold.active[g.name][i].sum())
            assert layer.mode == "fbs" and layer.name == f"{g.name}/img{i}"


def test_host_step_matches_golden(fbs_program):
    fp, x = fbs_program
    gold = run_fbs_golden(fp, x)
    for g in fp.gates:
        scale, active, bias = fbs_host_step(fp, g.name, gold.env[g.input])
        assert torch.equal(scale, gold.scale[g.name]) and torch.equal(active, gold.active[g.name])
        assert torch.equal(bias, gold.bias[g.name])
    with pytest.raises(ValueError, match="conv2.*N, C, H, W"):
        fbs_host_step(fp, "conv2", gold.env["conv1"][0])
