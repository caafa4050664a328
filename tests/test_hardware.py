"""The accelerator table: lookups by name and by jax's device_kind, and its errors."""

import pytest

from t5x_like.model import hardware


@pytest.mark.parametrize("device_kind,name", [
    ("NVIDIA H100 80GB HBM3", "H100 80GB"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 141GB"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
    ("TPU v4", "TPU v4"),
    ("TPU v5 lite", "TPU v5e"),
    ("TPU v5", "TPU v5p"),
])
def test_device_kinds_find_their_datasheet(device_kind, name):
    assert hardware.spec_for_device_kind(device_kind).name == name


@pytest.mark.parametrize("device_kind", ["NVIDIA H800", "NVIDIA B200", "NVIDIA L40S", "cpu"])
def test_devices_the_table_lacks_are_none(device_kind):
    assert hardware.spec_for_device_kind(device_kind) is None


def test_the_default_plan_devices_and_their_sizes():
    sizes = {n: hardware.spec(n).hbm_bytes / 1e9 for n in hardware.DEFAULT_PLAN_DEVICES}
    assert sizes == {"A100 40GB": 40, "A100 80GB": 80, "H100 80GB": 80, "H200 141GB": 141}
    h100 = hardware.spec("H100 80GB")
    # Datasheet "NVLink 900 GB/s" counts both directions; DGX H100: 8 x 400 Gb/s NICs.
    assert (h100.intra_node_bytes_per_s, h100.inter_node_bytes_per_s) == (450e9, 400e9)
    assert h100.peak("bfloat16") == 989e12 and h100.peak("float32") == 494e12


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown device kind 'H100 94GB'; known: \[.*"
                                         r"'H100 80GB'.*Did you mean"):
        hardware.spec("H100 94GB")
    with pytest.raises(ValueError, match=r"TPU v5e: no peak for dtype 'float16'"):
        hardware.spec("TPU v5e").peak("float16")
