"""Mapping of dual-precision (PG / DFS) layers onto the dual-precision engine."""

import dataclasses

import pytest
import torch

from dynacc.gen.engine_layers import dual_layer
from dynacc.gen.gate_report import gate_statistics, gates_markdown
from dynacc.gen.layer_program import MappingError, build_layer_program
from dynacc.hw.config import load_named
from dynacc.hw.cycles import dual_conv_cycles
from dynacc.quant.calibrate import calibrate
from dynacc.quant.data import random_images
from dynacc.quant.formats import BFPFormat, QuantConfig
from dynacc.quant.models import build_model

HW = load_named("dual")
SHAPE = (1, 16, 16)


def _gated_program(act_bits=3, msb_bits=2):
    """A calibrated resnet20 whose block conv1 layers are made dual-precision by hand: their
    producers clamp to unsigned act_bits bits (rule G0) and thresholds sit at the median MSB
    partial sum of a calibration image, so about half of the outputs pass."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1)
    model.train()
    with torch.no_grad():
        model(random_images(4, SHAPE, seed=1))
    shapes = {}
    cfg = dataclasses.replace(QuantConfig(method="max"), fmt=BFPFormat(9, 8))
    prog = calibrate(model.eval(), [random_images(2, SHAPE, seed=2)], cfg, progress=False,
                     shapes=shapes)
    x = random_images(1, SHAPE, seed=3)
    for op in prog.ops:
        if op.kind == "conv" and op.name.endswith(".conv1") and op.name.startswith("layer"):
            producer = prog.op(op.inputs[0])
            producer.activation = "pact"
            producer.clamp_max = torch.full((shapes[producer.name][0],), (1 << act_bits) - 1)
            op.dp_act_bits, op.dp_msb_bits, op.dp_mode = act_bits, msb_bits, "msb"
            env = prog.run_golden(x)
            acc, _ = prog.dual_precision_acc(op, env[op.inputs[0]], mode="msb")
            op.dp_threshold = (acc - op.bias[None, :, None, None]).transpose(0, 1).reshape(
                acc.shape[1], -1).median(dim=1).values
            op.dp_sign = torch.ones(acc.shape[1], dtype=torch.int64)
            op.dp_mode = "gated"
    return prog, shapes


@pytest.fixture(scope="module")
def gated():
    return _gated_program()


def test_dual_layers_map_onto_the_dual_engine_with_both_cycle_bounds(gated):
    prog, shapes = gated
    lp = build_layer_program("resnet20", prog, shapes, HW)
    dual = [l for l in lp.engine_layers if l.engine == "dual"]
    assert [l.name for l in dual] == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    for l in dual:
        shape = dict(in_channels=l.in_channels, out_channels=l.out_channels,
                     out_height=l.out_height, out_width=l.out_width, kernel_h=3, kernel_w=3)
        assert l.cycles == dual_conv_cycles(HW, **shape, mode="full")
        assert l.cycles_msb == dual_conv_cycles(HW, **shape, mode="msb") < l.cycles
        assert (l.act_bits, l.msb_bits, l.dp_mode) == (3, 2, "gated")
        assert l.residual is None            # no residual add is fused into a dual conv
    d = lp.to_dict()
    assert any(s.get("engine", {}).get("engine") == "dual" for s in d["steps"])


def test_dual_layer_inputs_equal_the_golden_tensors(gated):
    prog, shapes = gated
    lp = build_layer_program("resnet20", prog, shapes, HW)
    env = prog.run_golden(random_images(1, SHAPE, seed=9))
    l = next(l for l in lp.engine_layers if l.engine == "dual")
    acts = {k: v[0] for k, v in env.items()}
    dl = dual_layer(prog, l, acts)
    assert int(dl.x.max()) <= 7 and int(dl.x.min()) >= 0
    y, passed = dl.golden(HW.fmt)
    assert torch.equal(torch.as_tensor(y), env[l.name][0])
    assert dual_layer(prog, l, acts, mode="msb").mode == "msb"


def test_gate_statistics_cycles_lie_between_the_bounds(gated):
    prog, shapes = gated
    lp = build_layer_program("resnet20", prog, shapes, HW)
    g = gate_statistics(prog, lp, random_images(3, SHAPE, seed=4), HW)
    assert len(g["layers"]) == 9 and g["images"] == 3
    for x in g["layers"]:
        assert x["cycles_msb"] <= x["cycles_gated_mean"] <= x["cycles_dense"]
        assert 0.0 <= x["passed_fraction"] <= 1.0
        assert x["theoretical_speedup"] == pytest.approx(2 / (1 + x["passed_fraction"]), rel=1e-3)
    assert "## Gates" in gates_markdown(g)


def test_wrong_mantissa_width_is_a_mapping_error(gated):
    prog, shapes = gated
    with pytest.raises(MappingError, match="M=9"):
        build_layer_program("resnet20", prog, shapes, load_named("small"))


def test_dfs_statistics_follow_the_forced_decisions():
    """Exact engine cycles of a DFS network for known decisions: all-full equals the dense
    total, all-skip leaves only the transition blocks' shortcut convs, all-msb the MSB pass."""
    from dynacc.gen.gate_report import dfs_markdown, dfs_statistics
    from dynacc.quant.dfs_program import build_dfs_program
    from dynacc.quant.flow import cached_digits_model, calibration_batches
    from dynacc.quant.train_dfs import make_dfs_model

    backbone, splits = cached_digits_model("resnet20")
    calib = calibration_batches(splits.train, 32)
    program, gate = build_dfs_program(make_dfs_model(backbone, "skip,4,8", calib), calib)
    images = calib[0][:3]
    env = program.run_golden(images[:1])
    shapes = {n: tuple(t.shape[1:]) for n, t in env.items()}
    lp = build_layer_program("dfs", program, shapes, HW)
    layers = {l.name: l for l in lp.engine_layers}
    blocks = [b for b in gate.layout if b.gated]

    def total(mode):
        return sum(dual_conv_cycles(HW, in_channels=layers[c].in_channels,
                                    out_channels=layers[c].out_channels,
                                    out_height=layers[c].out_height,
                                    out_width=layers[c].out_width, kernel_h=layers[c].kernel,
                                    kernel_w=layers[c].kernel, mode=mode)
                   for b in blocks for c in b.convs)

    class Forced:
        """The trained gate's layout and options, with every decision forced to ``j``."""
        def __init__(self, j):
            self.layout, self.options, self.n_gated, self.j = gate.layout, gate.options, gate.n_gated, j

    import dynacc.quant.dfs_program as dp
    real = dp.run_dfs_golden

    def forced_run(program, g, x, decisions=None):
        return real(program, gate, x, torch.full((x.shape[0], gate.n_gated), g.j))

    dp.run_dfs_golden = forced_run
    try:
        full = dfs_statistics(program, Forced(2), lp, images, None, HW)
        msb = dfs_statistics(program, Forced(1), lp, images, None, HW)
        skip = dfs_statistics(program, Forced(0), lp, images, None, HW)
    finally:
        dp.run_dfs_golden = real
    assert full["totals"]["cycles_mean"] == full["totals"]["cycles_dense"] == total("full")
    assert msb["totals"]["cycles_mean"] == total("msb")
    shortcut_only = sum(dual_conv_cycles(HW, in_channels=layers[b.shortcut].in_channels,
                                         out_channels=layers[b.shortcut].out_channels,
                                         out_height=layers[b.shortcut].out_height,
                                         out_width=layers[b.shortcut].out_width,
                                         kernel_h=1, kernel_w=1, mode="full")
                        for b in blocks if b.shortcut)
    assert skip["totals"]["cycles_mean"] == shortcut_only
    assert (full["cp"], msb["cp"], skip["cp"]) == (100.0, 50.0, 0.0)
    assert all(b["share"]["4"] == 1.0 for b in msb["blocks"])
    assert "## DFS decisions" in dfs_markdown(msb)


