"""The model contract train/eval/infer use: the network, its data form, loss, scores.

A model object holds only the config; the NNX module (the parameters) is passed to each
method, so train/eval code can `nnx.split`/`nnx.merge`, shard and differentiate it freely.
Batches are dicts of int32 [B, L] arrays with SeqIO's feature names (docs/ARCHITECTURE.md).
Absent `*_segment_ids` / `*_positions` mean unpacked rows, right-padded with 0 (SeqIO's
convention): a row runs up to its last non-zero token of `decoder_target_tokens` for the
decoder (its inputs start with the shifted-in 0), `encoder_input_tokens` for the encoder;
a 0 inside a row is a token (Llama 3's "!"). Prompts to decode carry their lengths
(`prompt_lengths`) where id 0 is a real token.

The model decides its family, here and nowhere else: the class (encoder-decoder or
decoder-only, `model_for(cfg)` for a bare config) and, for a decoder-only model, the
task features (with "inputs": prefix LM; without: causal LM). Callers ask the model for
everything that follows from it: `data_form` (data/forms.py: converters, features, lengths),
`tokens_per_example`, `bpc_form`, `train_flops_per_step`, `get_initial_batch`.

Loss (float32 throughout): weighted token cross-entropy, summed over weighted tokens and
divided by their number, plus PaLM's z-loss `z_loss · log²Z` averaged the same way. In
training (`fuses_loss`) it is made chunk by chunk from the final hidden states, its
gradient in the same pass (`fused_loss_sums`): no [B, L, V] logits array exists.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_like.model import attention, decoding, flops, partitioning
from t5x_like.model.decoding import DecodeConfig
from t5x_like.model.layers import TransformerConfig
from t5x_like.model.network import Decoder, EncoderDecoder, segments_and_positions

if TYPE_CHECKING:  # data/forms.py imports SeqIO and TensorFlow: loaded only when a
    from t5x_like.data import forms  # model builds rows (the accelerator check has neither)

Batch = Mapping[str, jax.Array]


def _segments_and_positions(batch: Batch, prefix: str, pad_source: str):
    """(segment_ids, positions) from the batch, or their unpacked defaults: one segment
    up to the row's last non-zero token (SeqIO's right padding with 0; a 0 inside the
    row, a real token in some vocabularies, is attended)."""
    segment_ids_BL = batch.get(f"{prefix}_segment_ids")
    tokens_BL = batch[pad_source]
    if segment_ids_BL is None:
        columns_L = jnp.arange(tokens_BL.shape[1])[None, :]
        segment_ids_BL = (columns_L < right_padded_lengths(tokens_BL)[:, None]).astype(
            jnp.int32)
    return segments_and_positions(tokens_BL, segment_ids_BL, batch.get(f"{prefix}_positions"))


def loss_weights(batch: Batch):
    weights_BL = batch.get("decoder_loss_weights")
    if weights_BL is None:
        weights_BL = batch["decoder_target_tokens"] > 0
    return weights_BL.astype(jnp.float32)


def token_losses(logits_BLV, targets_BL, z_loss: float):
    """Per-token (nll, z-loss, correct), float32. nll = log Z − logit[target]."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = target_logits(logits_BLV, targets_BL)
    nll_BL = log_z_BL - target_logit_BL
    z_loss_BL = z_loss * jnp.square(log_z_BL)
    return nll_BL, z_loss_BL, _is_top(target_logit_BL, logits_BLV)


def target_logits(logits_BLV, targets_BL):
    """logit[target] at each position. Compiled for a TPU, a sum over the vocabulary
    masked by the target, which XLA fuses into the passes that reduce log Z and its
    gradient; a gather reads the float32 logits from memory once more and scatters into
    them again in the backward pass (Llama 3 8B at 8,192 tokens on a v5p: 8e9 fewer bytes
    accessed per chip, 0.003 s off the compiler's step estimate; docs/PERFORMANCE.md).
    Elsewhere the gather: on CPU the masked sum made the loss 1.6x slower."""
    if attention.platform() != "tpu":
        return jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    vocab = jnp.arange(logits_BLV.shape[-1], dtype=targets_BL.dtype)
    is_target = targets_BL[..., None] == vocab.reshape((1,) * targets_BL.ndim + (-1,))
    return jnp.sum(jnp.where(is_target, logits_BLV, 0.0), axis=-1)


