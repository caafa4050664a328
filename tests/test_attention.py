"""The attention implementations (model/attention.py) against the XLA path.

Splash attention (the TPU kernel) runs here in Pallas interpret mode on CPU: its outputs
and gradients must equal 'xla''s to 1e-5 in float32 for every mask the networks use
(packed causal rows with several documents and padding, bidirectional encoder rows,
cross-attention, a left-padded KV-cache prefill) and for MHA, GQA and MQA. Masks it
cannot do (prefix LM, a decode step) fall back under 'auto' with one log line and are an
error when it is named. Splash tiles sequences in blocks of 128, so these are the
smallest shapes it takes; interpret mode makes each case take seconds. cuDNN needs a GPU:
its equality test runs only there (bench/accelerator_check.sh's kernel step); here its
packed layout is checked as a mask, and the step is lowered for CUDA.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import make_module, packed_ids, random_tokens, tiny_config, with_config

from t5x_like.model import attention, layers, partitioning
from t5x_like.model.attention import Mask

L = 128  # splash's smallest block along a sequence


def _qkv(seed, batch, length, slots, heads, kv_heads, head_dim=8, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, heads, head_dim))
    k, v = (rng.normal(size=(batch, slots, kv_heads, head_dim)) for _ in range(2))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _packed(lengths_per_row, total):
    return jnp.asarray(np.stack([packed_ids(lengths, total)[0] for lengths in lengths_per_row]))


def _outputs_and_grads(impl, q, k, v, mask, rows_B1L1):
    """Attention outputs and the gradients of a random projection of them; rows with no
    allowed key (padding: undefined values) are left out of both."""
    w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), q.dtype) * rows_B1L1

    def loss(q, k, v):
        return jnp.sum(attention.attend(q, k, v, mask, impl) * w)

    out = jax.jit(lambda q, k, v: attention.attend(q, k, v, mask, impl))(q, k, v)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    return out * rows_B1L1, grads


def _assert_kernel_equals_xla(kernel, q, k, v, mask):
    rows_BL = np.asarray(mask.dense()[:, 0].any(-1))
    assert rows_BL.sum() > rows_BL.shape[0], "the mask should leave real rows"
    rows = jnp.asarray(rows_BL[:, :, None, None], q.dtype)
    out, grads = _outputs_and_grads(kernel, q, k, v, mask, rows)
    want_out, want_grads = _outputs_and_grads("xla", q, k, v, mask, rows)
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(want_out).max()) > 0.1  # not vacuous


# Several documents and padding in row 0, one document and padding in row 1.
_SEGMENTS = [[40, 50, 30], [100]]


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 1)], ids=["gqa", "mqa"])
def test_splash_equals_xla_on_packed_causal_rows(heads, kv_heads):
    q, k, v = _qkv(0, 2, L, L, heads, kv_heads)
    _assert_kernel_equals_xla("splash", q, k, v, Mask.causal_lm(_packed(_SEGMENTS, L)))


def test_splash_equals_xla_on_packed_bidirectional_encoder_rows():
    q, k, v = _qkv(1, 2, L, L, 2, 2)  # MHA
    _assert_kernel_equals_xla("splash", q, k, v, Mask.bidirectional(_packed(_SEGMENTS, L)))


def test_splash_equals_xla_on_cross_attention():
    q, k, v = _qkv(2, 2, L, 2 * L, 4, 2)
    mask = Mask.cross(_packed(_SEGMENTS, L), _packed([[100, 60, 90], [200]], 2 * L))
    _assert_kernel_equals_xla("splash", q, k, v, mask)


def test_splash_equals_xla_on_a_left_padded_prefill_into_a_kv_cache():
    """Prefill of a fresh cache (queries at slots 0..L-1 of 2L): row 0 left-padded by 37."""
    q, k, v = _qkv(3, 2, L, 2 * L, 4, 1)
    valid_BS = np.zeros((2, 2 * L), bool)
    valid_BS[0, 37:L] = valid_BS[1, :L] = True
    _assert_kernel_equals_xla("splash", q, k, v, Mask.cached(L, jnp.asarray(valid_BS), 0))


@pytest.mark.slow
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_splash_equals_xla_for_more_head_layouts_and_longer_rows(heads, kv_heads, kind):
    segments = [[100, 156, 0], [30, 30, 30, 30, 30, 20], [256]]
    q, k, v = _qkv(4, 3, 2 * L, 2 * L, heads, kv_heads, head_dim=16)
    seg = _packed([[n for n in row if n] for row in segments], 2 * L)
    mask = Mask.causal_lm(seg) if kind == "causal" else Mask.bidirectional(seg)
    _assert_kernel_equals_xla("splash", q, k, v, mask)


@pytest.mark.parametrize("rules,kv_heads", [
    ("fsdp_tp", 2), pytest.param("fsdp_tp_kv", 4, marks=pytest.mark.slow)])
def test_on_a_mesh_splash_runs_per_device_rows_and_heads_and_equals_xla(rules, kv_heads):
    """fsdp 2 x tensor 4 (8 CPU devices): rows split over fsdp, 8 query heads over
    tensor, their kv heads sliced per device (fsdp_tp: 2 kv heads, whole on every
    device) or split with them (fsdp_tp_kv: 4 kv heads); the kernel runs under shard_map
    (not on gathered operands) and equals 'xla'."""
    q, k, v = _qkv(10, 2, L, L, 8, kv_heads)
    mask = Mask.causal_lm(_packed(_SEGMENTS, L))
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    with jax.set_mesh(mesh), nnx.logical_axis_rules(partitioning.get_rules(rules)):
        _assert_kernel_equals_xla("splash", q, k, v, mask)
        lowered = jax.jit(lambda q, k, v: attention.attend(q, k, v, mask, "splash")).lower(
            q, k, v).as_text()
    assert "manual_computation" in lowered or "shard_map" in lowered


def test_masks_the_kernels_cannot_do_fall_back_under_auto_and_are_errors_when_named(caplog):
    seg = _packed(_SEGMENTS, L)
    prefix = (jnp.arange(L)[None, :] < jnp.asarray([[20], [60]])).astype(jnp.int32)
    q, k, v = _qkv(5, 2, L, L, 4, 2)
    step_q = q[:, :1]
    decode = Mask.cached(1, jnp.asarray(np.arange(L)[None, :] < [[70], [90]]), jnp.int32(90))
    for mask, query, why in ((Mask.causal_lm(seg, prefix), q, "prefix LM"),
                             (decode, step_q, "traced")):
        want = attention.attend(query, k, v, mask, "xla")
        with pytest.raises(ValueError, match=f"(?s)attention_impl='splash' cannot.*{why}.*'auto'"):
            attention.attend(query, k, v, mask, "splash")
        with caplog.at_level(logging.WARNING, logger=attention.__name__):
            caplog.clear()
            attention._logged.clear()
            with attention.platform_for("tpu"):
                for _ in range(2):  # the reason is logged once, not per call
                    got = attention.attend(query, k, v, mask, "auto")
        assert [r.getMessage() for r in caplog.records if why in r.getMessage()] == [
            r.getMessage() for r in caplog.records]
        assert len(caplog.records) == 1 and "instead of 'splash'" in caplog.text
        np.testing.assert_array_equal(got, want)


def test_an_implementation_the_backend_lacks_or_an_unknown_one_is_an_error_naming_the_choices():
    q, k, v = _qkv(6, 1, 8, 8, 2, 1)
    mask = Mask.causal_lm(jnp.ones((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="(?s)'cudnn' does not run on this backend.*'auto'"):
        attention.attend(q, k, v, mask, "cudnn")
    with attention.platform_for("gpu"), pytest.raises(ValueError, match="'splash' does not run"):
        attention.attend(q, k, v, mask, "splash")
    with pytest.raises(ValueError, match="(?s)attention_impl='flash'.*'xla'.*gin"):
        tiny_config(attention_impl="flash")
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("auto", "gpu") == "cudnn"
    assert attention.resolve("auto", "cpu") == "xla"


def test_a_function_traced_for_another_platform_is_traced_again_for_this_one():
    """platform_for is part of jax's trace and compile cache keys: one jitted function
    gives the TPU's choice inside it and this backend's before and after (with a plain
    context variable the first trace was reused in all three)."""
    f = jax.jit(lambda x: x + (1 if attention.platform() == "tpu" else 0))
    before = int(f(jnp.int32(0)))
    with attention.platform_for("tpu"):
        inside = int(f(jnp.int32(0)))
    assert (before, inside, int(f(jnp.int32(0)))) == (0, 1, 0)


def test_the_cudnn_masks_are_plain_rows_and_seqio_packed_rows_in_half_precision():
    q, k, v = _qkv(7, 1, 16, 16, 4, 2, head_dim=16, dtype=jnp.bfloat16)
    ones = jnp.ones((1, 16), jnp.int32)
    why = lambda mask, q=q: attention.unsupported("cudnn", q, k, mask)
    assert why(Mask.causal_lm(ones, packed=False)) is None
    assert why(Mask.bidirectional(ones, packed=False)) is None
    assert why(Mask.cross(ones, ones, packed=False)) is None
    assert why(Mask.causal_lm(ones, max_segments=4)) is None  # packed rows
    assert why(Mask.bidirectional(ones, max_segments=4)) is None
    assert why(Mask.cross(ones, ones, max_segments=4)) is None
    assert "segments in order" in why(Mask.causal_lm(ones))  # no layout promised
    assert "prefix LM" in why(Mask.causal_lm(ones, ones, max_segments=4))
    assert "left padding" in why(Mask.cached(16, ones.astype(bool), jnp.int32(0)))
    assert "bfloat16" in why(Mask.causal_lm(ones, packed=False), q.astype(jnp.float32))
    wide = jnp.zeros((1, 16, 4, 264), jnp.bfloat16)
    assert "multiple of 8 up to 256" in why(Mask.causal_lm(ones, packed=False), wide)
    assert "dense" in why(Mask.causal_lm(ones, packed=False).dense())


def _mask_of_packed_layout(layout, length, slots, causal):
    """The [B, 1, L, M] booleans cuDNN's packed layout means: sequence s of a row is the
    queries starts_q[s] .. + lengths_q[s] against the keys starts_kv[s] .. + lengths_kv[s]
    (entries of -1: no sequence), and under `causal` key j of a sequence sees query i of
    it when j <= i, counted from each sequence's first slot."""
    q_len, kv_len, q_start, kv_start = map(np.asarray, layout[:4])
    out = np.zeros((q_len.shape[0], 1, length, slots), bool)
    for b, s in zip(*np.nonzero(q_len >= 0)):
        assert kv_len[b, s] >= 0 and q_start[b, s] >= 0 and kv_start[b, s] >= 0
        i = np.arange(q_len[b, s])[:, None]
        j = np.arange(kv_len[b, s])[None, :]
        block = (j <= i) if causal else np.ones((i.size, j.size), bool)
        out[b, 0, q_start[b, s] + i, kv_start[b, s] + j] = block
    return out


