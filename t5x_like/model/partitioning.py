"""Logical axis names, rule presets, meshes and sharded initialisation.

Every parameter declares its logical axes where it is created (layers.py) using the
constants below; a rule preset maps them to the mesh axes (`data`, `fsdp`, `tensor`).
The same model and gin config then run on 8 CPU-emulated devices, one GPU node or a
cluster: only the mesh shape and the preset name change.

Functions that need a model take a zero-argument factory of the NNX module (e.g. a
model/families.py model's `make_module`), never a config: this module knows axes and meshes,
not model families. Typical use (what train.py does):

    mesh_cfg = MeshConfig(shape={"data": 1, "fsdp": 8, "tensor": 1}, rules="fsdp")
    mesh, rules = mesh_cfg.make_mesh(), mesh_cfg.rule_set()
    validate_for_mesh(model.make_module, mesh, rules)   # clear errors before compiling
    module = create_sharded(model.make_module, mesh, rules)
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# The closed set of logical axis names. Nothing else may appear in a parameter's or
# an activation's sharding annotation.
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
VOCAB = "vocab"
LAYERS = "layers"
# A norm's scale [D]: replicated by every preset, as MaxText keeps it (split over fsdp
# it cost 4 all-gathers per layer to save D floats: 128 of Llama 3 8B's collectives).
NORM = "norm"

LOGICAL_AXES = (BATCH, LENGTH, EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS, NORM)

MESH_AXES = ("data", "fsdp", "tensor")

# A rule set: (logical name, mesh axis | tuple of mesh axes | None) pairs, one per name.
MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# The batch is split over every data-parallel axis; `fsdp` is data parallel for
# activations and parameter sharding for weights (ZeRO-3).
BATCH_MESH_AXES = ("data", "fsdp")


def _preset(**mesh_axes_of: MeshAxes) -> Rules:
    # BATCH comes first: linen's `with_logical_constraint` (activations) assigns mesh
    # axes in rule order and skips a rule whose mesh axis is taken, so an activation
    # (batch, length, embed) keeps `fsdp` on batch and leaves embed unsharded.
    # Parameters never carry BATCH, and NNX resolves them by plain lookup.
    return tuple((name, mesh_axes_of.get(name)) for name in LOGICAL_AXES)


RULE_PRESETS: dict[str, Rules] = {
    # Pure data parallelism: parameters replicated, batch over data x fsdp.
    "dp": _preset(batch=BATCH_MESH_AXES),
    # ZeRO-3 / FSDP: every parameter has an `embed` dimension, so sharding embed over
    # `fsdp` divides each parameter's bytes by the fsdp size. Scanned layers stay
    # whole on the `layers` axis (scan slices one layer per step).
    "fsdp": _preset(batch=BATCH_MESH_AXES, embed="fsdp"),
    # FSDP + Megatron tensor parallelism. kv_heads stay replicated over `tensor`: a
    # multi-query model has one kv head, which cannot be split, and GQA's kv
    # projections are small (Llama 3 8B: a quarter of wq each).
    "fsdp_tp": _preset(
        batch=BATCH_MESH_AXES, embed="fsdp", heads="tensor", mlp="tensor", vocab="tensor"
    ),
    # As fsdp_tp, and kv heads split over `tensor` too: for MHA/GQA models whose
    # num_kv_heads divides by the tensor size (validate_for_mesh checks; tensor_preset
    # picks between the two). Llama 3 70B (8 kv heads) with tensor 8 uses this one.
    "fsdp_tp_kv": _preset(
        batch=BATCH_MESH_AXES,
        embed="fsdp",
        heads="tensor",
        kv_heads="tensor",
        mlp="tensor",
        vocab="tensor",
    ),
    # Sequence parallelism (Megatron-SP): as fsdp_tp / fsdp_tp_kv, and the residual
    # stream between blocks split along its length over `tensor` (the one activation
    # constraint, layers.BlockStack). XLA gathers the length before each block's
    # attention and MLP, which run head- and mlp-split as under fsdp_tp, and
    # reduce-scatters their outputs back; the saved carries and the norms' work are
    # 1/tensor per device. A length the tensor size does not divide is split
    # unevenly (XLA pads the last shard); decode steps keep the length whole.
    "fsdp_tp_sp": _preset(
        batch=BATCH_MESH_AXES, length="tensor", embed="fsdp", heads="tensor", mlp="tensor",
        vocab="tensor"
    ),
    "fsdp_tp_kv_sp": _preset(
        batch=BATCH_MESH_AXES,
        length="tensor",
        embed="fsdp",
        heads="tensor",
        kv_heads="tensor",
        mlp="tensor",
        vocab="tensor",
    ),
}


def tensor_preset(num_kv_heads: int, tensor: int, sequence_parallel: bool = False) -> str:
    """The tensor-parallel preset for a model with `num_kv_heads` on a `tensor`-way axis:
    kv heads split with the query heads when they divide (fsdp_tp_kv: Llama 3 70B's 8
    kv heads on tensor 8), replicated otherwise (fsdp_tp: MQA, or 2 kv heads on 8);
    with `sequence_parallel` the _sp form of that preset."""
    name = "fsdp_tp_kv" if tensor > 1 and num_kv_heads % tensor == 0 else "fsdp_tp"
    return name + "_sp" if sequence_parallel else name


# The TransformerConfig field whose size each logical axis has, for error messages.
_CONFIG_FIELD_OF_AXIS = {
    EMBED: "emb_dim",
    MLP: "mlp_dim",
    HEADS: "num_heads",
    KV_HEADS: "num_kv_heads",
    HEAD_DIM: "head_dim",
    VOCAB: "vocab_size",
    NORM: "emb_dim",
}


def _mesh_axes_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def get_rules(rules: str | Sequence[tuple[str, MeshAxes]]) -> Rules:
    """Returns a rule set: a preset looked up by name, or a given rule set checked."""
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            near = difflib.get_close_matches(rules, RULE_PRESETS, n=3, cutoff=0.4)
            hint = f" Did you mean {' or '.join(map(repr, near))}?" if near else ""
            raise ValueError(
                f"Unknown rule preset {rules!r}; expected one of "
                f"{sorted(RULE_PRESETS)}.{hint}"
            )
        return RULE_PRESETS[rules]
    rules = tuple((name, axes) for name, axes in rules)
    seen = set()
    for name, axes in rules:
        if name not in LOGICAL_AXES:
            raise ValueError(
                f"Rule for unknown logical axis {name!r}; expected one of "
                f"{LOGICAL_AXES} (partitioning.py holds the closed set)."
            )
        if name in seen:
            # NNX resolves parameter axes by dict lookup (last rule wins) while linen
            # takes the first that fits: two rules for one name would disagree.
            raise ValueError(f"Logical axis {name!r} has two rules in {rules}; keep one.")
        seen.add(name)
        for mesh_axis in _mesh_axes_tuple(axes):
            if mesh_axis not in MESH_AXES:
                raise ValueError(
                    f"Rule {name!r} -> {axes!r} names mesh axis {mesh_axis!r}; "
                    f"expected one of {MESH_AXES}."
                )
    return rules


def split_ways(rules, name: str, sizes: Mapping[str, int]) -> int:
    """How many ways logical axis `name` is split on a mesh of `sizes` under `rules`."""
    return math.prod(sizes[a] for a in _mesh_axes_tuple(dict(get_rules(rules))[name]))


def logical_to_mesh_spec(logical: Sequence[str | None], rules, where: str = "") -> PartitionSpec:
    """Maps one tensor's logical axes to a PartitionSpec, as NNX does (plain lookup).

    Raises ValueError, naming the tensor, for a logical name without a rule (NNX would
    pass the name through and fail later with "Resource axis ... not found in mesh")
    and for two dimensions mapped to one mesh axis (jax's DuplicateSpecError).
    """
    table = dict(get_rules(rules))
    where = f" of {where}" if where else ""
    out, used = [], {}
    for dim, name in enumerate(logical):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"Logical axis {name!r}{where} has no rule in the rule set (rules for "
                f"{sorted(table)}); add ({name!r}, <mesh axes or None>) to the rules "
                f"or use a preset from {sorted(RULE_PRESETS)}."
            )
        axes = table[name]
        for mesh_axis in _mesh_axes_tuple(axes):
            if mesh_axis in used:
                raise ValueError(
                    f"Logical axes {used[mesh_axis]!r} and {name!r}{where} (logical "
                    f"{tuple(logical)}) both map to mesh axis {mesh_axis!r}; one tensor "
                    "dimension per mesh axis. Map one of them to another axis or None."
                )
            used[mesh_axis] = name
        out.append(axes)
    return PartitionSpec(*out)


# ----------------------------------------------------------------------------- meshes


MeshShape = Mapping[str, int] | Sequence[int]


def _shape_tuple(shape: MeshShape, what: str = "mesh shape", *, total: int | None = None,
                 total_name: str = "") -> tuple[int, ...]:
    """{'data': 1, 'fsdp': 8} or (1, 8, 1) -> (data, fsdp, tensor) sizes; missing axes are 1.

    One size may be -1 when `total` is given: it becomes whatever makes the product
    `total` (the devices of a node, the nodes of a cluster).
    """
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(
                f"{what} {dict(shape)} names unknown mesh axes {sorted(unknown)}; "
                f"expected a subset of {MESH_AXES}."
            )
        sizes = tuple(int(shape.get(axis, 1)) for axis in MESH_AXES)
    else:
        sizes = tuple(int(s) for s in shape)
        if len(sizes) != len(MESH_AXES):
            raise ValueError(
                f"{what} {tuple(shape)} has {len(sizes)} sizes; expected one per mesh "
                f"axis {MESH_AXES}, or a dict such as {{'fsdp': 8}}."
            )
    if sizes.count(-1) == 1 and total is not None:
        rest = math.prod(s for s in sizes if s != -1)
        if rest < 1 or total % rest:
            raise ValueError(
                f"{what} {dict(zip(MESH_AXES, sizes))}: the -1 cannot be filled: {total_name}"
                f"={total} is not a multiple of {rest}, the product of the other sizes. "
                f"Pick sizes whose product divides {total}.")
        sizes = tuple(total // rest if s == -1 else s for s in sizes)
    elif -1 in sizes:
        fix = (f"set {total_name} so it can be filled" if total is None
               else "keep one -1 per shape")
        raise ValueError(f"{what} {dict(zip(MESH_AXES, sizes))} has a -1 that cannot be "
                         f"filled; {fix}.")
    if any(s < 1 for s in sizes):
        raise ValueError(f"{what} {sizes} has a size below 1; every axis needs >= 1.")
    if total is not None and math.prod(sizes) != total:
        raise ValueError(
            f"{what} {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
            f"{total_name}={total}; make the product {total} (or use -1 for one axis).")
    return sizes


def make_mesh(shape: MeshShape, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh of Auto axes over `devices` (default: all).

    Auto, not jax.make_mesh's Explicit default, under which the embedding gather fails.
    Within one GPU node jax orders devices so `tensor` (last, fastest) gets NVLink peers.
    """
    sizes = _shape_tuple(shape)
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"Mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices "
            f"but {len(devices)} are given; make the product of the sizes "
            f"{len(devices)} (e.g. {{'fsdp': {len(devices)}}})."
        )
    auto = (AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)


