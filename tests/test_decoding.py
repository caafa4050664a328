"""Decoding with the KV cache: every cached step equals a full forward pass (all three
families, prompts of different lengths in one batch), greedy == beam 1, beam search ==
brute force on a small chain, sampling filters, EOS, sharded caches."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import make_module, random_tokens, tiny_config

from t5x_like.model import decoding, families, partitioning

B, T = 3, 5
LENGTHS = (6, 3, 1)  # prompt lengths of the three rows


def _ragged_prompts(seed=0, extra=T):
    """Per row: its prompt (LENGTHS[b] tokens) followed by `extra` continuation tokens."""
    return [random_tokens(seed + b, (n + extra,)) for b, n in enumerate(LENGTHS)]


def _right_padded(rows, width):
    out = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        out[b, :len(row)] = row
    return out


@pytest.mark.parametrize("family", ["causal", "prefix_lm"])
def test_cached_decoder_steps_equal_the_full_forward_pass(family):
    cfg = tiny_config(block="parallel" if family == "prefix_lm" else "sequential")
    module, model = make_module(cfg), families.model_for(cfg)
    rows = _ragged_prompts()
    key = "inputs" if family == "prefix_lm" else "prompt"
    prompts = _right_padded([r[:n] for r, n in zip(rows, LENGTHS)], max(LENGTHS))
    first_logits, cache = model._start_decoding(module, {key: jnp.asarray(prompts)}, T)
    steps = [first_logits]
    for t in range(T - 1):
        token_B1 = jnp.asarray([[r[n + t]] for r, n in zip(rows, LENGTHS)])
        logits, cache = module.decode_step(token_B1, cache)
        steps.append(logits[:, 0])
    for b, (row, n) in enumerate(zip(rows, LENGTHS)):
        # One full pass per row: position n + t has seen BOS + row[:n + t] (the prompt
        # bidirectionally for a prefix LM), as cached step t has.
        seq = np.concatenate([[0], row[:n + T - 1]])[None]
        prefix = np.arange(seq.shape[1])[None] <= n if family == "prefix_lm" else None
        full = module(jnp.asarray(seq), causal_attention_BL=prefix)[0]
        for t, logits_BV in enumerate(steps):
            np.testing.assert_allclose(logits_BV[b], full[n + t], atol=1e-5, rtol=1e-5,
                                       err_msg=f"row {b} step {t}")


def test_cached_encoder_decoder_steps_equal_the_full_forward_pass():
    cfg = tiny_config(num_encoder_layers=2, block="parallel")
    module, model = make_module(cfg), families.model_for(cfg)
    encoder = _right_padded([r[:n] for r, n in zip(_ragged_prompts(), LENGTHS)], 7)
    targets = random_tokens(9, (B, T))
    first_logits, cache = model._start_decoding(
        module, {"encoder_input_tokens": jnp.asarray(encoder)}, T)
    decoder_inputs = np.concatenate([np.zeros((B, 1), np.int32), targets[:, :-1]], axis=1)
    steps = [first_logits]
    for t in range(1, T):
        logits, cache = module.decode_step(jnp.asarray(decoder_inputs[:, t:t + 1]), cache)
        steps.append(logits[:, 0])
    full = module(jnp.asarray(encoder), jnp.asarray(decoder_inputs),
                  encoder_segment_ids_BM=jnp.asarray((encoder > 0).astype(np.int32)))
    for t, logits_BV in enumerate(steps):
        np.testing.assert_allclose(logits_BV, full[:, t], atol=1e-5, rtol=1e-5, err_msg=str(t))


def _predict(model, module, batch, **config):
    graphdef, state = nnx.split(module)
    # No vocabulary here: the shipped one's special ids (EOS 1, start 0) unless given.
    decode = decoding.DecodeConfig(**{"eos_id": 1, "bos_id": 0, **config})
    run = jax.jit(lambda s, b: model.predict_batch(nnx.merge(graphdef, s), b, decode,
                                                   jax.random.key(7)))
    return jax.device_get(run(state, batch))


def _greedy_by_full_forward(module, prompt, steps):
    """Argmax of a full causal pass, one token at a time (zeros after the sequence so
    far cannot change its logits: one compiled length)."""
    forward = nnx.jit(lambda m, seq: m(seq)[0])
    seq = np.zeros((1, 1 + len(prompt) + steps), np.int32)
    seq[0, 1:1 + len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + steps):
        seq[0, i + 1] = int(jnp.argmax(forward(module, jnp.asarray(seq))[i]))
    return seq[0, len(prompt) + 1:].tolist()


def test_greedy_equals_argmax_of_full_passes_and_beam_one_equals_greedy():
    cfg = tiny_config()
    module, model = make_module(cfg), families.model_for(cfg)
    prompts = _right_padded([r[:n] for r, n in zip(_ragged_prompts(3), LENGTHS)], 6)
    batch = {"prompt": jnp.asarray(prompts)}
    greedy = _predict(model, module, batch, max_decode_length=6, eos_id=-1)
    for b, n in enumerate(LENGTHS):
        assert greedy["tokens"][b].tolist() == _greedy_by_full_forward(module, prompts[b, :n], 6)
    beam = _predict(model, module, batch, method="beam", beam_size=1, alpha=0.0,
                    max_decode_length=6, eos_id=-1)
    np.testing.assert_array_equal(beam["tokens"], greedy["tokens"])
    np.testing.assert_allclose(beam["scores"], greedy["scores"], rtol=1e-5)


@pytest.mark.slow
def test_sampling_is_seeded_top_k_one_is_greedy_and_tokens_stop_at_eos():
    cfg = tiny_config()
    module, model = make_module(cfg), families.model_for(cfg)
    batch = {"prompt": jnp.asarray(_right_padded([[5, 6, 7], [9]], 3))}
    greedy = _predict(model, module, batch, max_decode_length=8, eos_id=-1)
    top1 = _predict(model, module, batch, method="sample", top_k=1, max_decode_length=8,
                    eos_id=-1)
    np.testing.assert_array_equal(top1["tokens"], greedy["tokens"])
    a = _predict(model, module, batch, method="sample", temperature=2.0, max_decode_length=8)
    b = _predict(model, module, batch, method="sample", temperature=2.0, max_decode_length=8)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    # With EOS = the first greedy token, every row stops at once: the rest is 0.
    eos = int(greedy["tokens"][0, 0])
    stopped = _predict(model, module, batch, max_decode_length=8, eos_id=eos)
    assert stopped["tokens"][0, 0] == eos and not stopped["tokens"][0, 1:].any()
    assert stopped["token_logprobs"][0, 1:].tolist() == [0.0] * 7


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]]))
    kept = lambda f: (np.asarray(f) > decoding.NEG_INF / 2).tolist()[0]
    assert kept(decoding._filter_logits(logits, top_k=2, top_p=1.0)) == [True, True, False, False]
    assert kept(decoding._filter_logits(logits, top_k=0, top_p=0.7)) == [True, True, False, False]
    assert kept(decoding._filter_logits(logits, top_k=0, top_p=0.75)) == [True, True, False, False]
    assert kept(decoding._filter_logits(logits, top_k=0, top_p=0.76)) == [True, True, True, False]


# A 3-token Markov chain (token 2 = EOS) where greedy is not the best sequence.
_CHAIN = np.log(np.asarray([[0.45, 0.35, 0.20],     # after BOS / token 0
                            [0.05, 0.05, 0.90],     # after token 1: EOS very likely
                            [1 / 3, 1 / 3, 1 / 3]]))


def _chain_step(tokens_B1, state):
    logits_BV = jnp.asarray(_CHAIN, jnp.float32)[tokens_B1[:, 0]]
    return logits_BV[:, None, :], state + 1


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_finds_the_brute_force_best(alpha):
    length = 3
    config = decoding.DecodeConfig(method="beam", beam_size=9, alpha=alpha,
                                   max_decode_length=length, eos_id=2)
    first = jnp.asarray(_CHAIN[0], jnp.float32)[None]
    tokens, scores = decoding.beam_search(decoding.repeat_for_beams(first, 9),
                                          decoding.repeat_for_beams(jnp.zeros((1,)), 9),
                                          _chain_step, config)
    best, best_score = None, -np.inf
    for seq in itertools.product(range(3), repeat=length):
        if 2 not in seq:
            continue  # only finished hypotheses compete once one exists
        seq = seq[:seq.index(2) + 1]
        logp = _CHAIN[0, seq[0]] + sum(_CHAIN[a, b] for a, b in zip(seq, seq[1:]))
        score = logp / decoding.length_penalty(len(seq), alpha)
        if score > best_score:
            best, best_score = seq, score
    assert tokens[0, 0, :len(best)].tolist() == list(best)
    assert float(scores[0, 0]) == pytest.approx(best_score, rel=1e-5)
    assert np.all(np.diff(np.asarray(scores[0])) <= 1e-6)  # best first
    greedy = decoding.sample(first, jnp.zeros((1,)), _chain_step,
                             decoding.DecodeConfig(max_decode_length=length, eos_id=2))[0]
    assert greedy[0].tolist() != list(best) + [0] * (length - len(best))  # the chain's point


def test_decoding_on_a_sharded_mesh_equals_one_device():
    """The cache is constrained like the activations (batch over data axes, kv heads over
    tensor under fsdp_tp_kv): same tokens and scores as unsharded."""
    cfg = tiny_config(num_heads=4, num_kv_heads=4, head_dim=8)
    model = families.model_for(cfg)
    module = make_module(cfg)
    rows = [random_tokens(20 + b, (n,)) for b, n in enumerate((6, 3, 1, 2, 5, 4, 1, 3))]
    prompts = jnp.asarray(_right_padded(rows, 6))
    reference = _predict(model, module, {"prompt": prompts}, method="beam", beam_size=2,
                         max_decode_length=5)
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = partitioning.get_rules("fsdp_tp_kv")
    graphdef, state = nnx.split(module)
    shardings = partitioning.logical_shardings(module, mesh, rules)
    state = jax.device_put(state, shardings)
    decode = decoding.DecodeConfig(method="beam", beam_size=2, max_decode_length=5, eos_id=1,
                                   bos_id=0)

    @jax.jit
    def run(s, p):
        with nnx.logical_axis_rules(rules):
            return model.predict_batch(nnx.merge(graphdef, s), {"prompt": p}, decode)

    with jax.set_mesh(mesh):
        sharded = jax.device_get(run(state, jax.device_put(prompts,
                                                           partitioning.batch_sharding(mesh))))
    np.testing.assert_array_equal(sharded["tokens"], reference["tokens"])
    np.testing.assert_allclose(sharded["scores"], reference["scores"], rtol=1e-5)