def _is_top(target_logit, logits):
    """1.0 where the target's logit is the largest of its row (a tie for the top counts
    as correct), else 0.0. Compared against the max that log Z already reduces, so XLA
    shares that pass; an argmax is a second, slower (value, index) reduction (111 ms
    against 17 ms a step of the reference model on CPU)."""
    return (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)


def fuses_loss(cfg) -> bool:
    """Whether training takes the fused loss (`fused_loss_sums`): cfg.fused_loss when set;
    by default yes, except compiled for a TPU with no loss_chunk_length, where XLA fuses
    the plain loss's logits into the loss (less memory and fewer collectives than the
    fused loss in one chunk; docs/PERFORMANCE.md, "Measurements")."""
    if cfg.fused_loss is not None:
        return cfg.fused_loss
    return cfg.loss_chunk_length > 0 or attention.platform() != "tpu"


def _in_chunks(a_BL, chunk: int):
    """[B, L, ...] -> [L/chunk, B, chunk, ...]: whole rows in every chunk, so a batch
    sharded over devices stays sharded (no chunk crosses the batch axis)."""
    b, length = a_BL.shape[:2]
    return jnp.moveaxis(a_BL.reshape(b, length // chunk, chunk, *a_BL.shape[2:]), 1, 0)


def _chunk_length(length: int, chunk: int) -> int:
    """The largest divisor of `length` that is at most `chunk` (0: the whole length)."""
    if chunk <= 0 or chunk >= length:
        return length
    return max(d for d in range(1, chunk + 1) if length % d == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def fused_loss_sums(x_BLD, w_DV, targets_BL, weights_BL, scale: float, z_loss: float,
                    chunk: int):
    """(Σw·(nll + z-loss), Σw·nll, Σw·z-loss, Σw·correct) of logits = (x·w)·scale, one
    chunk of `chunk` positions (all rows) at a time: never more than one chunk's logits
    [B, chunk, V] exist, forward or backward. The gradient of the first sum (the loss)
    is made in the same pass, chunk by chunk, and kept (dx [B, L, D], dw [D, V]), so
    nothing is recomputed; the other sums are metrics, not differentiated (their
    cotangents are ignored: pass them through stop_gradient). Equal to `token_losses`
    summed, gradients included (tests/test_models.py)."""
    return _fused_forward(x_BLD, w_DV, targets_BL, weights_BL, scale, z_loss, chunk)[0]


def _fused_forward(x_BLD, w_DV, targets_BL, weights_BL, scale, z_loss, chunk):
    chunk = _chunk_length(x_BLD.shape[1], chunk)

    def body(dw_DV, xs):
        # The chunk's B·c tokens as one axis T: 2-D matmuls (see layers.dense).
        x_BcD, x_DT, targets_Bc, weights_Bc = xs
        x_TD = x_BcD.reshape(-1, x_BcD.shape[-1])
        targets_T, weights_T = targets_Bc.reshape(-1), weights_Bc.reshape(-1)
        logits_TV = scale * jnp.dot(x_TD, w_DV, preferred_element_type=jnp.float32)
        log_z_T = jax.nn.logsumexp(logits_TV, axis=-1)
        target_logit_T = jnp.take_along_axis(logits_TV, targets_T[:, None], axis=-1)[:, 0]
        nll_T = log_z_T - target_logit_T
        correct_T = _is_top(target_logit_T, logits_TV)
        # d/dlogits of w·(log Z − logit[t] + z·log²Z) = w·(softmax·(1 + 2z·log Z) − onehot)
        onehot_TV = jax.nn.one_hot(targets_T, logits_TV.shape[-1], dtype=jnp.float32)
        probs_TV = jnp.exp(logits_TV - log_z_T[:, None])
        g_TV = (weights_T[:, None] * scale * (
            probs_TV * (1.0 + 2.0 * z_loss * log_z_T)[:, None] - onehot_TV)).astype(x_TD.dtype)
        dx_TD = jnp.einsum("TV,DV->TD", g_TV, w_DV, preferred_element_type=jnp.float32)
        dw_DV = dw_DV + jnp.dot(x_DT, g_TV, preferred_element_type=jnp.float32)
        sums = jnp.stack([jnp.sum(weights_T * nll_T),
                          jnp.sum(weights_T * z_loss * jnp.square(log_z_T)),
                          jnp.sum(weights_T * correct_T)])
        return dw_DV, (sums, dx_TD.reshape(x_BcD.shape).astype(x_BcD.dtype))

    # x's chunks also transposed, [D, B·c], made once: XLA on CPU hands x_DT·g to its fast
    # matmul library but runs x_TDᵀ·g (a contraction over the leading axis) in a
    # generic loop about 2x slower.
    x_nBcD = _in_chunks(x_BLD, chunk)
    x_nDT = jnp.swapaxes(x_nBcD.reshape(x_nBcD.shape[0], -1, x_BLD.shape[-1]), 1, 2)
    xs = (x_nBcD, x_nDT, _in_chunks(targets_BL, chunk),
          _in_chunks(weights_BL.astype(jnp.float32), chunk))
    dw_DV, (sums_n3, dx_nBcD) = jax.lax.scan(body, jnp.zeros(w_DV.shape, jnp.float32), xs)
    dx_BLD = jnp.moveaxis(dx_nBcD, 0, 1).reshape(x_BLD.shape)
    nll, z, correct = jnp.sum(sums_n3, axis=0)
    return (nll + z, nll, z, correct), (dx_BLD, dw_DV.astype(w_DV.dtype))


def _fused_backward(scale, z_loss, chunk, residuals, cotangents):
    dx_BLD, dw_DV = residuals
    g = cotangents[0]
    return (g * dx_BLD).astype(dx_BLD.dtype), (g * dw_DV).astype(dw_DV.dtype), None, None


fused_loss_sums.defvjp(_fused_forward, _fused_backward)


class LanguageModel:
    """Loss and scoring shared by both families; subclasses say how to get logits and
    what form their data takes."""

    module_class: type
    bpc_form: str  # how bpc.py lays out a scoring window: "encdec" or "decoder"

    def __init__(self, cfg: TransformerConfig):
        self._check_config(cfg)
        self.cfg = cfg

    def _check_config(self, cfg: TransformerConfig) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg})"

    @functools.cached_property
    def num_params(self) -> int:
        """Exact parameter count, from shapes only (nothing is allocated)."""
        return partitioning.count_params(self.make_module)

    def data_form(self, task_feature_lengths: Mapping[str, int]) -> forms.DataForm:
        """The form of this model's rows for a task of these features (data/forms.py):
        its feature converters, features, packing, prompt feature and length check.
        Every module that builds or reads rows asks this, never the model's class."""
        raise NotImplementedError  # pragma: no cover - abstract

    def tokens_per_example(self, task_feature_lengths: Mapping[str, int]) -> int:
        """Token positions one row feeds the model (the data form's count)."""
        return self.data_form(task_feature_lengths).tokens_per_example(task_feature_lengths)

    def get_initial_batch(self, batch_size: int, feature_lengths: Mapping[str, int]):
        """All-zero numpy batch of the data form's model features at their packed
        lengths (shape-only initialisation); feature_lengths as TASK_FEATURE_LENGTHS
        ({"targets": L}; a prefix LM's {"inputs": I, "targets": T} gives I + T)."""
        lengths = self.data_form(feature_lengths).model_feature_lengths(feature_lengths)
        return {name: np.zeros((batch_size, length), np.int32)
                for name, length in lengths.items()}

    def train_flops_per_step(self, batch_size: int,
                             task_feature_lengths: Mapping[str, int]) -> flops.Flops:
        """Model FLOPs of one training step of `batch_size` rows, both conventions."""
        raise NotImplementedError  # pragma: no cover - abstract

    def make_module(self, rngs: nnx.Rngs | int = 0) -> nnx.Module:
        """Build the NNX network with freshly initialised float32 parameters.

        Under `jax.set_mesh(mesh)` and `nnx.logical_axis_rules(rules)` parameters are
        sharded as they are created (Flax's eager sharding); without a mesh they are
        created unsharded, so tests and single-device use need no mesh.
        For a large model, use partitioning.py's sharded init (eval_shape, then
        jit(make_module, out_shardings=...)).
        """
        if isinstance(rngs, int):
            rngs = nnx.Rngs(rngs)
        if jax.sharding.get_abstract_mesh().empty:
            with nnx.use_eager_sharding(False):
                return self.module_class(self.cfg, rngs=rngs)
        return self.module_class(self.cfg, rngs=rngs)

    def logits(self, module, batch: Batch, rng=None, hidden: bool = False):  # pragma: no cover
        raise NotImplementedError

    def loss_fn(self, module, batch: Batch, rng=None):
        """(loss, metrics): weighted mean cross-entropy + z-loss; dropout iff rng given.
        Fused (`fuses_loss`), through `fused_loss_sums` (no [B, L, V] logits)."""
        return self._loss(module, batch, rng, fused=fuses_loss(self.cfg))

    def _loss(self, module, batch: Batch, rng, fused: bool):
        weights_BL = loss_weights(batch)
        targets_BL = batch["decoder_target_tokens"]
        if fused:
            x_BLD = self.logits(module, batch, rng, hidden=True)
            w_DV, scale = module.projection()
            total_sum, *parts = fused_loss_sums(x_BLD, w_DV, targets_BL, weights_BL, scale,
                                                self.cfg.z_loss, self.cfg.loss_chunk_length)
            nll_sum, z_loss_sum, correct_sum = jax.lax.stop_gradient(parts)
        else:
            nll_BL, z_loss_BL, correct_BL = token_losses(
                self.logits(module, batch, rng), targets_BL, self.cfg.z_loss)
            nll_sum = jnp.sum(weights_BL * nll_BL)
            z_loss_sum = jnp.sum(weights_BL * z_loss_BL)
            correct_sum = jnp.sum(weights_BL * correct_BL)
            total_sum = nll_sum + z_loss_sum
        weight_sum = jnp.sum(weights_BL)
        # An all-padding batch contributes zero loss rather than 0/0.
        denom = jnp.maximum(weight_sum, 1e-8)
        cross_entropy = nll_sum / denom
        z_loss = z_loss_sum / denom
        loss = total_sum / denom
        metrics = {
            "loss": loss,
            "cross_entropy": cross_entropy,
            "z_loss": z_loss,
            "accuracy": correct_sum / denom,
            "num_tokens": weight_sum,
            "nll_sum": nll_sum,
            "z_loss_sum": z_loss_sum,
            "correct_sum": correct_sum,
            "weight_sum": weight_sum,
        }
        return loss, metrics

    # For objectives that keep more than a network's parameters (t5x_like/objectives/):
    # what the train step and the state's start do with them. A family keeps nothing.
    updates_state = False  # whether the train step calls `after_update`

    def after_update(self, module, metrics: dict) -> dict:
        """Inside the train step, after the update (only when `updates_state`): writes
        the model's own state (DoReMi's domain weights) and returns the metrics to log."""
        return metrics

    def after_initial_params(self, module) -> None:
        """A new run's parameters were just read from an initial checkpoint (DPO: its
        frozen reference becomes that start)."""

    def frozen_reference(self, module):
        """The module's frozen reference network, which a run's `reference_checkpoint`
        fills (DoReMi's proxy); None for a model without one."""
        return None

    def eval_fn(self, module, batch: Batch):
        """Deterministic loss and metrics (T5X's eval_fn); no gradient is taken, so the
        logits are built whole (the fused loss makes its gradient as it goes)."""
        return self._loss(module, batch, None, fused=False)

    def score_batch(self, module, batch: Batch):
        """[B] per-example summed log-likelihood of the targets, weighted by loss weights."""
        return self.score_and_greedy(module, batch)[0]

    def score_and_greedy(self, module, batch: Batch):
        """(score_batch's [B] log-likelihoods, [B] whether every weighted target is its
        position's argmax: lm-evaluation-harness's `is_greedy`)."""
        logits_BLV = self.logits(module, batch, None)
        nll_BL, _, top_BL = token_losses(logits_BLV, batch["decoder_target_tokens"], 0.0)
        weights_BL = loss_weights(batch)
        return (-jnp.sum(weights_BL * nll_BL, axis=-1),
                jnp.all((top_BL > 0) | (weights_BL == 0), axis=-1))

    def predict_batch(self, module, batch: Batch, decode: DecodeConfig,
                      rng=None) -> dict[str, jax.Array]:
        """Decodes a batch with the KV cache (T5X's predict_batch): {"tokens" [B, T],
        "scores" [B] (log-probability, length-penalised for beams), and for sampling
        "token_logprobs" [B, T] or for beam search "beams" [B, k, T], "beam_scores"}.
        Tokens after EOS are 0 (a row ends at its first EOS; 0 may be a real token
        before it). `decode`'s special ids must be known (resolved from the vocabulary:
        data/vocabulary.resolve_decode). The batch's prompt features are the family's
        (`_start_decoding`); jit this with `decode` static."""
        decode.check_resolved()
        first_logits_BV, state = self._start_decoding(module, batch,
                                                      decode.max_decode_length, decode.bos_id)
        # The loop body is a new trace: it rebuilds the module with new Variables there
        # (NNX refuses Variables made at another trace level) over the same arrays.
        graphdef, arrays = nnx.split(module)

        def step_fn(tokens_B1, state):
            here = jax.tree.map(lambda x: x, arrays)
            return nnx.merge(graphdef, here).decode_step(tokens_B1, state)

        if decode.method != "beam":
            tokens_BT, logprobs_BT = decoding.sample(first_logits_BV, state, step_fn, decode,
                                                     rng)
            return {"tokens": tokens_BT, "scores": jnp.sum(logprobs_BT, axis=-1),
                    "token_logprobs": logprobs_BT}
        beams = decode.beam_size
        tokens_BKT, scores_BK = decoding.beam_search(
            decoding.repeat_for_beams(first_logits_BV, beams),
            decoding.repeat_for_beams(state, beams), step_fn, decode)
        return {"tokens": tokens_BKT[:, 0], "scores": scores_BK[:, 0], "beams": tokens_BKT,
                "beam_scores": scores_BK}


class DecoderOnlyModel(LanguageModel):
    """Decoder-only LM: causal LM, or prefix LM when `decoder_causal_attention` is present."""

    module_class = Decoder
    bpc_form = "decoder"

    def _check_config(self, cfg: TransformerConfig) -> None:
        if cfg.num_encoder_layers:
            raise ValueError(
                f"DecoderOnlyModel: num_encoder_layers={cfg.num_encoder_layers}; a "
                "decoder-only model has none. Use families.EncoderDecoderModel in the model "
                "gin file, or set num_encoder_layers = 0.")

    def data_form(self, task_feature_lengths: Mapping[str, int]) -> forms.DataForm:
        from t5x_like.data import forms  # SeqIO + TensorFlow, only when rows are built

        # T5X's DecoderFeatureConverter rule: task inputs make it a prefix LM; dialogues
        # carry their loss mask (data/chat.py).
        if "loss_mask" in task_feature_lengths:
            return forms.CHAT
        return forms.PREFIX_LM if "inputs" in task_feature_lengths else forms.LM

    def _start_decoding(self, module: Decoder, batch: Batch, max_decode_length: int,
                        bos_id: int | None = 0):
        """Prompts: `inputs` [B, P] (token ids, right-padded with 0, e.g. a SeqIO task's
        inputs with their EOS) decode as a prefix LM (bidirectional prompt, as trained
        on prefix-LM data), and so do SeqIO's unpacked prefix-LM features (the inputs are
        the `decoder_target_tokens` under `decoder_causal_attention` but its last
        position); `prompt` [B, P] instead continues the text causally. A prompt's length
        per row is `prompt_lengths` [B] (required where id 0 is a real token, e.g.
        Llama 3's "!"), else SeqIO's convention: right-padded with 0, up to its last
        non-zero token. Each becomes `bos_id` (if any) + its tokens, left-padded to one
        length, and fills the cache."""
        if "decoder_causal_attention" in batch:
            attention_BL = batch["decoder_causal_attention"]
            n_inputs_B1 = jnp.sum(attention_BL != 0, axis=1, keepdims=True) - 1
            columns_L = jnp.arange(attention_BL.shape[1])[None, :]
            batch = {"inputs": jnp.where(columns_L < n_inputs_B1,
                                         batch["decoder_target_tokens"], 0),
                     "prompt_lengths": jnp.maximum(n_inputs_B1[:, 0], 0)}
        prefix_lm = "inputs" in batch
        prompt_BP = batch["inputs"] if prefix_lm else batch["prompt"]
        tokens_BL, valid_BL = _left_aligned(prompt_BP, batch.get("prompt_lengths"), bos_id)
        logits_BLV, cache = module.prefill(tokens_BL, valid_BL,
                                           tokens_BL.shape[1] + max_decode_length,
                                           prefix_BP=valid_BL if prefix_lm else None)
        return logits_BLV[:, -1], cache

    def train_flops_per_step(self, batch_size, task_feature_lengths):
        # A prefix LM packs inputs and targets into one decoder sequence.
        seq_len = self.tokens_per_example(task_feature_lengths)
        per_token = flops.decoder_only_flops_per_token(self.cfg, seq_len)
        return per_token * (batch_size * seq_len)

    def logits(self, module: Decoder, batch: Batch, rng=None, hidden: bool = False):
        segment_ids_BL, positions_BL = _segments_and_positions(
            batch, "decoder", "decoder_target_tokens")
        return module(batch["decoder_input_tokens"], segment_ids_BL=segment_ids_BL,
                      positions_BL=positions_BL,
                      causal_attention_BL=batch.get("decoder_causal_attention"), rng=rng,
                      hidden=hidden)


class EncoderDecoderModel(LanguageModel):
    """Encoder-decoder LM (UL2 denoisers in inputs/targets form)."""

    module_class = EncoderDecoder
    bpc_form = "encdec"

    def _check_config(self, cfg: TransformerConfig) -> None:
        if not cfg.num_encoder_layers:
            raise ValueError(
                "EncoderDecoderModel: num_encoder_layers=0; an encoder-decoder needs at least "
                "one encoder layer. Use families.DecoderOnlyModel in the model gin file, or "
                "set num_encoder_layers.")

    def data_form(self, task_feature_lengths: Mapping[str, int]) -> forms.DataForm:
        from t5x_like.data import forms  # SeqIO + TensorFlow, only when rows are built

        return forms.ENCDEC

    def _start_decoding(self, module: EncoderDecoder, batch: Batch, max_decode_length: int,
                        bos_id: int | None = 0):
        """Prompts: `encoder_input_tokens` [B, M] (0-padded): the encoder runs once; the
        decoder starts from BOS (0), as training's shifted targets do."""
        segment_ids_BM, _ = _segments_and_positions(batch, "encoder", "encoder_input_tokens")
        cache = module.prefill(batch["encoder_input_tokens"], max_decode_length + 1,
                               segment_ids_BM)
        bos_B1 = jnp.full((batch["encoder_input_tokens"].shape[0], 1), bos_id or 0, jnp.int32)
        logits_B1V, cache = module.decode_step(bos_B1, cache)
        return logits_B1V[:, -1], cache

    def train_flops_per_step(self, batch_size, task_feature_lengths):
        return flops.encoder_decoder_flops_per_example(
            self.cfg, task_feature_lengths["inputs"], task_feature_lengths["targets"]
        ) * batch_size

    def logits(self, module: EncoderDecoder, batch: Batch, rng=None, hidden: bool = False):
        enc_segment_ids_BM, enc_positions_BM = _segments_and_positions(
            batch, "encoder", "encoder_input_tokens")
        dec_segment_ids_BL, dec_positions_BL = _segments_and_positions(
            batch, "decoder", "decoder_target_tokens")
        return module(batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                      encoder_segment_ids_BM=enc_segment_ids_BM,
                      encoder_positions_BM=enc_positions_BM,
                      decoder_segment_ids_BL=dec_segment_ids_BL,
                      decoder_positions_BL=dec_positions_BL, rng=rng, hidden=hidden)


def _left_aligned(prompt_BP, lengths_B=None, bos_id: int | None = 0):
    """`bos_id` (if not None) + each row's first `lengths_B` tokens, left-padded to one
    width: (tokens, valid) [B, W]. Left padding gives every row the same next slot.
    Without `lengths_B`, SeqIO's convention: rows right-padded with 0, each up to its
    last non-zero token (a 0 inside a row is kept); a vocabulary whose id 0 is a real
    token passes the lengths."""
    prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
    batch = prompt_BP.shape[0]
    if lengths_B is None:
        lengths_B = right_padded_lengths(prompt_BP)
    if bos_id is not None:
        prompt_BP = jnp.concatenate([jnp.full((batch, 1), bos_id, jnp.int32), prompt_BP], 1)
        lengths_B = jnp.asarray(lengths_B) + 1
    width = prompt_BP.shape[1]
    source_BW = jnp.arange(width)[None, :] - (width - jnp.asarray(lengths_B))[:, None]
    valid_BW = source_BW >= 0
    tokens_BW = jnp.take_along_axis(prompt_BP, jnp.maximum(source_BW, 0), axis=1)
    return jnp.where(valid_BW, tokens_BW, 0), valid_BW


def right_padded_lengths(tokens_BL):
    """[B] length of each row right-padded with 0 (SeqIO's convention, pad = 0): up to
    and including its last non-zero token, so a 0 inside a row counts."""
    tokens_BL = jnp.asarray(tokens_BL)
    columns_L = jnp.arange(1, tokens_BL.shape[1] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(tokens_BL != 0, columns_L[None, :], 0), axis=1)


def model_for(cfg: TransformerConfig) -> DecoderOnlyModel | EncoderDecoderModel:
    """The model a bare config describes (encoder layers: encoder-decoder). Gin model
    files name the class themselves; this is for code that holds only a config."""
    return EncoderDecoderModel(cfg) if cfg.num_encoder_layers else DecoderOnlyModel(cfg)
