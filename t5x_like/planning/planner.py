"""`python -m t5x_like.plan --gin_file=...`: an experiment on a GPU (or TPU) cluster,
planned on a CPU-only machine, without allocating a parameter.

Same gin files and `--gin.X` overrides as `python -m t5x_like.train`: the experiment's
model, mesh (gin_configs/meshes/), rule preset, batch, feature lengths and optimizer.
For them `plan` reports (docs/PLANNING.md says how each number is made):

1. per-device bytes of parameters, gradients and optimizer state, exact, from the
   abstract sharded train state (partitioning.abstract_sharded; memory.state_bytes);
2. an ahead-of-time compile of the real train step (train_state.make_train_step, lowered
   with ShapeDtypeStructs carrying the mesh's NamedShardings) on emulated CPU devices,
   or for a TPU topology with the TPU compiler, and its memory_analysis() and
   cost_analysis(); beside it the analytic activation estimate for the remat policy;
3. the collectives of the compiled step (collectives.py): count and bytes per step, by
   the mesh axes they run over, inside a node (NVLink / ICI) or across nodes;
4. per device kind (hardware.py): fits with what headroom, or what would fit
   (re-planned analytically: remat, microbatches, more fsdp, tensor, more nodes);
5. time per step (compute at a stated MFU plus the communication not hidden behind it)
   and days for the run's tokens.

A mesh larger than `PlanConfig.max_compile_devices` is compiled with fewer data-parallel
replicas across nodes (every device keeps its shard shapes and rows), and its
data-parallel collectives are scaled to the full data axis; the report names the method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5x_like import launch
from t5x_like.model import attention, hardware, partitioning
from t5x_like.planning import collectives, memory
from t5x_like.data import stream
from t5x_like.training import train_state

log = logging.getLogger("t5x_like.planning.planner")

_GB = 1e9
_REMAT_ORDER = ("none", "minimal", "full")


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """What the plan assumes and judges (gin: planner.PlanConfig).

    mfu: model FLOPs utilisation the step-time estimate assumes (PaLM convention);
      published large runs: 38-46% (docs/PLANNING.md).
    device_kinds: hardware.DEVICE_SPECS names to judge the plan on. A GPU's usable memory
      is the mesh preset's `MeshConfig.memory_fraction` of it, the fraction the run's
      start-up gives jax (`usable_fraction`).
    max_compile_devices: the most CPU devices one compile emulates; larger meshes are
      compiled with fewer data-parallel replicas.
    tpu_topology: e.g. "v5e:2x2": compile with the TPU compiler for that slice instead
      (needs the [tpu] extra, libtpu); the mesh must have its chip count.
    hlo_output: a file to write the compiled step's HLO text to (to compare it with
      another stack's: bench/hlo_bytes.py); None writes none.
    """

    mfu: float = 0.4
    device_kinds: Sequence[str] = hardware.DEFAULT_PLAN_DEVICES
    max_compile_devices: int = 512
    tpu_topology: str | None = None
    hlo_output: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "device_kinds", tuple(self.device_kinds))
        for name in self.device_kinds:
            hardware.spec(name)  # an unknown kind is an error listing the known ones
        if not 0 < self.mfu <= 1:
            raise ValueError(f"PlanConfig: mfu={self.mfu} must be in (0, 1], e.g. 0.4.")
        if self.max_compile_devices < 1:
            raise ValueError(f"PlanConfig.max_compile_devices={self.max_compile_devices} "
                             "must be >= 1.")


# ------------------------------------------------------------------- the compile mesh


@dataclasses.dataclass(frozen=True)
class CompileMesh:
    """The mesh the step is compiled on and how it relates to the planned one.

    shape, ici: global and per-node axis sizes of the compile mesh.
    data, data_nodes: (compiled, planned) size of the data axis, and the nodes it spans.
    batch_size: the compile's global batch (same rows per device as planned).
    """

    shape: dict[str, int]
    ici: dict[str, int]
    data: tuple[int, int]
    data_nodes: tuple[int, int]
    batch_size: int

    @property
    def reduced(self) -> bool:
        return self.data[0] != self.data[1]

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape.values())


def compile_mesh(mesh_config: partitioning.MeshConfig, batch_size: int,
                 max_devices: int) -> CompileMesh:
    """The planned mesh if it has at most `max_devices` devices; else the same mesh with
    the data axis across nodes cut to 2 nodes (1 if it has fewer), which leaves every
    device's parameter, optimizer and activation shapes and its rows as planned."""
    target, ici = mesh_config.global_shape, mesh_config.ici_shape
    dcn_data = target["data"] // ici["data"]
    if mesh_config.num_devices <= max_devices:
        return CompileMesh(dict(target), dict(ici), (target["data"],) * 2, (dcn_data,) * 2,
                           batch_size)
    kept = min(dcn_data, 2)
    shape = {**target, "data": ici["data"] * kept}
    if math.prod(shape.values()) > max_devices:
        raise ValueError(
            f"The mesh {target} needs {math.prod(shape.values())} devices even with its "
            f"data axis cut to {kept} node(s), more than max_compile_devices="
            f"{max_devices}; raise --gin.planner.PlanConfig.max_compile_devices or put "
            "more of the mesh on the data axis.")
    # Every data-parallel rank keeps its rows: batch / data of them.
    rows_per_replica = batch_size // target["data"]
    return CompileMesh(shape, dict(ici), (shape["data"], target["data"]), (kept, dcn_data),
                       rows_per_replica * shape["data"])


