"""Collectives read from HLO text: replica-group spellings, loop trip counts, mesh axes,
node spans, and their link times; checked on hand-written HLO and a compiled step."""

import pytest
from flax import nnx

from t5x_like.model import families, partitioning
from t5x_like.planning import collectives, memory, planner
from t5x_like.planning.collectives import Collective
from t5x_like.training import optimizers, train_state


def _groups(attributes, n=8):
    return sorted(sorted(g) for g in collectives.replica_groups(attributes, n).tolist())


@pytest.mark.parametrize("attributes,expected", [
    ("replica_groups={{0,1},{2,3}}, dimensions={0}", [[0, 1], [2, 3]]),
    ("replica_groups={}, to_apply=%add", [list(range(8))]),
    ("replica_groups=[2,4]<=[8], dimensions={0}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("replica_groups=mesh['a'=2,'b'=4] {'b'}, dimensions={1}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("replica_groups=mesh['a'=2,'b'=4] {'a'}, use_global_device_ids=true",
     [[0, 4], [1, 5], [2, 6], [3, 7]]),
    # device ids [0,4,1,5,2,6,3,7] laid out as the 2x4 mesh; groups along 'a'.
    ("replica_groups=mesh['a'=2,'b'=4], device_ids=([2,4]T(1,0)) {'a'}, to_apply=%add",
     [[0, 2], [1, 3], [4, 6], [5, 7]]),
    # Sub-axes: 'a':(1)2 is the outer factor 2 of 'a' (stride 4), 'a':(2)2 the middle.
    ("replica_groups=mesh['a'=8] {'a':(1)2}, dimensions={0}", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("replica_groups=mesh['a'=8] {'a':(2)2}, dimensions={0}", [[0, 2], [1, 3], [4, 6], [5, 7]]),
    ("replica_groups=mesh['a'=2,'b'=4] {'a','b'}, to_apply=%add", [list(range(8))]),
    ("source_target_pairs={{0,1},{1,0},{2,3}}, channel_id=3", [[0, 1], [0, 1], [2, 3]]),
])
def test_every_replica_group_spelling(attributes, expected):
    assert _groups(attributes) == expected


_HLO = """HloModule loops

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%inner.cond (p: (u32[], f32[4])) -> pred[] {
  %p = (u32[], f32[4]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %limit = u32[]{:T(128)} constant(3)
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%inner.body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %x = f32[4]{0} get-tuple-element(%p), index=1
  %ag = bf16[16,8]{1,0:T(8,128)} all-gather(%x), channel_id=1, replica_groups=[4,2]<=[8], dimensions={0}, use_global_device_ids=true
  ROOT %t = (s32[], f32[4]) tuple(%i, %x)
}

%outer.cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%outer.body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %w = (s32[], f32[4]) while(%p), condition=%inner.cond, body=%inner.body
  %ar = f32[1024]{0} all-reduce(%x), channel_id=2, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %slice = f32[256]{0} dynamic-slice(%ar, %pid), dynamic_slice_sizes={256}
  ROOT %t = (s32[], f32[4]) tuple(%i, %slice)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %w = (s32[], f32[4]) while(%t0), condition=%outer.cond, body=%outer.body, backend_config={"known_trip_count":{"n":"5"}}
  %ar2 = f32[8]{0} all-reduce(%a), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add_promoted
  %cp = f32[4]{0} collective-permute(%a), channel_id=4, source_target_pairs={{0,4},{4,0}}
  %cps = (bf16[8,4]{1,0}, bf16[8,4]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%a), channel_id=5, source_target_pairs={{0,1},{1,0}}
  ROOT %out = f32[4] copy(%a)
}
"""


def test_counts_follow_the_loops_and_groups_the_mesh():
    found = {c.name: c for c in collectives.parse(
        _HLO, {"data": 2, "fsdp": 4}, ici_shape={"data": 1, "fsdp": 4})}
    ag, ar, ar2, cp = found["ag"], found["ar"], found["ar2"], found["cp"]
    # 3 inner iterations (from `i < 3`) in each of 5 outer ones (known_trip_count).
    assert (ag.count, ar.count, ar2.count, cp.count) == (15, 5, 1, 1)
    # all-gather: the gathered result (16 x 8 bf16, TPU layout ignored); pairs of fsdp.
    assert (ag.buffer_bytes, ag.dtype, ag.mesh_axes, ag.group_size, ag.nodes) == (
        256, "bf16", ("fsdp",), 2, 1)
    # Groups of 4 consecutive devices = the fsdp axis; consumed only as a slice: the
    # reduce-scatter XLA:CPU spells as all-reduce + dynamic-slice.
    assert (ar.mesh_axes, ar.group_size, ar.priced_as, ar.bytes_per_step) == (
        ("fsdp",), 4, "reduce-scatter", 5 * 4096)
    # A reducer cloned "_promoted": XLA:CPU widened a bf16 all-reduce; counted at 16 bits.
    assert (ar2.widened, ar2.dtype, ar2.buffer_bytes, ar2.nodes) == (True, "bf16", 16, 2)
    assert ar2.mesh_axes == ("data", "fsdp") and ar2.priced_as == "all-reduce"
    # Device 0 <-> 4 differ in data only, and data is across nodes.
    assert (cp.mesh_axes, cp.group_size, cp.nodes) == (("data",), 2, 2)
    # An async permute (the TPU compiler's collective matmuls): its result buffer, not
    # the operand copy or the u32 context of the start tuple.
    cps = found["cps"]
    assert (cps.op, cps.buffer_bytes, cps.dtype, cps.mesh_axes) == (
        "collective-permute", 64, "bf16", ("fsdp",))


def test_a_loop_without_a_readable_trip_count_is_refused():
    unreadable = _HLO.replace(', backend_config={"known_trip_count":{"n":"5"}}', "")
    with pytest.raises(ValueError, match="Cannot tell how often ag runs"):
        collectives.parse(unreadable, {"data": 2, "fsdp": 4})


# A layer scan around Pallas kernels as the TPU compiler prints them (splash attention's
# tpu_custom_call): the backend_config spans lines, some beginning with `}}` or `}`, and
# carries the kernel's Mosaic text, whose lines look like instructions and braces. The
# collectives after each kernel (and in the computations after the body) must count.
_PALLAS_HLO = """HloModule jit_train_step, entry_computation_layout={(bf16[8,512,64]{2,1,0})->bf16[8,512,64]{2,1,0}}

%add.clone (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %x, f32[] %y)
}

%layers.body (p: (s32[], bf16[8,512,64])) -> (s32[], bf16[8,512,64]) {
  %p = (s32[], bf16[8,512,64]{2,1,0}) parameter(0)
  %h = bf16[8,512,64]{2,1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %wq.gathered = bf16[64,256]{1,0:T(8,128)(2,1)} all-gather(bf16[16,256]{1,0} %h), channel_id=7, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true, metadata={op_name="jit(train_step)/decoder/attention/wq/all_gather"}
  %splash.fwd = (bf16[8,4,512,64]{3,2,1,0}, f32[8,4,512,128]{3,2,1,0}) custom-call(bf16[8,4,512,64]{3,2,1,0} %q, bf16[8,4,512,64]{3,2,1,0} %k, bf16[8,4,512,64]{3,2,1,0} %v, s32[8,512]{1,0} %segment_ids), custom_call_target="tpu_custom_call", operand_layout_constraints={bf16[8,4,512,64]{3,2,1,0}, bf16[8,4,512,64]{3,2,1,0}, bf16[8,4,512,64]{3,2,1,0}, s32[8,512]{1,0}}, metadata={op_name="jit(train_step)/decoder/attention/splash_mha_fwd/pallas_call" source_file="splash_attention_kernel.py" source_line=1104}, backend_config={"custom_call_config": {"kernel_name": "splash_mha_fwd_residuals", "needs_layout_passes": true, "serialization_format": 1,
"cost_estimate": {"flops": 2147483648, "transcendentals": 8388608, "bytes_accessed": 3145728
}},
"body": "module attributes {stable_mosaic.version = 11 : i64} {
  func.func @splash_mha_fwd(%arg0: i32, %arg1: memref<1x512x64xbf16, #tpu.memory_space<vmem>>) attributes {dimension_semantics = [#tpu.dimension_semantics<parallel>]} {
    %0 = \\"tpu.iota\\"() {dimensions = array<i32: 0>} : () -> vector<8x128xi32>
    %1 = all-gather(%0), replica_groups={{0,1}}
    return
  }
}
"}
  %wo.gathered = bf16[256,64]{1,0} all-gather(bf16[64,64]{1,0} %h), channel_id=8, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  %splash.bwd = bf16[8,4,512,64]{3,2,1,0} custom-call(bf16[8,4,512,64]{3,2,1,0} %q, f32[8,4,512,128]{3,2,1,0} %res), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"kernel_name": "splash_mha_dkv",
"cost_estimate": {"flops": 4294967296, "transcendentals": 8388608, "bytes_accessed": 6291456
}}}
  %grad.rs = bf16[16,256]{1,0} reduce-scatter(bf16[64,256]{1,0} %h), channel_id=9, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true, to_apply=%add.clone
  ROOT %t = (s32[], bf16[8,512,64]) tuple(%i, %h)
}

%layers.cond (p: (s32[], bf16[8,512,64])) -> pred[] {
  %p = (s32[], bf16[8,512,64]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(32)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: bf16[8,512,64]) -> bf16[8,512,64] {
  %a = bf16[8,512,64]{2,1,0} parameter(0)
  %w = (s32[], bf16[8,512,64]) while(%t0), condition=%layers.cond, body=%layers.body
  %loss.ar = f32[]{:T(128)} all-reduce(f32[] %l), channel_id=10, replica_groups=[1,8]<=[8], use_global_device_ids=true, to_apply=%add.clone
  ROOT %out = bf16[8,512,64]{2,1,0} copy(%a)
}
"""


def test_pallas_custom_calls_with_multi_line_attributes_do_not_end_the_computation():
    found = collectives.parse(_PALLAS_HLO, {"data": 2, "fsdp": 4},
                              ici_shape={"data": 1, "fsdp": 4})
    # Every collective after the kernels, in the body and in ENTRY, 32 layers each; the
    # all-gather in the kernel's text is not an instruction.
    assert sorted((c.name, c.op, c.count) for c in found) == [
        ("grad.rs", "reduce-scatter", 32), ("loss.ar", "all-reduce", 1),
        ("wo.gathered", "all-gather", 32), ("wq.gathered", "all-gather", 32)]
    assert sum(c.count for c in found) == 97
    assert {c.mesh_axes for c in found if c.name != "loss.ar"} == {("fsdp",)}
    computations, _ = collectives._computations(_PALLAS_HLO)
    kernel = next(line for line in computations["layers.body"] if "splash.fwd" in line)
    assert kernel.endswith('"}') and kernel.count("\n") == 10
    with pytest.raises(ValueError, match="ends inside an instruction"):
        collectives.parse(_PALLAS_HLO[:_PALLAS_HLO.index("func.func")],
                          {"data": 2, "fsdp": 4})


def _one(op, nbytes, group, nodes, axes=("fsdp",)):
    return Collective("x", op, "bf16", nbytes, group, axes, nodes, 1)


def test_link_times_inside_and_across_nodes():
    nvlink, node_network, per_node = 450e9, 400e9, 8  # H100 80GB
    S = 1e9
    # Inside a node: ring over 8 at NVLink speed; an all-reduce moves twice as much.
    assert collectives.seconds(_one("all-gather", S, 8, 1), nvlink, node_network,
                               per_node) == pytest.approx(7 / 8 * S / nvlink)
    assert collectives.seconds(_one("all-reduce", S, 8, 1), nvlink, node_network,
                               per_node) == pytest.approx(2 * 7 / 8 * S / nvlink)
    # One GPU per node in the group: each GPU's share of the node network (50 GB/s).
    assert collectives.seconds(_one("all-gather", S, 8, 8), nvlink, node_network,
                               per_node) == pytest.approx(7 / 8 * S / 50e9)
    # 2 nodes x 8: NVLink inside, then S/8 per GPU across.
    assert collectives.seconds(_one("reduce-scatter", S, 16, 2), nvlink, node_network,
                               per_node) == pytest.approx(7 / 8 * S / nvlink
                                                          + 1 / 2 * S / 8 / 50e9)
    assert collectives.seconds(_one("all-gather", S, 8, 8), nvlink, None, per_node) is None


def test_scaling_the_data_axis_keeps_buffers_and_grows_groups():
    c = _one("all-reduce", 1000, 4, 2, axes=("data", "fsdp"))  # data 2 over 2 nodes x fsdp 2
    scaled = collectives.scale_axis(c, "data", (2, 39), (2, 39))
    assert (scaled.group_size, scaled.nodes, scaled.buffer_bytes) == (78, 39, 1000)
    fsdp_only = _one("all-gather", 1000, 8, 1)
    assert collectives.scale_axis(fsdp_only, "data", (2, 39), (2, 39)) == fsdp_only
    # An all-gather's buffer is what it gathers: each new member brings its piece.
    gather = _one("all-gather", 1000, 4, 2, axes=("data", "fsdp"))
    assert collectives.scale_axis(gather, "data", (2, 39), (2, 39)).buffer_bytes == 19_500


def _compiled(model_name, mesh_shape, rules):
    from test_configs import model_config  # noqa: PLC0415

    model = families.model_for(model_config(model_name))
    mesh = partitioning.make_mesh(mesh_shape)
    compiled, graphdef, state, _ = planner._compile(
        model, optimizers.adamw_llama2(1e-3, 1, 10), mesh, partitioning.get_rules(rules), 8,
        {"targets": 64}, 1)
    found = collectives.parse(compiled.as_text(), dict(mesh.shape))
    return found, train_state.params_of(graphdef, state), dict(mesh.shape)


def _is_norm(param) -> bool:
    """A norm scale: replicated by every preset (partitioning.NORM), so its gradient is
    all-reduced, not reduce-scattered."""
    return partitioning.NORM in param.get_metadata().get("out_sharding", ())


def test_a_compiled_fsdp_step_reduce_scatters_every_gradient_once():
    """tiny_llama on fsdp 8 (float32): each layer and head gradient is reduced and
    sliced along fsdp once per step: the reduce-scatter bytes are the parameters'
    (the embedding's gradient, a scatter-add, takes an all-to-all instead; the norm
    scales, replicated, are all-reduced)."""
    found, params, sizes = _compiled("tiny_llama", {"fsdp": 8}, "fsdp")
    assert all(c.mesh_axes == ("fsdp",) for c in found)
    expected = sum(memory.shard_bytes(v.get_value(), sizes, gathered=("fsdp",))
                   for path, v in nnx.to_flat_state(params)
                   if path[0] != "embed" and not _is_norm(v))
    reduced = sum(c.bytes_per_step for c in found if c.priced_as == "reduce-scatter")
    assert reduced == expected
    # Two layers' weights gathered in the forward and again in the backward pass.
    layers = sum(memory.shard_bytes(v.get_value(), sizes, gathered=("fsdp",))
                 for path, v in nnx.to_flat_state(params) if path[0] == "decoder")
    gathered = sum(c.bytes_per_step for c in found if c.op == "all-gather")
    assert 2 * layers <= gathered <= 2 * layers + expected


def test_a_tied_table_is_reduced_once_and_gathered_once_on_fsdp():
    """tiny_palm (tied embeddings) on fsdp 8 (float32): the table's gradient (its lookup's
    scatter-add and its head's matmul, summed) is reduce-scattered once per step, like
    every other parameter's but the replicated norm scales'; the table is gathered once, for the head (the fused loss
    makes the head's gradient in the forward pass, so the backward needs no second copy)."""
    found, params, sizes = _compiled("tiny_palm", {"fsdp": 8}, "fsdp")
    shard = {path: memory.shard_bytes(v.get_value(), sizes, gathered=("fsdp",))
             for path, v in nnx.to_flat_state(params) if not _is_norm(v)}
    total, table = sum(shard.values()), shard[("embed", "embedding")]
    layers = sum(b for path, b in shard.items() if path[0] == "decoder")
    reduced = sum(c.bytes_per_step for c in found if c.priced_as == "reduce-scatter")
    assert reduced == total
    gathered = sum(c.bytes_per_step for c in found if c.op == "all-gather" and c.dtype == "f32")
    assert table + 2 * layers <= gathered <= table + 2 * (total - table)


def test_a_compiled_fsdp_tp_step_communicates_over_the_axes_its_rules_name():
    """tiny_llama on fsdp 2 x tensor 4: weights gathered along fsdp (pairs), layer
    outputs summed along tensor (fours), nothing along any other axis."""
    found, _, _ = _compiled("tiny_llama", {"fsdp": 2, "tensor": 4}, "fsdp_tp")
    weight_gathers = [c for c in found if c.op == "all-gather" and c.dtype == "f32"
                      and c.mesh_axes == ("fsdp",)]
    assert weight_gathers and all(c.group_size == 2 for c in weight_gathers)
    assert any(c.op == "all-reduce" and c.mesh_axes == ("tensor",) and c.group_size == 4
               for c in found)
    assert all(set(c.mesh_axes) <= {"fsdp", "tensor"} for c in found)
    assert any(c.priced_as == "reduce-scatter" and c.mesh_axes == ("fsdp",) for c in found)
