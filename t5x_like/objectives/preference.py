"""Preference pairs: the reward model and DPO, their losses and metrics.

A preference example is (prompt, chosen, rejected, rating): task features `inputs`
(the prompt), `targets` (the chosen response), `rejected` and `rating`, one int in
0..3 (Llama 2's four levels; docs/FORMULAS.md, "Preference pairs"):

  3 significantly better   2 better   1 slightly better   0 negligibly better / unsure

Their SeqIO side (the feature converter, pairs built from the shipped corpus) is
data/pairs.py; this module is the losses, the metrics and the two models (`RewardModel`,
`DPOModel`): decoder-only families whose loss is over pairs.

Losses, per pair (mean over the pairs of a batch):

  reward model   −log σ(r_c − r_r − m(rating))            m: MARGINS[name][rating]
  DPO            −log σ(β·[(log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_like.data import forms
from t5x_like.data import pairs
from t5x_like.data.pairs import NUM_RATINGS
from t5x_like.model import flops
from t5x_like.model.decoding import DecodeConfig
from t5x_like.model.families import (
    Batch,
    DecoderOnlyModel,
    right_padded_lengths,
    token_losses,
)
from t5x_like.model.layers import TransformerConfig
from t5x_like.model.network import Decoder, DPODecoder, RewardDecoder

# Llama 2, Table 27, indexed by rating 0..3 (unsure ... significantly better).
MARGINS: Mapping[str, tuple[float, ...]] = {
    "none": (0.0, 0.0, 0.0, 0.0),
    "small": (0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0),
    "large": (0.0, 1.0, 2.0, 3.0),
}


def margin_table(name: str) -> tuple[float, ...]:
    if name not in MARGINS:
        raise ValueError(f"Unknown reward margin {name!r}; expected one of {sorted(MARGINS)} "
                         "(Llama 2's Table 27: 'small' or 'large'; 'none' for no margin).")
    return MARGINS[name]


def reward_losses(reward_chosen_B, reward_rejected_B, rating_B, margins: tuple[float, ...]):
    """Per-pair −log σ(r_c − r_r − m(rating)), float32 (softplus form, stable)."""
    margin_B = jnp.asarray(margins, jnp.float32)[jnp.clip(rating_B, 0, NUM_RATINGS - 1)]
    delta_B = (reward_chosen_B - reward_rejected_B).astype(jnp.float32) - margin_B
    return jax.nn.softplus(-delta_B)


def dpo_losses(policy_chosen_B, policy_rejected_B, reference_chosen_B, reference_rejected_B,
               beta: float):
    """Per-pair DPO loss and implicit reward margin β·(Δ_chosen − Δ_rejected), where Δ is
    the policy's log-likelihood of a response minus the reference's."""
    margin_B = beta * ((policy_chosen_B - reference_chosen_B)
                       - (policy_rejected_B - reference_rejected_B))
    return jax.nn.softplus(-margin_B), margin_B


def pair_metrics(loss_B, correct_B, valid_B, rating_B, extra: Mapping[str, Any] = None):
    """(mean loss, metrics) of a batch of pairs: sums that add up across batches
    (`*_sum`, the trainer's convention; weight_sum = pairs) and, per rating level,
    `pairs_rating{k}_sum` and `correct_rating{k}_sum`."""
    valid_B = valid_B.astype(jnp.float32)
    pairs = jnp.sum(valid_B)
    loss_sum = jnp.sum(loss_B * valid_B)
    correct_sum = jnp.sum(correct_B.astype(jnp.float32) * valid_B)
    denom = jnp.maximum(pairs, 1e-8)
    metrics = {"loss": loss_sum / denom, "accuracy": correct_sum / denom,
               "nll_sum": loss_sum, "correct_sum": correct_sum, "weight_sum": pairs}
    for k in range(NUM_RATINGS):
        at_k = valid_B * (rating_B == k)
        metrics[f"pairs_rating{k}_sum"] = jnp.sum(at_k)
        metrics[f"correct_rating{k}_sum"] = jnp.sum(at_k * correct_B.astype(jnp.float32))
    for name, value_B in (extra or {}).items():
        metrics[f"{name}_sum"] = jnp.sum(value_B * valid_B)
        metrics[name] = metrics[f"{name}_sum"] / denom
    return metrics["loss"], metrics


def summarize_pairs(totals: Mapping[str, float]) -> dict[str, float]:
    """Eval results from summed pair metrics: loss, accuracy, pairs, accuracy per rating
    level (`accuracy_rating{k}`, absent for a level without pairs), and means of the other
    sums (e.g. `reward_margin` for DPO)."""
    pairs = float(totals["weight_sum"])
    out = {"loss": float(totals["nll_sum"]) / max(pairs, 1e-8),
           "accuracy": float(totals["correct_sum"]) / max(pairs, 1e-8), "pairs": int(pairs)}
    for k in range(NUM_RATINGS):
        n = float(totals.get(f"pairs_rating{k}_sum", 0.0))
        if n:
            out[f"accuracy_rating{k}"] = float(totals[f"correct_rating{k}_sum"]) / n
            out[f"pairs_rating{k}"] = int(n)
    known = {"nll_sum", "correct_sum", "weight_sum"}
    for key, value in totals.items():
        if key.endswith("_sum") and key not in known and "_rating" not in key:
            out[key[:-len("_sum")]] = float(value) / max(pairs, 1e-8)
    return out


def last_token_index(tokens_BL, segment_ids_BL=None):
    """Index of each row's last token (0 for an all-padding row): the last position whose
    segment id is non-zero; without segment ids, SeqIO's right padding with 0 (the last
    non-zero token: a 0 inside the row is a token)."""
    marks_BL = tokens_BL if segment_ids_BL is None else segment_ids_BL
    return jnp.maximum(right_padded_lengths(marks_BL) - 1, 0)


def row_segments(batch: Batch, side: str):
    """[B, L] int32 segment ids of a pair's `side` ("chosen", "rejected"): 1 on the
    prompt and response, 0 on padding, as the converter marks them
    (`{side}_segment_ids`); rows made before those existed: SeqIO's right padding."""
    segment_ids_BL = batch.get(f"{side}_segment_ids")
    if segment_ids_BL is None:
        tokens_BL = batch[f"{side}_tokens"]
        columns_L = jnp.arange(tokens_BL.shape[1])[None, :]
        segment_ids_BL = columns_L < right_padded_lengths(tokens_BL)[:, None]
    return jnp.asarray(segment_ids_BL).astype(jnp.int32)