def _devices(cm: CompileMesh, config: PlanConfig) -> tuple[list[Any], str]:
    """(devices to compile for, backend label). CPU: emulated, set before jax starts."""
    if config.tpu_topology:
        return _tpu_devices(config.tpu_topology, cm.num_devices), "TPU compiler"
    launch.use_cpu_devices(cm.num_devices)
    cpus = jax.devices("cpu")
    if len(cpus) < cm.num_devices:
        raise ValueError(
            f"The plan compiles on {cm.num_devices} emulated CPU devices but jax started "
            f"with {len(cpus)}: run `python -m t5x_like.plan` in a fresh process (it sets "
            "the count before jax starts), or lower max_compile_devices.")
    return cpus[:cm.num_devices], "XLA:CPU"


def _tpu_devices(topology: str, needed: int) -> list[Any]:
    # Describing a topology uses no chip: let libtpu load beside another process that
    # holds its lockfile (a run on this TPU VM, or a test's jax starting with libtpu).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies  # noqa: PLC0415
        devices = topologies.get_topology_desc(topology_name=topology,
                                               platform="tpu").devices
    except Exception as error:  # noqa: BLE001 - libtpu missing or the name unknown
        raise ValueError(
            f"Cannot describe TPU topology {topology!r}: {error}. Install the TPU "
            "compiler with `pip install -e '.[tpu]'` and name a slice such as "
            "'v5e:2x2', 'v4:2x2x1' or 'v5p:2x2x1'.") from error
    if len(devices) != needed:
        raise ValueError(f"TPU topology {topology!r} has {len(devices)} chips but the mesh "
                         f"needs {needed}; pick a mesh or a topology that match.")
    return list(devices)


# ---------------------------------------------------------------------------- compile


def _stacks(model, lengths: Mapping[str, int]) -> dict[str, int]:
    """Positions per row of each layer stack (memory.activation_bytes' `stacks`)."""
    if "encoder_input_tokens" in model.data_form(lengths).model_features:
        return {"encoder": int(lengths["inputs"]), "decoder": int(lengths["targets"])}
    return {"decoder": model.tokens_per_example(lengths)}


def _compile(model, optimizer, mesh: Mesh, rules, batch_size: int,
             lengths: Mapping[str, int], num_microbatches: int):
    """(compiled train step, graphdef, abstract sharded state, seconds to compile)."""
    graphdef, state = train_state.abstract_train_state(model, optimizer.tx, mesh, rules)
    batch_sharding = partitioning.batch_sharding(mesh)
    batch = {name: jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=batch_sharding)
             for name, array in model.get_initial_batch(batch_size, lengths).items()}
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                               sharding=NamedSharding(mesh, PartitionSpec()))
    step = train_state.make_train_step(
        graphdef, model.loss_fn, optimizer.schedule, num_microbatches=num_microbatches,
        state_sharding=train_state.state_shardings(state), batch_sharding=batch_sharding,
        rules=rules)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch, key).compile()
    return compiled, graphdef, state, time.perf_counter() - start


def _compile_for(config: PlanConfig, *args):
    """`_compile(*args)`; for a TPU topology the lowering picks the TPU's attention
    kernels ('auto': splash), not this CPU host's."""
    with (attention.platform_for("tpu") if config.tpu_topology
          else contextlib.nullcontext()):
        try:
            return _compile(*args)
        except jax.errors.JaxRuntimeError as error:
            if not config.tpu_topology or "RESOURCE_EXHAUSTED" not in str(error):
                raise
            # The TPU compiler refuses a step whose buffers exceed the chip's HBM.
            raise ValueError(
                f"The step does not fit {config.tpu_topology}'s chips: the TPU compiler "
                f"says {str(error).splitlines()[0]} Give each chip fewer rows "
                "(BATCH_SIZE, NUM_MICROBATCHES), remat more (TransformerConfig."
                "remat_policy='full'), compute the loss in chunks (TransformerConfig."
                "loss_chunk_length) or plan a larger slice.") from error


def _hlo_text(compiled, output: str | None) -> str:
    """The compiled step's HLO text, also written to `output` (PlanConfig.hlo_output)."""
    hlo = compiled.as_text()
    if output:
        with open(output, "w") as f:
            f.write(hlo)
    return hlo


def _compiled_memory(compiled, backend: str) -> dict[str, Any]:
    """The compiled step's memory_analysis(). `peak` adds its parts up (the new state
    written over the donated one); `compiler_peak` is the compiler's own
    peak_memory_in_bytes (the live-buffer peak of its schedule: what the TPU compiler
    checks against HBM, below the sum because not every temporary is live at once);
    None where the backend does not report it."""
    stats = compiled.memory_analysis()
    arguments, outputs = stats.argument_size_in_bytes, stats.output_size_in_bytes
    aliased, temporaries = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    return {"backend": backend, "arguments": arguments, "outputs": outputs,
            "aliased": aliased, "temporaries": temporaries,
            "peak": arguments + outputs - aliased + temporaries,
            "compiler_peak": getattr(stats, "peak_memory_in_bytes", 0) or None}


# custom-call targets of the fused attention kernels in compiled HLO: splash is a Mosaic
# (Pallas TPU) kernel, cuDNN's flash attention a cuDNN fMHA call.
_KERNEL_CALLS = {"splash": 'custom_call_target="tpu_custom_call"',
                 "cudnn": 'custom_call_target="__cudnn$fmha'}


def compiled_attention(cfg, platform: str, hlo_text: str,
                       stacks: Mapping[str, int]) -> dict[str, Any]:
    """Which attention implementation the compiled step runs: the configured one, what
    it resolves to on `platform`, and how many of the kernel's calls the HLO holds
    ('xla' when there are none: 'auto' fell back, or the platform's kernel is XLA);
    `score_arrays`: how many arrays of the step are score-shaped (two dimensions of the
    stacks' lengths, [.., L, .., L] or [.., L, .., M]), and the largest's bytes."""
    kernel = attention.resolve(cfg.attention_impl, platform)
    calls = hlo_text.count(_KERNEL_CALLS[kernel]) if kernel in _KERNEL_CALLS else 0
    lengths = set(stacks.values())

    def score_shaped(shape) -> bool:
        return sum(d in lengths for d in shape) >= 2

    scores = [a for a in collectives.largest_arrays(hlo_text, None)
              if score_shaped(a["shape"])]
    return {"configured": cfg.attention_impl, "platform": platform,
            "compiled": kernel if calls else "xla", "kernel_calls": calls,
            "score_arrays": len(scores),
            "largest_score_array": max((a["bytes"] for a in scores), default=0)}


