"""Rule presets, meshes, sharded init and sharded == single-device, on 8 emulated CPUs.

Golden files tests/golden/sharding_{model}_{preset}.json pin every parameter's shape,
logical axes and PartitionSpec. After an intended change, regenerate them explicitly:

    .venv/bin/python tests/test_partitioning.py --update-golden

and review the diff; the tests never rewrite them.
"""
import dataclasses
import json
import pathlib
import sys
import types

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec

from t5x_like.model import families, partitioning
from t5x_like.model.partitioning import (
    BATCH,
    EMBED,
    HEADS,
    KV_HEADS,
    LAYERS,
    LENGTH,
    LOGICAL_AXES,
    MLP,
    NORM,
    RULE_PRESETS,
    VOCAB,
)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_configs import MODEL_GINS, factory, model_config  # noqa: E402
from tiny import assert_no_compile_while  # noqa: E402

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden"
TINY = ("tiny_palm", "tiny_llama", "tiny_encdec")
PRESETS = tuple(sorted(RULE_PRESETS))

# Name -> (mesh shape, preset, number of devices).
MESHES = {
    "cpu1": ({"data": 1, "fsdp": 1, "tensor": 1}, "dp", 1),
    "fsdp": ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp", 8),
    "fsdp_tp": ({"data": 1, "fsdp": 2, "tensor": 4}, "fsdp_tp", 8),
}


def _mesh(name):
    shape, preset, n = MESHES[name]
    return partitioning.make_mesh(shape, jax.devices()[:n]), partitioning.get_rules(preset)


def _model(cfg):
    return families.model_for(cfg)


def test_eight_emulated_devices():
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 CPU devices before jax import"


# ------------------------------------------------------------------------------ rules


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_one_rule_per_logical_axis_and_batch_first(preset):
    rules = RULE_PRESETS[preset]
    assert [name for name, _ in rules] == list(LOGICAL_AXES)
    assert rules[0] == (BATCH, ("data", "fsdp"))
    assert dict(rules)[LAYERS] is None  # scan slices whole layers; never split them


def test_preset_tables():
    table = {p: {k: v for k, v in RULE_PRESETS[p] if v is not None} for p in PRESETS}
    dp = {BATCH: ("data", "fsdp")}
    assert table["dp"] == dp
    assert table["fsdp"] == {**dp, EMBED: "fsdp"}
    tp = {HEADS: "tensor", MLP: "tensor", VOCAB: "tensor"}
    assert table["fsdp_tp"] == {**dp, EMBED: "fsdp", **tp}
    assert table["fsdp_tp_kv"] == {**dp, EMBED: "fsdp", **tp, KV_HEADS: "tensor"}
    # Sequence parallelism: the same, and the residual stream's length over tensor.
    assert table["fsdp_tp_sp"] == {**table["fsdp_tp"], LENGTH: "tensor"}
    assert table["fsdp_tp_kv_sp"] == {**table["fsdp_tp_kv"], LENGTH: "tensor"}


def test_unknown_preset_names_the_nearest():
    with pytest.raises(ValueError, match=r"Unknown rule preset 'fsdp_pt'.*Did you mean 'fsdp_tp'"):
        partitioning.get_rules("fsdp_pt")
    with pytest.raises(ValueError, match=r"expected one of \['dp', 'fsdp'"):
        partitioning.get_rules("zero3")


def test_rule_sets_are_checked():
    with pytest.raises(ValueError, match="unknown logical axis 'embedding'"):
        partitioning.get_rules((("embedding", "fsdp"),))
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        partitioning.get_rules(((EMBED, "model"),))
    with pytest.raises(ValueError, match="two rules"):
        partitioning.get_rules(((EMBED, "fsdp"), (EMBED, None)))


def test_two_axes_of_one_tensor_on_one_mesh_axis_is_a_clear_error():
    rules = ((EMBED, "fsdp"), (MLP, "fsdp"))
    with pytest.raises(ValueError, match=r"'embed' and 'mlp' of wi .*both map to mesh axis 'fsdp'"):
        partitioning.logical_to_mesh_spec((EMBED, MLP), rules, "wi")


