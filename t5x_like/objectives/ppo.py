"""PPO's math for Llama 2's RLHF: rewards, advantages and losses as pure jnp functions.

The trainer (recipes/rlhf.py) samples responses, scores them and calls these; they hold
no state and no model, are jit-able, and return float32. Shapes are in suffixes: B rows,
T response positions, V vocabulary. `mask_BT` is 1 on a row's response tokens (a prefix:
positions 0..n_b−1) and 0 on its padding.

The final reward (Llama 2, arXiv 2307.09288, §3.2.3):

  R_c = R_s   if the prompt is a safety prompt or R_s < 0.15     (strict <)
        R_h   otherwise
  R̂   = WHITEN(LOGIT(R_c)) − β·KL(π_θ ‖ π_0)

R_s, R_h are the safety and helpfulness reward models' scores, σ(raw output) in (0, 1);
LOGIT undoes the sigmoid, WHITEN standardises over the batch. The KL is per token, the k1
estimator of InstructGPT: log π_θ(y_t) − log π_0(y_t) of the sampled token y_t, so each
token's reward is −β·KL_t and the whitened score is added at the response's last token.

Advantages are GAE (Schulman et al. 2016, arXiv 1506.02438), run backwards over t:

  δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t
  A_t = δ_t + γλ·m_{t+1}·A_{t+1}          (V_T = A_T = 0 past the end)
  A_t ← A_t·m_t,   returns_t = (A_t + V_t)·m_t

The policy loss is PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347),
with ratio ρ_t = exp(log π_new − log π_old):

  L = mean_t −min(ρ_t·A_t, clip(ρ_t, 1−ε, 1+ε)·A_t)

and the value loss its clipped counterpart:

  L_V = ½·mean_t max((V_t − R_t)², (V_old + clip(V_t − V_old, −ε, ε) − R_t)²)

Every mean is over the mask's tokens of the whole batch (`masked_mean`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SAFETY_THRESHOLD = 0.15


def masked_mean(x, mask, axis=None):
    """sum(x·mask) / max(sum(mask), 1e-8) over `axis` (all by default), float32.

    The floor keeps an all-masked batch at 0 instead of NaN."""
    mask = jnp.asarray(mask).astype(jnp.float32)
    x = jnp.asarray(x).astype(jnp.float32)
    total = jnp.sum(x * mask, axis=axis)
    return total / jnp.maximum(jnp.sum(mask, axis=axis), 1e-8)


def whiten(x_B, valid_B=None, eps=1e-8):
    """(x − mean)/sqrt(var + eps), mean and population variance over the valid entries;
    invalid entries become 0 so padding rows neither shift the statistics nor get a score."""
    x_B = jnp.asarray(x_B).astype(jnp.float32)
    valid_B = jnp.ones(x_B.shape, jnp.bool_) if valid_B is None else jnp.asarray(valid_B)
    valid_B = valid_B.astype(jnp.bool_)
    mean = masked_mean(x_B, valid_B)
    var = masked_mean(jnp.square(x_B - mean), valid_B)
    return jnp.where(valid_B, (x_B - mean) / jnp.sqrt(var + eps), 0.0)


def logit(p, eps=1e-6):
    """log(p) − log(1 − p), the inverse of the sigmoid; p is clipped to [eps, 1 − eps] so a
    score of exactly 0 or 1 gives a finite value."""
    p = jnp.clip(jnp.asarray(p).astype(jnp.float32), eps, 1.0 - eps)
    return jnp.log(p) - jnp.log1p(-p)


def combined_score(helpful_B, safety_B, is_safety_B, threshold=SAFETY_THRESHOLD):
    """Llama 2's R_c: the safety score on safety prompts or when it is below `threshold`
    (strictly: exactly 0.15 takes the helpfulness score), else the helpfulness score."""
    safety_B = jnp.asarray(safety_B).astype(jnp.float32)
    helpful_B = jnp.asarray(helpful_B).astype(jnp.float32)
    use_safety = jnp.asarray(is_safety_B).astype(jnp.bool_) | (safety_B < threshold)
    return jnp.where(use_safety, safety_B, helpful_B)


def per_token_kl(logp_policy_BT, logp_reference_BT, mask_BT):
    """The k1 estimate of KL(π_θ ‖ π_0) at each sampled token, 0 on padding."""
    diff = (jnp.asarray(logp_policy_BT).astype(jnp.float32)
            - jnp.asarray(logp_reference_BT).astype(jnp.float32))
    return diff * jnp.asarray(mask_BT).astype(jnp.float32)


def token_rewards(score_B, kl_BT, mask_BT, beta):
    """r_t = −β·KL_t on each response token, plus the row's score at its last token.

    The last token is the last position where the mask is 1; a row with no response
    tokens gets no reward at all (its score is dropped)."""
    mask_BT = jnp.asarray(mask_BT).astype(jnp.float32)
    kl_BT = jnp.asarray(kl_BT).astype(jnp.float32)
    positions_T = jnp.arange(mask_BT.shape[-1])
    last_B = jnp.max(jnp.where(mask_BT > 0, positions_T, -1), axis=-1)
    at_last_BT = (positions_T[None, :] == last_B[:, None]).astype(jnp.float32)
    score_B = jnp.asarray(score_B).astype(jnp.float32)
    return -beta * kl_BT * mask_BT + score_B[:, None] * at_last_BT


def gae(rewards_BT, values_BT, mask_BT, gamma=1.0, lam=0.95):
    """Generalized advantage estimates and returns, (advantages_BT, returns_BT).

    A backward `lax.scan` over t carries V_{t+1}·m_{t+1} and A_{t+1}·m_{t+1}, so a row's
    recursion stops at its own end whatever the others' lengths."""
    rewards_TB = jnp.asarray(rewards_BT).astype(jnp.float32).T
    values_TB = jnp.asarray(values_BT).astype(jnp.float32).T
    mask_TB = jnp.asarray(mask_BT).astype(jnp.float32).T

    def step(carry, inputs):
        next_value_B, next_advantage_B = carry  # both already × m_{t+1}
        r_B, v_B, m_B = inputs
        delta_B = r_B + gamma * next_value_B - v_B
        advantage_B = (delta_B + gamma * lam * next_advantage_B) * m_B
        return (v_B * m_B, advantage_B), advantage_B

    zeros_B = jnp.zeros(rewards_TB.shape[1:], jnp.float32)
    _, advantages_TB = jax.lax.scan(step, (zeros_B, zeros_B),
                                    (rewards_TB, values_TB, mask_TB), reverse=True)
    advantages_BT = advantages_TB.T
    mask_BT = mask_TB.T
    return advantages_BT, (advantages_BT + values_TB.T) * mask_BT


