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
