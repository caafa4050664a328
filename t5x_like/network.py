"""The two network families, assembled from layers.py: decoder-only and encoder-decoder.

Inputs follow SeqIO's packed-batch conventions: segment ids are 0 on padding and number
the packed examples of a row from 1; positions restart at 0 for each example. When segment
ids / positions are None the row is one unpadded example (ids all 1, positions 0..L-1).
Both networks return float32 logits [B, L, V].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_like.layers import (
    BlockStack,
    Embed,
    LmHead,
    RMSNorm,
    TransformerConfig,
    bidirectional_mask,
    causal_mask,
    cross_mask,
    dropout,
)


def segments_and_positions(tokens_BL, segment_ids_BL=None, positions_BL=None, *,
                           zero_is_padding: bool = False):
    """The given segment ids / positions, or the defaults of one unpacked example per row.

    Default segment ids: 1 on every token, or, with `zero_is_padding`, on the non-zero
    tokens only (0 on padding); default positions 0..L-1. The one place these defaults
    are made (models.py asks with its padding-bearing feature).
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


class _Output(nnx.Module):
    """Final norm and logits: tied to the embedding (·1/√D) or an untied head."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.final_norm = RMSNorm(cfg, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else LmHead(cfg, rngs=rngs)

    def __call__(self, x_BLD, embed: Embed):
        x_BLD = self.final_norm(x_BLD)
        return embed.attend(x_BLD) if self.lm_head is None else self.lm_head(x_BLD)


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
                 causal_attention_BL=None, rng=None):
        segment_ids_BL, positions_BL = segments_and_positions(tokens_BL, segment_ids_BL,
                                                              positions_BL)
        emb_rng, stack_rng = _split(rng, 2)
        x_BLD = dropout(self.embed(tokens_BL), self.cfg.dropout_rate, emb_rng)
        x_BLD = self.decoder(x_BLD, mask_B1LL=causal_mask(segment_ids_BL, causal_attention_BL),
                             positions_BL=positions_BL, rng=stack_rng)
        return self.output(x_BLD, self.embed)


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
        segment_ids_BM, positions_BM = segments_and_positions(tokens_BM, segment_ids_BM,
                                                              positions_BM)
        emb_rng, stack_rng = _split(rng, 2)
        x_BMD = dropout(self.embed(tokens_BM), self.cfg.dropout_rate, emb_rng)
        x_BMD = self.encoder(x_BMD, mask_B1LL=bidirectional_mask(segment_ids_BM),
                             positions_BL=positions_BM, rng=stack_rng)
        return self.encoder_norm(x_BMD)

    def decode(self, encoded_BMD, tokens_BL, *, encoder_segment_ids_BM=None, segment_ids_BL=None,
               positions_BL=None, rng=None):
        encoder_segment_ids_BM, _ = segments_and_positions(encoded_BMD[:, :, 0],
                                                           encoder_segment_ids_BM)
        segment_ids_BL, positions_BL = segments_and_positions(tokens_BL, segment_ids_BL,
                                                              positions_BL)
        emb_rng, stack_rng = _split(rng, 2)
        x_BLD = dropout(self.embed(tokens_BL), self.cfg.dropout_rate, emb_rng)
        x_BLD = self.decoder(x_BLD, mask_B1LL=causal_mask(segment_ids_BL),
                             positions_BL=positions_BL, encoded_BMD=encoded_BMD,
                             cross_mask_B1LM=cross_mask(segment_ids_BL, encoder_segment_ids_BM),
                             rng=stack_rng)
        return self.output(x_BLD, self.embed)

    def __call__(self, encoder_tokens_BM, decoder_tokens_BL, *, encoder_segment_ids_BM=None,
                 encoder_positions_BM=None, decoder_segment_ids_BL=None,
                 decoder_positions_BL=None, rng=None):
        enc_rng, dec_rng = _split(rng, 2)
        encoder_segment_ids_BM, encoder_positions_BM = segments_and_positions(
            encoder_tokens_BM, encoder_segment_ids_BM, encoder_positions_BM)
        encoded_BMD = self.encode(encoder_tokens_BM, segment_ids_BM=encoder_segment_ids_BM,
                                  positions_BM=encoder_positions_BM, rng=enc_rng)
        return self.decode(encoded_BMD, decoder_tokens_BL,
                           encoder_segment_ids_BM=encoder_segment_ids_BM,
                           segment_ids_BL=decoder_segment_ids_BL,
                           positions_BL=decoder_positions_BL, rng=dec_rng)