def plan_platform(config: PlanConfig) -> str:
    """The platform the plan is for: 'tpu' for a TPU topology or TPU device kinds only,
    else 'gpu' (the default device kinds); it picks the attention kernels."""
    if config.tpu_topology or all(k.startswith("TPU") for k in config.device_kinds):
        return "tpu"
    return "gpu"


def _compiled_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def _compiled_cost(compiled) -> dict[str, float | None]:
    """The compiler's cost analysis per device: bytes accessed and (the TPU compiler's
    only) optimal_seconds. Like its FLOPs, a while loop's body (the scan over layers)
    counts once (bench/tpu_aot.sh and MaxText's train_compile.py print these)."""
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return {key.replace(" ", "_"): float(cost[key]) if key in cost else None
            for key in ("bytes accessed", "optimal_seconds")}


def xla_train_flops(model, optimizer, batch_size: int, lengths: Mapping[str, int],
                    device=None) -> float:
    """XLA's cost-analysis FLOPs of one compiled train step of `model` on one device,
    layers unrolled and the fused loss in one chunk (XLA counts a loop's body once, not
    per iteration; the FLOPs are the same): the count `flops.py`'s conventions are
    checked against. Includes the optimizer update and elementwise work, which the
    conventions leave out."""
    unrolled = type(model)(dataclasses.replace(model.cfg, scan_layers=False,
                                               loss_chunk_length=0))
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                  [device or jax.devices()[0]])
    rules = partitioning.get_rules("fsdp")
    compiled = _compile(unrolled, optimizer, mesh, rules, batch_size, lengths, 1)[0]
    return _compiled_flops(compiled)


# ------------------------------------------------------------------ analytic memory


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run the experiment: the mesh (per node and across nodes), rule
    preset, remat policy and microbatches; the plan's own and each suggestion."""

    ici: dict[str, int]
    dcn: dict[str, int]
    rules: str
    remat_policy: str
    num_microbatches: int

    @property
    def sizes(self) -> dict[str, int]:
        return {a: self.ici[a] * self.dcn[a] for a in partitioning.MESH_AXES}

    @property
    def num_devices(self) -> int:
        return math.prod(self.sizes.values())


class _States:
    """Abstract sharded states per rule preset, built once on the compile mesh (their
    PartitionSpecs hold for any mesh sizes)."""

    def __init__(self, model, optimizer, mesh: Mesh, graphdef, state, rules: str):
        self._model, self._optimizer, self._mesh = model, optimizer, mesh
        self._by_rules = {rules: (state, train_state.params_of(graphdef, state))}

    def __call__(self, rules: str):
        if rules not in self._by_rules:
            graphdef, state = train_state.abstract_train_state(
                self._model, self._optimizer.tx, self._mesh, rules)
            self._by_rules[rules] = (state, train_state.params_of(graphdef, state))
        return self._by_rules[rules]


def analytic_memory(model, states: _States, variant: Variant, batch_size: int,
                    lengths: Mapping[str, int], gathered_per_row: float = 0.0,
                    kernels: Mapping[str, str] | None = None) -> dict[str, int]:
    """Per-device bytes of a variant: the state exactly, activations by formula.

    gathered_per_row: bytes per row of a microbatch that the compiled step gathers
      across the data-parallel axis at once (see `data_gathers`); they scale with the
      global rows of a microbatch, which neither formula nor a reduced compile shows.
    kernels: what runs each attention on the planned platform
      (memory.attention_kernels); default 'xla'.
    """
    state, params = states(variant.rules)
    sizes = variant.sizes
    param_bytes = memory.state_bytes(params, sizes)
    state_bytes = memory.state_bytes(state, sizes)
    micro_rows = batch_size // variant.num_microbatches
    split = memory.Split.of(variant.rules, sizes, micro_rows)
    activations = memory.activation_bytes(model.cfg, split, _stacks(model, lengths),
                                          variant.remat_policy, kernels)
    row_bytes = sum(a.nbytes for a in model.get_initial_batch(1, lengths).values())
    parts = {
        "parameters": param_bytes,
        # accumulation keeps a running sum beside each microbatch's gradients
        "gradients": param_bytes * (2 if variant.num_microbatches > 1 else 1),
        "optimizer": state_bytes - param_bytes,
        "activations": activations["total"],
        "gathered_weights": memory.gathered_weight_bytes(params, sizes),
        "inputs": row_bytes * split.rows * variant.num_microbatches,
        "gathered_across_data": int(gathered_per_row * micro_rows),
    }
    return {**parts, "total": sum(parts.values()),
            "activation_parts": {k: v for k, v in activations.items() if k != "total"}}


