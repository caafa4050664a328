"""The two network families, assembled from layers.py: decoder-only and encoder-decoder.

Inputs follow SeqIO's packed-batch conventions: segment ids are 0 on padding and number
the packed examples of a row from 1; positions restart at 0 for each example. When segment
ids / positions are None the row is one unpadded example (ids all 1, positions 0..L-1).
Both networks return float32 logits [B, L, V].
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from t5x_like.model.attention import Mask
from t5x_like.model.layers import (
    BlockStack,
    Embed,
    LmHead,
    RMSNorm,
    TransformerConfig,
    dropout,
)
from t5x_like.model.partitioning import BATCH, EMBED


def segments_and_positions(tokens_BL, segment_ids_BL=None, positions_BL=None, *,
                           zero_is_padding: bool = False):
    """The given segment ids / positions, or the defaults of one unpacked example per row.

    Default segment ids: 1 on every token, or, with `zero_is_padding`, on the non-zero
    tokens only (0 on padding); default positions 0..L-1. The one place these defaults
    are made (model/families.py asks with its padding-bearing feature).
    """
    if segment_ids_BL is None:
        segment_ids_BL = ((tokens_BL != 0) if zero_is_padding
                          else jnp.ones(tokens_BL.shape, bool)).astype(jnp.int32)
    if positions_BL is None:
        positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1], dtype=jnp.int32)[None, :],
                                        tokens_BL.shape)
    return segment_ids_BL, positions_BL


def _split(rng, n):
    return [None] * n if rng is None else list(jax.random.split(rng, n))


# ----------------------------------------------------------------------------------------
# Decoding with a KV cache. A cache is a dict whose every leaf is batch-leading (so beam
# search can reorder rows with one gather):
#   "self": {"k", "v"}: [B, N, S, G, K], the decoder's keys/values at S slots;
#   "valid": [B, S] bool, slot holds a real token (prompts are left-padded);
#   "index": [B] int32, the next slot to write (the same in every row);
#   "position": [B] int32, the RoPE position of the row's next token;
#   encoder-decoder only: "cross": (k, v) [B, N, M, G, K], "cross_valid": [B, M].
# Left padding keeps one write slot for the whole batch (a single dynamic_update_slice)
# while each row's positions still start at 0 at its first real token.
# ----------------------------------------------------------------------------------------


def empty_cache(cfg: TransformerConfig, batch: int, num_layers: int, length: int) -> dict:
    shape = (batch, num_layers, length, cfg.num_kv_heads, cfg.head_dim)
    return {"self": {"k": jnp.zeros(shape, cfg.compute_dtype),
                     "v": jnp.zeros(shape, cfg.compute_dtype)},
            "valid": jnp.zeros((batch, length), bool),
            "index": jnp.zeros((batch,), jnp.int32),
            "position": jnp.zeros((batch,), jnp.int32)}


def _write(cache_BS, new_BL, index):
    return jax.lax.dynamic_update_slice_in_dim(cache_BS, new_BL.astype(cache_BS.dtype), index,
                                               axis=1)


def _cached_layers(stack: BlockStack, embed: Embed, tokens_BL, valid_BL, cache: dict,
                   prefix_BL=None, *, fresh: bool = False):
    """Runs L new tokens through `stack` against `cache`; returns (x_BLD, new cache).

    A new token at slot t sees every written real slot s <= t; with `prefix_BL` (a
    prefix-LM prompt) prefix tokens also see the later prefix tokens of the same call.
    `fresh`: the cache is empty (a prefill), so the new tokens start at slot 0, a static
    causal mask that the fused kernels take.
    """
    index = cache["index"][0]
    valid_BS = _write(cache["valid"], valid_BL, index)
    prefix_BS = None
    if prefix_BL is not None:
        prefix_BS = _write(jnp.zeros_like(valid_BS), prefix_BL != 0, index)
    self_mask = Mask.cached(tokens_BL.shape[1], valid_BS, 0 if fresh else index, prefix_BL,
                            prefix_BS)
    positions_BL = jnp.maximum(cache["position"][:, None]
                               + jnp.cumsum(valid_BL.astype(jnp.int32), axis=1) - 1, 0)
    cross = cache.get("cross")
    cross_mask_B1LM = None
    if cross is not None:
        # Every new token sees the encoder's real tokens (its padding has id 0).
        cross_mask_B1LM = Mask.cross(jnp.ones(tokens_BL.shape, jnp.int32),
                                     cache["cross_valid"].astype(jnp.int32))
    x_BLD, self_caches = stack.decode(
        embed(tokens_BL), caches=cache["self"], index=index, mask_B1LS=self_mask,
        positions_BL=positions_BL, cross_kv=cross, cross_mask_B1LM=cross_mask_B1LM)
    new = dict(cache, self=self_caches, valid=valid_BS, index=cache["index"] + tokens_BL.shape[1],
               position=cache["position"] + jnp.sum(valid_BL, axis=1, dtype=jnp.int32))
    return x_BLD, new




class _Output(nnx.Module):
    """Final norm and logits: tied to the embedding (·1/√D) or an untied head."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.final_norm = RMSNorm(cfg, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else LmHead(cfg, rngs=rngs)

    def __call__(self, x_BLD, embed: Embed, *, hidden: bool = False):
        """Logits [B, L, V] float32, or with `hidden` the final-normed states [B, L, D]
        that `projection` maps to them (the chunked loss never builds all logits)."""
        # The length whole for the logits (under sequence parallelism the stream arrives
        # split along it; layers.Block does the same for each branch's input).
        x_BLD = nn.with_logical_constraint(self.final_norm(x_BLD), (BATCH, None, None))
        if hidden:
            return x_BLD
        return embed.attend(x_BLD) if self.lm_head is None else self.lm_head(x_BLD)

    def projection(self, embed: Embed):
        """(w [D, V] in the compute dtype, scale): logits = (hidden · w) · scale, float32."""
        if self.lm_head is not None:
            return self.lm_head.kernel[...].astype(self.lm_head.dtype), 1.0
        w_DV = embed.embedding[...].astype(embed.dtype).T
        return w_DV, (1.0 / math.sqrt(w_DV.shape[0]) if embed.scale_logits else 1.0)


