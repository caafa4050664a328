"""Properties of the building blocks: config validation, attention (MHA/GQA) against a numpy
reference, masks against a brute-force definition, RoPE, norms, block formulas, param axes."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import (  # noqa: F401
    assert_close,
    build,
    make_module,
    max_abs,
    model_for,
    packed_ids,
    strict_rank_promotion,
    tiny_config,
)

from t5x_like.model import layers, partitioning
from t5x_like.model.partitioning import LAYERS, LOGICAL_AXES

# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("changes, words", [
    (dict(num_heads=6, num_kv_heads=4), ["num_heads=6", "num_kv_heads=4"]),
    (dict(block="serial"), ["'serial'", "parallel", "sequential"]),
    (dict(remat_policy="some"), ["'some'", "minimal"]),
    (dict(mlp_activation="relu"), ["'relu'", "swiglu"]),
    (dict(dtype="int8"), ["'int8'", "bfloat16"]),
    (dict(head_dim=7, num_heads=4), ["head_dim=7", "even"]),
    (dict(num_decoder_layers=0), ["num_decoder_layers=0"]),
    (dict(dropout_rate=1.0), ["dropout_rate=1.0"]),
])
def test_config_rejects_bad_values_and_names_them(changes, words):
    with pytest.raises(ValueError) as err:
        tiny_config(**changes)
    for word in words:
        assert word in str(err.value)


def test_config_is_frozen_and_hashable():
    cfg = tiny_config()
    with pytest.raises(Exception):
        cfg.emb_dim = 3  # type: ignore[misc]
    assert hash(cfg) == hash(tiny_config())
    assert not cfg.is_encoder_decoder and tiny_config(num_encoder_layers=1).is_encoder_decoder


# ------------------------------------------------------------------------------ attention


def _ref_attention(x, wq, wk, wv, wo, mask_BLM):
    """Plain numpy multi-head attention; kv head g serves query heads [g·r, (g+1)·r)."""
    x, wq, wk, wv, wo = (np.asarray(a, np.float64) for a in (x, wq, wk, wv, wo))
    rep = wq.shape[1] // wk.shape[1]
    q = np.einsum("BLD,DHK->BLHK", x, wq)
    k = np.repeat(np.einsum("BMD,DGK->BMGK", x, wk), rep, axis=2)
    v = np.repeat(np.einsum("BMD,DGK->BMGK", x, wv), rep, axis=2)
    s = np.einsum("BLHK,BMHK->BHLM", q, k) / math.sqrt(q.shape[-1])
    # A large finite negative, like jax: a fully masked (padding) row becomes uniform,
    # i.e. the mean of V, the trap the loss weights must remove.
    s = np.where(mask_BLM[:, None], s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("BLHK,HKD->BLD", np.einsum("BHLM,BMHK->BLHK", p, v), wo)


def _attention(cfg, seed=0):
    return build(lambda: layers.Attention(cfg, rngs=nnx.Rngs(0)), seed)


def _self_attend(attn, x, mask_B1LL):
    return jax.jit(lambda x, m: attn(x, x, m))(x, mask_B1LL)


def _packed_causal_mask():
    seg, _ = packed_ids([3, 4], 9)
    seg = np.stack([seg, np.ones(9, np.int32)])
    return layers.causal_mask(jnp.asarray(seg))


def test_mha_matches_numpy_reference():
    cfg = tiny_config(num_heads=4, num_kv_heads=4)
    attn = _attention(cfg)
    x = np.random.default_rng(0).normal(size=(2, 9, cfg.emb_dim)).astype(np.float32)
    mask = _packed_causal_mask()
    out = _self_attend(attn, x, mask)
    ref = _ref_attention(x, attn.wq[...], attn.wk[...], attn.wv[...], attn.wo[...],
                         np.asarray(mask[:, 0]))
    assert_close(out, ref, atol=1e-5)
    # Row 0 ends in padding: those fully masked queries output the mean of V (not zero).
    assert not np.asarray(mask[0, 0, -1]).any() and max_abs(out[0, -1]) > 1e-3


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa_cfg = tiny_config(num_heads=4, num_kv_heads=2)
    mha_cfg = tiny_config(num_heads=4, num_kv_heads=4)
    gqa = _attention(gqa_cfg)
    mha = _attention(mha_cfg, seed=1)
    mha.wq[...] = gqa.wq[...]
    mha.wo[...] = gqa.wo[...]
    mha.wk[...] = jnp.repeat(gqa.wk[...], 2, axis=1)
    mha.wv[...] = jnp.repeat(gqa.wv[...], 2, axis=1)
    x = np.random.default_rng(1).normal(size=(2, 9, gqa_cfg.emb_dim)).astype(np.float32)
    mask = _packed_causal_mask()
    out_gqa = _self_attend(gqa, x, mask)
    assert_close(out_gqa, _self_attend(mha, x, mask), atol=1e-5)
    ref = _ref_attention(x, gqa.wq[...], gqa.wk[...], gqa.wv[...], gqa.wo[...],
                         np.asarray(mask[:, 0]))
    assert_close(out_gqa, ref, atol=1e-5)


def test_mqa_runs_and_differs_from_gqa():
    x = np.random.default_rng(2).normal(size=(2, 9, 32)).astype(np.float32)
    mask = _packed_causal_mask()
    out = _self_attend(_attention(tiny_config(num_kv_heads=1)), x, mask)
    assert out.shape == (2, 9, 32) and np.isfinite(np.asarray(out)).all()


# ------------------------------------------------------------------------------ masks


def _brute_force_mask(q_seg, k_seg, causal, prefix=None):
    b, l = q_seg.shape
    m = k_seg.shape[1]
    out = np.zeros((b, 1, l, m), bool)
    for i in range(b):
        for x in range(l):
            for y in range(m):
                ok = q_seg[i, x] == k_seg[i, y] and k_seg[i, y] != 0
                if causal:
                    see_past = y <= x
                    both_prefix = prefix is not None and prefix[i, x] and prefix[i, y]
                    ok = ok and (see_past or both_prefix)
                out[i, 0, x, y] = ok
    return out


def test_masks_match_brute_force_definitions():
    seg_a, _ = packed_ids([3, 4, 2], 11)
    seg_b, _ = packed_ids([6, 5], 11)
    seg = np.stack([seg_a, seg_b])
    # Prefix flags per segment: first 2 tokens of each segment of row a, 4 of row b's first.
    prefix = np.zeros_like(seg)
    prefix[0, [0, 1, 3, 4, 7]] = 1
    prefix[1, [0, 1, 2, 3]] = 1
    enc_seg = np.stack([packed_ids([2, 2, 3], 8)[0], packed_ids([5, 3], 8)[0]])
    np.testing.assert_array_equal(layers.causal_mask(jnp.asarray(seg)),
                                  _brute_force_mask(seg, seg, causal=True))
    np.testing.assert_array_equal(layers.causal_mask(jnp.asarray(seg), jnp.asarray(prefix)),
                                  _brute_force_mask(seg, seg, causal=True, prefix=prefix))
    np.testing.assert_array_equal(layers.bidirectional_mask(jnp.asarray(seg)),
                                  _brute_force_mask(seg, seg, causal=False))
    np.testing.assert_array_equal(layers.cross_mask(jnp.asarray(seg), jnp.asarray(enc_seg)),
                                  _brute_force_mask(seg, enc_seg, causal=False))


def test_prefix_mask_lets_prefix_see_later_prefix_but_targets_only_the_past():
    seg = jnp.ones((1, 6), jnp.int32)
    prefix = jnp.asarray([[1, 1, 1, 0, 0, 0]])
    mask = np.asarray(layers.causal_mask(seg, prefix))[0, 0]
    assert mask[0, 2] and mask[1, 2]  # prefix sees later prefix
    assert not mask[2, 3] and not mask[3, 4]  # nobody sees the future of a target
    assert mask[5, :6].all()  # last target sees everything before it


# ------------------------------------------------------------------------------ RoPE, norm


def test_rope_is_relative_and_identity_at_zero():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(1, 1, 2, 8)).astype(np.float32)
    k = rng.normal(size=(1, 1, 2, 8)).astype(np.float32)

    def score(pq, pk, theta=10_000.0):
        rq = layers.apply_rope(jnp.asarray(q), jnp.asarray([[pq]]), theta)
        rk = layers.apply_rope(jnp.asarray(k), jnp.asarray([[pk]]), theta)
        return np.asarray(jnp.sum(rq * rk, axis=-1))

    assert_close(score(7, 3), score(104, 100), atol=1e-4)
    assert_close(score(7, 3, 500_000.0), score(54, 50, 500_000.0), atol=1e-4)
    assert np.abs(score(7, 3) - score(7, 4)).max() > 1e-3
    assert_close(layers.apply_rope(jnp.asarray(q), jnp.zeros((1, 1), jnp.int32), 1e4), q)
    # Rotation preserves the norm of each head vector.
    r = layers.apply_rope(jnp.asarray(q), jnp.asarray([[12345]]), 1e4)
    assert_close(jnp.linalg.norm(r, axis=-1), np.linalg.norm(q, axis=-1), atol=1e-4)


def test_rmsnorm_matches_numpy():
    cfg = tiny_config(norm_eps=1e-5)
    norm = build(lambda: layers.RMSNorm(cfg, rngs=nnx.Rngs(0)))
    norm.scale[...] = jnp.linspace(0.5, 1.5, cfg.emb_dim)
    x = np.random.default_rng(4).normal(size=(2, 3, cfg.emb_dim)).astype(np.float32) * 3
    ref = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-5) * np.linspace(0.5, 1.5, 32)
    assert_close(norm(jnp.asarray(x)), ref, atol=1e-5)


@pytest.mark.parametrize("scale", [True, False])
def test_tied_logits_are_x_dot_embedding_scaled_only_when_asked(scale):
    """PaLM's tied logits x·Eᵀ/√D (the default) and Hugging Face's tied Llama x·Eᵀ."""
    cfg = tiny_config(scale_tied_logits=scale)
    embed = build(lambda: layers.Embed(cfg, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(7).normal(size=(2, 3, cfg.emb_dim)).astype(np.float32)
    ref = x @ np.asarray(embed.embedding[...]).T
    assert_close(embed.attend(jnp.asarray(x)), ref / math.sqrt(cfg.emb_dim) if scale else ref,
                 atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_logits_are_float32_and_their_gradient_runs_in_the_compute_dtype(dtype):
    """head_logits: x·w accumulated in float32; its gradient is the plain matmul's with the
    cotangent cast to the operands' dtype first (in float32, autodiff's own)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 5, 16)), dtype)
    w = jnp.asarray(rng.normal(size=(16, 24)), dtype)
    g = jnp.asarray(rng.normal(size=(2, 5, 24)), jnp.float32)
    out, vjp = jax.vjp(layers.head_logits, x, w)
    plain = functools.partial(layers.dense, preferred_element_type=jnp.float32)
    plain_out, plain_vjp = jax.vjp(plain, x, w)
    assert out.dtype == jnp.float32
    assert_close(out, plain_out, atol=0, rtol=0)
    dx, dw = vjp(g)
    assert dx.dtype == dw.dtype == dtype
    cast_dx, cast_dw = jax.vjp(layers.dense, x, w)[1](g.astype(dtype))
    assert_close(dx, cast_dx, atol=0, rtol=0)
    assert_close(dw, cast_dw, atol=0, rtol=0)
    tol = 1e-6 if dtype == jnp.float32 else 3e-2
    for ours, autodiff in zip((dx, dw), plain_vjp(g)):
        assert_close(ours, autodiff, atol=tol * max_abs(autodiff), rtol=tol)