@pytest.mark.parametrize("max_segments", [3, 4, 8])
@pytest.mark.parametrize("kind", ["causal", "bidirectional", "cross"])
def test_cudnns_packed_layout_of_seqio_rows_is_the_segment_mask(kind, max_segments):
    """What cuDNN's packed ("THD") layout tells the kernel, rebuilt as a mask, is the
    segment ids' own mask on every query with keys, and the queries it leaves out are
    padding (several documents, padding, one-document rows, cross lengths that differ)."""
    seg = _packed([[5, 7, 3], [9], [2, 2, 2]], 20)
    mask = {"causal": Mask.causal_lm(seg, max_segments=max_segments),
            "bidirectional": Mask.bidirectional(seg, max_segments=max_segments),
            "cross": Mask.cross(seg, _packed([[4, 1, 6], [11], [3, 1, 2]], 12),
                                max_segments=max_segments)}[kind]
    layout = attention.packed_layout(mask.q_segment_ids, mask.kv_segment_ids, max_segments)
    want = np.asarray(mask.dense())
    got = _mask_of_packed_layout(layout, *want.shape[2:], causal=mask.causal)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(layout.queries_BL, want[:, 0].any(-1))
    np.testing.assert_array_equal(layout.keys_BM, mask.kv_segment_ids != 0)
    assert layout.q_lengths.shape == (3, max_segments)
    assert layout.q_starts.shape == (3, max_segments + 1)
    assert [int(n) for n in layout.q_lengths[0, :3]] == [5, 7, 3]  # not vacuous