def test_gated_plots_section(tmp_path, monkeypatch):
    from dynacc.gen import pipeline

    (tmp_path / "report.md").write_text("# m\n")
    rep = {"gates": {"images": 3, "layers": [
        {"name": "layer1.0.conv1", "theoretical_speedup": 1.6, "cycle_speedup": 1.58},
        {"name": "layer2.0.conv1", "theoretical_speedup": 1.4, "cycle_speedup": 1.37}]}}
    bench = tmp_path / "pg_dfs.json"
    monkeypatch.setattr(pipeline, "PG_DFS_BENCH", bench)
    pipeline._gated_plots(tmp_path, rep)
    md = (tmp_path / "report.md").read_text()
    assert "![gate_speedups](gate_speedups.png)" in md and "accuracy_vs_compute" not in md
    assert (tmp_path / "gate_speedups.png").read_bytes()[:4] == b"\x89PNG"
    bench.write_text('{"pg": [{"act_bits": 3, "msb_bits": 2, "acc": 97.0, "fp_acc": 96.0, '
                     '"avg_bits": 2.2}], "dfs": {"dfs": [{"measured_cp": 50, "acc": 98}], '
                     '"skip_only": [{"measured_cp": 51, "acc": 94}]}}')
    pipeline._gated_plots(tmp_path, rep)
    md = (tmp_path / "report.md").read_text()
    assert md.count("## Gated plots") == 1 and "![accuracy_vs_compute]" in md
    assert (tmp_path / "accuracy_vs_compute.png").exists()
    # a DFS report (no PG gates) gets the accuracy-vs-compute plot only, and nothing
    # without a bench result
    (tmp_path / "report.md").write_text("# dfs\n")
    pipeline._gated_plots(tmp_path, {"dfs": {"blocks": []}, "gates": {"layers": []}})
    md = (tmp_path / "report.md").read_text()
    assert "![accuracy_vs_compute]" in md and "gate_speedups" not in md
    bench.unlink()
    (tmp_path / "report.md").write_text("# dfs\n")
    pipeline._gated_plots(tmp_path, {"dfs": {"blocks": []}})
    assert (tmp_path / "report.md").read_text() == "# dfs\n"
