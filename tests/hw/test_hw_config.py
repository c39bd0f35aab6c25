"""HwConfig: YAML loading, checks that name the bad field, derived quantities."""

from __future__ import annotations

import pytest

from dynacc.hw.address_gen import SETUP_CYCLES
from dynacc.hw.config import HwConfig, load_named
from dynacc.hw.cycles import conv_cycles, conv_steps, engine_latency, ideal_cycles


def test_repo_configs_load():
    d = load_named("default")
    assert (d.lanes, d.mantissa_bits, d.macs_per_cycle) == (16, 8, 256)
    assert d.fmt.max_mantissa == 127
    s = load_named("small")
    assert s.lanes == 4


def test_unknown_field(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("lanes: 8\nlane_count: 3\n")
    with pytest.raises(ValueError, match=r"x.yaml: unknown HwConfig field\(s\): \['lane_count'\]"):
        HwConfig.from_yaml(p)


@pytest.mark.parametrize("text, exc, msg", [
    ("lanes: 0", ValueError, r"'lanes' must be \[1, 64\], not 0"),
    ("lanes: '16'", TypeError, r"'lanes' must be an integer, not '16'"),
    ("mantissa_bits: 1", ValueError, r"'mantissa_bits'"),
    ("acc_bits: 24", ValueError, r"'acc_bits' = 24 cannot hold the worst-case"),
    ("name: 'a b'", ValueError, r"'name' must be an identifier"),
])
def test_bad_fields(tmp_path, text, exc, msg):
    p = tmp_path / "bad.yaml"
    p.write_text(text + "\n")
    with pytest.raises(exc, match=msg):
        HwConfig.from_yaml(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HwConfig.from_yaml(tmp_path / "nope.yaml")


def test_cycle_model():
    cfg = load_named("default")
    kw = dict(in_channels=64, out_channels=64, out_height=56, out_width=56, kernel_h=3,
              kernel_w=3)
    steps = conv_steps(cfg, **kw)
    assert steps == 56 * 56 * 4 * 9 * 4
    assert conv_cycles(cfg, **kw) == steps + SETUP_CYCLES + engine_latency(cfg)
    assert ideal_cycles(cfg, **kw) == steps   # C, O multiples of K: 100 % of the array
    # the stem as an im2col 1x1 conv: C' = 147 -> CW = 10 words of which 9.1875 are useful
    stem = dict(in_channels=147, out_channels=64, out_height=112, out_width=112, kernel_h=1,
                kernel_w=1)
    assert conv_steps(cfg, **stem) == 112 * 112 * 4 * 10