def test_rows_beyond_the_packed_layout_stop_the_step_with_the_setting_named():
    """More segments than max_segments_per_row, or ids not in SeqIO's packed order (a
    left-padded row), are an error at the host, not silently unattended tokens."""
    check = jax.jit(lambda ids: attention.check_packed_rows(Mask.causal_lm(ids, max_segments=3)))

    def step(ids):
        check(ids)
        jax.effects_barrier()

    step(_packed([[5, 7, 3], [9]], 20))  # three segments and padding: fine
    with pytest.raises(Exception, match="(?s)holds 4 packed segments.*max_segments_per_row=3"):
        step(_packed([[5, 7, 3, 1], [9]], 20))
    with pytest.raises(Exception, match="(?s)not SeqIO's packed layout.*attention_impl='xla'"):
        step(jnp.asarray([[0, 0, 1, 1, 1]] * 2))  # left padding


@pytest.fixture
def lowering_for_cuda(monkeypatch):
    """Lowering for CUDA on this GPU-less host: jax's cuDNN version and compute-capability
    probes, which need the GPU, answer as for an H100 with cuDNN 9.10; the packed-row
    check is a CPU callback, which cannot be lowered for another platform (tested above)."""
    from jax._src.cudnn import fused_attention_stablehlo as fused
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda capability: False)

    def cudnn_calls(f, *args):
        # jax's trace caches are keyed by the platform (platform_for), not by a patch: no
        # trace made with the check patched out may be reused, nor one made before.
        jax.clear_caches()
        with attention.platform_for("gpu"), monkeypatch.context() as patch:
            patch.setattr(attention, "check_packed_rows", lambda mask: None)
            text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        jax.clear_caches()
        return [line for line in text.splitlines() if "custom_call @__cudnn$fmha" in line]

    yield cudnn_calls
    jax.clear_caches()


