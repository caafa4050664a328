"""The model contract: loss and z-loss against a numpy reference, loss weights (padding out of
the loss), score_batch, unpacked defaults, initial batches, dropout through loss_fn."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import (  # noqa: F401
    assert_close,
    make_module,
    model_for,
    packed_ids,
    random_tokens,
    strict_rank_promotion,
    tiny_config,
)

from t5x_like.model.families import DecoderOnlyModel, EncoderDecoderModel

L = 12
DEC = tiny_config(z_loss=1e-2)  # a large coefficient, so a wrong z-loss cannot hide
ENCDEC = tiny_config(num_encoder_layers=1, z_loss=1e-2, tie_embeddings=False)


@functools.lru_cache(maxsize=None)
def _evaluate(cfg):
    """One compiled function per config giving loss, metrics, logits and scores."""
    model, module = model_for(cfg), make_module(cfg)

    @nnx.jit
    def run(module, batch, rng):
        loss, metrics = model.loss_fn(module, batch, rng)
        return loss, metrics, model.logits(module, batch), model.score_batch(module, batch)

    return lambda batch, rng=None: run(module, batch, rng)


def _decoder_batch(seed=0):
    """Row 0: two packed examples + padding; row 1: a padding row full of garbage tokens."""
    seg, pos = packed_ids([5, 4], L)
    seg = np.stack([seg, np.zeros(L, np.int32)])
    pos = np.stack([pos, np.zeros(L, np.int32)])
    targets = random_tokens(seed, (2, L)) * (seg > 0)
    inputs = np.where(pos > 0, np.roll(targets, 1, axis=1), 0)
    inputs[1] = random_tokens(seed + 1, (L,))  # garbage a correct model must ignore
    targets[1] = random_tokens(seed + 2, (L,))
    weights = (seg > 0).astype(np.int32)
    weights[0, 0] = 0  # a non-padding position may also be out of the loss
    return dict(decoder_input_tokens=inputs.astype(np.int32),
                decoder_target_tokens=targets.astype(np.int32), decoder_loss_weights=weights,
                decoder_segment_ids=seg, decoder_positions=pos)


def _numpy_reference(logits, targets, weights, z_coef):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    w = weights.astype(np.float64)
    n = w.sum()
    return dict(cross_entropy=(w * nll).sum() / n, z_loss=z_coef * (w * log_z**2).sum() / n,
                accuracy=(w * (logits.argmax(-1) == targets)).sum() / n, num_tokens=n,
                nll_sum=(w * nll).sum(), z_loss_sum=z_coef * (w * log_z**2).sum(),
                weight_sum=n, scores=-(w * nll).sum(-1))


@pytest.mark.parametrize("cfg", [DEC, ENCDEC], ids=["decoder", "encdec"])
def test_loss_z_loss_and_scores_match_numpy(cfg):
    batch = _decoder_batch()
    if cfg.is_encoder_decoder:
        enc_seg, enc_pos = packed_ids([6, 3], L)
        batch.update(encoder_input_tokens=random_tokens(3, (2, L)) * (enc_seg > 0),
                     encoder_segment_ids=np.stack([enc_seg, np.zeros(L, np.int32)]),
                     encoder_positions=np.stack([enc_pos, np.zeros(L, np.int32)]))
    loss, metrics, logits, scores = _evaluate(cfg)(batch)
    ref = _numpy_reference(logits, batch["decoder_target_tokens"],
                           batch["decoder_loss_weights"], cfg.z_loss)
    for name in ("cross_entropy", "z_loss", "accuracy", "num_tokens", "nll_sum", "z_loss_sum",
                 "weight_sum"):
        assert_close(metrics[name], ref[name], atol=1e-5, rtol=1e-5)
    assert_close(loss, ref["cross_entropy"] + ref["z_loss"], rtol=1e-5)
    assert_close(metrics["loss"], loss, atol=0)
    assert_close(metrics["correct_sum"], ref["accuracy"] * ref["weight_sum"], atol=1e-4)
    assert ref["z_loss"] > 1e-3  # large enough to matter at this coefficient
    # score_batch: per-example summed log-likelihood of weighted targets == -nll per row.
    assert scores.shape == (2,)
    assert_close(scores, ref["scores"], atol=1e-4, rtol=1e-5)
    assert_close(np.sum(scores), -metrics["nll_sum"], atol=1e-4, rtol=1e-5)
    assert float(scores[1]) == 0.0  # the padding row scores nothing


def test_padding_row_and_unweighted_tokens_are_out_of_the_loss():
    f = _evaluate(DEC)
    batch = _decoder_batch()
    loss, metrics, _, _ = f(batch)
    assert np.isfinite(float(loss))
    assert float(metrics["weight_sum"]) == 8.0  # 5 + 4 tokens, minus the one weighted 0
    garbage = dict(batch)
    garbage["decoder_input_tokens"] = batch["decoder_input_tokens"].copy()
    garbage["decoder_target_tokens"] = batch["decoder_target_tokens"].copy()
    garbage["decoder_input_tokens"][1] = random_tokens(9, (L,))
    garbage["decoder_target_tokens"][1] = random_tokens(10, (L,))
    garbage["decoder_target_tokens"][0, 0] = (batch["decoder_target_tokens"][0, 0] % 63) + 1
    loss2, metrics2, _, _ = f(garbage)
    assert_close(loss2, loss, atol=0)
    for name in ("nll_sum", "z_loss_sum", "correct_sum", "weight_sum"):
        assert_close(metrics2[name], metrics[name], atol=0)
    # ...while a weighted target does count.
    counted = dict(garbage)
    counted["decoder_target_tokens"] = garbage["decoder_target_tokens"].copy()
    counted["decoder_target_tokens"][0, 3] = (garbage["decoder_target_tokens"][0, 3] % 63) + 1
    assert abs(float(f(counted)[0]) - float(loss)) > 1e-6


def test_unpacked_batch_defaults_match_explicit_ids():
    f = _evaluate(DEC)
    targets = random_tokens(11, (2, L))
    targets[1, 8:] = 0  # a shorter example padded at the end
    inputs = np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]], axis=1)
    plain = dict(decoder_input_tokens=inputs, decoder_target_tokens=targets,
                 decoder_loss_weights=(targets > 0).astype(np.int32))
    explicit = dict(plain, decoder_segment_ids=(targets > 0).astype(np.int32),
                    decoder_positions=np.broadcast_to(np.arange(L, dtype=np.int32), (2, L)))
    loss_a, metrics_a, logits_a, _ = f(plain)
    loss_b, _, logits_b, _ = f(explicit)
    assert_close(loss_a, loss_b, atol=1e-6)
    assert_close(logits_a[:, :8], logits_b[:, :8], atol=1e-6)
    assert float(metrics_a["weight_sum"]) == 12 + 8
    # Without loss weights, non-pad targets are weighted.
    no_weights = {k: v for k, v in plain.items() if k != "decoder_loss_weights"}
    assert_close(f(no_weights)[0], loss_a, atol=1e-6)


def test_prefix_lm_feature_reaches_the_network():
    f = _evaluate(DEC)
    batch = _decoder_batch()
    prefix = dict(batch, decoder_causal_attention=(batch["decoder_positions"] < 3).astype(
        np.int32) * (batch["decoder_segment_ids"] > 0))
    logits_causal = np.asarray(f(batch)[2])
    logits_prefix = np.asarray(f(prefix)[2])
    assert np.abs(logits_causal[0, 0] - logits_prefix[0, 0]).max() > 1e-4  # sees token 1, 2
    assert np.abs(logits_causal[0, 5:9] - logits_prefix[0, 5:9]).max() > 1e-4  # 2nd segment


def test_dropout_through_loss_fn_only_with_rng():
    cfg = tiny_config(z_loss=1e-2, dropout_rate=0.3)
    f = _evaluate(cfg)
    batch = _decoder_batch()
    det = float(f(batch)[0])
    assert_close(det, _evaluate(DEC)(batch)[0], atol=1e-6)
    a, b = float(f(batch, jax.random.key(0))[0]), float(f(batch, jax.random.key(0))[0])
    assert a == b and abs(a - det) > 1e-4


@pytest.mark.parametrize("model_class, cfg, lengths", [
    (DecoderOnlyModel, DEC, {"targets": 8}),
    (DecoderOnlyModel, DEC, {"inputs": 4, "targets": 8}),
    (EncoderDecoderModel, ENCDEC, {"inputs": 6, "targets": 8}),
])
def test_initial_batch_shapes_and_all_padding_loss(model_class, cfg, lengths):
    batch = model_class(cfg).get_initial_batch(2, lengths)
    for name, array in batch.items():
        want = lengths["inputs"] if name.startswith("encoder") else sum(
            lengths.values()) if model_class is DecoderOnlyModel else lengths["targets"]
        assert array.shape == (2, want) and array.dtype == np.int32, name
    assert ("decoder_causal_attention" in batch) == (
        model_class is DecoderOnlyModel and "inputs" in lengths)
    shapes = jax.eval_shape(lambda b: model_class(cfg).loss_fn(make_module(cfg), b), batch)
    assert shapes[0].shape == () and shapes[1]["nll_sum"].shape == ()


def test_all_padding_batch_has_zero_finite_loss():
    batch = {k: np.zeros((2, L), np.int32) for k in _decoder_batch()}
    loss, metrics, _, scores = _evaluate(DEC)(batch)
    assert float(loss) == 0.0 and float(metrics["weight_sum"]) == 0.0
    assert np.all(np.asarray(scores) == 0.0)


def test_models_refuse_the_wrong_family():
    with pytest.raises(ValueError, match="num_encoder_layers"):
        DecoderOnlyModel(ENCDEC).make_module(0)
    with pytest.raises(ValueError, match="num_encoder_layers"):
        EncoderDecoderModel(DEC).make_module(0)


# The fused, chunked loss (cfg.fused_loss) against the whole-logits one: the same loss,
# metrics and gradients (every parameter's), for tied (scaled) and untied heads, padding,
# unweighted positions and a large z-loss; chunks of 4 and 5 (-> 4: a divisor of L = 12)
# and the whole length.
# One compile of two gradients each (about 20 s on the loaded shared cores): the
# untied encoder-decoder by default, the tied ones with -m slow.
@pytest.mark.parametrize("base, chunk", [pytest.param(DEC, 4, marks=pytest.mark.slow),
                                         (ENCDEC, 5),
                                         pytest.param(DEC, 0, marks=pytest.mark.slow)],
                         ids=["tied-chunk4", "untied-encdec-chunk5", "whole"])
def test_fused_chunked_loss_equals_the_whole_logits_loss_and_gradients(base, chunk):
    import dataclasses

    batch = _decoder_batch()
    if base.is_encoder_decoder:
        enc_seg, enc_pos = packed_ids([6, 3], L)
        batch.update(encoder_input_tokens=random_tokens(3, (2, L)) * (enc_seg > 0),
                     encoder_segment_ids=np.stack([enc_seg, np.zeros(L, np.int32)]),
                     encoder_positions=np.stack([enc_pos, np.zeros(L, np.int32)]))
    fused_cfg = dataclasses.replace(base, fused_loss=True, loss_chunk_length=chunk)
    base = dataclasses.replace(base, fused_loss=False)
    module = make_module(base)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def grads_of(cfg):
        model = model_for(cfg)

        def loss(p):
            return model.loss_fn(nnx.merge(graphdef, p, rest), batch)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (loss, metrics), grads = grads_of(base)
    (f_loss, f_metrics), f_grads = grads_of(fused_cfg)
    assert_close(f_loss, loss, rtol=1e-5, atol=1e-6)
    for name in ("cross_entropy", "z_loss", "nll_sum", "z_loss_sum", "correct_sum",
                 "weight_sum"):
        assert_close(f_metrics[name], metrics[name], rtol=1e-5, atol=1e-5)
    flat, f_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(f_grads))
    assert len(flat) == len(f_flat)
    for path, g in flat:
        expected = np.asarray(g.get_value())
        assert np.abs(expected).max() > 0, path  # every parameter gets a gradient
        assert_close(f_flat[path].get_value(), expected, rtol=1e-4, atol=1e-6)


def test_the_default_loss_is_fused_except_on_a_tpu_without_chunks():
    """fused_loss=None: the fused loss on CPU and GPU; compiled for a TPU the plain loss
    (XLA fuses its logits into the loss), unless loss chunks are asked for; an explicit
    setting wins everywhere. Seen in the traced loss: fused_loss_sums is a custom VJP."""
    import dataclasses

    from t5x_like.model import attention, families

    batch = _decoder_batch()
    module = make_module(DEC)

    def fused_in_trace(cfg, platform):
        with attention.platform_for(platform):
            jaxpr = jax.make_jaxpr(lambda m: model_for(cfg).loss_fn(m, batch)[0])(module)
        return "name=fused_loss_sums" in str(jaxpr)

    assert DEC.fused_loss is None
    chunked, plain = (dataclasses.replace(DEC, loss_chunk_length=4),
                      dataclasses.replace(DEC, fused_loss=False))
    forced = dataclasses.replace(DEC, fused_loss=True)
    for cfg, platform, fused in ((DEC, "cpu", True), (DEC, "gpu", True), (DEC, "tpu", False),
                                 (chunked, "tpu", True), (forced, "tpu", True),
                                 (plain, "cpu", False)):
        with attention.platform_for(platform):
            assert families.fuses_loss(cfg) is fused, (cfg.fused_loss, platform)
        assert fused_in_trace(cfg, platform) is fused, (cfg.fused_loss, platform)


def test_accuracy_counts_a_tie_for_the_top_logit_as_correct():
    from t5x_like.model.families import fused_loss_sums, token_losses

    logits = np.array([[[1.0, 3.0, 3.0, 0.0], [2.0, 1.0, 0.0, 0.0]]], np.float32)
    targets, weights = np.array([[2, 1]]), np.ones((1, 2), np.float32)
    np.testing.assert_array_equal(token_losses(logits, targets, 0.0)[2], [[1.0, 0.0]])
    # logits = x·I: the fused loss sees the same rows
    sums = fused_loss_sums(logits, np.eye(4, dtype=np.float32), targets, weights, 1.0, 0.0, 0)
    assert float(sums[3]) == 1.0


def test_the_tpu_form_of_the_target_logit_equals_the_gather():
    """Compiled for a TPU the target's logit is a masked sum over the vocabulary (it fuses
    into the log Z pass); on CPU a gather. Losses and gradients are the same."""
    from t5x_like.model import attention
    from t5x_like.model.families import token_losses

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)) * 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)

    def loss(x):
        nll, z, correct = token_losses(x, targets, 1e-4)
        return jnp.sum(nll + z), correct

    assert "gather" in str(jax.make_jaxpr(loss)(logits))
    (cpu, cpu_correct), cpu_grad = jax.value_and_grad(loss, has_aux=True)(logits)
    with attention.platform_for("tpu"):
        tpu_loss = lambda x: loss(x)  # noqa: E731  (jax caches traces by function)
        assert "gather" not in str(jax.make_jaxpr(tpu_loss)(logits))
        (tpu, tpu_correct), tpu_grad = jax.value_and_grad(tpu_loss, has_aux=True)(logits)
    np.testing.assert_allclose(tpu, cpu, rtol=1e-6)
    np.testing.assert_array_equal(tpu_correct, cpu_correct)
    np.testing.assert_allclose(tpu_grad, cpu_grad, rtol=1e-6, atol=1e-7)
