"""The accelerators we plan for: peak FLOP/s per dtype, memory, and link bandwidths.

One table (`DEVICE_SPECS`), read by `flops.py` (the peak behind MFU), `plan.py` (fits,
step time, days) and the tests. Every number is the vendor's datasheet value; the
sources are listed in docs/PLANNING.md ("Hardware table"), one line per entry here.

Conventions (the datasheets mix them, so they are fixed here):
- peak FLOP/s are *dense* tensor-core rates (NVIDIA prints the 2:4-sparsity figure,
  twice the dense one, in its headline column); float32 means TF32 tensor cores on
  GPUs, which is what XLA uses for float32 matmuls at default precision;
- bandwidths are bytes/s in *one* direction: NVIDIA's "NVLink 900 GB/s" counts both
  directions, so H100's is 450e9 here; a node's network is the sum of its compute
  NICs (DGX H100: eight 400 Gb/s ConnectX-7 = 400e9 B/s);
- `hbm_bytes` is the marketed capacity (80 GB = 80e9 bytes, 32 GiB = 32·2³⁰).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """One accelerator model and the node it usually comes in.

    name: what plans and error messages call it ("H100 80GB").
    kind_patterns: substrings of jax's `device.device_kind` that identify it, tried in
      table order ("NVIDIA H100 80GB HBM3" contains "H100 80GB").
    peak_flops: dense peak FLOP/s per compute dtype name.
    intra_node_bytes_per_s: per device, one direction (NVLink; TPU: ICI).
    inter_node_bytes_per_s: per node, one direction (the compute NICs; TPU: DCN per host).
      Either is None where no primary source gives it (no link time is estimated).
    devices_per_node: devices sharing that node network (a DGX/HGX board: 8).
    """

    name: str
    kind_patterns: tuple[str, ...]
    peak_flops: Mapping[str, float]
    hbm_bytes: float
    hbm_bytes_per_s: float
    intra_node_bytes_per_s: float | None
    inter_node_bytes_per_s: float | None
    devices_per_node: int

    def peak(self, dtype: str = "bfloat16") -> float:
        if dtype not in self.peak_flops:
            raise ValueError(f"{self.name}: no peak for dtype {dtype!r}; the table has "
                             f"{sorted(self.peak_flops)}.")
        return self.peak_flops[dtype]


def _gpu(bf16: float, tf32: float) -> dict[str, float]:
    return {"bfloat16": bf16, "float16": bf16, "float32": tf32}


def _tpu(bf16: float) -> dict[str, float]:
    # At jax's default precision a TPU runs a float32 matmul as one bfloat16 pass.
    return {"bfloat16": bf16, "float32": bf16}


_GB, _GIB = 1e9, 2.0**30

DEVICE_SPECS: tuple[DeviceSpec, ...] = (
    # A100 datasheet (NVIDIA, 2021): BF16 312 TF dense, TF32 156 TF dense, NVLink 600 GB/s
    # both ways; 80GB: HBM2e 2,039 GB/s, 40GB: HBM2 1,555 GB/s. DGX A100: eight
    # 200 Gb/s HDR InfiniBand compute ports.
    DeviceSpec("A100 80GB", ("A100-SXM4-80GB", "A100 80GB", "A100-SXM-80GB"),
               _gpu(312e12, 156e12), 80 * _GB, 2039e9, 300e9, 200e9, 8),
    DeviceSpec("A100 40GB", ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB", "A100"),
               _gpu(312e12, 156e12), 40 * _GB, 1555e9, 300e9, 200e9, 8),
    # H100 datasheet (NVIDIA, 2023). PCIe and NVL first: "H100" alone means SXM.
    # PCIe: BF16 756 TF, TF32 378, 2.0 TB/s, NVLink bridge 600 GB/s. NVL: BF16 835,
    # TF32 418 (half of the sparse 835), 94 GB, 3.9 TB/s, NVLink 600 GB/s.
    DeviceSpec("H100 PCIe", ("H100 PCIe",), _gpu(756e12, 378e12), 80 * _GB, 2000e9,
               300e9, 400e9, 8),
    DeviceSpec("H100 NVL", ("H100 NVL",), _gpu(835e12, 418e12), 94 * _GB, 3900e9,
               300e9, 400e9, 8),
    # H100 SXM: BF16 989 TF dense (1,979 sparse), TF32 494, HBM3 80 GB at 3.35 TB/s,
    # NVLink 900 GB/s both ways. DGX H100: eight 400 Gb/s NDR ConnectX-7 ports.
    DeviceSpec("H100 80GB", ("H100",), _gpu(989e12, 494e12), 80 * _GB, 3350e9,
               450e9, 400e9, 8),
    # H200 datasheet (NVIDIA, 2024): the H100 SXM's compute and NVLink, HBM3e 141 GB at
    # 4.8 TB/s; DGX H200 keeps DGX H100's eight 400 Gb/s ports.
    DeviceSpec("H200 141GB", ("H200",), _gpu(989e12, 494e12), 141 * _GB, 4800e9,
               450e9, 400e9, 8),
    # Cloud TPU system architecture pages (Google Cloud, "TPU v4", "TPU v5e", "TPU v5p"):
    # peak bf16 per chip, HBM, bidirectional ICI per chip (halved here), DCN per host.
    # v4: 275 TF, 32 GiB at 1,200 GB/s (its ICI and DCN rates are not on that page: the
    # plan reports no link times for it). v5e: 197 TF, 16 GB at 819 GB/s, ICI 400 GB/s,
    # 8 chips and 2 x 100 Gb/s NICs per host. v5p: 459 TF, 95 GiB at 2,765 GB/s,
    # ICI 1,200 GB/s, DCN 50 Gb/s per chip, 4 chips per host.
    DeviceSpec("TPU v4", ("TPU v4",), _tpu(275e12), 32 * _GIB, 1200e9,
               None, None, 4),
    DeviceSpec("TPU v5e", ("TPU v5 lite", "TPU v5e"), _tpu(197e12), 16 * _GB,
               819e9, 200e9, 25e9, 8),
    DeviceSpec("TPU v5p", ("TPU v5p", "TPU v5"), _tpu(459e12), 95 * _GIB,
               2765e9, 600e9, 25e9, 4),
)

# The device kinds a plan judges by default: the GPUs people rent for LLM training.
DEFAULT_PLAN_DEVICES = ("A100 40GB", "A100 80GB", "H100 80GB", "H200 141GB")


def known_names() -> list[str]:
    return [spec.name for spec in DEVICE_SPECS]


def spec(name: str) -> DeviceSpec:
    """The table entry called `name` ("H100 80GB"); a clear error listing the known ones."""
    for entry in DEVICE_SPECS:
        if entry.name == name:
            return entry
    near = difflib.get_close_matches(name, known_names(), n=2, cutoff=0.4)
    hint = f" Did you mean {' or '.join(map(repr, near))}?" if near else ""
    raise ValueError(f"Unknown device kind {name!r}; known: {known_names()}.{hint} Add a "
                     "row with its datasheet numbers to hardware.DEVICE_SPECS.")


def spec_for_device_kind(device_kind: str) -> DeviceSpec | None:
    """The entry whose pattern `device_kind` contains (jax's name for the device), or
    None for a device the table does not know (CPU, an unlisted GPU)."""
    for entry in DEVICE_SPECS:
        if any(pattern in device_kind for pattern in entry.kind_patterns):
            return entry
    return None