def test_cudnn_on_packed_rows_lowers_to_cudnns_kernels_forward_and_backward(lowering_for_cuda):
    """No GPU here: the gradient is lowered for CUDA. Forward and backward are cuDNN's
    fused attention custom calls with the packed layout's lengths and offsets, for GQA."""
    q, k, v = _qkv(10, 2, 256, 256, 4, 2, head_dim=64, dtype=jnp.bfloat16)
    mask = Mask.causal_lm(_packed([[100, 100, 40], [250]], 256), max_segments=4)
    loss = lambda q, k, v: attention.attend(q, k, v, mask, "cudnn").astype(jnp.float32).sum()
    calls = lowering_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert len(calls) == 2, calls
    forward, backward = sorted(calls, key=lambda line: "Backward" in line)
    # q, k, v, then lengths [B, S] and first slots [B, S + 1] of the queries and keys.
    assert "tensor<2x4xi32>, tensor<2x4xi32>, tensor<2x5xi32>, tensor<2x5xi32>) ->" in forward
    assert "tensor<2x256x2x64xbf16>" in forward and "Backward" in backward


def test_every_attention_of_a_packed_encoder_decoder_lowers_to_cudnn(lowering_for_cuda):
    """A bfloat16 encoder-decoder on packed rows under 'auto' for a GPU, layers scanned
    and rematerialised: the encoder's, the decoder's and the cross-attention run cuDNN,
    forward and backward (no 'xla' fallback, whose [B, H, L, M] scores a GPU run would
    hold), and each checks its rows (the host callback traces inside scan and remat)."""
    cfg = tiny_config(num_encoder_layers=2, dtype="bfloat16", head_dim=16,
                      remat_policy="full")
    module = make_module(cfg)
    tokens, seg, pos = _model_batch(cfg, L)
    graphdef, state = nnx.split(module)

    def grads(state):
        def loss(state):
            logits = nnx.merge(graphdef, state)(
                tokens, tokens, encoder_segment_ids_BM=seg, encoder_positions_BM=pos,
                decoder_segment_ids_BL=seg, decoder_positions_BL=pos)
            return jnp.sum(jax.nn.logsumexp(logits.astype(jnp.float32), -1) * (seg != 0))
        return jax.grad(loss)(state)

    calls = lowering_for_cuda(grads, state)
    assert sum("Backward" in c for c in calls) == 3, calls
    assert sum("Backward" not in c for c in calls) == 6, calls  # and remat's recompute
    with attention.platform_for("gpu"):
        assert "debug_callback" in str(jax.make_jaxpr(grads)(state))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("kind", ["causal", "bidirectional", "cross", "packed causal",
                                  "packed bidirectional", "packed cross"])
def test_cudnn_equals_xla_on_a_gpu(heads, kv_heads, kind):
    q, k, v = _qkv(8, 2, 256, 384 if "cross" in kind else 256, heads, kv_heads, head_dim=64,
                   dtype=jnp.bfloat16)
    ones_q, ones_k = jnp.ones(q.shape[:2], jnp.int32), jnp.ones(k.shape[:2], jnp.int32)
    seg_q = _packed([[100, 90, 50], [256]], 256)
    seg_k = _packed([[150, 100, 120], [300]], 384)
    mask = {"causal": Mask.causal_lm(ones_q, packed=False),
            "bidirectional": Mask.bidirectional(ones_q, packed=False),
            "cross": Mask.cross(ones_q, ones_k, packed=False),
            "packed causal": Mask.causal_lm(seg_q, max_segments=4),
            "packed bidirectional": Mask.bidirectional(seg_q, max_segments=4),
            "packed cross": Mask.cross(seg_q, seg_k, max_segments=4)}[kind]
    assert attention.unsupported("cudnn", q, k, mask) is None
    rows = jnp.asarray(np.asarray(mask.dense()[:, 0].any(-1))[:, :, None, None], q.dtype)
    out, grads = _outputs_and_grads("cudnn", q, k, v, mask, rows)
    want_out, want_grads = _outputs_and_grads("xla", q, k, v, mask, rows)
    for got, want in zip((out, *grads), (want_out, *want_grads)):  # bfloat16 tolerances
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=2e-2, rtol=2e-2)