@pytest.mark.parametrize("path", MODEL_GINS, ids=lambda p: p.stem)
def test_every_param_of_every_model_resolves_under_every_preset(path):
    """No DuplicateSpecError, no unknown name, layers never split: all shipped models."""
    cfg = model_config(path.stem)
    for preset in PRESETS:
        logical = partitioning.logical_specs(factory(cfg))
        specs = partitioning.param_partition_specs(factory(cfg), preset)
        for name, spec in specs.items():
            mesh_axes = [a for axes in spec for a in partitioning._mesh_axes_tuple(axes)]
            assert len(mesh_axes) == len(set(mesh_axes)), (name, spec)
            for dim, axis in enumerate(logical[name]):
                if axis == LAYERS:
                    assert spec[dim] is None, (preset, name, spec)
            if NORM in logical[name]:  # norm scales: replicated by every preset
                assert not mesh_axes, (preset, name, spec)
            elif preset != "dp":
                # fsdp-based presets shard every other parameter: each has an embed axis.
                assert EMBED in logical[name] and "fsdp" in mesh_axes, (preset, name)


def test_activation_constraint_keeps_fsdp_on_batch():
    """linen resolves rules in order; BATCH first keeps `fsdp` off the embed dim."""
    for preset in PRESETS:
        spec = nn.logical_to_mesh_axes((BATCH, LENGTH, EMBED), RULE_PRESETS[preset])
        length = "tensor" if preset.endswith("_sp") else None  # sequence parallel
        assert spec == PartitionSpec(("data", "fsdp"), length, None), preset


# ----------------------------------------------------------------------------- golden


def _golden_path(model_name, preset):
    return GOLDEN_DIR / f"sharding_{model_name}_{preset}.json"


def _spec_json(spec):
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def _golden_record(model_name, preset):
    cfg = model_config(model_name)
    shapes = partitioning.param_shapes(factory(cfg))
    logical = partitioning.logical_specs(factory(cfg))
    specs = partitioning.param_partition_specs(factory(cfg), preset)
    return {
        "model": model_name,
        "preset": preset,
        "params": {
            name: {"shape": list(shapes[name]), "logical": list(logical[name]),
                   "spec": _spec_json(specs[name])}
            for name in sorted(specs)
        },
    }


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("model_name", TINY)
def test_sharding_matches_golden(model_name, preset):
    path = _golden_path(model_name, preset)
    assert path.exists(), f"{path} missing; run: .venv/bin/python {__file__} --update-golden"
    expected = json.loads(path.read_text())
    actual = _golden_record(model_name, preset)
    assert actual == expected, (
        f"Sharding of {model_name} under {preset} changed. If intended, run "
        f".venv/bin/python tests/test_partitioning.py --update-golden and review the diff."
    )


def update_golden():
    GOLDEN_DIR.mkdir(exist_ok=True)
    for model_name in TINY:
        for preset in PRESETS:
            path = _golden_path(model_name, preset)
            record = _golden_record(model_name, preset)
            # One line per parameter, so a diff reads as the list of changed params.
            params = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}"
                                 for k, v in record["params"].items())
            path.write_text(f'{{"model": {json.dumps(model_name)}, "preset": '
                            f'{json.dumps(preset)}, "params": {{\n{params}\n}}}}\n')
            print("wrote", path)


# ------------------------------------------------------------------------------ meshes


def test_make_mesh_accepts_dict_or_tuple_and_uses_auto_axes():
    mesh = partitioning.make_mesh({"fsdp": 2, "tensor": 4})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(partitioning.make_mesh((2, 4, 1)).shape) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_make_mesh_errors():
    with pytest.raises(ValueError, match=r"needs 16 devices but 8 are given.*\{'fsdp': 8\}"):
        partitioning.make_mesh({"fsdp": 16})
    with pytest.raises(ValueError, match="unknown mesh axes \\['model'\\]"):
        partitioning.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="one per mesh axis"):
        partitioning.make_mesh((8,))


