"""Graph tracing, BN folding, the integer program, golden vs fake-quant, checkpoints."""

import pytest
import torch
from torch import nn

from dynacc.quant.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dynacc.quant.formats import QuantConfig
from dynacc.quant.functional import tensor_shared_exponent
from dynacc.quant.graph import UnsupportedLayerError, fold_bn, trace
from dynacc.quant.models import build_model
from dynacc.quant.program import BFPProgram, build_program, iter_observed, quant_points


def settle_bn(model, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape, generator=g))
    return model.eval()


def max_program(model, x, cfg=QuantConfig(method="max")):
    """Calibrate with the plain max exponent (independent of the observer module)."""
    graph = trace(model)
    mx: dict[str, float] = {}
    ch = iter_observed(graph, [x], lambda p, t: mx.__setitem__(p, max(mx.get(p, 0.0),
                                                                      float(t.abs().max()))))
    exps = {p: torch.tensor([tensor_shared_exponent(torch.tensor(v), cfg.fmt)])
            for p, v in mx.items()}
    return graph, build_program(graph, cfg, exps, ch)


def test_bn_folding_matches_eval_mode_conv_bn():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    bn = nn.BatchNorm2d(5, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w, b = fold_bn(conv, bn)
    ref = bn.double()(conv.double()(x))
    got = torch.nn.functional.conv2d(x, w, b, padding=1)
    assert torch.allclose(ref, got, atol=1e-12)


def test_trace_structure_of_resnet20():
    g = trace(build_model("resnet20", num_classes=10, in_channels=1))
    kinds = [n.kind for n in g.nodes]
    assert kinds.count("conv") == 19 + 2  # 19 convs + 2 downsample convs
    assert kinds.count("add") == 9 and kinds.count("linear") == 1
    assert g.node("layer1.0.conv1").activation == "relu"
    assert g.node("layer1.0.conv2").activation is None  # feeds the add
    adds = [n for n in g.nodes if n.kind == "add"]
    assert all(a.activation == "relu" for a in adds)
    pts = quant_points(g)
    assert "layer1.0.conv2" not in pts and any(k.endswith(".joint") for k in pts)
    assert "fc" in pts  # the classifier is requantized (max rule R6)


class _Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.gelu = nn.GELU()

    def forward(self, x):
        return self.gelu(self.conv(x))


def test_unsupported_layer_error_names_the_layer():
    with pytest.raises(UnsupportedLayerError, match="'gelu'.*GELU"):
        trace(_Unsupported())


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(1, 2, 1)
        self.relu = nn.ReLU()
        self.c = nn.Conv2d(5, 4, 3, stride=2)

    def forward(self, x):
        return self.c(torch.cat([self.relu(self.a(x)), self.b(x)], 1))


@pytest.mark.parametrize("name,shape", [("resnet20", (1, 32, 32)), ("digits_net", (1, 8, 8)),
                                        ("mobilenet_v2", (3, 32, 32)), ("resnet18", (3, 32, 32))])
def test_golden_equals_fake_quant_in_float64(name, shape):
    torch.manual_seed(0)
    model = settle_bn(build_model(name, num_classes=10, in_channels=shape[0]), shape)
    x = torch.randn(4, *shape)
    graph, prog = max_program(model, x)
    env = prog.run_golden(x)
    fq = prog.fake_quant(x)
    for op in prog.ops:
        assert env[op.name].dtype == torch.int64
        got = prog.dequantize_output(op.name, env[op.name]).double()
        assert torch.equal(got, fq[op.name].double()), op.name
    logits = prog.logits(x)
    ref = graph.forward(x)
    cos = torch.nn.functional.cosine_similarity(logits.flatten(), ref.flatten(), dim=0)
    assert cos > 0.95  # untrained nets: only a sanity check; trained digits nets are tighter


def test_concat_model_runs_and_agrees():
    torch.manual_seed(1)
    x = torch.randn(3, 1, 9, 9)
    graph, prog = max_program(_Concat(), x)
    assert [o.kind for o in prog.ops].count("concat") == 1
    env = prog.run_golden(x)
    fq = prog.fake_quant(x)
    out = prog.output
    assert torch.equal(prog.dequantize_output(out, env[out]).double(), fq[out].double())


def test_program_state_round_trip(tmp_path):
    model = settle_bn(build_model("digits_net"), (1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    _, prog = max_program(model, x)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, "digits_net", {"num_classes": 10, "in_channels": 1}, model, prog,
                    meta={"fp_acc": 1.0})
    ck = load_checkpoint(path)
    assert ck.model_name == "digits_net" and ck.meta["fp_acc"] == 1.0
    a, b = prog.run_golden(x), ck.program.run_golden(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(ck.program, BFPProgram)
    for p, q in zip(model.state_dict().values(), ck.model.state_dict().values()):
        assert torch.equal(p, q)


def test_checkpoint_errors_name_file_and_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt.*cannot be read"):
        load_checkpoint(bad)
    sd = build_model("resnet20", num_classes=10, in_channels=1).state_dict()
    sdp = tmp_path / "sd.pt"
    torch.save(sd, sdp)
    with pytest.raises(CheckpointError, match="does not fit.*shape mismatch"):
        load_checkpoint(sdp, expect_model="resnet20")  # in_channels 3 by default
    model = build_model("digits_net")
    save_checkpoint(tmp_path / "d.pt", "digits_net", {}, model)
    with pytest.raises(CheckpointError, match="holds model 'digits_net', not 'resnet20'"):
        load_checkpoint(tmp_path / "d.pt", expect_model="resnet20")


def test_missing_exponent_is_reported():
    model = settle_bn(build_model("digits_net"), (1, 8, 8))
    graph = trace(model)
    with pytest.raises(ValueError, match="missing calibrated exponents"):
        build_program(graph, QuantConfig(), {}, {})


def test_network_output_uses_max_exponent_even_with_kl():
    from dynacc.quant.calibrate import calibrate
    from dynacc.quant.formats import QuantConfig
    model = settle_bn(build_model("digits_net"), (1, 8, 8))
    x = torch.randn(32, 1, 8, 8)
    prog = calibrate(model, [x], QuantConfig(method="kl"), progress=False)
    logits = trace(model).forward(x)
    assert int(prog.shared_exponents["fc"][0]) == tensor_shared_exponent(logits, prog.fmt)
    out = prog.run_golden(x)["fc"]
    assert int(out.abs().max()) < prog.fmt.max_mantissa + 1
