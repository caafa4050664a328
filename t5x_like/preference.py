"""Preference pairs: their SeqIO form, the reward model's margin loss and the DPO loss.

A preference example is (prompt, chosen, rejected, rating): task features `inputs`
(the prompt), `targets` (the chosen response), `rejected` and `rating`, one int in
0..3 (Llama 2's four levels; docs/FORMULAS.md, "Preference pairs"):

  3 significantly better   2 better   1 slightly better   0 negligibly better / unsure

Their SeqIO side (the feature converter, pairs built from the shipped corpus) is
preference_data.py; this module is the losses and metrics, in jax only.

Losses, per pair (mean over the pairs of a batch):

  reward model   −log σ(r_c − r_r − m(rating))            m: MARGINS[name][rating]
  DPO            −log σ(β·[(log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

NUM_RATINGS = 4
RATING_NAMES = ("negligibly better / unsure", "slightly better", "better",
                "significantly better")
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


def last_token_index(tokens_BL):
    """Index of each row's last non-padding token (0 for an all-padding row)."""
    return jnp.maximum(jnp.sum(tokens_BL != 0, axis=1) - 1, 0)