class Decoder(nnx.Module):
    """Decoder-only LM (PaLM, Llama): embedding, N causal blocks, final norm, logits.

    Causal LM by default; prefix LM when `causal_attention_BL` (SeqIO's
    `decoder_causal_attention`) marks the bidirectional prefix.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        if cfg.num_encoder_layers:
            raise ValueError(f"Decoder: num_encoder_layers={cfg.num_encoder_layers}, expected 0 "
                             "for a decoder-only network; use EncoderDecoder, or set "
                             "num_encoder_layers=0.")
        self.cfg = cfg
        self.embed = Embed(cfg, rngs=rngs)
        self.decoder = BlockStack(cfg, cfg.num_decoder_layers, cross_attention=False, rngs=rngs)
        self.output = _Output(cfg, rngs=rngs)

    def __call__(self, tokens_BL, *, segment_ids_BL=None, positions_BL=None,
                 causal_attention_BL=None, rng=None, hidden: bool = False):
        packed = segment_ids_BL is not None  # else one unpadded example per row
        segment_ids_BL, positions_BL = segments_and_positions(tokens_BL, segment_ids_BL,
                                                              positions_BL)
        mask = Mask.causal_lm(segment_ids_BL, causal_attention_BL, packed=packed,
                              max_segments=self.cfg.max_segments_per_row)
        emb_rng, stack_rng = _split(rng, 2)
        x_BLD = dropout(self.embed(tokens_BL), self.cfg.dropout_rate, emb_rng)
        x_BLD = self.decoder(x_BLD, mask_B1LL=mask, positions_BL=positions_BL, rng=stack_rng)
        return self.output(x_BLD, self.embed, hidden=hidden)

    def projection(self):
        """The output projection (w [D, V], scale) of the hidden states (`hidden=True`)."""
        return self.output.projection(self.embed)

    def final_states(self, tokens_BL, *, segment_ids_BL=None, positions_BL=None, rng=None):
        """The last block's outputs after the final norm [B, L, D] (what the logits are
        read from; a reward head reads them too)."""
        return self(tokens_BL, segment_ids_BL=segment_ids_BL, positions_BL=positions_BL,
                    rng=rng, hidden=True)

    def prefill(self, tokens_BP, valid_BP, max_length: int, prefix_BP=None):
        """Fills a fresh cache of `max_length` slots with a left-padded prompt; returns
        (logits of the prompt's positions [B, P, V], cache). `prefix_BP`: the prompt is
        a prefix-LM prefix (SeqIO's decoder_causal_attention), seen bidirectionally."""
        cache = empty_cache(self.cfg, tokens_BP.shape[0], self.cfg.num_decoder_layers,
                            max_length)
        x_BPD, cache = _cached_layers(self.decoder, self.embed, tokens_BP, valid_BP, cache,
                                      prefix_BP, fresh=True)
        return self.output(x_BPD, self.embed), cache

    def decode_step(self, tokens_BL, cache):
        """The logits [B, L, V] of L new tokens (all real) after `cache`, and the cache."""
        x_BLD, cache = _cached_layers(self.decoder, self.embed, tokens_BL,
                                      jnp.ones(tokens_BL.shape, bool), cache)
        return self.output(x_BLD, self.embed), cache


class RewardDecoder(Decoder):
    """A decoder-only LM with a scalar reward head (Llama 2's reward model): the reward
    of a sequence is the head applied to the final state of its last token. The LM
    parameters keep their names, so a pretrained or finetuned checkpoint initialises
    them; the head starts at zero (every reward 0 before training)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.reward_head = nnx.Param(jnp.zeros((cfg.emb_dim,), jnp.float32),
                                     out_sharding=(EMBED,))

    def rewards(self, tokens_BL, last_B, *, segment_ids_BL=None, rng=None):
        """[B] float32 reward of each row, read at position `last_B`; `segment_ids_BL`:
        1 on the row's tokens, 0 on padding (default: its non-zero tokens)."""
        if segment_ids_BL is None:
            segment_ids_BL = (tokens_BL != 0).astype(jnp.int32)
        states_BLD = self.final_states(tokens_BL, segment_ids_BL=segment_ids_BL, rng=rng)
        last_BD = jnp.take_along_axis(states_BLD, last_B[:, None, None], axis=1)[:, 0]
        return jnp.einsum("BD,D->B", last_BD.astype(jnp.float32), self.reward_head[...])

    def values(self, tokens_BL, *, segment_ids_BL, rng=None):
        """[B, L] float32: the head at every position, the value of the text up to and
        including that token (PPO's value model, initialised from a reward model, whose
        reward is this at a row's last token)."""
        states_BLD = self.final_states(tokens_BL, segment_ids_BL=segment_ids_BL, rng=rng)
        return jnp.einsum("BLD,D->BL", states_BLD.astype(jnp.float32), self.reward_head[...])


class Frozen(nnx.Variable):
    """A parameter nothing trains: gradients and the optimizer see only nnx.Param."""


class DPODecoder(Decoder):
    """The DPO policy (this decoder's own parameters, named as a plain Decoder's, so an
    SFT checkpoint initialises them) and `reference`, a frozen copy of them: the
    reference model of the DPO loss. `reset_reference` copies the policy into it (done
    at initialisation and after an initial checkpoint is read)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        graphdef, params = nnx.split(nnx.clone(self), nnx.Param)
        frozen = jax.tree.map(lambda v: Frozen(v.get_value(), **v.get_metadata()), params,
                              is_leaf=lambda x: isinstance(x, nnx.Variable))
        self.reference = nnx.merge(graphdef, frozen)

    def reset_reference(self) -> None:
        nnx.update(self.reference, nnx.state(self, nnx.Param))


class DomainState(nnx.Variable):
    """State the train step advances that is not a parameter (DoReMi's domain weights):
    checkpointed with the train state, never seen by gradients or the optimizer."""


@functools.cache
def with_reference(network: type) -> type:
    """`network` (Decoder or EncoderDecoder) with a frozen `reference` of the same shape
    (DoReMi's reference model, read from another run's checkpoint by
    train_state.init_or_restore) and the Group DRO state: `domain_weights` (α_t, starting
    uniform), `domain_weights_sum` (Σ α_t over steps), `domain_scores` (λ of the last
    step). Its own parameters are named as a plain `network`'s, so its checkpoints are
    ordinary ones. One class per network (cached): graphdefs compare by class."""

    class WithReference(network):
        def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, num_domains: int):
            super().__init__(cfg, rngs=rngs)
            graphdef, params = nnx.split(nnx.clone(self), nnx.Param)
            frozen = jax.tree.map(lambda v: Frozen(v.get_value(), **v.get_metadata()),
                                  params, is_leaf=lambda x: isinstance(x, nnx.Variable))
            self.reference = nnx.merge(graphdef, frozen)
            self.domain_weights = DomainState(jnp.full((num_domains,), 1.0 / num_domains))
            self.domain_weights_sum = DomainState(jnp.zeros((num_domains,)))
            self.domain_scores = DomainState(jnp.zeros((num_domains,)))

    WithReference.__name__ = WithReference.__qualname__ = f"{network.__name__}WithReference"
    return WithReference


class EncoderDecoder(nnx.Module):
    """Encoder-decoder LM (UL2 / Reka style) with one embedding shared by both stacks.

    Encoder: bidirectional self-attention within each packed segment. Decoder: causal
    self-attention, cross-attention from decoder segment k to encoder segment k, MLP.
    With tied embeddings the same table also produces the logits.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        if not cfg.num_encoder_layers:
            raise ValueError("EncoderDecoder: num_encoder_layers=0; an encoder-decoder needs "
                             ">= 1 encoder layer (use Decoder for decoder-only).")
        self.cfg = cfg
        self.embed = Embed(cfg, rngs=rngs)
        self.encoder = BlockStack(cfg, cfg.num_encoder_layers, cross_attention=False, rngs=rngs)
        self.encoder_norm = RMSNorm(cfg, rngs=rngs)
        self.decoder = BlockStack(cfg, cfg.num_decoder_layers, cross_attention=True, rngs=rngs)
        self.output = _Output(cfg, rngs=rngs)

    def encode(self, tokens_BM, *, segment_ids_BM=None, positions_BM=None, rng=None):
        packed = segment_ids_BM is not None
        segment_ids_BM, positions_BM = segments_and_positions(tokens_BM, segment_ids_BM,
                                                              positions_BM)
        emb_rng, stack_rng = _split(rng, 2)
        x_BMD = dropout(self.embed(tokens_BM), self.cfg.dropout_rate, emb_rng)
        mask = Mask.bidirectional(segment_ids_BM, packed=packed,
                                  max_segments=self.cfg.max_segments_per_row)
        x_BMD = self.encoder(x_BMD, mask_B1LL=mask, positions_BL=positions_BM, rng=stack_rng)
        return self.encoder_norm(x_BMD)

    def decode(self, encoded_BMD, tokens_BL, *, encoder_segment_ids_BM=None, segment_ids_BL=None,
               positions_BL=None, rng=None, hidden: bool = False):
        packed = encoder_segment_ids_BM is not None or segment_ids_BL is not None
        encoder_segment_ids_BM, _ = segments_and_positions(encoded_BMD[:, :, 0],
                                                           encoder_segment_ids_BM)
        segment_ids_BL, positions_BL = segments_and_positions(tokens_BL, segment_ids_BL,
                                                              positions_BL)
        emb_rng, stack_rng = _split(rng, 2)
        x_BLD = dropout(self.embed(tokens_BL), self.cfg.dropout_rate, emb_rng)
        bound = dict(packed=packed, max_segments=self.cfg.max_segments_per_row)
        x_BLD = self.decoder(
            x_BLD, mask_B1LL=Mask.causal_lm(segment_ids_BL, **bound),
            positions_BL=positions_BL, encoded_BMD=encoded_BMD,
            cross_mask_B1LM=Mask.cross(segment_ids_BL, encoder_segment_ids_BM, **bound),
            rng=stack_rng)
        return self.output(x_BLD, self.embed, hidden=hidden)

    def projection(self):
        """The output projection (w [D, V], scale) of the hidden states (`hidden=True`)."""
        return self.output.projection(self.embed)

    def __call__(self, encoder_tokens_BM, decoder_tokens_BL, *, encoder_segment_ids_BM=None,
                 encoder_positions_BM=None, decoder_segment_ids_BL=None,
                 decoder_positions_BL=None, rng=None, hidden: bool = False):
        enc_rng, dec_rng = _split(rng, 2)
        encoder_segment_ids_BM, encoder_positions_BM = segments_and_positions(
            encoder_tokens_BM, encoder_segment_ids_BM, encoder_positions_BM)
        encoded_BMD = self.encode(encoder_tokens_BM, segment_ids_BM=encoder_segment_ids_BM,
                                  positions_BM=encoder_positions_BM, rng=enc_rng)
        return self.decode(encoded_BMD, decoder_tokens_BL,
                           encoder_segment_ids_BM=encoder_segment_ids_BM,
                           segment_ids_BL=decoder_segment_ids_BL,
                           positions_BL=decoder_positions_BL, rng=dec_rng, hidden=hidden)

    def prefill(self, encoder_tokens_BM, max_length: int, encoder_segment_ids_BM=None):
        """Runs the encoder once; returns a decoder cache of `max_length` slots holding
        every layer's cross-attention keys and values (padding: token 0 or segment 0)."""
        segment_ids_BM, _ = segments_and_positions(encoder_tokens_BM, encoder_segment_ids_BM,
                                                   zero_is_padding=True)
        encoded_BMD = self.encode(encoder_tokens_BM, segment_ids_BM=segment_ids_BM)
        cache = empty_cache(self.cfg, encoder_tokens_BM.shape[0], self.cfg.num_decoder_layers,
                            max_length)
        return dict(cache, cross=self.decoder.cross_kv(encoded_BMD),
                    cross_valid=segment_ids_BM != 0)

    def decode_step(self, tokens_BL, cache):
        """The logits [B, L, V] of L new decoder tokens (all real) after `cache`, and the
        cache."""
        x_BLD, cache = _cached_layers(self.decoder, self.embed, tokens_BL,
                                      jnp.ones(tokens_BL.shape, bool), cache)
        return self.output(x_BLD, self.embed), cache