def hybrid_mesh_shape(ici_shape: MeshShape, dcn_shape: MeshShape) -> tuple[int, ...]:
    """The global mesh shape of a multi-node mesh: per-axis product of the two shapes."""
    ici, dcn = _shape_tuple(ici_shape, "ici_shape"), _shape_tuple(dcn_shape, "dcn_shape")
    return tuple(i * d for i, d in zip(ici, dcn))


# What tells devices' nodes apart, in order of preference: jax gives every GPU of one
# host the same slice_index (from the host's boot id), whether one process drives the
# node's 8 GPUs or SLURM starts one process per GPU, and every chip of a TPU slice the
# same slice_index; process_index is the node when one process drives a whole node.
NODE_ATTRIBUTES = ("slice_index", "process_index")


def node_attribute(devices: Sequence[Any], num_nodes: int) -> str:
    """The device attribute whose values split `devices` into `num_nodes` equal nodes."""
    seen = {}
    for attr in NODE_ATTRIBUTES:
        values = [getattr(d, attr, None) for d in devices]
        if None in values:
            continue
        counts = {v: values.count(v) for v in set(values)}
        seen[attr] = len(counts)
        if len(counts) == num_nodes and len(set(counts.values())) == 1:
            return attr
    raise ValueError(
        f"The mesh spans {num_nodes} nodes, but the {len(devices)} devices split into "
        f"{seen or 'no'} nodes by {NODE_ATTRIBUTES} (one value per node expected, equal "
        "device counts). Set the mesh's num_nodes/dcn_shape to the nodes you started, "
        "and start every node with the same number of devices.")