def clipped_surrogate(logp_new_BT, logp_old_BT, advantages_BT, mask_BT, clip=0.2):
    """PPO's clipped policy loss and its stats: `clip_fraction`, the share of tokens whose
    ratio left [1−ε, 1+ε], and `approx_kl`, mean(log π_old − log π_new)."""
    log_ratio_BT = (jnp.asarray(logp_new_BT).astype(jnp.float32)
                    - jnp.asarray(logp_old_BT).astype(jnp.float32))
    ratio_BT = jnp.exp(log_ratio_BT)
    advantages_BT = jnp.asarray(advantages_BT).astype(jnp.float32)
    unclipped_BT = ratio_BT * advantages_BT
    clipped_BT = jnp.clip(ratio_BT, 1.0 - clip, 1.0 + clip) * advantages_BT
    loss = masked_mean(-jnp.minimum(unclipped_BT, clipped_BT), mask_BT)
    stats = {
        "clip_fraction": masked_mean(jnp.abs(ratio_BT - 1.0) > clip, mask_BT),
        "approx_kl": masked_mean(-log_ratio_BT, mask_BT),
    }
    return loss, stats


def value_loss(values_BT, old_values_BT, returns_BT, mask_BT, clip=0.2):
    """½·mean of the larger of the plain and the clipped squared error (the value head
    may not move more than ε from the values the rollout saw); clip=None: plain."""
    values_BT = jnp.asarray(values_BT).astype(jnp.float32)
    returns_BT = jnp.asarray(returns_BT).astype(jnp.float32)
    plain_BT = jnp.square(values_BT - returns_BT)
    if clip is None:
        return 0.5 * masked_mean(plain_BT, mask_BT)
    old_BT = jnp.asarray(old_values_BT).astype(jnp.float32)
    moved_BT = old_BT + jnp.clip(values_BT - old_BT, -clip, clip)
    return 0.5 * masked_mean(jnp.maximum(plain_BT, jnp.square(moved_BT - returns_BT)), mask_BT)


def token_entropy(logits_BTV, mask_BT):
    """Mean over the response tokens of the policy's entropy −Σ_v p·log p, in float32."""
    log_p_BTV = jax.nn.log_softmax(jnp.asarray(logits_BTV).astype(jnp.float32), axis=-1)
    entropy_BT = -jnp.sum(jnp.exp(log_p_BTV) * log_p_BTV, axis=-1)
    return masked_mean(entropy_BT, mask_BT)


def check_settings(beta, clip, gamma, lam):
    """Refuses PPO settings that make the objective meaningless, before any step runs."""
    if not beta >= 0:  # NaN included
        raise ValueError(
            f"PPO's KL penalty beta is {beta}, not >= 0: a negative beta rewards moving away "
            "from the reference model. Set gin `PPO_BETA` to a value >= 0 (Llama 2 uses 0.01; "
            "0 turns the penalty off).")
    if clip is None or not clip > 0:
        raise ValueError(
            f"PPO's clip range is {clip}; it must be > 0, or every ratio is clipped and the "
            "policy gets no gradient. Set clip to a positive value (0.2 is the usual choice, "
            "Schulman et al. 2017).")
    for name, value, usual in (("gamma", gamma, "1.0"), ("lam", lam, "0.95")):
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"PPO's GAE {name} is {value}, outside [0, 1]; values above 1 make "
                f"the advantages grow without bound and below 0 flip their sign. Set {name} "
                f"within [0, 1] ({usual} is the usual choice for language-model RLHF).")
