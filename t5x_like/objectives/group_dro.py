"""DoReMi's Group DRO over domains (docs/FORMULAS.md, "DoReMi"): per-domain excess loss
of a proxy model over a reference model, and the multiplicative domain-weight update.

The update is pure jax.numpy on small vectors (`tests/test_doremi.py` checks one against
numbers worked out by hand); `DoReMiModel`, the proxy, calls it inside the train step.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_like.data.pipeline import DOMAIN_IDS
from t5x_like.model.families import Batch, LanguageModel, loss_weights, token_losses
from t5x_like.model.network import with_reference

ETA = 1.0  # step size of the weight update (DoReMi's reweight_eta)
SMOOTHING = 1e-3  # weight of the uniform mix in every update (DoReMi's reweight_eps)


def domain_excess(nll_BL, reference_nll_BL, weights_BL, domain_ids_BL, num_domains: int):
    """(excess_K, tokens_K): over the loss tokens of each domain k (domain id k + 1;
    0 is padding), the sum of max(ℓ_proxy − ℓ_reference, 0) and the number of tokens."""
    onehot_BLK = jax.nn.one_hot(domain_ids_BL - 1, num_domains, dtype=jnp.float32)
    onehot_BLK = onehot_BLK * weights_BL.astype(jnp.float32)[..., None]
    excess_BL = jnp.maximum(nll_BL - reference_nll_BL, 0.0).astype(jnp.float32)
    return (jnp.einsum("BLK,BL->K", onehot_BLK, excess_BL),
            jnp.sum(onehot_BLK, axis=(0, 1)))


def update_weights(alpha_K, excess_K, tokens_K, previous_scores_K, eta: float = ETA,
                   smoothing: float = SMOOTHING):
    """One Group DRO step: (new weights α_t, the scores λ_t used).

    λ_k = excess_k / tokens_k, the domain's mean excess loss per token in this batch; a
    domain with no token in the batch keeps its previous score. Then
    α'_k = α_{t−1,k} · exp(η λ_k) and α_t = (1 − c) · α' / Σα' + c / K (computed in log
    space, as a softmax).
    """
    present_K = tokens_K > 0
    scores_K = jnp.where(present_K, excess_K / jnp.maximum(tokens_K, 1.0), previous_scores_K)
    logits_K = jnp.log(alpha_K) + eta * scores_K
    num_domains = alpha_K.shape[-1]
    alpha_K = (1.0 - smoothing) * jax.nn.softmax(logits_K) + smoothing / num_domains
    return alpha_K, scores_K


# ---------------------------------------------------------------------------
# DoReMi's proxy model


class DoReMiModel(LanguageModel):
    """DoReMi's proxy (docs/FORMULAS.md, "DoReMi"): `base` (any DecoderOnlyModel or
    EncoderDecoderModel) trained with Group DRO over the domains of its mixture against
    a frozen reference model of the same shape (network.with_reference; its parameters
    from the reference run's checkpoint, `train(reference_checkpoint=...)`).

    Each step, on a batch whose decoder positions carry their domain
    (`decoder_domain_ids`, `train.DataConfig.domain_ids`): the per-token losses of proxy
    and reference give each domain's mean excess loss λ_k; the weights become
    α_t = (1 − c)·softmax(log α_{t−1} + η λ) + c/K (update_weights); the proxy
    minimises the token loss weighted by α_{d}/s_{d}, normalised by the weights' sum,
    where s_d is domain d's sampling rate in the training mixture (`sampling_rates`), so
    that the weighted loss stands for Σ_d α_d · (domain d's mean token loss). α_t, its
    running sum (the output ᾱ is its mean over the updates; a step the non-finite guard
    skips updates neither) and λ are the module's state,
    written by `after_update` and checkpointed with the train state.

    Everything else (evaluation, BPC, scoring, decoding, FLOPs, data form) is `base`'s,
    each contract method handing over to it below: without domain ids a batch gets
    `base`'s own loss.
    """

    updates_state = True

    def __init__(self, base: LanguageModel, domains, sampling_rates,
                 eta: float = ETA, smoothing: float = SMOOTHING):
        if isinstance(base, DoReMiModel) or not isinstance(base, LanguageModel):
            raise ValueError(f"DoReMiModel needs a language model as base, got {base!r}.")
        rates = np.asarray(sampling_rates, np.float64)
        if len(domains) != len(rates) or len(rates) < 2 or not np.all(rates > 0):
            raise ValueError(f"DoReMiModel: {len(domains)} domains {list(domains)} need as "
                             f"many positive sampling rates, got {list(rates)}.")
        if not (eta > 0 and 0 <= smoothing < 1):
            raise ValueError(f"DoReMiModel: eta={eta} must be > 0 and smoothing={smoothing} "
                             "in [0, 1).")
        self.base, self.cfg = base, base.cfg
        self.domains = tuple(domains)
        self.sampling_rates = rates / rates.sum()
        self.eta, self.smoothing = float(eta), float(smoothing)
        self.module_class = functools.partial(with_reference(base.module_class),
                                              num_domains=len(self.domains))

    # The base model's contract: its data, FLOPs, logits and decoding.
    @property
    def bpc_form(self) -> str:
        return self.base.bpc_form

    @property
    def num_params(self) -> int:
        return self.base.num_params

    def data_form(self, task_feature_lengths: Mapping[str, int]):
        return self.base.data_form(task_feature_lengths)

    def tokens_per_example(self, task_feature_lengths: Mapping[str, int]) -> int:
        return self.base.tokens_per_example(task_feature_lengths)

    def train_flops_per_step(self, batch_size: int, task_feature_lengths: Mapping[str, int]):
        return self.base.train_flops_per_step(batch_size, task_feature_lengths)

    def get_initial_batch(self, batch_size: int, feature_lengths: Mapping[str, int]):
        return self.base.get_initial_batch(batch_size, feature_lengths)

    def logits(self, module, batch: Batch, rng=None, hidden: bool = False):
        return self.base.logits(module, batch, rng, hidden=hidden)

    def _start_decoding(self, module, batch: Batch, max_decode_length: int,
                        bos_id: int | None = 0):
        return self.base._start_decoding(module, batch, max_decode_length, bos_id)

    def frozen_reference(self, module):
        return module.reference

    def __repr__(self) -> str:
        return (f"DoReMiModel({self.base!r}, domains={self.domains}, eta={self.eta}, "
                f"smoothing={self.smoothing})")

    def _token_losses(self, module, batch: Batch, rng):
        targets_BL = batch["decoder_target_tokens"]
        nll_BL, z_loss_BL, correct_BL = token_losses(
            self.base.logits(module, batch, rng), targets_BL, self.cfg.z_loss)
        # Rebuilt over the same arrays: NNX refuses Variables made at another trace level.
        ref_graphdef, ref_state = nnx.split(module.reference)
        reference = nnx.merge(ref_graphdef, jax.tree.map(lambda x: x, ref_state))
        reference_nll_BL = jax.lax.stop_gradient(
            token_losses(self.base.logits(reference, batch), targets_BL, 0.0)[0])
        return nll_BL, z_loss_BL, correct_BL, reference_nll_BL

    def loss_fn(self, module, batch: Batch, rng=None):
        if DOMAIN_IDS not in batch:
            return self.base.loss_fn(module, batch, rng)
        weights_BL = loss_weights(batch)
        domains_BL = batch[DOMAIN_IDS]
        nll_BL, z_loss_BL, correct_BL, reference_nll_BL = self._token_losses(module, batch,
                                                                             rng)
        excess_K, tokens_K = domain_excess(
            jax.lax.stop_gradient(nll_BL), reference_nll_BL, weights_BL, domains_BL,
            len(self.domains))
        alpha_K, scores_K = update_weights(
            module.domain_weights[...], excess_K, tokens_K, module.domain_scores[...],
            self.eta, self.smoothing)
        # Token weight α_d / s_d (0 on padding), normalised by its sum over the batch.
        per_domain_K = jnp.concatenate([jnp.zeros((1,)), alpha_K / self.sampling_rates])
        token_weights_BL = weights_BL * jax.lax.stop_gradient(per_domain_K)[domains_BL]
        loss = (jnp.sum(token_weights_BL * (nll_BL + z_loss_BL))
                / jnp.maximum(jnp.sum(token_weights_BL), 1e-8))
        weight_sum = jnp.sum(weights_BL)
        denom = jnp.maximum(weight_sum, 1e-8)
        nll_sum = jnp.sum(weights_BL * nll_BL)
        z_loss_sum = jnp.sum(weights_BL * z_loss_BL)
        correct_sum = jnp.sum(weights_BL * correct_BL)
        metrics = {
            "loss": loss, "cross_entropy": nll_sum / denom, "z_loss": z_loss_sum / denom,
            "accuracy": correct_sum / denom, "num_tokens": weight_sum, "nll_sum": nll_sum,
            "z_loss_sum": z_loss_sum, "correct_sum": correct_sum, "weight_sum": weight_sum,
            "reference_cross_entropy": jnp.sum(weights_BL * reference_nll_BL) / denom,
            "doremi_alpha": alpha_K, "doremi_scores": scores_K,
        }
        return loss, metrics

    def after_update(self, module, metrics: dict) -> dict:
        """Writes the step's α_t and λ into the module (train_state.make_train_step's
        `after_update`) and reports them as scalars."""
        metrics = dict(metrics)
        alpha_K, scores_K = metrics.pop("doremi_alpha"), metrics.pop("doremi_scores")
        module.domain_weights[...] = alpha_K
        module.domain_scores[...] = scores_K
        module.domain_weights_sum[...] = module.domain_weights_sum[...] + alpha_K
        for k, name in enumerate(self.domains):
            metrics[f"domain_weight/{name}"] = alpha_K[k]
            metrics[f"excess_loss/{name}"] = scores_K[k]
        return metrics