def hybrid_device_array(ici_shape: MeshShape, dcn_shape: MeshShape,
                        devices: Sequence[Any]) -> np.ndarray:
    """The device array of a multi-node mesh: `ici_shape` inside each node, `dcn_shape`
    across nodes (jax's mesh_utils.create_hybrid_device_mesh; each axis's node factor
    outermost). Works on anything with the device attributes, so it is testable."""
    ici, dcn = _shape_tuple(ici_shape, "ici_shape"), _shape_tuple(dcn_shape, "dcn_shape")
    num_nodes, per_node = math.prod(dcn), math.prod(ici)
    if len(devices) != num_nodes * per_node:
        raise ValueError(
            f"Hybrid mesh ici {dict(zip(MESH_AXES, ici))} x dcn {dict(zip(MESH_AXES, dcn))} "
            f"needs {num_nodes} nodes of {per_node} devices each ({num_nodes * per_node}) "
            f"but {len(devices)} devices are given. Make the dcn product the number of "
            "nodes and the ici product the devices per node.")
    attr = node_attribute(devices, num_nodes)
    return mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=attr == "process_index")


def make_hybrid_mesh(ici_shape: MeshShape, dcn_shape: MeshShape,
                     devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over several nodes (or TPU slices): `ici_shape` within a node, `dcn_shape`
    across. Put `tensor` (and, when it fits, `fsdp`) inside the node: their traffic is
    per layer and belongs on NVLink; `data` crosses nodes once per step."""
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(_shape_tuple(dcn_shape, "dcn_shape")) == 1:
        return make_mesh(ici_shape, devices)
    return Mesh(hybrid_device_array(ici_shape, dcn_shape, devices), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


# jax's GPU allocator reads it when its backend starts; its default is 0.75.
MEMORY_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
JAX_DEFAULT_MEMORY_FRACTION = 0.75
_ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_XLA_FLAG = re.compile(r"--[a-z][a-z0-9_]*(=\S*)?")


def _checked_xla_flags(flags: Sequence[str]) -> tuple[str, ...]:
    if isinstance(flags, str):
        flags = flags.split()
    bad = [f for f in flags if not isinstance(f, str) or not _XLA_FLAG.fullmatch(f)]
    if bad:
        raise ValueError(
            f"MeshConfig.xla_flags has {bad!r}, which is not an XLA flag: each entry is one "
            "'--xla_name=value' (or '--xla_name') with no spaces, e.g. "
            "'--xla_gpu_enable_latency_hiding_scheduler=true' (gin_configs/meshes/"
            "xla_flags/gpu.gin lists the GPU presets' flags).")
    return tuple(flags)


def _checked_env(env) -> tuple[tuple[str, str], ...]:
    """`env` as sorted (name, value) pairs (hashable), each name and value checked."""
    pairs = list(env.items()) if isinstance(env, Mapping) else list(env)
    out = {}
    for name, value in pairs:
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            problem = "is not an environment variable name (A-Z, 0-9 and _, e.g. NCCL_PROTO)"
        elif name == MEMORY_FRACTION_ENV:
            problem = ("is the memory fraction, which the planner must see too: set "
                       "MeshConfig.memory_fraction instead")
        elif name == "XLA_FLAGS":
            problem = "holds XLA's flags: list them in MeshConfig.xla_flags instead"
        elif name.startswith("JAX_"):
            problem = ("is read when jax is imported, before any mesh is known, so setting it "
                       "here would change nothing: export it before starting, or use the "
                       "gin setting that exists for it (docs/OPERATIONS.md)")
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            problem = f"has the value {value!r}: give a string or a number"
        else:
            out[name] = str(value)
            continue
        raise ValueError(f"MeshConfig.env: {name!r} {problem}. The GPU presets' variables are "
                         "in gin_configs/meshes/xla_flags/gpu.gin (GPU_ENV).")
    return tuple(sorted(out.items()))


def _check_memory_fraction(fraction) -> None:
    if fraction is None:
        return
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
            0 < fraction <= 1):
        raise ValueError(
            f"MeshConfig.memory_fraction={fraction!r}: the fraction of each GPU's memory jax "
            f"takes at start-up ({MEMORY_FRACTION_ENV}) must be a number in (0, 1], e.g. 0.9 "
            f"(the GPU presets'; jax's own default is {JAX_DEFAULT_MEMORY_FRACTION}), or None "
            "to leave jax's default.")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The mesh of a run, bound by gin_configs/meshes/*.gin: sizes inside a node and
    across nodes, the rule preset, and the hardware's XLA flags.

    shape: sizes of ('data', 'fsdp', 'tensor') inside one node (ICI: NVLink, a TPU
      slice's links); dict or 3-tuple; one size may be -1, filled from devices_per_node.
    rules: a preset name in RULE_PRESETS.
    dcn_shape: sizes across nodes (DCN: the data-centre network); one may be -1, filled
      from num_nodes. Default: one node, or all nodes data parallel ({'data': -1}) when
      num_nodes > 1.
    num_nodes, devices_per_node: the cluster (8 GPUs per DGX/HGX node); optional when
      the shapes have no -1, and then checked against them.
    xla_flags: XLA flags for the hardware (the GPU presets' collective overlap), added
      to XLA_FLAGS by the entry point before jax starts (launch.apply_xla_flags).
    memory_fraction: of each GPU's memory, what jax's allocator takes at start-up
      (XLA_PYTHON_CLIENT_MEM_FRACTION; jax's own default 0.75). The GPU presets set 0.9;
      the entry point exports it before jax starts and the planner judges fit against
      the same number. None: the preset sets nothing (CPU presets).
    env: environment variables for the hardware (the GPU presets' NCCL settings), set
      by the entry point before jax starts where the environment does not set them.
    """

    shape: Any
    rules: str = "fsdp"
    dcn_shape: Any = None
    num_nodes: int | None = None
    devices_per_node: int | None = None
    xla_flags: Sequence[str] = ()
    memory_fraction: float | None = None
    env: Mapping[str, Any] | tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        # Normalised to tuples: hashable and printable the same whatever gin passed.
        object.__setattr__(self, "shape", _shape_tuple(
            self.shape, "MeshConfig.shape", total=self.devices_per_node,
            total_name="devices_per_node"))
        dcn = self.dcn_shape
        if dcn is None and (self.num_nodes or 1) > 1:
            dcn = {"data": -1}
        if dcn is not None:
            dcn = _shape_tuple(dcn, "MeshConfig.dcn_shape", total=self.num_nodes,
                               total_name="num_nodes")
        object.__setattr__(self, "dcn_shape", dcn)
        object.__setattr__(self, "xla_flags", _checked_xla_flags(self.xla_flags))
        object.__setattr__(self, "env", _checked_env(self.env))
        _check_memory_fraction(self.memory_fraction)
        get_rules(self.rules)

    @property
    def global_shape(self) -> dict[str, int]:
        sizes = self.shape
        if self.dcn_shape is not None:
            sizes = hybrid_mesh_shape(self.shape, self.dcn_shape)
        return dict(zip(MESH_AXES, sizes))

    @property
    def ici_shape(self) -> dict[str, int]:
        return dict(zip(MESH_AXES, self.shape))

    @property
    def num_devices(self) -> int:
        return math.prod(self.global_shape.values())

    @property
    def nodes(self) -> int:
        return math.prod(self.dcn_shape) if self.dcn_shape is not None else 1

    def rule_set(self) -> Rules:
        return get_rules(self.rules)

    def environment(self) -> dict[str, str]:
        """The environment variables a run on this mesh sets before jax starts: `env`
        and the memory fraction (XLA_PYTHON_CLIENT_MEM_FRACTION)."""
        out = dict(self.env)
        if self.memory_fraction is not None:
            out[MEMORY_FRACTION_ENV] = f"{self.memory_fraction:g}"
        return out

    def device_array(self, devices: Sequence[Any]) -> np.ndarray:
        """The devices in mesh order (what `make_mesh` builds the Mesh from)."""
        if self.nodes == 1:
            return mesh_utils.create_device_mesh(self.shape, devices)
        return hybrid_device_array(self.shape, self.dcn_shape, devices)

    def make_mesh(self, devices: Sequence[Any] | None = None) -> Mesh:
        if self.nodes == 1:
            return make_mesh(self.shape, devices)
        return make_hybrid_mesh(self.shape, self.dcn_shape, devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [batch, ...] input array: dim 0 over the mesh's batch axes."""
    axes = tuple(a for a in BATCH_MESH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def num_batch_shards(mesh: Mesh) -> int:
    """How many ways `batch_sharding` splits the batch dimension."""
    return math.prod(mesh.shape[a] for a in BATCH_MESH_AXES if a in mesh.axis_names)


@dataclasses.dataclass(frozen=True)
class ProcessRows:
    """The rows of a global batch that one process feeds to its devices.

    They are the batch slices its devices hold under `batch_sharding` (sorted, adjacent
    slices merged), so processes whose devices are replicas of each other (one process
    per GPU with `tensor` over GPUs) read the same rows, as
    `jax.make_array_from_process_local_data` requires; the same for any mesh whose
    non-batch axes span processes.

    `groups` is the number of distinct row sets over all processes (the data-parallel
    process groups), `group` this process's index among them (in order of their first
    row), and `counts` whether it is the first process of its group: the one whose rows
    count in totals summed over processes (examples seen, tokens).
    """
    global_rows: int
    ranges: tuple[tuple[int, int], ...]
    group: int
    groups: int
    counts: bool

    @property
    def num_rows(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    def take(self, array: np.ndarray) -> np.ndarray:
        """This process's rows of a global [global_rows, ...] host array."""
        return np.concatenate([array[start:stop] for start, stop in self.ranges])


def _merged(slices) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for start, stop in sorted(slices):  # equal or disjoint: one per batch shard
        if out and out[-1][1] == start:
            out[-1][1] = stop
        else:
            out.append([start, stop])
    return tuple((a, b) for a, b in out)


@functools.lru_cache(maxsize=64)
def process_rows(mesh: Mesh, global_rows: int, process_index: int | None = None
                 ) -> ProcessRows:
    """Which rows of a `global_rows` batch process `process_index` (default this one)
    reads for `mesh`: see `ProcessRows`. Cached: inference asks once per batch."""
    me = jax.process_index() if process_index is None else process_index
    return rows_of_processes(mesh.devices, mesh.axis_names, global_rows)[me]


def rows_of_processes(devices: np.ndarray, axis_names: Sequence[str], global_rows: int
                      ) -> dict[int, ProcessRows]:
    """`ProcessRows` of every process of a mesh's device array (anything with a
    `process_index`, so a cluster's layout is checkable without its devices).

    `batch_sharding` splits the rows over the batch axes in row-major order: the device
    at mesh index (d, f, t) holds batch shard d·fsdp + f."""
    axes = [i for i, name in enumerate(axis_names) if name in BATCH_MESH_AXES]
    sizes = [devices.shape[i] for i in axes]
    shards = math.prod(sizes)
    if global_rows % shards:
        raise ValueError(
            f"A global batch of {global_rows} rows does not split over the {shards} batch "
            f"shards of mesh axes {BATCH_MESH_AXES} {dict(zip(axis_names, devices.shape))}; "
            f"pick a batch size that is a multiple of {shards}.")
    size = global_rows // shards
    slices_of: dict[int, set[tuple[int, int]]] = {}
    for index in np.ndindex(devices.shape):
        shard = int(np.ravel_multi_index([index[i] for i in axes], sizes)) if axes else 0
        slices_of.setdefault(devices[index].process_index, set()).add(
            (shard * size, (shard + 1) * size))
    ranges_of = {p: _merged(s) for p, s in slices_of.items()}
    groups = sorted(set(ranges_of.values()))
    first_of = {}
    for p in sorted(ranges_of):
        first_of.setdefault(ranges_of[p], p)
    return {p: ProcessRows(global_rows, r, groups.index(r), len(groups), first_of[r] == p)
            for p, r in ranges_of.items()}


# ------------------------------------------------------------- abstract model, counts


ModuleFactory = Callable[[], nnx.Module]


def abstract_params(factory: ModuleFactory) -> nnx.State:
    """Parameter shapes and logical axes of `factory()`, without allocating.

    Variables hold jax.ShapeDtypeStruct; their `out_sharding` metadata is the logical
    spec. No mesh is needed: eager sharding is off while tracing.
    """
    with nnx.use_eager_sharding(False):
        module = nnx.eval_shape(factory)
    return nnx.state(module, nnx.Param)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _param_table(factory: ModuleFactory
                 ) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """{'path/to/param': (shape, logical axes)}, checked: one logical name per dim."""
    out = {}
    for path, v in nnx.to_flat_state(abstract_params(factory)):
        name, shape = _path_str(path), tuple(v.shape)
        logical = v.get_metadata().get("out_sharding")
        if logical is None:
            raise ValueError(
                f"Parameter {name} {shape} has no logical axes; every parameter declares "
                "them where it is created (nnx.Param(..., out_sharding=(EMBED, MLP)))."
            )
        if len(logical) != len(shape):
            raise ValueError(
                f"Parameter {name} has shape {shape} but logical axes {tuple(logical)}; "
                "give one name (or None) per dimension."
            )
        out[name] = (shape, tuple(logical))
    return out


def count_params(factory: ModuleFactory) -> int:
    """Exact number of parameters of `factory()`, from shapes only."""
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(abstract_params(factory)))


def param_shapes(factory: ModuleFactory) -> dict[str, tuple[int, ...]]:
    """{'path/to/param': shape} for every parameter, from shapes only."""
    return {name: shape for name, (shape, _) in _param_table(factory).items()}


def logical_specs(factory: ModuleFactory) -> dict[str, tuple[str | None, ...]]:
    """{'path/to/param': logical axes} for every parameter, e.g. ('embed', 'mlp')."""
    return {name: logical for name, (_, logical) in _param_table(factory).items()}


def param_partition_specs(factory: ModuleFactory, rules) -> dict[str, PartitionSpec]:
    """{'path/to/param': PartitionSpec} under a rule set (preset name or rules)."""
    return {
        path: logical_to_mesh_spec(logical, rules, path)
        for path, logical in logical_specs(factory).items()
    }


def _sizes_of_axes(table) -> dict[str, int]:
    """{logical axis: size} read off the parameters: the config size each axis carries
    (every parameter with a 'heads' dimension has num_heads there, and so on)."""
    sizes = {}
    for shape, logical in table.values():
        for size, name in zip(shape, logical):
            if name in _CONFIG_FIELD_OF_AXIS:
                sizes.setdefault(name, size)
    return sizes


def validate_for_mesh(factory: ModuleFactory, mesh: Mesh, rules, *,
                      batch_size: int | None = None) -> None:
    """Raises ValueError, before anything is compiled, if `factory()` cannot run on `mesh`.

    Checks: rules name only known logical and mesh axes; every logical axis has a
    rule; every sharded size (heads, kv heads, MLP, vocab, embed; named by its
    TransformerConfig field) divides by the mesh axes it is sharded over; every
    parameter dimension likewise; no tensor maps two dimensions to one mesh axis; no
    mesh axis of size > 1 is left unused; the global batch size (if given) divides by
    the data-parallel ways.
    """
    rules = get_rules(rules)
    table = dict(rules)
    missing = [name for name in LOGICAL_AXES if name not in table]
    if missing:
        raise ValueError(
            f"Logical axes {missing} have no rule in the rule set; every name in "
            f"{LOGICAL_AXES} needs one (None = replicated). Add them or use a preset "
            f"from {sorted(RULE_PRESETS)}."
        )
    sizes = dict(mesh.shape)
    for name, axes in rules:
        for mesh_axis in _mesh_axes_tuple(axes):
            if mesh_axis not in sizes:
                raise ValueError(
                    f"Rule {name!r} -> {axes!r} needs mesh axis {mesh_axis!r}, but the "
                    f"mesh has {tuple(sizes)}; build it with make_mesh."
                )

    used = {a for _, axes in rules for a in _mesh_axes_tuple(axes)}
    for mesh_axis, size in sizes.items():
        if size > 1 and mesh_axis not in used:
            raise ValueError(
                f"Mesh axis {mesh_axis!r} has size {size} but no rule uses it, so "
                f"{size} devices would repeat the same work. Set it to 1 or pick a "
                f"preset that uses it (presets: {sorted(RULE_PRESETS)})."
            )
    batch_ways = split_ways(rules, BATCH, sizes)
    if batch_size is not None and batch_size % batch_ways:
        raise ValueError(
            f"The batch size {batch_size} (global, or per microbatch with gradient "
            f"accumulation) is not divisible by {batch_ways}, the "
            f"data-parallel ways (mesh axes {table[BATCH]!r}); use a multiple of "
            f"{batch_ways}."
        )
    params = _param_table(factory)
    axis_sizes = _sizes_of_axes(params)
    for name, field in _CONFIG_FIELD_OF_AXIS.items():
        value, n = axis_sizes.get(name), split_ways(rules, name, sizes)
        if value is not None and n > 1 and value % n:
            hint = ""
            if name == KV_HEADS:
                hint = (" A multi-query or few-kv-head model can use preset 'fsdp_tp', "
                        "which keeps kv heads replicated over 'tensor'.")
            raise ValueError(
                f"{field}={value} is not divisible by {n}, the size of mesh axes "
                f"{table[name]!r} that logical axis {name!r} is sharded over; choose "
                f"{field} a multiple of {n} or a smaller {table[name]!r} axis.{hint}"
            )
    for path, (shape, logical) in params.items():
        spec = logical_to_mesh_spec(logical, rules, path)
        for dim, (axes, size) in enumerate(zip(spec, shape)):
            n = math.prod(sizes[a] for a in _mesh_axes_tuple(axes))
            if size % n:
                raise ValueError(
                    f"Parameter {path} dimension {dim} ({logical[dim]!r}) has size {size}, "
                    f"not divisible by {n} (mesh axes {axes!r}); resize it or shard "
                    f"{logical[dim]!r} over fewer devices."
                )


# ---------------------------------------------------------------------- sharded init


def create_sharded(factory: ModuleFactory, mesh: Mesh, rules) -> nnx.Module:
    """Builds `factory()` with every variable created directly in its shard.

    Shapes come from eval_shape, shardings from the logical axes and rules, and the
    initialiser runs under jit with those out_shardings, so a model too large for one
    device is never materialised on one.
    """
    graphdef, abstract_state = abstract_sharded(factory, mesh, rules)
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(get_rules(rules)):
        state = jax.jit(lambda: nnx.state(factory()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_sharded(factory: ModuleFactory, mesh: Mesh, rules
                     ) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of what `create_sharded` would build, without allocating: each
    leaf a jax.ShapeDtypeStruct carrying its NamedSharding (a checkpoint restore
    target, so a restored model is never also initialised)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(get_rules(rules)):
        graphdef, abstract_state = nnx.split(nnx.eval_shape(factory))
        shardings = nnx.get_named_sharding(abstract_state, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract_state, shardings)
    return graphdef, state


def logical_shardings(module: nnx.Module, mesh: Mesh, rules) -> nnx.State:
    """The NamedShardings a module's state should have under `rules` (from its logical
    axes; for a state that has them already, `jax.tree.map(lambda x: x.sharding, ...)`)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(get_rules(rules)):
        return nnx.get_named_sharding(nnx.state(module), mesh)


def per_device_param_bytes(module: nnx.Module) -> dict[Any, int]:
    """Bytes of parameters held by each device, from the arrays' addressable shards."""
    out: dict[Any, int] = {}
    for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        for shard in v[...].addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


__all__ = [
    "BATCH", "LENGTH", "EMBED", "MLP", "HEADS", "KV_HEADS", "HEAD_DIM", "VOCAB", "LAYERS", "NORM",
    "LOGICAL_AXES", "MESH_AXES", "BATCH_MESH_AXES", "RULE_PRESETS", "MeshConfig",
    "get_rules", "split_ways", "logical_to_mesh_spec", "make_mesh", "make_hybrid_mesh",
    "hybrid_mesh_shape", "hybrid_device_array", "node_attribute", "batch_sharding", "num_batch_shards", "ProcessRows", "process_rows", "rows_of_processes", "abstract_params",
    "count_params", "logical_specs", "param_shapes", "param_partition_specs",
    "validate_for_mesh", "create_sharded", "abstract_sharded", "logical_shardings",
    "per_device_param_bytes",
]
