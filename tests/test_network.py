"""Properties of the networks: causality, prefix LM, packing isolation, RoPE per-segment
positions, cross-attention segment isolation, scan == unrolled, remat == no remat, bf16
close to fp32, dropout only with an rng."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import (  # noqa: F401
    assert_close,
    jit_apply,
    make_module,
    max_abs,
    model_for,
    packed_ids,
    random_tokens,
    strict_rank_promotion,
    tiny_config,
    unrolled_copy,
)

L = 16
DEC = tiny_config()  # parallel block, GQA 4/2, tied embeddings, scanned
ENCDEC = tiny_config(num_encoder_layers=2, block="sequential", tie_embeddings=False)


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    return jit_apply(make_module(cfg))


def _packed_row(lengths, total=L):
    seg, pos = packed_ids(lengths, total)
    return seg[None, :], pos[None, :]


def _bump(tokens, *index):
    """A copy with the tokens at `index` replaced by different non-pad tokens."""
    out = tokens.copy()
    out[index] = (out[index] % 63) + 1
    return out


def _changed(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max(axis=-1)  # per position


# ------------------------------------------------------------------------------ decoder-only


def test_causality_future_tokens_change_no_earlier_logit():
    f = _forward(DEC)
    tokens = random_tokens(0, (2, L))
    diff = _changed(f(tokens), f(_bump(tokens, 0, 7)))
    assert diff[0, :7].max() == 0.0
    assert diff[0, 7:].min() > 1e-6  # the edit reaches every later position
    assert diff[1].max() == 0.0  # other rows untouched


def test_prefix_lm_prefix_is_bidirectional_targets_causal():
    f = _forward(DEC)
    tokens = random_tokens(1, (1, L))
    prefix = np.zeros((1, L), np.int32)
    prefix[0, :6] = 1
    edit_prefix = _bump(tokens, 0, 4)
    # A later prefix token is seen by earlier prefix positions...
    diff = _changed(f(tokens, causal_attention_BL=prefix),
                    f(edit_prefix, causal_attention_BL=prefix))
    assert diff[0, :4].min() > 1e-6
    # ...which plain causal attention does not allow.
    assert _changed(f(tokens), f(edit_prefix))[0, :4].max() == 0.0
    # A target token is seen by no earlier position.
    edit_target = _bump(tokens, 0, 10)
    diff = _changed(f(tokens, causal_attention_BL=prefix),
                    f(edit_target, causal_attention_BL=prefix))
    assert diff[0, :10].max() == 0.0 and diff[0, 10:].min() > 1e-6


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_packing_isolation_decoder_only(prefix_lm):
    f = _forward(DEC)
    seg, pos = _packed_row([5, 6])  # segments 1: [0,5), 2: [5,11), padding [11,16)
    prefix = ((pos < 3) & (seg > 0)).astype(np.int32) if prefix_lm else None
    tokens = random_tokens(2, (1, L))
    run = lambda t: f(t, segment_ids_BL=seg, positions_BL=pos, causal_attention_BL=prefix)
    base = run(tokens)
    diff = _changed(base, run(_bump(tokens, 0, slice(5, 11))))
    assert diff[0, :5].max() == 0.0 and diff[0, 5:11].min() > 1e-6
    diff = _changed(base, run(_bump(tokens, 0, 0)))
    assert diff[0, 5:11].max() == 0.0 and diff[0, 0:5].min() > 1e-6
    assert _changed(base, run(_bump(tokens, 0, slice(11, None))))[0, :11].max() == 0.0


def test_rope_uses_per_segment_positions_decoder_only():
    f = _forward(DEC)
    a = random_tokens(5, (6,))
    row0, row1 = np.zeros((1, L), np.int32), np.zeros((1, L), np.int32)
    row0[0, :6], row0[0, 6:11] = a, random_tokens(6, (5,))
    row1[0, :7], row1[0, 7:13] = random_tokens(7, (7,)), a
    seg0, pos0 = _packed_row([6, 5])
    seg1, pos1 = _packed_row([7, 6])
    logits0 = f(row0, segment_ids_BL=seg0, positions_BL=pos0)
    logits1 = f(row1, segment_ids_BL=seg1, positions_BL=pos1)
    assert_close(logits0[0, :6], logits1[0, 7:13], atol=2e-5)
    # Control: the positions are really used (a uniform shift is invisible to RoPE inside
    # an isolated segment, so stretch them instead).
    logits1_stretched = f(row1, segment_ids_BL=seg1, positions_BL=2 * pos1)
    assert max_abs(logits0[0, :6] - logits1_stretched[0, 7:13]) > 1e-3


# ------------------------------------------------------------------------------ encoder-decoder


def _encdec_batch():
    enc_seg, enc_pos = _packed_row([4, 5])  # encoder segments 1: [0,4), 2: [4,9)
    dec_seg, dec_pos = _packed_row([3, 6])  # decoder segments 1: [0,3), 2: [3,9)
    return dict(encoder_segment_ids_BM=enc_seg, encoder_positions_BM=enc_pos,
                decoder_segment_ids_BL=dec_seg, decoder_positions_BL=dec_pos)


def test_encdec_cross_attention_respects_encoder_segments():
    f = _forward(ENCDEC)
    ids = _encdec_batch()
    enc, dec = random_tokens(8, (1, L)), random_tokens(9, (1, L))
    base = f(enc, dec, **ids)
    diff = _changed(base, f(_bump(enc, 0, slice(4, 9)), dec, **ids))  # encoder segment 2
    assert diff[0, :3].max() == 0.0 and diff[0, 3:9].min() > 1e-6
    diff = _changed(base, f(_bump(enc, 0, 1), dec, **ids))  # encoder segment 1
    assert diff[0, 3:9].max() == 0.0 and diff[0, :3].min() > 1e-6
    assert _changed(base, f(_bump(enc, 0, slice(9, None)), dec, **ids))[0, :9].max() == 0.0


def test_encdec_decoder_packing_and_causality():
    f = _forward(ENCDEC)
    ids = _encdec_batch()
    enc, dec = random_tokens(12, (1, L)), random_tokens(13, (1, L))
    base = f(enc, dec, **ids)
    diff = _changed(base, f(enc, _bump(dec, 0, 5), **ids))  # inside decoder segment 2
    assert diff[0, :5].max() == 0.0 and diff[0, 5:9].min() > 1e-6


def test_rope_uses_per_segment_positions_encdec():
    f = _forward(ENCDEC)
    ea, da = random_tokens(14, (4,)), random_tokens(15, (3,))
    enc0, dec0 = np.zeros((1, L), np.int32), np.zeros((1, L), np.int32)
    enc1, dec1 = np.zeros((1, L), np.int32), np.zeros((1, L), np.int32)
    enc0[0, :4], dec0[0, :3] = ea, da
    enc1[0, :6], dec1[0, :5] = random_tokens(16, (6,)), random_tokens(17, (5,))
    enc1[0, 6:10], dec1[0, 5:8] = ea, da
    ids0 = dict(zip(["encoder_segment_ids_BM", "encoder_positions_BM"], _packed_row([4])))
    ids0.update(zip(["decoder_segment_ids_BL", "decoder_positions_BL"], _packed_row([3])))
    ids1 = dict(zip(["encoder_segment_ids_BM", "encoder_positions_BM"], _packed_row([6, 4])))
    ids1.update(zip(["decoder_segment_ids_BL", "decoder_positions_BL"], _packed_row([5, 3])))
    assert_close(f(enc0, dec0, **ids0)[0, :3], f(enc1, dec1, **ids1)[0, 5:8], atol=2e-5)


# ------------------------------------------------------------------------------ equivalences


@pytest.mark.parametrize("cfg", [DEC, ENCDEC], ids=["decoder", "encdec"])
def test_scan_equals_unrolled(cfg):
    scanned = make_module(cfg)
    unrolled = unrolled_copy(scanned, tiny_config(**{**cfg.__dict__, "scan_layers": False}))
    assert "layers" in str(jax.tree.structure(nnx.state(unrolled)))
    args = (random_tokens(18, (2, L)),) * (2 if cfg.is_encoder_decoder else 1)
    assert_close(jit_apply(scanned)(*args), jit_apply(unrolled)(*args), atol=1e-5)


def _loss_and_grads(cfg, batch):
    model = model_for(cfg)
    module = make_module(cfg)

    @nnx.jit
    def run(module, batch):
        return nnx.value_and_grad(lambda m: model.loss_fn(m, batch)[0])(module)

    loss, grads = run(module, batch)
    return loss, nnx.to_flat_state(grads)


def _lm_batch(seed=19):
    seg, pos = _packed_row([7, 6])
    tokens = random_tokens(seed, (1, L + 1)) * np.concatenate([[1], seg[0] > 0])[None, :]
    return dict(decoder_input_tokens=tokens[:, :-1], decoder_target_tokens=tokens[:, 1:],
                decoder_loss_weights=(seg > 0).astype(np.int32), decoder_segment_ids=seg,
                decoder_positions=pos)


@functools.lru_cache(maxsize=None)
def _decoder_loss_and_grads(remat_policy):
    return _loss_and_grads(tiny_config(remat_policy=remat_policy), _lm_batch())


# Each gradient compile takes 10-20 s on the loaded shared cores: 'minimal' runs with -m slow.
@pytest.mark.parametrize("policy", ["full", pytest.param("minimal", marks=pytest.mark.slow)])
def test_remat_equals_no_remat_values_and_gradients(policy):
    loss0, grads0 = _decoder_loss_and_grads("none")
    loss1, grads1 = _decoder_loss_and_grads(policy)
    assert_close(loss0, loss1, atol=1e-6)
    for (path, g0), (path1, g1) in zip(grads0, grads1):
        assert path == path1
        assert_close(g0[...], g1[...], atol=1e-6)
    assert max(max_abs(g[...]) for _, g in grads0) > 1e-3  # the comparison is not vacuous


@pytest.mark.slow
def test_remat_equals_no_remat_unrolled_encdec():
    cfg = tiny_config(num_encoder_layers=1, num_decoder_layers=2, scan_layers=False)
    batch = dict(_lm_batch(), encoder_input_tokens=random_tokens(20, (1, L)))
    loss0, grads0 = _loss_and_grads(cfg, batch)
    loss1, grads1 = _loss_and_grads(tiny_config(**{**cfg.__dict__, "remat_policy": "full"}),
                                    batch)
    assert_close(loss0, loss1, atol=1e-6)
    for (_, g0), (_, g1) in zip(grads0, grads1):
        assert_close(g0[...], g1[...], atol=1e-6)


def test_bf16_compute_close_to_fp32():
    tokens = random_tokens(21, (2, L))
    logits32 = _forward(DEC)(tokens)
    logits16 = jit_apply(make_module(tiny_config(dtype="bfloat16")))(tokens)
    assert logits16.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    scale = max_abs(logits32)
    # bf16 keeps 8 bits of mantissa (~0.4% per rounding); two layers of rounding stay
    # well inside 5% of the logit range, and the argmax mostly agrees.
    assert max_abs(logits16 - logits32) < 0.05 * scale
    agree = np.mean(np.argmax(logits16, -1) == np.argmax(logits32, -1))
    assert agree > 0.9
    assert max_abs(logits16 - logits32) > 0.0  # bf16 really was used


def test_dropout_only_with_rng():
    cfg = tiny_config(dropout_rate=0.2)
    f = _forward(cfg)
    tokens = random_tokens(22, (2, L))
    det = f(tokens)
    assert_close(det, _forward(DEC)(tokens), atol=0)  # no rng: same as no dropout
    a = f(tokens, rng=jax.random.key(1))
    b = f(tokens, rng=jax.random.key(1))
    c = f(tokens, rng=jax.random.key(2))
    assert_close(a, b, atol=0)
    assert max_abs(a - det) > 1e-3 and max_abs(a - c) > 1e-3
