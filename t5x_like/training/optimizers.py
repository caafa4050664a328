"""Optimizers and learning-rate schedules: Llama 2's AdamW and PaLM's Adafactor, each with
the schedule it uses and a description a resumed run must match (`Optimizer`).

Gin names them (`OPTIMIZER = @optimizers.adamw_llama2()`); `train_state.py` builds the
train state and steps over whichever `Optimizer.tx` it is given.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

# ---------------------------------------------------------------------------
# Optimizers and schedules


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation, the learning-rate schedule it uses (for logging), and a
    description of both (name and settings: what a resumed run must match)."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    description: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_NO_DECAY_NAMES = ("norm", "scale", "bias")


def default_decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: matrices and embeddings, not norms/biases.

    Llama 2's paper says only "weight decay 0.1"; Meta never published which tensors it
    covers. We follow the GPT-3/OLMo/nanoGPT convention: decay the matmul weights and
    embeddings, not norm scales or biases (shrinking a norm scale towards 0 fights the
    normalisation; it is not a capacity control). A leaf is excluded when any part of its
    path contains "norm", "scale" or "bias", or when it has fewer than 2 dims. The name
    test matters because under scan_layers a norm scale is 2-D ([layers, embed]).
    """

    def _decays(path, leaf) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))).lower()
                 for k in path]
        if any(bad in name for name in names for bad in _NO_DECAY_NAMES):
            return False
        return jnp.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(_decays, params)


def _describe(value: Any) -> Any:
    """A JSON-able stand-in for a setting that may be a function (e.g. a decay mask)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "__qualname__", type(value).__name__)


def adamw_llama2(
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-5,
    weight_decay: float = 0.1,
    clip_norm: float = 1.0,
    final_lr_fraction: float = 0.1,
    decay_mask: Any = default_decay_mask,
) -> Optimizer:
    """Llama 2's AdamW (docs/MODELS.md): β=(0.9, 0.95), eps 1e-5, wd 0.1, clip 1.0.

    Schedule: linear warmup from 0 to `peak_lr` over `warmup_steps`, then cosine down to
    `final_lr_fraction * peak_lr` at `total_steps` (and constant after). Weight decay is
    decoupled (AdamW: `p -= lr * wd * p`) and masked by `decay_mask` (see
    `default_decay_mask`; pass `None` to decay every parameter).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be ≥ 1 (TRAIN_STEPS).")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be ≥ 0 (WARMUP_STEPS).")
    if warmup_steps >= total_steps:
        # A smoke run (--gin.TRAIN_STEPS=6) of an experiment whose warm-up is longer.
        shortened = total_steps // 10
        logging.getLogger("t5x_like.training.optimizers").warning(
            "WARMUP_STEPS=%d is not shorter than TRAIN_STEPS=%d: warming up for %d steps "
            "(a tenth of the run) instead.", warmup_steps, total_steps, shortened)
        warmup_steps = shortened
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=final_lr_fraction * peak_lr,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                    mask=decay_mask),
    )
    description = dict(name="adamw_llama2", peak_lr=peak_lr, warmup_steps=warmup_steps,
                       total_steps=total_steps, b1=b1, b2=b2, eps=eps,
                       weight_decay=weight_decay, clip_norm=clip_norm,
                       final_lr_fraction=final_lr_fraction, decay_mask=_describe(decay_mask))
    return Optimizer(tx=tx, schedule=schedule, description=description)


def palm_schedule(base_lr: float = 1e-2, constant_steps: int = 10_000) -> optax.Schedule:
    """PaLM's learning rate: `base_lr` for `constant_steps`, then ∝ 1/√k, continuous.

    lr(k) = base_lr·√(constant_steps / max(k, constant_steps)); with the paper's 1e-2 and
    10k steps that is exactly 1e-2 for k < 10,000 and 1/√k after.
    """

    def schedule(count):
        k = jnp.maximum(jnp.asarray(count, jnp.float32), float(constant_steps))
        return base_lr * jnp.sqrt(float(constant_steps) / k)

    return schedule


def adafactor_palm(
    base_lr: float = 1e-2,
    constant_steps: int = 10_000,
    *,
    b1: float = 0.9,
    decay_rate: float = 0.8,
    clip_norm: float = 1.0,
    update_clipping: float | None = None,
    weight_decay_lr_exponent: float = 2.0,
    decay_mask: Any = None,
) -> Optimizer:
    """PaLM's Adafactor (docs/MODELS.md): Adam with parameter scaling, no factorisation.

    - second moment: β2(k) = 1 − k^−0.8 for the k-th update (k = 1, 2, ...), which is
      optax's `decay_rate=0.8` (it uses (count+1)^−0.8 with count from 0); unfactored
      (`factored=False`), i.e. a full per-parameter v;
    - global-norm clip 1.0 on the raw gradients; first moment β1 = 0.9 (applied, as in
      T5X/optax Adafactor, to the lr- and parameter-scaled update, without debiasing);
    - parameter scaling: the update is multiplied by RMS(param) (floor 1e-3);
    - dynamic weight decay lr(k)^2 (T5X's `weight_decay_rate_lr_exponent=2`),
      decoupled: `p -= lr² · p`; applied to every parameter unless `decay_mask` says
      otherwise.
    - Adafactor's own update clipping (RMS ≤ d) is not in PaLM's description; it is off
      by default and available as `update_clipping=1.0`.
    """
    schedule = palm_schedule(base_lr, constant_steps)

    def weight_decay(count):
        return schedule(count) ** weight_decay_lr_exponent

    tx = optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adafactor(
            learning_rate=schedule,
            factored=False,
            decay_rate=decay_rate,
            multiply_by_parameter_scale=True,
            clipping_threshold=update_clipping,
            momentum=b1,
            weight_decay_rate=weight_decay,
            weight_decay_mask=decay_mask,
        ),
    )
    description = dict(name="adafactor_palm", base_lr=base_lr, constant_steps=constant_steps,
                       b1=b1, decay_rate=decay_rate, clip_norm=clip_norm,
                       update_clipping=update_clipping,
                       weight_decay_lr_exponent=weight_decay_lr_exponent,
                       decay_mask=_describe(decay_mask))
    return Optimizer(tx=tx, schedule=schedule, description=description)


def adafactor_beta2(step: int | jax.Array, decay_rate: float = 0.8) -> jax.Array:
    """β2 Adafactor uses for the `step`-th update (1-based): 1 − step^−decay_rate."""
    return 1.0 - jnp.asarray(step, jnp.float32) ** (-decay_rate)


