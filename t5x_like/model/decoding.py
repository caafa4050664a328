"""Autoregressive decoding loops: greedy, temperature / top-k / top-p sampling, beam search.

The loops know nothing about models: they take the logits of the first position to fill
and a `step_fn(tokens_B1, state) -> (logits_B1V, state)` (model/families.py builds both from the
network's KV cache), and run inside `jax.lax.while_loop`, so one jit compiles the whole
decode for a given (batch, prompt length, decode length). Every leaf of `state` is
batch-leading, which is what lets beam search reorder beams with one gather.

Beam search follows T5X's `beam_search` semantics: 2·k candidates per step, a finished
hypothesis scored by its log-probability divided by the length penalty
((5 + length) / 6) ** alpha (GNMT, Wu et al. 2016), EOS ends a hypothesis, and the search
stops when no live beam can still beat the worst finished one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


NEG_INF = -1.0e7  # large but finite: -inf - -inf would be NaN
StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]
METHODS = ("greedy", "sample", "beam")
VOCABULARY = "vocabulary"  # DecodeConfig's special ids: the task vocabulary's


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to decode (gin: infer.DecodeConfig).

    method: "greedy", "sample" (temperature, top_k, top_p) or "beam" (beam_size, alpha).
    max_decode_length: tokens to generate at most (EOS included).
    top_k: keep the k most likely tokens (0: all); top_p: the smallest set whose
      probability reaches p (1.0: all), both before sampling at `temperature`.
    eos_id, bos_id: the special ids, by default (VOCABULARY) the task vocabulary's,
      filled in by `resolved` where the vocabulary is known (infer, eval, the recipes:
      data/vocabulary.resolve_decode). eos_id ends a row; bos_id is the token a
      decoder-only prompt starts from: the vocabulary's BOS where it has one (a
      tokenizer.json's bos_token, e.g. Llama 3's <|begin_of_text|>), 0 for SeqIO's
      SentencePiece vocabularies (SeqIO's shifted targets start with 0), None for none.
      A gin setting (e.g. the one `hf import` writes from config.json) must agree with
      the vocabulary; `resolved` refuses one that does not, naming both. Code that
      decodes without a vocabulary (tests, benchmarks) passes ints (eos_id=-1: never
      stop).
    """

    method: str = "greedy"
    max_decode_length: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beam_size: int = 4
    alpha: float = 0.6
    eos_id: int | str = VOCABULARY
    bos_id: int | str | None = VOCABULARY

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"DecodeConfig.method={self.method!r}; expected one of {METHODS}.")
        if self.max_decode_length < 1 or self.beam_size < 1 or self.top_k < 0:
            raise ValueError(
                f"DecodeConfig: max_decode_length={self.max_decode_length} and beam_size="
                f"{self.beam_size} must be ≥ 1, top_k={self.top_k} ≥ 0.")
        if not 0.0 < self.top_p <= 1.0 or self.temperature <= 0.0:
            raise ValueError(f"DecodeConfig: top_p={self.top_p} must be in (0, 1] and "
                             f"temperature={self.temperature} > 0 (greedy: method='greedy').")
        for name in ("eos_id", "bos_id"):
            value = getattr(self, name)
            if not (value == VOCABULARY or isinstance(value, int)
                    or (name == "bos_id" and value is None)):
                raise ValueError(f"DecodeConfig.{name}={value!r}; expected an int, "
                                 f"{VOCABULARY!r} (the task vocabulary's)"
                                 f"{' or None (no BOS)' if name == 'bos_id' else ''}.")

    @property
    def is_resolved(self) -> bool:
        """Whether both special ids are known (not VOCABULARY)."""
        return VOCABULARY not in (self.eos_id, self.bos_id)

    def resolved(self, eos_id: int | None, bos_id: int | None, vocabulary: str
                 ) -> DecodeConfig:
        """This config with the vocabulary's EOS and start token (`vocabulary` names it in
        errors): a ValueError naming both values when a set id contradicts it, or when
        the vocabulary has no EOS (decoding could never stop)."""
        if eos_id is None:
            raise ValueError(
                f"The vocabulary {vocabulary} has no EOS token, so decoding could never "
                "stop: name it (HfTokenizerVocabulary(path, eos_token=...), the eos_token of "
                "the tokenizer's tokenizer_config.json, e.g. '<|end_of_text|>' for Llama 3).")
        for name, ours, theirs in (("eos_id", self.eos_id, eos_id),
                                   ("bos_id", self.bos_id, bos_id)):
            if ours != VOCABULARY and ours != theirs:
                raise ValueError(
                    f"decoding.DecodeConfig.{name}={ours!r} contradicts the task vocabulary "
                    f"{vocabulary}, whose {name} is {theirs!r}: a model decoded with special "
                    "ids its tokenizer does not use starts or stops at ordinary tokens. "
                    f"Remove the {name} setting (the vocabulary's is used) or use the "
                    "tokenizer the model was made for.")
        return dataclasses.replace(self, eos_id=eos_id, bos_id=bos_id)

    def check_resolved(self) -> None:
        if not self.is_resolved:
            raise ValueError(
                f"DecodeConfig(eos_id={self.eos_id!r}, bos_id={self.bos_id!r}) has no "
                "special ids yet: they come from the task vocabulary "
                "(data/vocabulary.resolve_decode(decode, vocab)); without one, pass eos_id "
                "and bos_id as ints.")


