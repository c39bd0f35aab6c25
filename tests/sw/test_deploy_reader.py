"""load_deploy refuses bad folders with a message naming the file and the field."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml

from dynacc.hw.config import load_named
from dynacc.sw import fileformat as ff
from dynacc.sw.reader import DeployError, load_deploy


@pytest.fixture
def folder(resnet20_deploy, tmp_path) -> Path:
    dst = tmp_path / "dep"
    shutil.copytree(resnet20_deploy.path, dst)
    return dst


def _manifest(root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / ff.MANIFEST).read_text())


def rewrite_manifest(root: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Edit the manifest *and* reseal its checksum (a buggy or hostile producer)."""
    man = _manifest(root)
    man.pop(ff.CHECKSUM_KEY)
    mutate(man)
    text = yaml.safe_dump(man, sort_keys=False, default_flow_style=None, width=100)
    (root / ff.MANIFEST).write_text(ff.seal_manifest(text))


def rewrite_arrays(root: Path, mutate: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Edit arrays.npz and update its size and sha256 in a resealed manifest."""
    path = root / ff.ARRAYS
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    mutate(arrays)
    ff.write_npz(path, arrays)

    def fix(man: dict[str, Any]) -> None:
        man["files"][ff.ARRAYS] = {"size": path.stat().st_size, "sha256": ff.sha256_file(path)}
    rewrite_manifest(root, fix)


def _first_layer(root: Path) -> str:
    return next(s["engine"]["name"] for s in _manifest(root)["steps"] if "engine" in s)


def test_intact_folder_loads(folder):
    dep = load_deploy(folder, "default")
    assert dep.hw == load_named("default")
    load_deploy(folder, Path(__file__).resolve().parents[2] / "configs/hw/default.yaml",
                images=False)


def test_not_a_folder(tmp_path):
    with pytest.raises(DeployError, match="does not exist"):
        load_deploy(tmp_path / "nope")
    with pytest.raises(DeployError, match=r"no manifest\.yaml"):
        load_deploy(tmp_path)


@pytest.mark.parametrize("rel", ["wgt.bin", "arrays.npz", "model.h", "mem/003_layer1.1.conv1/align.mem"])
def test_corrupt_byte(folder, rel):
    p = folder / rel
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(DeployError, match=rf"{rel}: sha256 mismatch .*corrupted"):
        load_deploy(folder)


def test_truncated_file(folder):
    p = folder / "quant.bin"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DeployError, match=r"quant\.bin: size \d+ bytes, the manifest says"):
        load_deploy(folder)


@pytest.mark.parametrize("rel", ["bias.bin", "mem/000_conv1/wgt.mem", "arrays.npz"])
def test_missing_file(folder, rel):
    (folder / rel).unlink()
    with pytest.raises(DeployError, match=rf"{rel}: missing \(listed in manifest\.yaml\)"):
        load_deploy(folder)


def test_file_dropped_from_the_listing(folder):
    rewrite_manifest(folder, lambda m: m["files"].pop("mem/000_conv1/bias.mem"))
    with pytest.raises(DeployError, match=r"'mem/000_conv1/bias\.mem' is not listed"):
        load_deploy(folder)


def test_edited_manifest_fails_its_checksum(folder):
    p = folder / ff.MANIFEST
    text = p.read_text()
    m = re.search(r"cycles: (\d+)", text)
    assert m, "the manifest lists each layer's cycles"
    edited = text.replace(m.group(0), f"cycles: {int(m.group(1)) + 1}", 1)
    assert edited != text
    p.write_text(edited)
    with pytest.raises(DeployError, match=r"manifest\.yaml: checksum mismatch"):
        load_deploy(folder)
    p.write_text("\n".join(p.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DeployError, match=r"manifest\.yaml: no manifest_sha256 line"):
        load_deploy(folder)


def test_format_version(folder):
    rewrite_manifest(folder, lambda m: m.__setitem__("format_version", 99))
    with pytest.raises(DeployError, match=r"format_version 99: this dynacc reads version 1"):
        load_deploy(folder)


def test_wrong_hw_config(folder):
    with pytest.raises(DeployError, match=r"made for hardware config 'default', which differs "
                                          r"from the given config 'small' in lanes \(16 vs 4\), "
                                          r"mantissa_bits \(8 vs 6\), acc_bits \(48 vs 30\)"):
        load_deploy(folder, load_named("small"))
    with pytest.raises(DeployError, match=r"lanes \(16 vs 4\)"):
        load_deploy(folder, "small")


def test_same_hw_under_another_name_is_accepted(folder):
    import dataclasses
    load_deploy(folder, dataclasses.replace(load_named("default"), name="other"), images=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_a_float_field(folder, value):
    rewrite_manifest(folder, lambda m: m["tensors"]["input"].__setitem__("scale", value))
    with pytest.raises(DeployError, match=r"manifest\.yaml: float field tensors\.input\.scale "
                                          r"is (nan|inf|-inf) \(NaN/Inf are not allowed\)"):
        load_deploy(folder)


def test_nan_in_a_layer_float_field(folder):
    def mutate(m):
        m["steps"][1]["engine"]["utilization"] = float("nan")
    rewrite_manifest(folder, mutate)
    with pytest.raises(DeployError, match=r"float field steps\[1\]\.engine\.utilization is nan"):
        load_deploy(folder)


def test_nan_in_a_float_array(folder):
    rewrite_arrays(folder, lambda a: a.__setitem__("extra/scale", np.array([1.0, np.nan])))
    with pytest.raises(DeployError, match=r"arrays\.npz: 'extra/scale' holds NaN/Inf"):
        load_deploy(folder)


def test_block_exponent_out_of_range(folder):
    name = _first_layer(folder)

    def mutate(a):
        a[f"{name}/block_exp"] = a[f"{name}/block_exp"].copy()
        a[f"{name}/block_exp"][0, 0] = 200
    rewrite_arrays(folder, mutate)
    with pytest.raises(DeployError, match=rf"arrays\.npz: '{name}/block_exp' holds 8-bit exponent "
                                          r"200 outside \[-128, 127\]"):
        load_deploy(folder)


def test_tensor_exponent_out_of_range(folder):
    rewrite_manifest(folder, lambda m: m["tensors"]["conv1"].__setitem__("exponent", -129))
    with pytest.raises(DeployError, match=r"tensors\.conv1\.exponent = -129 outside the 8-bit "
                                          r"range \[-128, 127\]"):
        load_deploy(folder)


def test_layer_lsb_out_of_range(folder):
    def mutate(m):
        m["steps"][1]["engine"]["out_lsb"] = 200
    rewrite_manifest(folder, mutate)
    with pytest.raises(DeployError, match=r"layer 'conv1': out_lsb = 200 is exponent 206, "
                                          r"outside the 8-bit range"):
        load_deploy(folder)


def test_mantissa_out_of_range(folder):
    name = _first_layer(folder)

    def mutate(a):
        w = a[f"{name}/weight"].copy()
        w.flat[0] = -128
        a[f"{name}/weight"] = w
    rewrite_arrays(folder, mutate)
    with pytest.raises(DeployError, match=rf"'{name}/weight' holds mantissa -128 outside "
                                          r"\[-127, 127\]"):
        load_deploy(folder)


def test_descriptor_edit_is_caught(folder):
    def mutate(m):
        m["steps"][1]["engine"]["descriptor"]["stride"] = 2
    rewrite_manifest(folder, mutate)
    with pytest.raises(DeployError, match=r"layer 'conv1': descriptor_bits .* != packed"):
        load_deploy(folder)


def test_mem_and_bin_must_agree(folder):
    """A .mem file replaced (with a consistent sha256) by other valid words."""
    rel = "mem/000_conv1/bias.mem"
    p = folder / rel
    lines = p.read_text().splitlines()
    lines[0] = "0" * len(lines[0])
    p.write_text("\n".join(lines) + "\n")

    def fix(m):
        m["files"][rel] = {"size": p.stat().st_size, "sha256": ff.sha256_file(p)}
    rewrite_manifest(folder, fix)
    load_deploy(folder, images=False)       # integrity holds; the words are checked on load
    with pytest.raises(DeployError, match=r"bias\.bin: bytes \[0, 96\) differ from bias\.mem "
                                          r"of layer 'conv1'"):
        load_deploy(folder)