# ---------------------------------------------------------------------------
# The models


class _PairwiseModel(DecoderOnlyModel):
    """A decoder-only model trained on preference pairs (data/pairs.py's
    "preference" rows): both responses of a pair run through the network."""

    def data_form(self, task_feature_lengths: Mapping[str, int]) -> forms.DataForm:
        return forms.PREFERENCE

    def train_flops_per_step(self, batch_size, task_feature_lengths):
        seq_len = _pair_length(task_feature_lengths)
        per_token = flops.decoder_only_flops_per_token(self.cfg, seq_len)
        return per_token * (batch_size * 2 * seq_len)

    def get_initial_batch(self, batch_size: int, feature_lengths: Mapping[str, int]):
        length = _pair_length(feature_lengths)
        batch = {n: np.zeros((batch_size, length), np.int32)
                 for n in pairs.MODEL_FEATURES if n != "rating"}
        batch["rating"] = np.zeros((batch_size, 1), np.int32)
        return batch

    def _pair_metrics(self, losses_B, correct_B, batch: Batch, extra):
        chosen_BL, rejected_BL = row_segments(batch, "chosen"), row_segments(batch, "rejected")
        loss, metrics = pair_metrics(
            losses_B, correct_B, chosen_BL[:, 0] != 0,  # rows of padding have no segment
            batch["rating"][:, 0], extra=extra)
        metrics["num_tokens"] = jnp.sum(chosen_BL + rejected_BL).astype(jnp.float32)
        return loss, metrics