def _filter_logits(logits_BV, top_k: int, top_p: float):
    """Logits with everything outside the top-k and the top-p nucleus set to NEG_INF."""
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, NEG_INF, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # The smallest logit still inside the nucleus (the first one reaching top_p).
        cutoff_index_B1 = jnp.sum(cumulative_BV < top_p, axis=-1, keepdims=True)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, cutoff_index_B1, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, NEG_INF, logits_BV)
    return logits_BV


def sample(first_logits_BV, state, step_fn: StepFn, config: DecodeConfig, rng=None):
    """Greedy or sampled decoding. Returns (tokens [B, T], log-probs [B, T]): 0 and 0.0
    after a row's EOS; log-probs are the model's own (temperature 1, unfiltered)."""
    batch, length = first_logits_BV.shape[0], config.max_decode_length
    rng = jax.random.key(0) if rng is None else rng

    def choose(logits_BV, key):
        if config.method == "greedy":
            return jnp.argmax(logits_BV, axis=-1)
        filtered_BV = _filter_logits(logits_BV / config.temperature, config.top_k, config.top_p)
        return jax.random.categorical(key, filtered_BV, axis=-1)

    def cond(carry):
        t, _, _, _, done_B, _ = carry
        return (t < length) & ~jnp.all(done_B)

    def body(carry):
        t, tokens_BT, logprobs_BT, (logits_BV, state), done_B, key = carry
        key, now = jax.random.split(key)
        token_B = choose(logits_BV, now)
        logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV), token_B[:, None], -1)[:, 0]
        token_B = jnp.where(done_B, 0, token_B)
        tokens_BT = tokens_BT.at[:, t].set(token_B)
        logprobs_BT = logprobs_BT.at[:, t].set(jnp.where(done_B, 0.0, logprob_B))
        done_B = done_B | (token_B == config.eos_id)
        logits_B1V, state = step_fn(token_B[:, None], state)
        return t + 1, tokens_BT, logprobs_BT, (logits_B1V[:, -1], state), done_B, key

    carry = (jnp.int32(0), jnp.zeros((batch, length), jnp.int32),
             jnp.zeros((batch, length), jnp.float32), (first_logits_BV.astype(jnp.float32),
                                                       state),
             jnp.zeros((batch,), bool), rng)
    _, tokens_BT, logprobs_BT, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return tokens_BT, logprobs_BT


def length_penalty(length, alpha: float):
    """GNMT's ((5 + length) / 6) ** alpha, by which T5X divides a finished beam's score."""
    return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(tree, beam_indices_BK, batch: int, beams: int):
    """Reorders the beams of every batch-leading leaf ([B·k, ...]) by beam_indices [B, k]."""

    def one(x):
        x = x.reshape((batch, beams) + x.shape[1:])
        x = jnp.take_along_axis(
            x, beam_indices_BK.reshape(beam_indices_BK.shape + (1,) * (x.ndim - 2)), axis=1)
        return x.reshape((batch * beams,) + x.shape[2:])

    return jax.tree.map(one, tree)