def _fits_checked(model, variant: Variant, batch_size: int) -> bool:
    """Whether the variant's mesh divides the model and the batch (no compile)."""
    try:
        partitioning.validate_for_mesh(model.make_module, memory.abstract_mesh(variant.sizes),
                                       variant.rules,
                                       batch_size=batch_size // variant.num_microbatches)
    except ValueError:
        return False
    return batch_size % variant.num_microbatches == 0


def _mesh_gin(variant: Variant, nodes: int) -> str:
    def shape(sizes):
        return "{" + ", ".join(f"'{a}': {n}" for a, n in sizes.items() if n != 1) + "}"

    text = f'--gin.partitioning.MeshConfig.shape="{shape(variant.ici)}"'
    if nodes > 1:
        text += (f" --gin.partitioning.MeshConfig.num_nodes={nodes}"
                 f' --gin.partitioning.MeshConfig.dcn_shape="{shape(variant.dcn)}"')
    return text + f" --gin.partitioning.MeshConfig.rules=\"'{variant.rules}'\""


def _with_microbatches(variant: Variant, batch_size: int) -> Variant | None:
    """`variant` with the most microbatches (at most its own) that still give every
    data-parallel rank whole rows; None if even one microbatch does not."""
    ways = variant.sizes["data"] * variant.sizes["fsdp"]
    for m in range(variant.num_microbatches, 0, -1):
        if batch_size % m == 0 and (batch_size // m) % ways == 0:
            return dataclasses.replace(variant, num_microbatches=m)
    return None


def _tensor_variants(base: Variant, devices_per_node: int, num_kv_heads: int | None = None
                     ) -> list[tuple[str, Variant]]:
    """Tensor parallelism 2, 4, 8 inside a node, taken from its FSDP (or data) ways; from
    a preset without tensor rules, the tensor preset for the model's kv heads (split
    with the query heads where they divide: partitioning.tensor_preset)."""
    out = []
    for tensor in (2, 4, 8):
        ici = dict(base.ici)
        take = "fsdp" if ici["fsdp"] * ici["tensor"] % tensor == 0 else "data"
        pool = ici[take] * ici["tensor"]
        if ici["tensor"] < tensor <= devices_per_node and pool % tensor == 0:
            ici.update({take: pool // tensor, "tensor": tensor})
            rules = (base.rules if "tp" in base.rules else
                     partitioning.tensor_preset(num_kv_heads, tensor) if num_kv_heads
                     else "fsdp_tp")
            out.append((f"tensor {tensor} inside a node ({rules})",
                        dataclasses.replace(base, ici=ici, rules=rules)))
    return out


def _node_variants(base: Variant, batch_size: int, label: str = ""
                   ) -> list[tuple[str, Variant]]:
    """2-64 times the nodes, FSDP across them; microbatches cut to keep whole rows."""
    out = []
    for factor in (2, 4, 8, 16, 32, 64):
        dcn = {**base.dcn, "fsdp": base.dcn["fsdp"] * factor}
        variant = _with_microbatches(dataclasses.replace(base, dcn=dcn), batch_size)
        if variant is not None:
            out.append((f"{label}{math.prod(dcn.values())} nodes ({variant.num_devices} "
                        f"devices), fsdp {variant.sizes['fsdp']}", variant))
    return out


def candidates(base: Variant, devices_per_node: int, batch_size: int,
               num_kv_heads: int | None = None) -> list[tuple[str, str, str, Variant]]:
    """(category, label, gin overrides, variant) of the changes a plan may suggest, in
    order of preference within each category; mesh changes keep devices per node."""

    def flags(variant: Variant) -> str:
        text = _mesh_gin(variant, math.prod(variant.dcn.values()))
        if variant.num_microbatches != base.num_microbatches:
            text += f" --gin.NUM_MICROBATCHES={variant.num_microbatches}"
        return text

    out = []
    priced = memory.priced_policy(base.remat_policy)
    for policy in _REMAT_ORDER[_REMAT_ORDER.index(priced) + 1:]:
        out.append(("remat", f"remat_policy '{policy}'",
                    f"--gin.layers.TransformerConfig.remat_policy=\"'{policy}'\"",
                    dataclasses.replace(base, remat_policy=policy)))
    for factor in (2, 4, 8, 16):
        m = base.num_microbatches * factor
        out.append(("microbatches", f"NUM_MICROBATCHES={m}", f"--gin.NUM_MICROBATCHES={m}",
                    dataclasses.replace(base, num_microbatches=m)))
    for factor in (2, 4, 8):  # data-parallel replicas become FSDP shards
        for part in ("dcn", "ici"):
            sizes = dict(getattr(base, part))
            if sizes["data"] % factor == 0:
                sizes.update(data=sizes["data"] // factor, fsdp=sizes["fsdp"] * factor)
                variant = dataclasses.replace(base, **{part: sizes})
                out.append(("fsdp", f"fsdp {variant.sizes['fsdp']} x data "
                            f"{variant.sizes['data']}", flags(variant), variant))
                break
    tensor = _tensor_variants(base, devices_per_node, num_kv_heads)
    out += [("tensor", label, flags(v), v) for label, v in tensor]
    out += [("nodes", label, flags(v), v) for label, v in _node_variants(base, batch_size)]
    both = [(label, v) for tensor_label, tensor_variant in tensor  # neither alone fits
            for label, v in _node_variants(tensor_variant, batch_size, f"{tensor_label} and ")]
    both.sort(key=lambda item: item[1].num_devices)  # the fewest devices that fit first
    return out + [("tensor+nodes", label, flags(v), v) for label, v in both]


# ------------------------------------------------------------ communication and time


def data_gathers(found: Sequence[collectives.Collective]) -> list[collectives.Collective]:
    """All-gathers across the data-parallel axis: a tensor split over the batch (the
    embedding gradient's cotangents, say) gathered whole. Their buffer grows with the
    data axis, so they must fit in memory at the planned size."""
    return [c for c in found if c.op == "all-gather" and "data" in c.mesh_axes]


def collective_rows(found: Sequence[collectives.Collective]) -> list[dict[str, Any]]:
    """The step's collectives grouped by kind, mesh axes and where they run; largest
    traffic first."""
    rows: dict[tuple, dict[str, Any]] = {}
    for c in found:
        where = ("inside a node" if c.nodes == 1 else
                 "across nodes" if c.group_size == c.nodes else "inside + across nodes")
        key = (c.op, c.priced_as, c.dtype, c.widened, c.mesh_axes, c.group_size, where)
        row = rows.setdefault(key, {"op": c.op, "priced_as": c.priced_as, "dtype": c.dtype,
                                    "widened_on_cpu": c.widened, "axes": list(c.mesh_axes),
                                    "group_size": c.group_size, "nodes": c.nodes,
                                    "where": where, "count": 0, "bytes_per_step": 0})
        row["count"] += c.count
        row["bytes_per_step"] += c.bytes_per_step
    return sorted(rows.values(), key=lambda r: -r["bytes_per_step"])


def step_time(spec: hardware.DeviceSpec, found: Sequence[collectives.Collective],
              step_flops: float, num_devices: int, dtype: str, mfu: float,
              extra_flops: float = 0.0) -> dict[str, float | None]:
    """Seconds per step on `spec` devices: compute at `mfu` of the peak, plus the
    communication not hidden behind it. Tensor-parallel collectives sit between the
    matmuls that need their results: all exposed. FSDP and data-parallel ones are
    prefetched or reduced while other layers compute (the latency-hiding scheduler):
    exposed only where they outlast the compute. extra_flops: work beyond the model
    FLOPs (the matmul-form embedding's), computed at the same MFU; the returned MFU
    counts model FLOPs only, so it lowers it."""
    model_s = step_flops / (num_devices * spec.peak(dtype) * mfu)
    compute = model_s + extra_flops / (num_devices * spec.peak(dtype) * mfu)
    tensor_s, other_s = 0.0, 0.0
    for c in found:
        seconds = collectives.seconds(c, spec.intra_node_bytes_per_s,
                                      spec.inter_node_bytes_per_s, spec.devices_per_node)
        if seconds is None:
            return {"compute_s": compute, "tensor_comm_s": None, "fsdp_data_comm_s": None,
                    "exposed_comm_s": None, "step_s": None, "mfu": None}
        if "tensor" in c.mesh_axes:
            tensor_s += seconds * c.count
        else:
            other_s += seconds * c.count
    exposed = tensor_s + max(0.0, other_s - compute)
    return {"compute_s": compute, "tensor_comm_s": tensor_s, "fsdp_data_comm_s": other_s,
            "exposed_comm_s": exposed, "step_s": compute + exposed,
            "mfu": mfu * model_s / (compute + exposed)}


def memory_fraction(mesh_config: partitioning.MeshConfig) -> dict[str, Any]:
    """The fraction of each GPU's memory a run on `mesh_config` gives jax, and where it
    comes from: the preset's MeshConfig.memory_fraction, which the run's start-up
    exports as XLA_PYTHON_CLIENT_MEM_FRACTION (launch.start_devices), else jax's default."""
    if mesh_config.memory_fraction is not None:
        return {"value": mesh_config.memory_fraction,
                "source": "the mesh preset's memory_fraction, which the run exports as "
                          f"{partitioning.MEMORY_FRACTION_ENV}"}
    return {"value": partitioning.JAX_DEFAULT_MEMORY_FRACTION,
            "source": "jax's default: the mesh preset sets no memory_fraction"}


def usable_fraction(spec: hardware.DeviceSpec, fraction: float) -> float:
    """Of `spec`'s memory, what a step may use: on a GPU the memory fraction jax's
    allocator takes; on a TPU all of it (jax reserves no fraction there; the TPU compiler
    refuses a program larger than the chip's memory)."""
    return 1.0 if spec.name.startswith("TPU") else fraction


def _judge(spec: hardware.DeviceSpec, need: int, fraction: float) -> dict[str, Any]:
    usable = spec.hbm_bytes * usable_fraction(spec, fraction)
    return {"hbm_gb": spec.hbm_bytes / _GB, "usable_fraction": usable_fraction(spec, fraction),
            "usable_gb": usable / _GB, "need_gb": need / _GB, "fits": need <= usable,
            "headroom_gb": (usable - need) / _GB}


def _suggestions(spec: hardware.DeviceSpec, options, fraction: float
                 ) -> list[dict[str, Any]]:
    """The first change of each kind that fits on `spec` (analytic re-plan)."""
    out, seen = [], set()
    usable = spec.hbm_bytes * usable_fraction(spec, fraction)
    for category, label, gin_flags, need in options:
        if category not in seen and need <= usable:
            seen.add(category)
            out.append({"change": label, "gin": gin_flags, "need_gb": need / _GB})
    return out


# --------------------------------------------------------------------- the entry point


def _base_variant(model, mesh_config: partitioning.MeshConfig, batch_size: int,
                  num_microbatches: int) -> Variant:
    """The planned variant, checked before anything is compiled or allocated: the
    batch splits into microbatches, and sizes and batch divide by the mesh."""
    if num_microbatches < 1 or batch_size % num_microbatches:
        raise ValueError(f"BATCH_SIZE={batch_size} must split into NUM_MICROBATCHES="
                         f"{num_microbatches} equal microbatches; pick a divisor.")
    partitioning.validate_for_mesh(
        model.make_module, memory.abstract_mesh(mesh_config.global_shape),
        mesh_config.rules, batch_size=batch_size // num_microbatches)
    dcn = dict(zip(partitioning.MESH_AXES, mesh_config.dcn_shape or (1, 1, 1)))
    return Variant(mesh_config.ici_shape, dcn, mesh_config.rules,
                   model.cfg.remat_policy, num_microbatches)


def _method(cm: CompileMesh, mesh_config, backend: str, seconds: float) -> str:
    text = f"compiled on {cm.num_devices} {backend} devices in {seconds:.1f} s"
    if not cm.reduced:
        return text + " (the planned mesh itself)"
    return (f"{text}: the planned mesh with data {cm.shape['data']} instead of "
            f"{mesh_config.global_shape['data']} (same shards and rows per device); "
            f"data-parallel collectives scaled to {mesh_config.global_shape['data']}")


@dataclasses.dataclass(frozen=True)
class _HostDevice:
    """What a mesh's device array needs of a device (`data_layouts` has none)."""

    id: int
    process_index: int
    slice_index: int  # its node
    platform: str = "gpu"
    device_kind: str = ""


def data_layouts(mesh_config: partitioning.MeshConfig, data, evaluation=None
                 ) -> dict[str, Any]:
    """How the run's rows split over its processes when started one process per node
    (all of its devices) or one per device (`srun` with a task per GPU): the processes,
    the groups of them that read different rows (processes holding replicas read the
    same), the stream shards (`train.DataConfig.stream_shards` or its default) and the
    eval batch; a layout whose processes the shards cannot split has an "error"."""
    n, nodes = mesh_config.num_devices, mesh_config.nodes
    per_node = n // nodes
    out: dict[str, Any] = {}
    for name, process_of in (("process per node", lambda i: i // per_node),
                             ("process per device", lambda i: i)):
        devices = [_HostDevice(i, process_of(i), i // per_node) for i in range(n)]
        rows = partitioning.rows_of_processes(mesh_config.device_array(devices),
                                              partitioning.MESH_AXES, data.batch_size)
        shards = stream.shard_count(data.stream_shards, data.batch_size, rows[0].groups)
        out[name] = {"processes": len(rows), "row_groups": rows[0].groups,
                     "rows_per_process": rows[0].num_rows, "stream_shards": shards,
                     "shards_per_process": shards // rows[0].groups}
        try:
            for process_rows in rows.values():
                stream.shards_for_rows(shards, data.batch_size, process_rows.ranges)
        except ValueError as e:
            out[name]["error"] = str(e)
    if evaluation is not None and evaluation.enabled:
        batch_shards = math.prod(mesh_config.global_shape[a]
                                 for a in partitioning.BATCH_MESH_AXES)
        out["eval_rows_per_step"] = evaluation.rows_per_batch(batch_shards)
    return out


def plan(*, model, mesh_config: partitioning.MeshConfig, optimizer, batch_size: int,
         task_feature_lengths: Mapping[str, int], num_microbatches: int = 1,
         train_steps: int | None = None, train_tokens: float | None = None,
         config: PlanConfig = PlanConfig(), output: str | None = None,
         data=None, evaluation=None) -> dict[str, Any]:
    """Plans `model` with `optimizer` on `mesh_config` (see the module docstring);
    prints the report, writes it as JSON to `output` if given, and returns it.

    train_tokens: tokens the days are computed for (default: train_steps batches).
    data, evaluation: the run's train.DataConfig and evaluate.EvalConfig, to report how
    their rows split over the processes (`data_layouts`).
    """
    started = time.perf_counter()
    layouts = None if data is None else data_layouts(mesh_config, data, evaluation)
    lengths = dict(task_feature_lengths)
    base = _base_variant(model, mesh_config, batch_size, num_microbatches)
    cm = compile_mesh(mesh_config, batch_size, config.max_compile_devices)
    devices, backend = _devices(cm, config)
    mesh = partitioning.make_mesh(cm.shape, devices)
    platform = plan_platform(config)
    kernels = memory.attention_kernels(model.cfg, platform, _stacks(model, lengths),
                                       model.get_initial_batch(1, lengths))
    compiled, graphdef, state, compile_s = _compile_for(
        config, model, optimizer, mesh, mesh_config.rule_set(), cm.batch_size, lengths,
        num_microbatches)
    hlo = _hlo_text(compiled, config.hlo_output)
    found = [collectives.scale_axis(c, "data", cm.data, cm.data_nodes)
             for c in collectives.parse(hlo, cm.shape, cm.ici)]
    states = _States(model, optimizer, mesh, graphdef, state, mesh_config.rules)
    gathered = max((c.buffer_bytes for c in data_gathers(found)), default=0)
    gathered_per_row = gathered * num_microbatches / batch_size
    analytic = analytic_memory(model, states, base, batch_size, lengths, gathered_per_row,
                               kernels)
    compiled_memory = _compiled_memory(compiled, backend)
    tokens_per_step = batch_size * model.tokens_per_example(lengths)
    step_flops = model.train_flops_per_step(batch_size, lengths)
    if train_tokens is None and train_steps is not None:
        train_tokens = float(train_steps * tokens_per_step)
    report = {
        "model": {"class": type(model).__name__, "parameters": model.num_params,
                  "dtype": model.cfg.dtype, "remat_policy": model.cfg.remat_policy},
        "mesh": {"global": mesh_config.global_shape, "ici": mesh_config.ici_shape,
                 "dcn": base.dcn, "nodes": mesh_config.nodes,
                 "devices": mesh_config.num_devices, "rules": mesh_config.rules},
        "batch": {"size": batch_size, "feature_lengths": lengths,
                  "microbatches": num_microbatches, "tokens_per_step": tokens_per_step},
        "method": _method(cm, mesh_config, backend, compile_s),
        "attention": {"analytic": kernels, **compiled_attention(
            model.cfg, "tpu" if config.tpu_topology else jax.default_backend(), hlo,
            _stacks(model, lengths))},
        "memory_per_device": {"analytic": analytic, "compiled": compiled_memory},
        "largest_arrays": collectives.largest_arrays(hlo),
        "flops": {"model_per_step": dataclasses.asdict(step_flops),
                  "embedding_matmul_per_step": memory.embedding_matmul_flops(
                      model.cfg, batch_size, _stacks(model, lengths)),
                  "compiled_per_device": _compiled_flops(compiled)},
        "cost_per_device": _compiled_cost(compiled),
        "collectives": collective_rows(found),
        "warnings": _warnings(found),
        "train_tokens": train_tokens,
        "assumptions": dataclasses.asdict(config),
        "memory_fraction": memory_fraction(mesh_config),
        "data_layouts": layouts,
    }
    kinds = config.device_kinds
    if config.tpu_topology:
        kinds = (hardware.spec_for_device_kind(devices[0].device_kind).name,)
    # TPU: the compiler's own peak, the number it checks against HBM.
    need = (compiled_memory["compiler_peak"] or compiled_memory["peak"]
            if config.tpu_topology else analytic["total"])
    report["devices"] = _per_device_kind(model, states, base, kinds, need, found,
                                         step_flops.palm, report, config, mesh_config,
                                         gathered_per_row)
    report["plan_seconds"] = time.perf_counter() - started
    print(format_report(report), flush=True)
    if output:
        with open(output, "w") as f:
            json.dump(_jsonable(report), f, indent=2)
        log.info("plan written to %s", output)
    return report


def _warnings(found: Sequence[collectives.Collective]) -> list[str]:
    out = []
    for c in sorted(data_gathers(found), key=lambda c: -c.buffer_bytes)[:3]:
        if c.buffer_bytes >= _GB:
            out.append(f"{c.name} gathers {c.buffer_bytes / _GB:.1f} GB across the data "
                       f"axis ({c.group_size} devices, {c.count}x per step) from "
                       f"{c.source or 'an unnamed op'}: it grows with the global batch "
                       "and counts in 'gathered across data'")
    return out


def _per_device_kind(model, states, base: Variant, kinds, need: int, found, step_flops,
                     report, config: PlanConfig, mesh_config, gathered_per_row: float
                     ) -> list[dict[str, Any]]:
    """Verdict, suggestions (if it does not fit) and time per step per device kind."""
    batch_size = report["batch"]["size"]
    lengths = report["batch"]["feature_lengths"]
    per_node = math.prod(base.ici.values())
    kernels = report["attention"]["analytic"]
    options = [(category, label, flags,
                analytic_memory(model, states, variant, batch_size, lengths,
                                gathered_per_row, kernels)["total"])
               for category, label, flags, variant in candidates(base, per_node, batch_size,
                                                                 model.cfg.num_kv_heads)
               if _fits_checked(model, variant, batch_size)]
    out = []
    for name in kinds:
        spec = hardware.spec(name)
        verdict = _judge(spec, need, report["memory_fraction"]["value"])
        timing = step_time(spec, found, step_flops, mesh_config.num_devices,
                           model.cfg.dtype, config.mfu,
                           report["flops"]["embedding_matmul_per_step"])
        steps = (report["train_tokens"] or 0) / report["batch"]["tokens_per_step"]
        days = steps * timing["step_s"] / 86_400 if timing["step_s"] else None
        out.append({"kind": name, **verdict, **timing, "days": days,
                    "suggestions": [] if verdict["fits"]
                    else _suggestions(spec, options, report["memory_fraction"]["value"])})
    return out


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ------------------------------------------------------------------------- the report


def _axes_text(sizes: Mapping[str, int]) -> str:
    return " x ".join(f"{a} {n}" for a, n in sizes.items() if n != 1) or "1 device"


def _header_lines(report: Mapping[str, Any]) -> list[str]:
    m, mesh, batch = report["model"], report["mesh"], report["batch"]
    f = report["flops"]["model_per_step"]
    nodes = (f"{mesh['nodes']} nodes x {mesh['devices'] // mesh['nodes']} (inside a node: "
             f"{_axes_text(mesh['ici'])}; across nodes: {_axes_text(mesh['dcn'])})"
             if mesh["nodes"] > 1 else f"one node ({_axes_text(mesh['ici'])})")
    return [
        f"== plan: {m['class']}, {m['parameters']:,} parameters, {m['dtype']}, "
        f"remat '{m['remat_policy']}'",
        f"mesh: {_axes_text(mesh['global'])} = {mesh['devices']:,} devices; {nodes}; "
        f"rules {mesh['rules']}",
        f"batch: {batch['size']:,} rows, {batch['tokens_per_step']:,} tokens/step, "
        f"{batch['microbatches']} microbatch(es); model FLOPs/step {f['palm']:.3g} (PaLM), "
        f"{f['maxtext']:.3g} (MaxText)" + _embedding_flops_text(report),
        f"method: {report['method']}",
        _attention_line(report["attention"]),
    ]


def _embedding_flops_text(report: Mapping[str, Any]) -> str:
    extra = report["flops"].get("embedding_matmul_per_step") or 0
    return (f"; + {extra:.3g} of the matmul embedding (computed at the same MFU, not "
            "model FLOPs)" if extra else "")


def _attention_line(a: Mapping[str, Any]) -> str:
    analytic = ", ".join(f"{site} {kernel}" for site, kernel in a["analytic"].items())
    calls = f" ({a['kernel_calls']} kernel calls)" if a["kernel_calls"] else ""
    scores = (f"{a['score_arrays']} score-shaped arrays (largest "
              f"{a['largest_score_array'] / _GB:.2f} GB)" if a["score_arrays"]
              else "no score-shaped array")
    return (f"attention: attention_impl '{a['configured']}'; compiled for {a['platform']}: "
            f"{a['compiled']}{calls}, {scores}; analytic estimate: {analytic}")


def _data_lines(report: Mapping[str, Any]) -> list[str]:
    layouts = report.get("data_layouts")
    if not layouts:
        return []
    lines = ["data per process (stream shards: train.DataConfig.stream_shards or its "
             "default):"]
    for name, d in layouts.items():
        if name != "eval_rows_per_step":
            lines.append(f"  {name}: {d['processes']:,} processes in {d['row_groups']:,} "
                         f"groups reading different rows, {d['rows_per_process']:,} rows "
                         f"each; {d['stream_shards']:,} stream shards, "
                         f"{d['shards_per_process']} per process")
            if "error" in d:
                lines.append(f"    CANNOT START: {d['error']}")
    if "eval_rows_per_step" in layouts:
        lines.append(f"  eval batch: {layouts['eval_rows_per_step']:,} rows per step")
    return lines


def _memory_lines(report: Mapping[str, Any]) -> list[str]:
    a = report["memory_per_device"]["analytic"]
    c = report["memory_per_device"]["compiled"]
    parts = a["activation_parts"]
    scale, unit = (_GB, "GB") if a["total"] >= _GB else (1e6, "MB")
    left = [("parameters", a["parameters"]), ("gradients", a["gradients"]),
            ("optimizer state", a["optimizer"]),
            (f"activations (remat '{report['model']['remat_policy']}')", a["activations"]),
            ("gathered weights (FSDP)", a["gathered_weights"]), ("inputs", a["inputs"]),
            ("gathered across data", a["gathered_across_data"]), ("total", a["total"])]
    right = [("arguments", c["arguments"]), ("outputs", c["outputs"]),
             ("aliased (donated)", c["aliased"]), ("temporaries", c["temporaries"]),
             ("peak (sum)", c["peak"])]
    if c.get("compiler_peak"):
        right.append(("compiler's peak", c["compiler_peak"]))
    lines = ["", f"memory per device, {unit}           analytic      compiled ({c['backend']})"]
    for i, (name, value) in enumerate(left):
        rtext = f"{right[i][0]:<18}{right[i][1] / scale:8.2f}" if i < len(right) else ""
        lines.append(f"  {name:<28}{value / scale:9.2f}      {rtext}")
    lines.append(f"  activations = saved {parts['saved'] / scale:.2f} + working layer "
                 f"{parts['working'] / scale:.2f} + logits {parts['logits'] / scale:.2f}"
                 + (f" + one-hot embedding rows {parts['embedding'] / scale:.2f}"
                    if parts.get("embedding") else ""))
    for a in report.get("largest_arrays", [])[:3]:
        lines.append(f"  largest array: {a['dtype']}{a['shape']} ({a['op']}), "
                     f"{a['bytes'] / scale:.2f} {unit}")
    if report["flops"]["compiled_per_device"]:
        lines.append("  compiled FLOPs per device (XLA cost analysis, each loop body "
                     f"counted once): {report['flops']['compiled_per_device']:.3g}")
    return lines


def _collective_lines(report: Mapping[str, Any]) -> list[str]:
    lines = ["", "collectives per step (compiled HLO)",
             f"  {'op':<20}{'dtype':<7}{'axes':<14}{'group':>6}  {'where':<23}{'count':>8}"
             f"{'GB/step':>11}"]
    rows = report["collectives"]
    for row in rows:
        op = row["op"] + ("*" if row["priced_as"] != row["op"] else "")
        dtype = row["dtype"] + ("+" if row["widened_on_cpu"] else "")
        lines.append(f"  {op:<20}{dtype:<7}{','.join(row['axes']) or '-':<14}"
                     f"{row['group_size']:>6}  {row['where']:<23}{row['count']:>8,}"
                     f"{row['bytes_per_step'] / _GB:>11.3f}")
    if any(r["priced_as"] != r["op"] for r in rows):
        lines.append("  * all-reduce followed only by a per-device slice (how this program "
                     "writes a reduce-scatter): priced as a reduce-scatter")
    if any(r["widened_on_cpu"] for r in rows):
        lines.append("  + reduced in float32 by XLA:CPU, which widens 16-bit all-reduces; "
                     "counted at 16 bits, as GPUs and TPUs run it")
    return lines


def _device_lines(report: Mapping[str, Any]) -> list[str]:
    tokens = report["train_tokens"]
    basis = ("the TPU compiler's own peak" if "TPU" in report["method"]
             else "analytic total")
    assumed, fraction = report["assumptions"], report["memory_fraction"]
    title = (f"per device kind (need = {basis}; usable = {fraction['value']:.0%} of a GPU's "
             f"memory ({fraction['source']}), all of a TPU's; MFU {assumed['mfu']:.0%} "
             "assumed")
    lines = ["", title + (f"; days for {tokens:.3g} tokens)" if tokens else ")"),
             f"  {'device':<12}{'usable':>7}{'need':>7}  {'fits':<5}{'headroom':>9}"
             f"{'compute':>9}{'TP comm':>9}{'FSDP/DP':>9}{'step s':>9}{'MFU':>6}{'days':>8}"]

    def num(value, fmt):
        return format(value, fmt) if value is not None else "-"

    for d in report["devices"]:
        lines.append(
            f"  {d['kind']:<12}{d['usable_gb']:>7.1f}{d['need_gb']:>7.1f}  "
            f"{'yes' if d['fits'] else 'NO':<5}{d['headroom_gb']:>9.1f}"
            f"{num(d['compute_s'], '.3g'):>9}{num(d['tensor_comm_s'], '.3g'):>9}"
            f"{num(d['fsdp_data_comm_s'], '.3g'):>9}{num(d['step_s'], '.3g'):>9}"
            f"{num(d['mfu'] and 100 * d['mfu'], '.1f'):>6}{num(d['days'], '.3g'):>8}")
        for s in d["suggestions"][:4]:
            lines.append(f"      fits with {s['change']} ({s['need_gb']:.1f} GB): {s['gin']}")
        if not d["fits"] and not d["suggestions"]:
            lines.append("      nothing considered fits (remat, microbatches, fsdp, tensor, "
                         "up to 64x the nodes, tensor and nodes together)")
    lines.append("  times: compute at the assumed MFU; tensor-parallel collectives fully "
                 "exposed, FSDP/data-parallel ones only beyond the compute time")
    return lines


def format_report(report: Mapping[str, Any]) -> str:
    warnings = [f"WARNING: {w}" for w in report["warnings"]]
    return "\n".join(_header_lines(report) + _data_lines(report) + _memory_lines(report)
                     + _collective_lines(report) + _device_lines(report)
                     + ([""] + warnings if warnings else []))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return launch.run(
        "t5x_like.planning.planner.plan", argv, prog="python -m t5x_like.plan",
        extra_flags={"output": {"default": None,
                                "help": "also write the plan as JSON to this file"}})
