"""The model's memory options (docs/MODELS.md "Memory options"): remat policies by name,
the matmul-form embedding, kv heads split over `tensor`, sequence parallelism. Each is
a gin choice whose default is the model as before; each choice gives the same values.

Tiny float32 models; the meshes are the 8 CPU devices tests/conftest.py emulates. What
could not run here (no GPU/TPU): host offload's moves are checked in the traced step,
where they are, not in memory, since XLA's CPU compiler drops them (host is the device).
"""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from tiny import (  # noqa: F401
    assert_close,
    build,
    jit_apply,
    make_module,
    max_abs,
    model_for,
    packed_ids,
    random_tokens,
    strict_rank_promotion,
    tiny_config,
    with_config,
)

from t5x_like.model import layers, partitioning
from t5x_like.model.partitioning import BATCH, LENGTH

L = 16


def _lm_batch(cfg, rows=2, seed=3):
    seg, pos = packed_ids([9, 5], L)
    tokens = random_tokens(seed, (rows, L + 1), cfg.vocab_size) * np.concatenate(
        [[1], seg > 0])[None, :]
    return dict(decoder_input_tokens=tokens[:, :-1], decoder_target_tokens=tokens[:, 1:],
                decoder_loss_weights=np.broadcast_to(seg > 0, (rows, L)).astype(np.int32),
                decoder_segment_ids=np.broadcast_to(seg, (rows, L)).copy(),
                decoder_positions=np.broadcast_to(pos, (rows, L)).copy())


def _grad_fn(cfg):
    model = model_for(cfg)
    return lambda module, batch: nnx.value_and_grad(
        lambda m: model.loss_fn(m, batch)[0])(module)


@functools.lru_cache(maxsize=None)
def _loss_and_grads(cfg):
    module = make_module(cfg)  # parameters depend on shapes only: equal across choices
    loss, grads = nnx.jit(_grad_fn(cfg))(module, _lm_batch(cfg))
    return float(loss), {p: np.asarray(g[...]) for p, g in nnx.to_flat_state(grads)}


