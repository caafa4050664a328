"""DoReMi's Group DRO over domains (docs/FORMULAS.md, "DoReMi"): per-domain excess loss
of a proxy model over a reference model, and the multiplicative domain-weight update.

Pure jax.numpy on small vectors; `models.DoReMiModel` calls these inside the train step,
`tests/test_doremi.py` checks one update against numbers worked out by hand.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

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