def test_mask_dense_is_the_mask_the_layers_built_before():
    """The 'xla' path's booleans are the old dense masks', so its losses are the same."""
    seg = _packed([[3, 4], [9]], 9)
    enc = _packed([[5, 2], [6]], 8)
    prefix = jnp.asarray([[1, 1, 0, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(Mask.causal_lm(seg).dense(), layers.causal_mask(seg))
    np.testing.assert_array_equal(Mask.causal_lm(seg, prefix).dense(),
                                  layers.causal_mask(seg, prefix))
    np.testing.assert_array_equal(Mask.bidirectional(seg).dense(), layers.bidirectional_mask(seg))
    np.testing.assert_array_equal(Mask.cross(seg, enc).dense(), layers.cross_mask(seg, enc))
    # A cache step: 2 queries at slots 4, 5 of 7; row 0 left-padded by 2.
    valid = jnp.asarray([[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0]], bool)
    got = Mask.cached(2, valid, jnp.int32(4)).dense()[:, 0]
    want = valid[:, None, :] & (jnp.arange(7)[None, None, :] <= jnp.asarray([4, 5])[None, :, None])
    np.testing.assert_array_equal(got, want)


def _model_batch(cfg, length):
    seg = _packed([[50, 60], [length - 9]], length)
    pos = jnp.asarray(np.stack([packed_ids(n, length)[1] for n in ([50, 60], [length - 9])]))
    tokens = jnp.asarray(random_tokens(3, seg.shape, cfg.vocab_size)) * (seg != 0)
    return tokens, seg, pos


@pytest.mark.slow
@pytest.mark.parametrize("encoder_decoder", [False, True], ids=["decoder", "encdec"])
def test_a_model_with_splash_attention_equals_the_xla_model(encoder_decoder):
    """The whole network (scanned layers, GQA, packed rows) on 'splash' vs 'xla': the loss
    and every parameter's gradient."""
    cfg = tiny_config(num_encoder_layers=2 if encoder_decoder else 0, attention_impl="xla")
    module = make_module(cfg)
    splash = with_config(module, tiny_config(num_encoder_layers=cfg.num_encoder_layers,
                                             attention_impl="splash"))
    tokens, seg, pos = _model_batch(cfg, L)

    def loss(m):
        if encoder_decoder:
            logits = m(tokens, tokens, encoder_segment_ids_BM=seg, encoder_positions_BM=pos,
                       decoder_segment_ids_BL=seg, decoder_positions_BL=pos)
        else:
            logits = m(tokens, segment_ids_BL=seg, positions_BL=pos)
        return jnp.sum(jax.nn.logsumexp(logits, -1) * (seg != 0))

    want, want_g = nnx.jit(nnx.value_and_grad(loss))(module)
    got, got_g = nnx.jit(nnx.value_and_grad(loss))(splash)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_a_left_padded_prefill_on_splash_equals_xla_and_decoding_goes_on_under_auto():
    """A model's prefill of a left-padded prompt batch into a fresh 256-slot cache runs
    splash (its mask is static: slot 0 on); its logits and cache equal 'xla''s, and the
    next step (one query, a traced slot) runs 'xla' under 'auto'."""
    cfg = tiny_config(attention_impl="xla")
    module = make_module(cfg)
    splash = with_config(module, tiny_config(attention_impl="splash"))
    valid = np.ones((2, L), bool)
    valid[0, :45] = False
    tokens = jnp.asarray(random_tokens(4, (2, L)) * valid)
    prefill = nnx.jit(lambda m: m.prefill(tokens, jnp.asarray(valid), 2 * L))
    (want, want_cache), (got, got_cache) = prefill(module), prefill(splash)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_cache["self"]["k"], want_cache["self"]["k"], atol=1e-5)
    auto = with_config(module, tiny_config(attention_impl="auto"))
    with attention.platform_for("tpu"):
        step = nnx.jit(lambda m, c: m.decode_step(tokens[:, -1:], c))(auto, got_cache)[0]
    np.testing.assert_allclose(step, module.decode_step(tokens[:, -1:], want_cache)[0],
                               atol=1e-5, rtol=1e-5)