def _assert_same_loss_and_grads(cfg_a, cfg_b, atol=1e-6):
    loss_a, grads_a = _loss_and_grads(cfg_a)
    loss_b, grads_b = _loss_and_grads(cfg_b)
    assert abs(loss_a - loss_b) <= atol, (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for path in grads_a:
        assert_close(grads_a[path], grads_b[path], atol=atol)
    assert max(max_abs(g) for g in grads_a.values()) > 1e-3  # not vacuous


# ------------------------------------------------------------------------ remat policies

SEQUENTIAL = tiny_config(block="sequential", tie_embeddings=False)


# Each gradient compile takes 10-20 s on the shared cores; 'save_nothing' is 'full'
# under its new name (test_network covers 'full'), so it runs with -m slow.
@pytest.mark.parametrize("policy", [
    "save_attention_and_mlp_projections", "offload_to_host",
    pytest.param("save_nothing", marks=pytest.mark.slow)])
def test_every_remat_policy_equals_no_remat(policy):
    _assert_same_loss_and_grads(SEQUENTIAL, tiny_config(**{**SEQUENTIAL.__dict__,
                                                           "remat_policy": policy}))


def _grad_jaxpr(policy, block="sequential", mlp_activation="swiglu"):
    cfg = tiny_config(block=block, mlp_activation=mlp_activation, remat_policy=policy)
    graphdef, state = nnx.split(make_module(cfg))
    model, batch = model_for(cfg), _lm_batch(cfg)

    def loss(state):
        return model.loss_fn(nnx.merge(graphdef, state), batch)[0]

    return str(jax.make_jaxpr(jax.grad(loss))(state))


def test_the_policies_save_what_their_names_say():
    """Counted in the traced gradient (no compile): 'full' recomputes every matmul of a
    layer, the projections policy recomputes fewer (the tagged outputs are saved),
    'none' recomputes none; only 'offload_to_host' moves values to host memory."""
    dots = {p: _grad_jaxpr(p).count("dot_general[") for p in
            ("none", "save_attention_and_mlp_projections", "full")}
    assert dots["none"] < dots["save_attention_and_mlp_projections"] < dots["full"], dots
    assert _grad_jaxpr("save_nothing").count("dot_general[") == dots["full"]
    offload = _grad_jaxpr("offload_to_host", block="parallel", mlp_activation="gelu")
    assert "<host>" in offload and "pinned_host" not in _grad_jaxpr("none")
    # Every tag the policies name is on the layer (GeLU: 'mlp_wi'; gated: wi_0, wi_1).
    for text in (offload, _grad_jaxpr("none")):
        assert "name=query_proj" in text
    tagged = _grad_jaxpr("none") + offload
    assert all(f"name={name}" in tagged for name in layers.PROJECTION_NAMES)


def test_a_remat_policy_that_does_not_exist_names_the_choices():
    with pytest.raises(ValueError) as error:
        tiny_config(remat_policy="save_dots")
    message = str(error.value)
    assert "remat_policy='save_dots'" in message and "\n" not in message
    assert all(f"'{name}'" in message for name in layers.REMAT_POLICIES)


# ----------------------------------------------------------------------------- embedding


def test_matmul_embedding_equals_the_lookup():
    gather = tiny_config()  # tied: the table also makes the logits
    matmul = tiny_config(embed_lookup="matmul")
    tokens = random_tokens(5, (2, L))
    module = make_module(gather)
    np.testing.assert_array_equal(  # one non-zero product per output: exact
        np.asarray(jit_apply(module.embed)(tokens)),
        np.asarray(jit_apply(with_config(module, matmul).embed)(tokens)))
    _assert_same_loss_and_grads(gather, matmul)


def test_matmul_embedding_is_exact_in_bfloat16_too():
    cfg = tiny_config(dtype="bfloat16")
    module = make_module(cfg)
    tokens = random_tokens(6, (2, L))
    a = jit_apply(module.embed)(tokens)
    b = jit_apply(with_config(module, tiny_config(dtype="bfloat16",
                                                  embed_lookup="matmul")).embed)(tokens)
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


_ROWS, _ROW_LENGTH, _VOCAB, _DIM = 8, 48, 96, 64  # 384 positions; table 96 x 64


def _embedding_grad_collectives(lookup):
    """The element counts of every collective in the compiled gradient of the embedding
    (followed by a mix of each row's D, as the network's blocks read it) on an 8-way
    fsdp mesh, the tokens' rows split over fsdp."""
    cfg = tiny_config(embed_lookup=lookup, vocab_size=_VOCAB, emb_dim=_DIM)
    mesh = partitioning.make_mesh({"fsdp": 8})
    rules = partitioning.get_rules("fsdp")
    embed = build(lambda: layers.Embed(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(embed)
    state = jax.device_put(state, partitioning.logical_shardings(embed, mesh, rules))
    tokens = jax.device_put(random_tokens(7, (_ROWS, _ROW_LENGTH), _VOCAB),
                            partitioning.batch_sharding(mesh))
    mix_D4 = jnp.asarray(np.random.default_rng(0).standard_normal((_DIM, 4)), jnp.float32)

    def loss(state, tokens):
        # As in the network: the embedded rows are the residual stream (batch split,
        # embed whole), and every later value reads all of a row's D.
        x_BLD = nn.with_logical_constraint(nnx.merge(graphdef, state)(tokens),
                                           (BATCH, LENGTH, None))
        return jnp.sum(jnp.sin(layers.dense(x_BLD, mix_D4)))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        hlo = jax.jit(jax.grad(loss)).lower(state, tokens).compile().as_text()
    counts = []
    for line in hlo.splitlines():
        op = re.search(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all)\(", line)
        if op and " = " in line:
            shapes = re.findall(r"\w+\[([\d,]*)\]", line[:op.start()].split(" = ", 1)[1])
            counts += [math.prod(int(d) for d in shape.split(",") if d) for shape in shapes]
    return counts


def test_matmul_embedding_gradient_moves_no_row_data():
    """Under fsdp the lookup's gradient scatters every position's cotangent into the
    table, so XLA moves row data (indices, cotangents) between the devices that hold the
    rows and those that hold the table's columns; on a real batch that is the
    all-gather of every row's cotangents the planner prices. The matmul form's gradient
    is onehotᵀ · cotangent, reduced over the batch: its collectives are table-sized
    (the forward's fsdp gather of the table and the gradient's reduction), whatever the
    batch."""
    table = {_VOCAB * _DIM, _VOCAB * _DIM // 8}
    gather, matmul = (_embedding_grad_collectives(k) for k in ("gather", "matmul"))
    assert matmul and set(matmul) <= table, matmul
    assert set(gather) - table, gather  # row-sized traffic


def test_an_unknown_embed_lookup_names_the_choices():
    with pytest.raises(ValueError, match=r"embed_lookup='iota' is not one of \('gather', "
                                         r"'matmul'\)"):
        tiny_config(embed_lookup="iota")


# ------------------------------------------------------------- kv heads and sequence split


def test_tensor_preset_splits_kv_heads_only_when_they_divide():
    assert partitioning.tensor_preset(8, 8) == "fsdp_tp_kv"  # Llama 3 70B, tensor 8
    assert partitioning.tensor_preset(8, 4) == "fsdp_tp_kv"
    assert partitioning.tensor_preset(2, 4) == "fsdp_tp"  # 2 kv heads cannot split 4 ways
    assert partitioning.tensor_preset(1, 8) == "fsdp_tp"  # MQA
    assert partitioning.tensor_preset(8, 8, sequence_parallel=True) == "fsdp_tp_kv_sp"
    assert partitioning.tensor_preset(1, 8, sequence_parallel=True) == "fsdp_tp_sp"
    for name in ("fsdp_tp_kv", "fsdp_tp_sp", "fsdp_tp_kv_sp"):
        assert name in partitioning.RULE_PRESETS


def test_the_70b_and_62b_presets_validate_on_a_tensor_8_node():
    """Llama 3 70B (8 kv heads) gets kv heads split, PaLM 62B (MQA) whole, both with the
    residual stream split: shapes only, nothing compiled."""
    from test_configs import factory, model_config

    mesh = partitioning.make_mesh({"fsdp": 1, "tensor": 8})
    for name, expected in (("llama3_70b", "fsdp_tp_kv_sp"), ("palm_62b", "fsdp_tp_sp")):
        cfg = model_config(name)
        preset = partitioning.tensor_preset(cfg.num_kv_heads, 8, sequence_parallel=True)
        assert preset == expected
        partitioning.validate_for_mesh(factory(cfg), mesh, preset)


MESH = {"fsdp": 2, "tensor": 4}


def _sharded_forward(cfg, preset, tokens):
    """The decoder's logits on the fsdp 2 x tensor 4 mesh under `preset`, the parameters
    resharded from the single-device module, and the wk sharding."""
    mesh, rules = partitioning.make_mesh(MESH), partitioning.get_rules(preset)
    module = make_module(cfg)
    partitioning.validate_for_mesh(lambda: make_module(cfg), mesh, rules)
    graphdef, state = nnx.split(module)
    state = jax.device_put(state, partitioning.logical_shardings(module, mesh, rules))
    tokens = jax.device_put(tokens, partitioning.batch_sharding(mesh))
    wk = nnx.merge(graphdef, state).decoder.layers.self_attention.wk[...]
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    return np.asarray(logits), wk.sharding.spec


def test_kv_heads_split_over_tensor_when_they_divide_and_outputs_are_equal():
    mha = tiny_config(num_kv_heads=4)  # 4 kv heads over tensor 4
    tokens = random_tokens(8, (2, L))
    reference = np.asarray(jit_apply(make_module(mha))(tokens))
    split, split_spec = _sharded_forward(mha, partitioning.tensor_preset(4, 4), tokens)
    assert split_spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert_close(split, reference, atol=1e-5)
    gqa = tiny_config()  # 2 kv heads: tensor 4 does not divide them, kept whole
    assert partitioning.tensor_preset(2, 4) == "fsdp_tp"
    whole, whole_spec = _sharded_forward(gqa, "fsdp_tp", tokens)
    assert whole_spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    assert_close(whole, np.asarray(jit_apply(make_module(gqa))(tokens)), atol=1e-5)
    with pytest.raises(ValueError, match=r"num_kv_heads=2 is not divisible by 4"):
        partitioning.validate_for_mesh(lambda: make_module(gqa), partitioning.make_mesh(MESH),
                                       "fsdp_tp_kv")


def _stack_output_sharding(cfg, preset):
    """The sharding of the decoder stack's output (the residual stream after the last
    block, which the block-boundary constraint lays out) under `preset`."""
    mesh, rules = partitioning.make_mesh(MESH), partitioning.get_rules(preset)
    module = make_module(cfg)
    graphdef, state = nnx.split(module)
    state = jax.device_put(state, partitioning.logical_shardings(module, mesh, rules))
    x = jax.device_put(np.ones((2, L, cfg.emb_dim), np.float32),
                       partitioning.batch_sharding(mesh))
    mask = layers.attention.Mask.causal_lm(jnp.ones((2, L), jnp.int32))
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (2, L))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        out = jax.jit(lambda s, x: nnx.merge(graphdef, s).decoder(
            x, mask_B1LL=mask, positions_BL=positions))(state, x)
    return out.sharding, mesh


def test_sequence_parallel_splits_the_residual_stream_along_length():
    """Between blocks the residual stream is [batch over data x fsdp, length over
    tensor, embed whole] (under fsdp_tp: length whole); the logits equal the
    single-device ones."""
    cfg = tiny_config()
    tokens = random_tokens(9, (2, L))
    sp, _ = _sharded_forward(cfg, "fsdp_tp_sp", tokens)
    assert_close(sp, np.asarray(jit_apply(make_module(cfg))(tokens)), atol=1e-5)
    uneven = tokens[:, :6]  # 6 positions over tensor 4: XLA pads the last shard
    sp, _ = _sharded_forward(cfg, "fsdp_tp_sp", uneven)
    assert_close(sp, np.asarray(jit_apply(make_module(cfg))(uneven)), atol=1e-5)
    P = jax.sharding.PartitionSpec
    for preset, length_axis in (("fsdp_tp_sp", "tensor"), ("fsdp_tp", None)):
        sharding, mesh = _stack_output_sharding(cfg, preset)
        expected = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), length_axis, None))
        assert sharding.is_equivalent_to(expected, 3), (preset, sharding)


@pytest.mark.slow
def test_sequence_parallel_training_step_equals_single_device():
    cfg = tiny_config(num_kv_heads=4, block="sequential", remat_policy="save_nothing")
    reference_loss, reference_grads = _loss_and_grads(cfg)
    mesh, rules = partitioning.make_mesh(MESH), partitioning.get_rules("fsdp_tp_kv_sp")
    module = make_module(cfg)
    graphdef, state = nnx.split(module)
    module = nnx.merge(graphdef, jax.device_put(
        state, partitioning.logical_shardings(module, mesh, rules)))
    batch = jax.device_put(_lm_batch(cfg), partitioning.batch_sharding(mesh))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        loss, grads = nnx.jit(_grad_fn(cfg))(module, batch)
    assert abs(float(loss) - reference_loss) <= 1e-5
    for path, g in nnx.to_flat_state(grads):
        np.testing.assert_allclose(np.asarray(g[...]), reference_grads[path], rtol=1e-4,
                                   atol=1e-6, err_msg=str(path))


def _gradient_temp_bytes(preset, **overrides):
    """XLA's per-device temporaries of the compiled training gradient (CPU's buffer
    assignment) of a small Llama-shaped model on the fsdp 2 x tensor 4 mesh."""
    cfg = tiny_config(**{**dict(vocab_size=256, emb_dim=128, num_heads=4, num_kv_heads=4,
                                head_dim=32, mlp_dim=256, num_decoder_layers=4,
                                block="sequential", tie_embeddings=False,
                                remat_policy="full"), **overrides})
    model = model_for(cfg)
    mesh, rules = partitioning.make_mesh(MESH), partitioning.get_rules(preset)
    graphdef, state = partitioning.abstract_sharded(lambda: model.make_module(nnx.Rngs(0)),
                                                    mesh, rules)
    tokens = jax.ShapeDtypeStruct((4, 256), np.int32, sharding=partitioning.batch_sharding(mesh))
    batch = dict(decoder_input_tokens=tokens, decoder_target_tokens=tokens,
                 decoder_loss_weights=tokens)

    def gradient(state, batch):
        return jax.grad(lambda s: model.loss_fn(nnx.merge(graphdef, s), batch)[0])(state)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        compiled = jax.jit(gradient).lower(state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_each_option_holds_less_where_it_should():
    """Compiled, not run: remat 'none' > the projections policy > 'full' in temporaries,
    and sequence parallelism holds less than the same preset without it."""
    none = _gradient_temp_bytes("fsdp_tp_kv", remat_policy="none")
    projections = _gradient_temp_bytes("fsdp_tp_kv",
                                       remat_policy="save_attention_and_mlp_projections")
    full = _gradient_temp_bytes("fsdp_tp_kv")
    assert none > projections > full, (none, projections, full)
    assert _gradient_temp_bytes("fsdp_tp_kv_sp") < full


def _planned_comm_seconds(preset):
    """The planner's H100 seconds per step of tensor-parallel and of FSDP collectives
    for a 4-kv-head tiny Llama, one row of 512 per device, on fsdp 2 x tensor 4."""
    from test_configs import model_config

    from t5x_like.model import families
    from t5x_like.planning import planner
    from t5x_like.training import optimizers

    cfg = tiny_config(**{**model_config("tiny_llama").__dict__, "num_kv_heads": 4,
                         "remat_policy": "full"})
    report = planner.plan(
        model=families.model_for(cfg), optimizer=optimizers.adamw_llama2(1e-3, 10, 100),
        mesh_config=partitioning.MeshConfig(shape=MESH, rules=preset), batch_size=2,
        task_feature_lengths={"targets": 512}, train_tokens=1e9)
    h100 = next(d for d in report["devices"] if d["kind"] == "H100 80GB")
    return h100["tensor_comm_s"], h100["fsdp_data_comm_s"]


@pytest.mark.slow
def test_sequence_parallelism_moves_no_more_than_tensor_parallelism():
    """The plan of the same step with and without the length split: sequence
    parallelism replaces each all-reduce over tensor by an all-gather and a
    reduce-scatter of the same ring time, and moves the same weights over fsdp."""
    tensor_tp, fsdp_tp = _planned_comm_seconds("fsdp_tp_kv")
    tensor_sp, fsdp_sp = _planned_comm_seconds("fsdp_tp_kv_sp")
    assert tensor_sp <= 1.1 * tensor_tp, (tensor_sp, tensor_tp)
    assert fsdp_sp <= 1.1 * fsdp_tp, (fsdp_sp, fsdp_tp)