def test_head_logits_weight_gradient_is_split_as_the_weight():
    """Under FSDP the head's weight gradient leaves the backward pass split as the weight
    (EMBED over fsdp), not whole on every device."""
    mesh = partitioning.make_mesh({"fsdp": 8})
    rules = partitioning.get_rules("fsdp")
    x = jnp.ones((8, 4, 16), jnp.bfloat16)
    w = jnp.ones((16, 24), jnp.bfloat16)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        dw = jax.jit(jax.grad(lambda w: layers.head_logits(x, w).sum()))(w)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
    assert dw.sharding.is_equivalent_to(split, dw.ndim), dw.sharding


# ------------------------------------------------------------------------------ blocks


@pytest.mark.parametrize("block", ["parallel", "sequential"])
@pytest.mark.parametrize("cross", [False, True])
def test_block_residual_formulas(block, cross):
    cfg = tiny_config(block=block)
    blk = build(lambda: layers.Block(cfg, cross_attention=cross, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    enc = jnp.asarray(rng.normal(size=(2, 4, 32)), jnp.float32)

    @nnx.jit
    def run(blk, x, enc):
        pos = jnp.broadcast_to(jnp.arange(5)[None, :], (2, 5))
        mask = layers.causal_mask(jnp.ones((2, 5), jnp.int32))
        xmask = layers.cross_mask(jnp.ones((2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))
        kw = dict(encoded_BMD=enc, cross_mask_B1LM=xmask) if cross else {}
        out = blk(x, mask_B1LL=mask, positions_BL=pos, **kw)
        if block == "parallel":
            h = blk.pre_norm(x)
            want = x + blk.self_attention(h, h, mask, pos, pos) + blk.mlp(h)
            if cross:
                want = want + blk.cross_attention(h, enc, xmask)
        else:
            h = blk.pre_self_attention_norm(x)
            want = x + blk.self_attention(h, h, mask, pos, pos)
            if cross:
                h = blk.pre_cross_attention_norm(want)
                want = want + blk.cross_attention(h, enc, xmask)
            want = want + blk.mlp(blk.pre_mlp_norm(want))
        return out, want

    out, want = run(blk, x, enc)
    assert_close(out, want, atol=1e-5)


@pytest.mark.parametrize("activation, names", [
    ("swiglu", {"wi_0", "wi_1", "wo"}), ("geglu", {"wi_0", "wi_1", "wo"}), ("gelu", {"wi", "wo"}),
])
def test_mlp_variants(activation, names):
    cfg = tiny_config(mlp_activation=activation)
    mlp = build(lambda: layers.Mlp(cfg, rngs=nnx.Rngs(0)))
    assert {p[0] for p, _ in nnx.to_flat_state(nnx.state(mlp, nnx.Param))} == names
    x = np.random.default_rng(6).normal(size=(1, 3, 32)).astype(np.float32)
    wo = np.asarray(mlp.wo[...])
    if activation == "gelu":
        h = jax.nn.gelu(x @ np.asarray(mlp.wi[...]))
    else:
        act = jax.nn.silu if activation == "swiglu" else jax.nn.gelu
        h = act(x @ np.asarray(mlp.wi_0[...])) * (x @ np.asarray(mlp.wi_1[...]))
    assert_close(mlp(jnp.asarray(x)), np.asarray(h) @ wo, atol=1e-5)


# ------------------------------------------------------------------------------ params


@pytest.mark.parametrize("changes", [
    dict(), dict(scan_layers=False), dict(num_encoder_layers=2, tie_embeddings=False),
])
def test_every_param_declares_logical_axes(changes):
    cfg = tiny_config(**changes)
    module = make_module(cfg)
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        name = "/".join(map(str, path))
        assert axes is not None and len(axes) == var[...].ndim, (name, axes)
        assert set(axes) <= set(LOGICAL_AXES) and len(set(axes)) == len(axes), (name, axes)
        assert var[...].dtype == jnp.float32, name
        stacked = cfg.scan_layers and "layers" in path
        assert (axes[0] == LAYERS) == stacked, (name, axes)


def test_param_names_are_stable():
    cfg = tiny_config(num_encoder_layers=1, tie_embeddings=False, block="sequential")
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(
        nnx.state(make_module(cfg), nnx.Param))}
    for expected in ["embed/embedding", "output/lm_head/kernel", "output/final_norm/scale",
                     "encoder_norm/scale", "encoder/layers/self_attention/wq",
                     "decoder/layers/cross_attention/wk", "decoder/layers/cross_attention/wv",
                     "decoder/layers/self_attention/wo", "decoder/layers/mlp/wi_0",
                     "decoder/layers/mlp/wi_1", "decoder/layers/mlp/wo",
                     "decoder/layers/pre_self_attention_norm/scale",
                     "decoder/layers/pre_cross_attention_norm/scale",
                     "decoder/layers/pre_mlp_norm/scale"]:
        assert expected in names, (expected, sorted(names))


@pytest.mark.slow  # compiles threefry per shape: ~15 s on the loaded shared cores
def test_init_scales_follow_palm():
    cfg = tiny_config(emb_dim=128, num_heads=4, head_dim=32, mlp_dim=256, num_decoder_layers=1,
                      vocab_size=512)
    module = model_for(cfg).make_module(nnx.Rngs(0))  # the production init, eagerly
    std = lambda v: float(np.std(np.asarray(v[...])))
    assert abs(std(module.embed.embedding) - 1.0) < 0.05
    attn = module.decoder.layers.self_attention
    assert abs(std(attn.wq) * math.sqrt(128) - 1.0) < 0.05
    assert abs(std(attn.wo) * math.sqrt(4 * 32) - 1.0) < 0.05
    assert abs(std(module.decoder.layers.mlp.wo) * math.sqrt(256) - 1.0) < 0.05
