"""``make gen MODEL=cg_resnet20``: the digits-trained Channel Gating ResNet-20 (cached in
build/cache, trained on first use) maps its 9 CG convs onto the dual-precision engine (mode
``cg``), emits both engines and reports gate outcomes and speed-ups."""

import json

import pytest
import torch

from dynacc.gen import pipeline
from dynacc.gen.cli import main as gen_main
from dynacc.gen.engine_layers import dual_layer
from dynacc.gen.layer_program import MappingError
from dynacc.hw.config import load_named
from dynacc.hw.cycles import dual_conv_cycles
from dynacc.quant.flow import load_data

HW = load_named("dual")
IMAGES = 6      # gate report images (make gen uses pipeline.GATE_REPORT_IMAGES = 50)


@pytest.fixture(scope="module")
def cg_gen(tmp_path_factory):
    """The ``make gen`` command line on cg_resnet20 into a temporary folder, with a short
    gate report; its GenState comes from the same pipeline steps."""
    out = tmp_path_factory.mktemp("gen") / "cg_resnet20"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "GATE_REPORT_IMAGES", IMAGES)
        assert gen_main(["--model", "cg_resnet20", "--out", str(out)]) == 0
        st = pipeline.run(pipeline.GenOptions(model="cg_resnet20", hw=HW, out_dir=out.parent /
                                              "steps"),
                          steps=["model", "calibrate", "layer_program"])
    splits = load_data("resnet20", "digits", seed=0)
    images = torch.cat([x for x, _ in splits.test])[:IMAGES]
    return out, st, images


def _shape(l):  # noqa: ANN001, ANN202
    return dict(in_channels=l.in_channels, out_channels=l.out_channels, out_height=l.out_height,
                out_width=l.out_width, kernel_h=l.kernel, kernel_w=l.kernel)


def test_cg_layers_map_onto_the_dual_engine_in_mode_cg(cg_gen):
    _, st, images = cg_gen
    prog, lp = st.program, st.layer_program
    dual = [l for l in lp.engine_layers if l.engine == "dual"]
    assert [l.name for l in dual] == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    for l in dual:
        assert (l.dp_mode, l.partitions, l.msb_bits, l.act_bits) == ("cg", 4, None, 8)
        assert l.residual is None and l.ideal_cycles == l.macs // HW.lanes ** 2
        all_pass = dual_conv_cycles(HW, **_shape(l), mode="cg", partitions=4,
                                    passed_counts=[l.out_height * l.out_width * HW.lanes]
                                    * l.tiles)
        none = dual_conv_cycles(HW, **_shape(l), mode="cg", partitions=4,
                                passed_counts=[0] * l.tiles)
        assert (l.cycles, l.cycles_msb) == (all_pass, none) and none < all_pass
    # the engine inputs of a CG layer reproduce the network's golden tensor and gates
    env = prog.run_golden(images[:1])
    acts = {k: v[0] for k, v in env.items()}
    for l in dual:
        dl = dual_layer(prog, l, acts)
        assert (dl.mode, dl.partitions) == ("cg", 4)
        y, passed = dl.golden(HW.fmt)
        op = prog.op(l.name)
        _, gp = prog.dual_precision_acc(op, env[op.inputs[0]])
        assert torch.equal(torch.as_tensor(y), env[l.name][0]), l.name
        assert torch.equal(torch.as_tensor(passed), gp[0]), l.name
    with pytest.raises(MappingError, match=r"layer 'layer1.0.conv1': a Channel Gating conv "
                                           r"runs gated .* not in mode 'msb'"):
        dual_layer(prog, dual[0], acts, mode="msb")


def test_gen_report_counts_cg_work_and_cycles(cg_gen):
    out, st, images = cg_gen
    assert (out / "rtl" / "dual_engine.v").stat().st_size > 0
    assert (out / "rtl" / "conv_engine.v").stat().st_size > 0
    rep = json.loads((out / "report.json").read_text())
    g = rep["gates"]
    assert g["images"] == IMAGES and len(g["layers"]) == 9
    prog, lp = st.program, st.layer_program
    env = prog.run_golden(images)
    layers = {l.name: l for l in lp.engine_layers}
    k = HW.lanes
    for x in g["layers"]:
        l, op = layers[x["name"]], prog.op(x["name"])
        _, passed = prog.dual_precision_acc(op, env[op.inputs[0]])
        f = float(passed.double().mean())
        cyc = [dual_conv_cycles(HW, **_shape(l), mode="cg", partitions=4,
                                passed_counts=[int(p[t * k:(t + 1) * k].sum())
                                               for t in range(l.tiles)]) for p in passed]
        mean = sum(cyc) / len(cyc)
        assert (x["technique"], x["partitions"]) == ("cg", 4)
        assert x["passed_fraction"] == pytest.approx(f, abs=1e-6) and 0.0 < f < 1.0
        assert x["theoretical_speedup"] == pytest.approx(1 / (1 / 4 + 3 / 4 * f), rel=1e-3)
        assert x["cycles_gated_mean"] == pytest.approx(mean, abs=0.05)
        assert x["cycle_speedup"] == pytest.approx(l.cycles / mean, rel=1e-3)
        assert x["cycles_msb"] < x["cycles_gated_mean"] < x["cycles_dense"] == l.cycles
        assert 0.85 < x["cycle_speedup"] / x["theoretical_speedup"] < 1.05
    t = g["totals"]
    net = sum(l.cycles for l in lp.engine_layers)
    assert t["network_cycles_dense"] == net == rep["totals"]["cycles"]
    assert t["network_cycles_gated_mean"] == pytest.approx(
        net - t["cycles_dense"] + t["cycles_gated_mean"], abs=0.1)
    assert 1.0 < t["network_cycle_speedup"] < t["cycle_speedup"]
    md = (out / "report.md").read_text()
    assert "## Gates" in md and "Channel Gating (p = 4) outcomes" in md
    assert "1 / (1/p + (1 - 1/p) · passed fraction)" in md and "Precision Gating" not in md
    assert "**Whole network:" in md
    assert "| layer1.0.conv1 (Channel Gating p=4, 8-bit input;" in md
    assert "Channel Gating layers run on the dual-precision engine" in md
    assert "an MSB pass over every output" not in md     # the PG paragraph
    # the gated plots: CG speed-ups, not the PG / DFS accuracy sweep
    assert "![gate_speedups](gate_speedups.png)" in md and "Per CG layer" in md
    assert "accuracy_vs_compute" not in md
    assert (out / "gate_speedups.png").read_bytes()[:4] == b"\x89PNG"