def beam_search(first_logits_BV, state, step_fn: StepFn, config: DecodeConfig):
    """Beam search with `config.beam_size` beams. `state` (and `step_fn`) must already be
    for B·k rows, each row's state repeated k times (`repeat_for_beams`). Returns (tokens
    [B, k, T], scores [B, k]) sorted best first; a row without a finished hypothesis
    returns its live beams with their penalised log-probabilities."""
    k, length, eos = config.beam_size, config.max_decode_length, config.eos_id
    batch, vocab = first_logits_BV.shape[0] // k, first_logits_BV.shape[-1]
    # Only the first of the k identical beams starts alive, so step 1 has k distinct picks.
    alive_logp_BK = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (batch, 1))
    init = dict(t=jnp.int32(0), alive_seq=jnp.zeros((batch, k, length), jnp.int32),
                alive_logp=alive_logp_BK, finished_seq=jnp.zeros((batch, k, length), jnp.int32),
                finished_score=jnp.full((batch, k), NEG_INF),
                logits=first_logits_BV.astype(jnp.float32), state=state)

    def cond(c):
        # Stop when the best live beam, at the best length penalty it can still get, cannot
        # beat the worst finished beam of its row.
        best_alive_B = c["alive_logp"][:, 0] / length_penalty(length, config.alpha)
        worst_finished_B = jnp.min(c["finished_score"], axis=1)
        done = jnp.all(worst_finished_B > best_alive_B)
        return (c["t"] < length) & ~done

    def body(c):
        t = c["t"]
        logp_BKV = jax.nn.log_softmax(c["logits"]).reshape(batch, k, vocab)
        cand_BKV = c["alive_logp"][:, :, None] + logp_BKV
        top_logp_B2K, top_flat_B2K = jax.lax.top_k(cand_BKV.reshape(batch, k * vocab), 2 * k)
        beam_B2K, token_B2K = top_flat_B2K // vocab, top_flat_B2K % vocab
        seq_B2KT = jnp.take_along_axis(c["alive_seq"], beam_B2K[:, :, None], axis=1)
        seq_B2KT = seq_B2KT.at[:, :, t].set(token_B2K)
        ends_B2K = token_B2K == eos
        # Finished: the EOS candidates, penalised; merged with the earlier finished ones.
        new_score_B2K = jnp.where(ends_B2K, top_logp_B2K / length_penalty(t + 1, config.alpha),
                                  NEG_INF)
        all_score = jnp.concatenate([c["finished_score"], new_score_B2K], axis=1)
        all_seq = jnp.concatenate([c["finished_seq"], seq_B2KT], axis=1)
        fin_score_BK, fin_idx_BK = jax.lax.top_k(all_score, k)
        fin_seq_BKT = jnp.take_along_axis(all_seq, fin_idx_BK[:, :, None], axis=1)
        # Alive: the best k candidates that did not end.
        alive_cand_B2K = jnp.where(ends_B2K, NEG_INF, top_logp_B2K)
        alive_logp_BK, alive_idx_BK = jax.lax.top_k(alive_cand_B2K, k)
        alive_seq_BKT = jnp.take_along_axis(seq_B2KT, alive_idx_BK[:, :, None], axis=1)
        parent_BK = jnp.take_along_axis(beam_B2K, alive_idx_BK, axis=1)
        next_token_BK = jnp.take_along_axis(token_B2K, alive_idx_BK, axis=1)
        state = _gather_beams(c["state"], parent_BK, batch, k)
        logits_B1V, state = step_fn(next_token_BK.reshape(batch * k, 1), state)
        return dict(t=t + 1, alive_seq=alive_seq_BKT, alive_logp=alive_logp_BK,
                    finished_seq=fin_seq_BKT, finished_score=fin_score_BK,
                    logits=logits_B1V[:, -1], state=state)

    c = jax.lax.while_loop(cond, body, init)
    any_finished_B = c["finished_score"][:, 0] > NEG_INF / 2
    alive_score_BK = c["alive_logp"] / length_penalty(length, config.alpha)
    tokens = jnp.where(any_finished_B[:, None, None], c["finished_seq"], c["alive_seq"])
    scores = jnp.where(any_finished_B[:, None], c["finished_score"], alive_score_BK)
    return tokens, scores


def repeat_for_beams(tree, beams: int):
    """Each batch-leading leaf's rows repeated `beams` times ([B, ...] → [B·k, ...])."""
    return jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0), tree)