class RewardModel(_PairwiseModel):
    """Llama 2's reward model: a decoder-only LM with a scalar head (RewardDecoder),
    trained on preference pairs with the margin loss −log σ(r_c − r_r − m(rating));
    `margin` names the table ("none", "small", "large"; MARGINS). Its eval
    metric is pairwise accuracy, r_c > r_r, overall and per rating level."""

    module_class = RewardDecoder

    def __init__(self, cfg: TransformerConfig, margin: str = "small"):
        self.margins = margin_table(margin)
        self.margin = margin
        super().__init__(cfg)

    def rewards(self, module: RewardDecoder, tokens_BL, rng=None, segment_ids_BL=None):
        """[B] reward of each row (prompt + response, right-padded), at its last token:
        the last of `segment_ids_BL` (1 on tokens, 0 on padding; default: SeqIO's right
        padding with 0, see `last_token_index`)."""
        if segment_ids_BL is None:
            columns_L = jnp.arange(tokens_BL.shape[1])[None, :]
            segment_ids_BL = (columns_L < right_padded_lengths(tokens_BL)[:, None]
                              ).astype(jnp.int32)
        return module.rewards(tokens_BL, last_token_index(tokens_BL, segment_ids_BL),
                              segment_ids_BL=segment_ids_BL, rng=rng)

    def loss_fn(self, module: RewardDecoder, batch: Batch, rng=None):
        rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
        chosen_B = self.rewards(module, batch["chosen_tokens"], rngs[0],
                                row_segments(batch, "chosen"))
        rejected_B = self.rewards(module, batch["rejected_tokens"], rngs[1],
                                  row_segments(batch, "rejected"))
        losses_B = reward_losses(chosen_B, rejected_B, batch["rating"][:, 0],
                                            self.margins)
        return self._pair_metrics(losses_B, chosen_B > rejected_B, batch,
                                  {"reward_margin": chosen_B - rejected_B})

    def score_batch(self, module: RewardDecoder, batch: Batch):
        """[B] reward of `decoder_target_tokens` (prompt + response, as the lm converter
        lays out an unpacked row; its padding: `decoder_segment_ids` where given, else
        SeqIO's right padding with 0), e.g. to rank sampled responses."""
        return self.rewards(module, batch["decoder_target_tokens"],
                            segment_ids_BL=batch.get("decoder_segment_ids"))

    def predict_batch(self, module, batch: Batch, decode: DecodeConfig = None, rng=None):
        raise ValueError("A RewardModel scores sequences and does not generate; decode with "
                         "the policy's DecoderOnlyModel and score its outputs with this one.")


class DPOModel(_PairwiseModel):
    """Direct preference optimisation: the policy (network.DPODecoder, an ordinary
    decoder-only LM, e.g. started from an SFT checkpoint) against a frozen copy of its
    starting parameters, with −log σ(β·[(log π(y_c) − log π_ref(y_c)) − (log π(y_r) −
    log π_ref(y_r))]), log π summed over the response's tokens. Eval: the implicit reward
    margin (the bracket times β) and how often it is positive, per rating level."""

    module_class = DPODecoder

    def __init__(self, cfg: TransformerConfig, beta: float = 0.1):
        if not beta > 0:
            raise ValueError(f"DPOModel.beta={beta} must be > 0 (the DPO paper and Llama 3 "
                             "use 0.1).")
        self.beta = float(beta)
        super().__init__(cfg)

    def after_initial_params(self, module: DPODecoder) -> None:
        module.reset_reference()  # the reference is where the policy starts

    @staticmethod
    def response_logprobs(decoder: Decoder, tokens_BL, response_BL, rng=None,
                          segment_ids_BL=None):
        """[B] Σ log p(token | earlier tokens) over each row's response positions;
        `segment_ids_BL` 1 on the row's tokens, 0 on padding (default: SeqIO's right
        padding with 0)."""
        if segment_ids_BL is None:
            segment_ids_BL = row_segments({"x_tokens": tokens_BL}, "x")
        inputs_BL = jnp.pad(tokens_BL[:, :-1], ((0, 0), (1, 0)))
        logits_BLV = decoder(inputs_BL, segment_ids_BL=segment_ids_BL, rng=rng)
        nll_BL, _, _ = token_losses(logits_BLV, tokens_BL, 0.0)
        return -jnp.sum(nll_BL * response_BL.astype(jnp.float32), axis=-1)

    def loss_fn(self, module: DPODecoder, batch: Batch, rng=None):
        rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
        # The reference rebuilt here over the same arrays: NNX refuses Variables made at
        # another trace level (the train step makes them outside its grad).
        ref_graphdef, ref_state = nnx.split(module.reference)
        reference = nnx.merge(ref_graphdef, jax.tree.map(lambda x: x, ref_state))
        logps = {}
        for i, side in enumerate(("chosen", "rejected")):
            tokens, response = batch[f"{side}_tokens"], batch[f"{side}_response"]
            segments = row_segments(batch, side)
            logps[side] = self.response_logprobs(module, tokens, response, rngs[i], segments)
            logps[f"reference_{side}"] = jax.lax.stop_gradient(
                self.response_logprobs(reference, tokens, response, None, segments))
        losses_B, margin_B = dpo_losses(
            logps["chosen"], logps["rejected"], logps["reference_chosen"],
            logps["reference_rejected"], self.beta)
        return self._pair_metrics(losses_B, margin_B > 0, batch, {"reward_margin": margin_B})


def _pair_length(task_feature_lengths: Mapping[str, int]) -> int:
    """Positions of one response's row: prompt + the longer response."""
    lengths = forms.PREFERENCE.check_lengths(task_feature_lengths)
    return lengths["inputs"] + lengths["targets"]