@dataclasses.dataclass(frozen=True)
class _FakeGpu:
    """Enough of a jax GPU for mesh_utils: id, process, host (slice_index), kind."""

    id: int
    process_index: int
    slice_index: int
    platform: str = "gpu"
    device_kind: str = "NVIDIA H100 80GB HBM3"


def _cluster(nodes, per_node=8, layout="process_per_node"):
    """Fake GPUs of `nodes` hosts as jax sees them: one process per node (8 local
    GPUs each), or one process per GPU as SLURM starts them (jax then tells hosts apart
    by slice_index, from each host's boot id); ids in process order."""
    return [_FakeGpu(id=per_node * node + i,
                     process_index=node if layout == "process_per_node" else per_node * node + i,
                     slice_index=node)
            for node in range(nodes) for i in range(per_node)]


@pytest.mark.parametrize("layout", ["process_per_node", "process_per_gpu"])
@pytest.mark.parametrize("ici,dcn", [
    ({"tensor": 8}, {"data": 2, "fsdp": 2}),        # 70B-style: tensor in the node
    ({"fsdp": 2, "tensor": 4}, {"data": -1}),       # the 312-node preset, scaled down
    ({"fsdp": 8}, {"data": 2, "fsdp": -1}),         # h100_cluster
])
def test_cluster_meshes_keep_tensor_and_fsdp_ici_inside_a_node(layout, ici, dcn):
    devices = _cluster(4, layout=layout)
    cfg = partitioning.MeshConfig(shape=ici, dcn_shape=dcn, rules="fsdp_tp", num_nodes=4,
                                  devices_per_node=8)
    array = cfg.device_array(devices)
    assert array.shape == tuple(cfg.global_shape.values())
    assert sorted(d.id for d in array.flat) == list(range(32))
    ici_sizes = cfg.shape
    for index in np.ndindex(array.shape):
        # Devices that differ only in the in-node part of each axis share a host:
        # the node is each coordinate's across-node part (the outer factor).
        node = tuple(c // n for c, n in zip(index, ici_sizes))
        peer = array[index].slice_index
        first = tuple(k * n for k, n in zip(node, ici_sizes))
        assert peer == array[first].slice_index, (index, first)
    # In particular, the whole tensor axis, and the in-node part of fsdp, is one node.
    for d, f in np.ndindex(array.shape[:2]):
        if f % ici_sizes[1] == 0:
            block = array[d, f:f + ici_sizes[1], :]
            assert len({x.slice_index for x in block.flat}) == 1


def test_node_attribute_prefers_hosts_and_names_the_mismatch():
    assert partitioning.node_attribute(_cluster(2, layout="process_per_gpu"), 2) == "slice_index"
    assert partitioning.node_attribute(_cluster(2), 2) == "slice_index"
    no_slices = [dataclasses.replace(d, slice_index=0) for d in _cluster(2)]
    assert partitioning.node_attribute(no_slices, 2) == "process_index"  # CPU processes
    with pytest.raises(ValueError, match=r"spans 4 nodes, but the 16 devices split into "
                                         r"\{'slice_index': 2, 'process_index': 2\}"):
        partitioning.node_attribute(_cluster(2), 4)


def test_hybrid_mesh_places_ici_within_a_node_and_dcn_across():
    # 4 nodes x 8 GPUs; ici fsdp 8 within a node, dcn data 2 x fsdp 2 across nodes.
    devices = _cluster(4)
    ici, dcn = {"fsdp": 8}, {"data": 2, "fsdp": 2}
    assert partitioning.hybrid_mesh_shape(ici, dcn) == (2, 16, 1)
    # jax.sharding.Mesh needs real devices, so check the device array it is built from.
    array = partitioning.hybrid_device_array(ici, dcn, devices)
    assert array.shape == (2, 16, 1)
    for d in range(2):
        for f in range(16):
            # Each run of 8 along fsdp is one node (NVLink); nodes differ along dcn.
            assert array[d, f, 0].process_index == 2 * d + f // 8
    with pytest.raises(ValueError, match=r"needs 4 nodes of 8 devices each \(32\) but 16"):
        partitioning.make_hybrid_mesh(ici, {"data": 4, "fsdp": 1}, devices[:16])


def test_mesh_config():
    cfg = partitioning.MeshConfig(shape={"fsdp": 2, "tensor": 4}, rules="fsdp_tp")
    assert cfg.shape == (1, 2, 4) and cfg.num_devices == 8
    assert dict(cfg.make_mesh().shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert cfg.rule_set() == RULE_PRESETS["fsdp_tp"]
    with pytest.raises(ValueError, match="Unknown rule preset 'tp'"):
        partitioning.MeshConfig(shape={"fsdp": 8}, rules="tp")
    cluster = partitioning.MeshConfig(shape={"fsdp": 8}, rules="fsdp", dcn_shape={"data": 4})
    assert cluster.global_shape == {"data": 4, "fsdp": 8, "tensor": 1}
    assert cluster.nodes == 4 and cluster.ici_shape == {"data": 1, "fsdp": 8, "tensor": 1}


def test_mesh_config_fills_minus_one_from_the_cluster():
    cfg = partitioning.MeshConfig(shape={"tensor": 8}, dcn_shape={"data": -1, "fsdp": 8},
                                  rules="fsdp_tp", num_nodes=312, devices_per_node=8)
    assert cfg.global_shape == {"data": 39, "fsdp": 8, "tensor": 8}
    assert cfg.num_devices == 2496 and cfg.nodes == 312
    node = partitioning.MeshConfig(shape={"fsdp": -1}, devices_per_node=8)
    assert node.global_shape == {"data": 1, "fsdp": 8, "tensor": 1} and node.nodes == 1
    # num_nodes alone: every node a data-parallel replica.
    assert partitioning.MeshConfig(shape={"fsdp": 8}, num_nodes=4).global_shape == {
        "data": 4, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("kwargs,match", [
    (dict(shape={"fsdp": -1}), r"has a -1 that cannot be filled; set devices_per_node"),
    (dict(shape={"fsdp": -1, "tensor": 3}, devices_per_node=8),
     r"the -1 cannot be filled: devices_per_node=8 is not a multiple of 3"),
    (dict(shape={"fsdp": -1, "tensor": -1}, devices_per_node=8), r"keep one -1 per shape"),
    (dict(shape={"fsdp": 4}, devices_per_node=8), r"has 4 devices but devices_per_node=8"),
    (dict(shape={"fsdp": 8}, dcn_shape={"data": -1, "fsdp": 5}, num_nodes=312),
     r"dcn_shape .* num_nodes=312 is not a multiple of 5"),
])
def test_mesh_config_errors_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        partitioning.MeshConfig(rules="fsdp", **kwargs)


# ------------------------------------------------------------- errors before compile


def _tiny(**changes):
    return dataclasses.replace(model_config("tiny_llama"), **changes)


def test_config_errors_are_raised_at_construction():
    with pytest.raises(ValueError, match="num_heads=6 is not divisible by num_kv_heads=4"):
        _tiny(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="block='serial'"):
        _tiny(block="serial")
    with pytest.raises(ValueError, match="remat_policy='some'"):
        _tiny(remat_policy="some")


@pytest.mark.parametrize("field,value,preset,match", [
    ("num_heads", 6, "fsdp_tp", r"num_heads=6 is not divisible by 4.*'tensor'"),
    ("mlp_dim", 390, "fsdp_tp", r"mlp_dim=390 is not divisible by 4"),
    ("vocab_size", 8190, "fsdp_tp", r"vocab_size=8190 is not divisible by 4"),
    ("emb_dim", 129, "fsdp", r"emb_dim=129 is not divisible by 2"),
])
def test_sizes_that_do_not_divide_the_mesh_fail_in_validate(field, value, preset, match):
    changes = {field: value}
    if field == "num_heads":
        changes["num_kv_heads"] = 2
    cfg = _tiny(**changes)
    mesh = partitioning.make_mesh({"fsdp": 2, "tensor": 4})
    rules = RULE_PRESETS[preset]
    if preset == "fsdp":
        mesh = partitioning.make_mesh({"data": 4, "fsdp": 2})
    with pytest.raises(ValueError, match=match):
        partitioning.validate_for_mesh(factory(cfg), mesh, rules)


def test_mqa_under_kv_sharding_points_to_fsdp_tp():
    cfg = model_config("tiny_palm")  # 1 kv head
    mesh = partitioning.make_mesh({"fsdp": 2, "tensor": 4})
    with pytest.raises(ValueError, match=r"num_kv_heads=1 is not divisible by 4.*preset 'fsdp_tp'"):
        partitioning.validate_for_mesh(factory(cfg), mesh, "fsdp_tp_kv")
    partitioning.validate_for_mesh(factory(cfg), mesh, "fsdp_tp")  # kv heads replicated: fine
    partitioning.validate_for_mesh(factory(model_config("tiny_llama")), partitioning.make_mesh(
        {"fsdp": 4, "tensor": 2}), "fsdp_tp_kv")  # 2 kv heads over tensor 2: fine


def test_rules_missing_a_logical_axis_fail_in_validate():
    rules = tuple(r for r in RULE_PRESETS["fsdp"] if r[0] != HEADS)
    mesh = partitioning.make_mesh({"fsdp": 8})
    with pytest.raises(ValueError, match=r"Logical axes \['heads'\] have no rule"):
        partitioning.validate_for_mesh(factory(model_config("tiny_llama")), mesh, rules)
    match = r"Logical axis 'heads' of .*self_attention/w[qo] has no rule"
    with pytest.raises(ValueError, match=match):
        partitioning.param_partition_specs(factory(model_config("tiny_llama")), rules)


def test_batch_size_must_split_over_the_data_parallel_axes():
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match=r"batch size 6 .* is not divisible by 4.*\('data', 'fsdp'\)"):
        partitioning.validate_for_mesh(factory(model_config("tiny_llama")), mesh, "fsdp_tp", batch_size=6)
    partitioning.validate_for_mesh(factory(model_config("tiny_llama")), mesh, "fsdp_tp", batch_size=8)


def test_unused_mesh_axis_fails_in_validate():
    mesh = partitioning.make_mesh({"fsdp": 2, "tensor": 4})
    with pytest.raises(ValueError, match="Mesh axis 'tensor' has size 4 but no rule uses it"):
        partitioning.validate_for_mesh(factory(model_config("tiny_llama")), mesh, "fsdp")


def test_validation_of_a_70b_model_compiles_nothing():
    def validate():
        mesh = partitioning.make_mesh({"fsdp": 1, "tensor": 8})
        partitioning.validate_for_mesh(factory(model_config("llama3_70b")), mesh, "fsdp_tp_kv")
        with pytest.raises(ValueError, match="num_kv_heads=1 is not divisible by 8"):
            partitioning.validate_for_mesh(factory(model_config("palm_62b")), mesh, "fsdp_tp_kv")

    assert_no_compile_while(validate)


@pytest.mark.parametrize("model_name", TINY)
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_tiny_models_validate_on_the_test_meshes(model_name, mesh_name):
    partitioning.validate_for_mesh(factory(model_config(model_name)), *_mesh(mesh_name))


# ------------------------------------------------------------------------ sharded init


def test_abstract_params_allocate_nothing():
    state = partitioning.abstract_params(factory(model_config("llama3_70b")))
    leaves = [v.get_value() for _, v in nnx.to_flat_state(state)]
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


# Sharded init compiles the initialiser (threefry random numbers are slow to compile on
# CPU), so each tiny model is initialised once per mesh and shared by the tests below.
_MODULES = {}


def _sharded_module(model_name, mesh_name):
    key = (model_name, mesh_name)
    if key not in _MODULES:
        cfg = model_config(model_name)
        mesh, rules = _mesh(mesh_name)
        partitioning.validate_for_mesh(factory(cfg), mesh, rules)
        _MODULES[key] = partitioning.create_sharded(_model(cfg).make_module, mesh, rules)
    return _MODULES[key]


def _params(module):
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {partitioning._path_str(p): v[...] for p, v in flat}


@pytest.mark.parametrize("model_name", TINY)
def test_fsdp_splits_every_parameter_eight_ways(model_name):
    cfg = model_config(model_name)
    module = _sharded_module(model_name, "fsdp")
    total = 4 * partitioning.count_params(factory(cfg))  # float32
    per_device = partitioning.per_device_param_bytes(module)
    assert len(per_device) == 8
    for device, nbytes in per_device.items():
        assert abs(nbytes - total / 8) <= 0.01 * total / 8, (device, nbytes, total)
    # Each array carries exactly the pinned spec, and the values do not depend on the
    # sharding (threefry is partitionable): the same as a single-device init.
    specs = partitioning.param_partition_specs(factory(cfg), "fsdp")
    reference = _params(_sharded_module(model_name, "cpu1"))
    for name, array in _params(module).items():
        assert array.sharding.spec == specs[name], name
        np.testing.assert_array_equal(np.asarray(array), np.asarray(reference[name]), name)


def _batch(cfg, seed=0, batch_size=8, length=32):
    """A packed-looking batch: random tokens, two segments per row, padding at the end."""
    rng = np.random.default_rng(seed)

    def features(prefix, length):
        tokens = rng.integers(1, cfg.vocab_size, (batch_size, length), dtype=np.int32)
        split, end = length // 2, length - 4
        segment_ids = np.where(np.arange(length) < split, 1, 2).astype(np.int32)
        segment_ids = np.broadcast_to(np.where(np.arange(length) < end, segment_ids, 0),
                                      (batch_size, length)).copy()
        positions = np.where(np.arange(length) < split, np.arange(length),
                             np.arange(length) - split)
        positions = np.broadcast_to(positions * (segment_ids[0] > 0), (batch_size, length))
        tokens = tokens * (segment_ids > 0)
        return tokens, segment_ids, positions.astype(np.int32)

    targets, seg, pos = features("decoder", length // 2 if cfg.is_encoder_decoder else length)
    inputs = np.where(pos == 0, 0, np.roll(targets, 1, axis=1)).astype(np.int32)
    batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
             "decoder_loss_weights": (seg > 0).astype(np.int32),
             "decoder_segment_ids": seg, "decoder_positions": pos}
    if cfg.is_encoder_decoder:
        tokens, seg, pos = features("encoder", length)
        batch.update(encoder_input_tokens=tokens, encoder_segment_ids=seg, encoder_positions=pos)
    return batch


def _loss_and_grads(model_name, mesh_name):
    cfg = model_config(model_name)
    model = _model(cfg)
    mesh, rules = _mesh(mesh_name)
    partitioning.validate_for_mesh(factory(cfg), mesh, rules)
    if (model_name, mesh_name) in _MODULES or mesh_name != "fsdp_tp":
        module = _sharded_module(model_name, mesh_name)
    else:
        # Same parameters resharded (saves compiling the initialiser once more).
        reference = _sharded_module(model_name, "cpu1")
        graphdef, state = nnx.split(reference)
        state = jax.device_put(state, partitioning.logical_shardings(reference, mesh, rules))
        module = nnx.merge(graphdef, state)
    batch = jax.device_put(_batch(cfg), partitioning.batch_sharding(mesh))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        @nnx.jit
        def step(module, batch):
            grad_fn = nnx.value_and_grad(model.loss_fn, has_aux=True)
            (loss, _), grads = grad_fn(module, batch)
            return loss, grads

        loss, grads = step(module, batch)
    flat = {partitioning._path_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    return float(loss), flat


_REFERENCE = {}


# Each case compiles a train step on CPU (5-15 s); the default run keeps one case per
# kind of attention sharding: MQA under both presets, GQA under tensor parallelism.
_slow = pytest.mark.slow


@pytest.mark.parametrize("model_name,mesh_name", [
    ("tiny_palm", "fsdp"),
    ("tiny_palm", "fsdp_tp"),
    ("tiny_llama", "fsdp_tp"),
    pytest.param("tiny_llama", "fsdp", marks=_slow),
    pytest.param("tiny_encdec", "fsdp", marks=_slow),
    pytest.param("tiny_encdec", "fsdp_tp", marks=_slow),
])
def test_sharded_step_equals_single_device(model_name, mesh_name):
    if model_name not in _REFERENCE:
        _REFERENCE[model_name] = _loss_and_grads(model_name, "cpu1")
    ref_loss, ref_grads = _REFERENCE[model_name]
    loss, grads = _loss_and_grads(model_name, mesh_name)
    assert np.isfinite(ref_loss) and ref_loss > 1.0
    # fp32 compute; only the order of the sharded reductions differs.
    assert abs(loss - ref_loss) <= 1e-5, (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)


if __name__ == "__main__":
    if sys.argv[1:] != ["--update-golden"]:
        sys.exit(f"usage: python {sys.argv[0]} --update-golden  (rewrites {GOLDEN_DIR})")
    update_golden()


def _fake_devices(process_ids, shape):
    return np.array([types.SimpleNamespace(process_index=p) for p in process_ids],
                    dtype=object).reshape(shape)


def test_process_rows_give_replicas_the_same_rows():
    # 4 processes × 2 devices, mesh fsdp 2 × tensor 4 in device order: processes 0 and 1
    # hold the first half of the batch (tensor spans them), 2 and 3 the second.
    devices = _fake_devices([0, 0, 1, 1, 2, 2, 3, 3], (1, 2, 4))
    rows = partitioning.rows_of_processes(devices, partitioning.MESH_AXES, 8)
    assert [rows[p].ranges for p in range(4)] == [((0, 4),), ((0, 4),), ((4, 8),), ((4, 8),)]
    assert [(rows[p].group, rows[p].groups, rows[p].counts) for p in range(4)] == [
        (0, 2, True), (0, 2, False), (1, 2, True), (1, 2, False)]
    # Adjacent slices of one process merge; separate ones stay apart, in row order.
    odd = partitioning.rows_of_processes(_fake_devices([0, 0, 1, 0], (1, 4, 1)),
                                         partitioning.MESH_AXES, 8)[0]
    assert odd.ranges == ((0, 4), (6, 8)) and odd.num_rows == 6
    np.testing.assert_array_equal(odd.take(np.arange(8)), [0, 1, 2, 3, 6, 7])
    with pytest.raises(ValueError, match="does not split over the 4 batch shards"):
        partitioning.rows_of_processes(_fake_devices([0, 0, 1, 0], (1, 4, 1)),
                                       partitioning.MESH_AXES, 6)


def test_process_rows_are_the_batch_shardings_slices():
    """Each device's slice as jax's batch sharding places it (one 'process' per device)."""
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    as_processes = np.vectorize(lambda d: types.SimpleNamespace(process_index=d.id),
                                otypes=[object])(mesh.devices)
    rows = partitioning.rows_of_processes(as_processes, mesh.axis_names, 16)
    placed = partitioning.batch_sharding(mesh).devices_indices_map((16,))
    for device, (index,) in placed.items():
        assert rows[device.id].ranges == (index.indices(16)[:2],)
    assert partitioning.process_rows(mesh, 16).ranges == ((0, 16),)  # one real process
