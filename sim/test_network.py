"""Whole-network co-simulation from a deploy folder: the digits-trained, KL-calibrated
ResNet-20 exported with ``dynacc.sw.export``, then test images through the RTL engine with
weights and exponents ``$readmemh``'d from the deploy folder, host steps between layers and
every layer fed by the previous RTL outputs. Bit-exact at every layer, same predictions as
the golden model, RTL cycles == ``conv_cycles`` for every layer. Shares the default engine
build with ``test_conv_engine.py``."""

from __future__ import annotations

import numpy as np
import pytest

from dynacc.hw.config import load_named
from dynacc.hw.cycles import conv_cycles
from dynacc.quant.calibrate import calibrate
from dynacc.quant.flow import cached_digits_model, calibration_batches
from dynacc.quant.formats import QuantConfig
from dynacc.sim.network import check_network, run_network
from dynacc.sw.export import export_program
from dynacc.sw.reader import load_deploy

DEFAULT = load_named("default")
N_IMAGES = 24


@pytest.fixture(scope="module")
def digits_resnet20(tmp_path_factory):
    model, splits = cached_digits_model("resnet20")
    shapes: dict = {}
    program = calibrate(model, calibration_batches(splits.train, 100), QuantConfig(method="kl"),
                        progress=False, shapes=shapes)
    path = tmp_path_factory.mktemp("deploy") / "resnet20-digits"
    export_program(path, program, shapes, DEFAULT, model="resnet20", dataset="digits")
    x, y = next(iter(splits.test))
    return program, load_deploy(path, DEFAULT), x[:N_IMAGES], y[:N_IMAGES]


def test_resnet20_digits_whole_network_on_rtl(digits_resnet20):
    program, dep, x, y = digits_resnet20
    res = run_network(dep, x)
    chk = check_network(program, res, x)
    chk.assert_ok()        # first mismatch: image, layer, channel, y, x, RTL and golden values
    assert chk.total_layers == len(dep.layers) == 22
    assert chk.bit_exact_layers == chk.total_layers
    assert all(h.exact for h in chk.host)
    np.testing.assert_array_equal(chk.rtl_pred, chk.golden_pred)
    for l in dep.layers:
        model = conv_cycles(DEFAULT, in_channels=l.in_channels, out_channels=l.out_channels,
                            out_height=l.out_height, out_width=l.out_width, kernel_h=l.kernel,
                            kernel_w=l.kernel)
        assert res.cycles[l.name].tolist() == [model] * N_IMAGES, l.name
    # the network classifies: the golden model is right on most test images
    assert (chk.golden_pred == y.numpy()).mean() > 0.8

    # the comparison is not vacuous: one flipped RTL element is reported where it is
    name = dep.layers[5].output
    rtl = res.acts[name]
    rtl[3, 7, 2, 1] += 1
    bad = check_network(program, res, x)
    assert bad.bit_exact_layers == chk.total_layers - 1
    with pytest.raises(AssertionError, match=rf"image 3: layer '{name}': output channel 7, y 2, "
                                             rf"x 1: RTL {int(rtl[3, 7, 2, 1])} != golden "
                                             rf"{int(rtl[3, 7, 2, 1]) - 1} \(1 of \d+ elements"):
        bad.assert_ok()


def test_a_corrupted_deploy_folder_is_refused_before_simulation(digits_resnet20, tmp_path):
    import shutil

    from dynacc.sw.reader import DeployError

    _, dep, x, _ = digits_resnet20
    bad = tmp_path / "bad"
    shutil.copytree(dep.path, bad)
    p = bad / dep.layers[3].memories["wgt"]["file"]
    p.write_text(p.read_text().replace("0", "1", 1))
    with pytest.raises(DeployError, match="sha256 mismatch"):
        run_network(bad, x[:1])
