"""Llama 2's RLHF loop (arXiv 2307.09288, sections 3.2.3 and 3.4): `python -m t5x_like.rlhf
--gin_file=MODEL --gin_file=MESH --gin_file=runs/rlhf.gin`.

Rounds of collect → reward → optimise. A round (`rounds`, one kind per round) is
`steps_per_round` steps; a step takes the next `prompts_per_step` prompts of the round's
own shuffled order of every prompt (the prompt tasks' `inputs`) and:
- "ppo": samples one response per prompt with the current policy (the KV-cache decoder
  on the run's mesh, temperature 1 and no filtering: the samples must come from the
  policy whose ratio PPO takes), scores prompt + response with both reward models and
  combines their σ-scores (R_c = R_s on a safety prompt or when R_s < 0.15, else R_h),
  then makes one gradient step per mini-batch of `minibatch_size` rows: the reward
  WHITEN(LOGIT(R_c)) at the response's last token minus β·KL(π_θ ‖ π_0) at every token,
  GAE advantages from the value model, the clipped surrogate for the policy and a
  clipped squared error for the value model (objectives/ppo.py has the formulas);
- "rejection_sampling": samples `rs_num_samples` responses per prompt, keeps the one
  with the highest combined score and makes one fine-tuning step (the kept responses'
  negative log-likelihood) per mini-batch, as Llama 2 did before PPO.

The models: the policy (gin MODEL, a DecoderOnlyModel) from POLICY_CHECKPOINT and π_0, a
frozen copy of it (the KL's reference); the helpfulness and the safety reward model
(preference.RewardModel, each trained by runs/reward_model.gin); the value model, a
RewardModel whose head is read at every position, initialised from VALUE_CHECKPOINT (by
default the helpfulness reward model). All are read onto the run's mesh with the
training rules (partitioning.abstract_sharded) and their rows placed as training places
them; the policy and value model train with AdamW (Llama 2's settings, `PPOConfig`).

MODEL_DIR gets:
- checkpoints/: policy, value model and both optimizer states every `save_every_steps`
  steps and at each round's end, with the round and step. Started again, the run goes on
  from the newest one, bitwise as if it had not stopped: every step's keys come from
  `seed` and the step, the prompt order from `seed` and the round.
- round_{r}/samples/step_{s}.jsonl: each step's prompts, responses (in rejection
  sampling the kept ones) and scores; round_{r}/policy: the policy at the round's end, a
  params checkpoint that infer, eval, rejection sampling and a next run read;
  round_{r}/summary.json: the round's mean, first and last step metrics.
- metrics.jsonl and TensorBoard events, per step: mean scores (each reward model and
  combined), the KL to π_0, value and policy loss, entropy, response length, clip
  fraction; rlhf_curve.png: the combined score and the KL over the steps.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from t5x_like import launch
from t5x_like.data import mixtures, vocabulary
from t5x_like.evaluation.predict import Inference
from t5x_like.model import families, partitioning
from t5x_like.model.decoding import DecodeConfig
from t5x_like.objectives import ppo, preference
from t5x_like.recipes import best_of_n, rejection_sampling
from t5x_like.training import checkpoints, guards, loader, metrics, optimizers, rundir
from t5x_like.training.train_state import state_shardings

log = logging.getLogger("t5x_like.recipes.rlhf")

ROUND_KINDS = ("ppo", "rejection_sampling")
CURVE_NAME = "rlhf_curve.png"


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO's settings, Llama 2's by default (section 3.2.3; gin: rlhf.PPOConfig).

    beta: the KL penalty's weight; clip: PPO's ε (policy ratio and value change);
    gamma, lam: GAE's discount and λ; prompts_per_step: the batch of prompts one step
    samples (512); minibatch_size: rows per gradient step (64, one step per mini-batch);
    learning_rate: the policy's, constant (1e-6); value_learning_rate: the value model's;
    b1, b2, eps, weight_decay, clip_norm: AdamW's (0.9, 0.95, 1e-5, 0.1, 1.0);
    safety_threshold: R_s below it takes over the combined reward (0.15);
    whiten_advantages: advantages whitened over each step's batch;
    rs_num_samples: responses per prompt in a rejection-sampling round.
    """

    beta: float = 0.01
    clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    prompts_per_step: int = 512
    minibatch_size: int = 64
    learning_rate: float = 1e-6
    value_learning_rate: float = 1e-6
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    safety_threshold: float = ppo.SAFETY_THRESHOLD
    whiten_advantages: bool = True
    rs_num_samples: int = 4

    def __post_init__(self):
        ppo.check_settings(self.beta, self.clip, self.gamma, self.lam)
        if self.minibatch_size < 1 or self.prompts_per_step % self.minibatch_size:
            raise ValueError(
                f"rlhf.PPOConfig: prompts_per_step={self.prompts_per_step} must be a "
                f"multiple of minibatch_size={self.minibatch_size} (Llama 2: 512 and 64), "
                "one gradient step per mini-batch.")
        if not (self.learning_rate > 0 and self.value_learning_rate > 0
                and self.rs_num_samples >= 1 and 0 < self.safety_threshold < 1):
            raise ValueError(
                f"rlhf.PPOConfig: learning_rate={self.learning_rate} and "
                f"value_learning_rate={self.value_learning_rate} must be > 0, "
                f"rs_num_samples={self.rs_num_samples} ≥ 1 and safety_threshold="
                f"{self.safety_threshold} in (0, 1).")

    def optimizer(self, learning_rate: float) -> optax.GradientTransformation:
        """AdamW at a constant rate, gradients clipped by global norm first."""
        return optax.chain(
            optax.clip_by_global_norm(self.clip_norm),
            optax.adamw(learning_rate, b1=self.b1, b2=self.b2, eps=self.eps,
                        weight_decay=self.weight_decay, mask=optimizers.default_decay_mask))


# ---------------------------------------------------------------------------
# Prompts


@dataclasses.dataclass
class Prompts:
    """Every prompt of the prompt tasks: tokens [N, P] right-padded, their lengths [N],
    whether each is a safety prompt [N], its task's name."""

    tokens: np.ndarray
    lengths: np.ndarray
    is_safety: np.ndarray
    tasks: list[str]

    def of_step(self, seed: int, round_index: int, step: int, count: int) -> np.ndarray:
        """Indices of a step's prompts: the round's permutation (from seed and round),
        read in order and around again when a round needs more than there are."""
        order = np.random.default_rng([seed, round_index]).permutation(len(self.lengths))
        return order[np.arange(step * count, (step + 1) * count) % len(order)]


def load_prompts(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                 split: str, max_prompts: int | None, safety_tasks: Sequence[str],
                 eos_id: int, prompt_feature: str = "inputs") -> Prompts:
    """The prompts of every task of `mixture_or_task_name` (a trailing EOS dropped: the
    policy continues the text); those of `safety_tasks` are safety prompts."""
    width = int(task_feature_lengths[prompt_feature])
    tokens, lengths, names = [], [], []
    for task in mixtures.leaf_tasks(mixture_or_task_name):
        for examples in rejection_sampling.prompt_batches(task, task_feature_lengths, split,
                                                          64, max_prompts):
            rows, row_lengths = rejection_sampling.prompt_rows(
                examples, prompt_feature, width, eos_id, len(examples))
            tokens.append(rows)
            lengths.append(row_lengths)
            names += [task.name] * len(examples)
    if not names:
        raise ValueError(f"{mixture_or_task_name!r} has no prompts in split {split!r}.")
    lengths_N = np.concatenate(lengths)
    if not lengths_N.min() > 0:
        raise ValueError(f"{mixture_or_task_name!r} has empty prompts ({split!r}); the "
                         "policy needs at least one token to continue.")
    return Prompts(np.concatenate(tokens), lengths_N,
                   np.array([n in set(safety_tasks) for n in names]), names)


# ---------------------------------------------------------------------------
# The networks' jitted views and steps


def _response_index(rows_BL, starts_B, length: int, offset: int):
    """[B, length] row positions of response tokens 0..length-1, `offset` earlier."""
    index_BT = starts_B[:, None] + jnp.arange(length)[None, :] - offset
    return jnp.clip(index_BT, 0, rows_BL.shape[1] - 1)


def response_logits(module, batch, bos_id: int | None):
    """(log-probabilities [B, T] of each row's response tokens under `module`, a
    Decoder, and the logits [B, T, V] they come from). The row is read as decoding
    produced it: after `bos_id` (when the policy decodes from one), each token predicted
    from the ones before it."""
    rows_BL, segments_BL = batch["rows"], batch["segments"]
    if bos_id is None:
        inputs_BL, offset = rows_BL, 1
    else:
        bos_B1 = jnp.full((rows_BL.shape[0], 1), bos_id, rows_BL.dtype)
        inputs_BL, offset = jnp.concatenate([bos_B1, rows_BL[:, :-1]], axis=1), 0
    logits_BLV = module(inputs_BL, segment_ids_BL=segments_BL)
    length = batch["mask"].shape[1]
    index_BT = _response_index(rows_BL, batch["starts"], length, offset)
    logits_BTV = jnp.take_along_axis(logits_BLV, index_BT[..., None], axis=1)
    tokens_BT = jnp.take_along_axis(rows_BL, _response_index(rows_BL, batch["starts"],
                                                             length, 0), axis=1)
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BTV, tokens_BT[..., None], axis=-1)[..., 0], logits_BTV


def response_values(module, batch):
    """[B, T] the value model's estimate before each response token: its head on the
    state after the token before (the prompt's last token for the first)."""
    values_BL = module.values(batch["rows"], segment_ids_BL=batch["segments"])
    index_BT = _response_index(batch["rows"], batch["starts"], batch["mask"].shape[1], 1)
    return jnp.take_along_axis(values_BL, index_BT, axis=1)


class Learner:
    """The policy and value model's jitted forward passes and update steps on a mesh.

    `state` is {"policy", "value": nnx.State of parameters, "policy_optimizer",
    "value_optimizer": optax states}; steps keep its shardings (pinned), so a run
    restored onto the same mesh computes bitwise what it would have."""

    def __init__(self, policy_graphdef, value_graphdef, mesh, rules, config: PPOConfig,
                 bos_id: int | None):
        self.policy_graphdef, self.value_graphdef = policy_graphdef, value_graphdef
        self.mesh, self.rules, self.config, self.bos_id = mesh, rules, config, bos_id
        self.policy_tx = config.optimizer(config.learning_rate)
        self.value_tx = config.optimizer(config.value_learning_rate)
        self._jitted: dict[str, object] = {}

    def _module(self, graphdef, params):
        return nnx.merge(graphdef, jax.tree.map(lambda x: x, params))

    def init_state(self, policy_params, value_params) -> dict:
        with jax.set_mesh(self.mesh):
            return {"policy": policy_params, "value": value_params,
                    "policy_optimizer": jax.jit(self.policy_tx.init)(policy_params),
                    "value_optimizer": jax.jit(self.value_tx.init)(value_params)}

    def _place(self, batch: Mapping[str, np.ndarray]):
        rows = partitioning.process_rows(self.mesh, len(next(iter(batch.values()))))
        return loader.to_global_batch({k: rows.take(np.asarray(v)) for k, v in batch.items()},
                                      self.mesh, rows)

    def _call(self, name: str, make, *args):
        """The jitted function `name` (built by `make` once) on args, under the mesh
        and the rules."""
        if name not in self._jitted:
            self._jitted[name] = make()
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            return self._jitted[name](*args)

    def view(self, state: dict, reference_params, batch: Mapping[str, np.ndarray]
             ) -> dict[str, np.ndarray]:
        """The rollout's log-probabilities under π_θ and π_0 and values, [B, T] each."""

        def fn(state, reference, batch):
            logp_BT, _ = response_logits(self._module(self.policy_graphdef, state["policy"]),
                                         batch, self.bos_id)
            ref_BT, _ = response_logits(self._module(self.policy_graphdef, reference), batch,
                                        self.bos_id)
            values_BT = response_values(self._module(self.value_graphdef, state["value"]),
                                        batch)
            return {"logp": logp_BT, "reference_logp": ref_BT, "values": values_BT}

        out = self._call("view", lambda: jax.jit(fn), state, reference_params,
                         self._place(batch))
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True))

    def _update(self, state, losses, batch):
        """One AdamW step of both networks on `losses(policy, value, batch)` →
        (loss, metrics); returns (state, metrics)."""
        (_, stats), (g_policy, g_value) = jax.value_and_grad(
            losses, argnums=(0, 1), has_aux=True)(state["policy"], state["value"], batch)
        new = dict(state)
        for name, grads, tx in (("policy", g_policy, self.policy_tx),
                                ("value", g_value, self.value_tx)):
            updates, new[f"{name}_optimizer"] = tx.update(grads, state[f"{name}_optimizer"],
                                                          state[name])
            new[name] = optax.apply_updates(state[name], updates)
        return new, stats

    def _jit_step(self, fn, state, batch):
        """fn jitted with the state's shardings pinned in and out (and donated), the
        batch's as placed, the metrics replicated."""
        shardings, replicated = state_shardings(state), jax.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec())
        return jax.jit(fn, in_shardings=(shardings, state_shardings(batch)),
                       out_shardings=(shardings, replicated), donate_argnums=0)

    def ppo_step(self, state: dict, batch: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
        """One PPO update on a mini-batch (rows, segments, starts, mask, and the
        rollout's logp, values, advantages, returns)."""
        config = self.config

        def losses(policy, value, batch):
            logp_BT, logits_BTV = response_logits(self._module(self.policy_graphdef, policy),
                                                  batch, self.bos_id)
            policy_loss, stats = ppo.clipped_surrogate(
                logp_BT, batch["logp"], batch["advantages"], batch["mask"], config.clip)
            values_BT = response_values(self._module(self.value_graphdef, value), batch)
            value_loss = ppo.value_loss(values_BT, batch["values"], batch["returns"],
                                        batch["mask"], config.clip)
            entropy = ppo.token_entropy(jax.lax.stop_gradient(logits_BTV), batch["mask"])
            return policy_loss + value_loss, {"policy_loss": policy_loss,
                                              "value_loss": value_loss, "entropy": entropy,
                                              **stats}

        step = lambda state, batch: self._update(state, losses, batch)  # noqa: E731
        batch = self._place(batch)
        state, stats = self._call("ppo", lambda: self._jit_step(step, state, batch), state,
                                  batch)
        return state, {k: float(v) for k, v in stats.items()}

    def sft_step(self, state: dict, batch: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
        """One fine-tuning step of the policy on kept responses (their mean token
        negative log-likelihood); the value model is left as it is."""

        def losses(policy, value, batch):
            logp_BT, logits_BTV = response_logits(self._module(self.policy_graphdef, policy),
                                                  batch, self.bos_id)
            nll = ppo.masked_mean(-logp_BT, batch["mask"])
            entropy = ppo.token_entropy(jax.lax.stop_gradient(logits_BTV), batch["mask"])
            return nll, {"sft_loss": nll, "entropy": entropy}

        def step(state, batch):
            new, stats = self._update(state, losses, batch)
            return {**new, "value": state["value"],
                    "value_optimizer": state["value_optimizer"]}, stats

        batch = self._place(batch)
        state, stats = self._call("sft", lambda: self._jit_step(step, state, batch), state,
                                  batch)
        return state, {k: float(v) for k, v in stats.items()}


# ---------------------------------------------------------------------------
# One step: rollouts, rewards, updates


def sigmoid(x) -> np.ndarray:
    """σ(x) of raw reward-model outputs: the scores the combination rule reads."""
    return (0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))).astype(np.float32)


def response_rows(prompts_BP, lengths_B, tokens_BT, eos_id: int) -> dict[str, np.ndarray]:
    """A rollout's rows: prompt + response up to its first EOS (`rows`, `segments`, as
    the reward models were trained on them), where each response starts (`starts`) and
    `mask` [B, T], 1 on the response's tokens, its EOS included."""
    rows, segments = best_of_n._joined_rows(prompts_BP, tokens_BT, eos_id, lengths_B)
    sizes_B = np.array([len(best_of_n._response_tokens(t, eos_id)) for t in tokens_BT])
    mask_BT = np.arange(tokens_BT.shape[1])[None, :] < sizes_B[:, None]
    return {"rows": rows, "segments": segments, "starts": np.asarray(lengths_B, np.int32),
            "mask": mask_BT.astype(np.float32)}


@dataclasses.dataclass
class _Run:
    """What every step reads: the networks, the prompts, the settings."""

    learner: Learner
    sampler: Inference
    reference: object
    rewards: dict  # "helpful", "safety": (Inference, params)
    prompts: Prompts
    config: PPOConfig
    decode: DecodeConfig
    vocab: object
    seed: int
    steps_per_round: int

    def sample(self, policy_params, index_B, key) -> dict[str, np.ndarray]:
        prompts_BP, lengths_B = self.prompts.tokens[index_B], self.prompts.lengths[index_B]
        tokens_BT = self.sampler.predict(policy_params, {"prompt": prompts_BP,
                                                         "prompt_lengths": lengths_B}, key)
        return response_rows(prompts_BP, lengths_B, np.asarray(tokens_BT["tokens"]),
                             self.decode.eos_id)

    def scores(self, batch, index_B) -> dict[str, np.ndarray]:
        """σ-scores of each reward model and their combination (ppo.combined_score)."""
        out = {}
        for name, (run, params) in self.rewards.items():
            out[name] = sigmoid(run.score(params, {"decoder_target_tokens": batch["rows"],
                                                   "decoder_segment_ids": batch["segments"]}))
        out["combined"] = np.asarray(ppo.combined_score(
            out["helpful"], out["safety"], self.prompts.is_safety[index_B],
            self.config.safety_threshold))
        return out

    def minibatches(self, step: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, step, 1]).permutation(
            self.config.prompts_per_step)
        return np.split(order, self.config.prompts_per_step // self.config.minibatch_size)


def _mean_stats(stats: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}


def _kl_and_length(view, batch) -> dict[str, float]:
    kl_BT = np.asarray(ppo.per_token_kl(view["logp"], view["reference_logp"], batch["mask"]))
    return {"kl": float(kl_BT.sum(axis=1).mean()),
            "response_length": float(batch["mask"].sum(axis=1).mean())}


def ppo_advantages(config: PPOConfig, batch, view, combined_B):
    """(advantages [B, T], returns [B, T]) of a rollout: the reward WHITEN(LOGIT(R_c))
    at each response's last token minus β·KL at every token, through GAE."""
    mask_BT = batch["mask"]
    reward_B = ppo.whiten(ppo.logit(jnp.asarray(combined_B)))
    kl_BT = ppo.per_token_kl(view["logp"], view["reference_logp"], mask_BT)
    rewards_BT = ppo.token_rewards(reward_B, kl_BT, mask_BT, config.beta)
    advantages_BT, returns_BT = ppo.gae(rewards_BT, view["values"], mask_BT, config.gamma,
                                        config.lam)
    if config.whiten_advantages:
        advantages_BT = ppo.whiten(advantages_BT.reshape(-1), mask_BT.reshape(-1)
                                   ).reshape(advantages_BT.shape)
    return np.asarray(advantages_BT), np.asarray(returns_BT)


def ppo_step(run: _Run, state: dict, step: int, index_B) -> tuple[dict, dict, dict]:
    """Sample → score → one PPO update per mini-batch: (state, metrics, the rollout and
    its scores for the samples file)."""
    key = jax.random.fold_in(jax.random.key(run.seed), step)
    batch = run.sample(state["policy"], index_B, key)
    scores = run.scores(batch, index_B)
    view = run.learner.view(state, run.reference, batch)
    advantages_BT, returns_BT = ppo_advantages(run.config, batch, view, scores["combined"])
    full = {**batch, "logp": view["logp"], "values": view["values"],
            "advantages": advantages_BT, "returns": returns_BT}
    stats = []
    for rows in run.minibatches(step):
        state, out = run.learner.ppo_step(state, {k: v[rows] for k, v in full.items()})
        stats.append(out)
    step_metrics = {**{f"score_{k}": float(v.mean()) for k, v in scores.items()},
                    "reward": float(np.mean(ppo.logit(jnp.asarray(scores["combined"])))),
                    **_kl_and_length(view, batch), **_mean_stats(stats)}
    return state, step_metrics, {"batch": batch, "scores": scores}


def rejection_sampling_step(run: _Run, state: dict, step: int, index_B
                            ) -> tuple[dict, dict, dict]:
    """Sample rs_num_samples → keep the best by the combined score → one fine-tuning
    step per mini-batch on the kept responses."""
    key = jax.random.fold_in(jax.random.key(run.seed), step)
    samples = []
    for i in range(run.config.rs_num_samples):
        batch = run.sample(state["policy"], index_B, jax.random.fold_in(key, i))
        samples.append((batch, run.scores(batch, index_B)))
    combined_KB = np.stack([scores["combined"] for _, scores in samples])
    best_B = np.argmax(combined_KB, axis=0)
    columns = np.arange(len(best_B))
    kept = {k: np.stack([b[k] for b, _ in samples])[best_B, columns] for k in samples[0][0]}
    kept_scores = {k: np.stack([s[k] for _, s in samples])[best_B, columns]
                   for k in samples[0][1]}
    view = run.learner.view(state, run.reference, kept)
    stats = []
    for rows in run.minibatches(step):
        state, out = run.learner.sft_step(state, {k: v[rows] for k, v in kept.items()})
        stats.append(out)
    step_metrics = {**{f"score_{k}": float(np.mean([s[k] for _, s in samples]))
                       for k in kept_scores},  # the policy's samples, as PPO reports
                    **{f"score_{k}_kept": float(v.mean()) for k, v in kept_scores.items()},
                    **_kl_and_length(view, kept), **_mean_stats(stats)}
    return state, step_metrics, {"batch": kept, "scores": kept_scores}


STEPS = {"ppo": ppo_step, "rejection_sampling": rejection_sampling_step}


# ---------------------------------------------------------------------------
# Checks, before anything is read or written


def _check_models(policy, reward_models: Mapping[str, object], value_model) -> None:
    if type(policy) is not families.DecoderOnlyModel:
        raise ValueError(f"The RLHF policy must be a families.DecoderOnlyModel (got "
                         f"{type(policy).__name__}); a DPO run's checkpoint reads as one.")
    for name, model in {**reward_models, "value model": value_model}.items():
        if not isinstance(model, preference.RewardModel):
            raise ValueError(f"The {name} must be a preference.RewardModel (got "
                             f"{type(model).__name__}), as runs/reward_model.gin trains.")


def _check_rounds(rounds: Sequence[str], steps_per_round: int, save_every_steps: int,
                  decode: DecodeConfig) -> None:
    unknown = [kind for kind in rounds if kind not in ROUND_KINDS]
    if not rounds or unknown or steps_per_round < 1 or save_every_steps < 1:
        raise ValueError(
            f"RLHF_ROUNDS={list(rounds)} must name at least one round, each one of "
            f"{ROUND_KINDS}; RLHF_STEPS_PER_ROUND={steps_per_round} and "
            f"RLHF_SAVE_EVERY_STEPS={save_every_steps} must be ≥ 1.")
    exact = (decode.method, decode.temperature, decode.top_k, decode.top_p)
    if "ppo" in rounds and exact != ("sample", 1.0, 0, 1.0):
        raise ValueError(
            f"PPO rounds sample from the policy itself: decoding.DecodeConfig method="
            f"{decode.method!r}, temperature={decode.temperature}, top_k={decode.top_k}, "
            f"top_p={decode.top_p} would make the ratio and the KL those of another "
            "distribution. Use method='sample', temperature=1.0, top_k=0, top_p=1.0.")


def recorded_task(checkpoint: str) -> str | None:
    """The training task a checkpoint's run recorded (its operative config's
    MIXTURE_OR_TASK_NAME), None where it recorded none (a params checkpoint)."""
    text = checkpoints.stored_config(checkpoint) or ""
    found = re.search(r"^MIXTURE_OR_TASK_NAME = '([^']+)'$", text, re.MULTILINE)
    return found.group(1) if found else None


def check_vocabularies(prompt_vocab, checkpoints_by_name: Mapping[str, str],
                       models: Mapping[str, object]) -> None:
    """Every model covers the prompts' vocabulary, and every checkpoint that recorded
    its training task was trained on text of the same vocabulary (a reward model of
    another tokenizer would score token ids it never saw)."""
    for name, model in models.items():
        vocabulary.check_model_covers(prompt_vocab, model.cfg.vocab_size)
    ours = vocabulary.vocabulary_checksum(prompt_vocab)
    for name, path in checkpoints_by_name.items():
        task = recorded_task(path)
        if task is None:  # e.g. a params checkpoint of `hf import`
            continue
        try:
            vocab = mixtures.leaf_tasks(task)[0].output_features["targets"].vocabulary
        except ValueError:  # not registered in this process
            log.warning("%s (%s) was trained on %r, not registered here; its vocabulary "
                        "is not checked against the prompts'.", name, path, task)
            continue
        if vocabulary.vocabulary_checksum(vocab) != ours:
            raise ValueError(
                f"The {name} ({path}) was trained on {task!r}, whose vocabulary {vocab} is "
                f"not the prompts' ({prompt_vocab}): it would read the policy's token ids "
                "as other text. Train it on data of the policy's tokenizer, or use prompts "
                "and a policy of its tokenizer.")


def _restore(model, mesh_config, checkpoint: str, name: str, setting: str):
    """(graphdef, params) of `model` read from `checkpoint` onto the run's mesh; a
    checkpoint of another shape is one paragraph naming the setting to fix."""
    mesh, rules = launch.mesh_for(mesh_config)
    graphdef, target = partitioning.abstract_sharded(model.make_module, mesh, rules)
    try:
        return graphdef, checkpoints.restore_params(checkpoint, target)
    except ValueError as e:
        raise ValueError(f"The {name} ({setting}={checkpoint!r}) does not fit its model "
                         f"{model!r}: {e}") from e


# ---------------------------------------------------------------------------
# The run directory


def _round_dir(model_dir: str, round_index: int) -> str:
    return rundir.join(model_dir, f"round_{round_index:03d}")


def write_samples(path: str, run: _Run, index_B, rollout: Mapping) -> None:
    """A step's prompts, responses and scores as JSON lines, once: a step run again
    after a restart samples the same (its keys are the step's)."""
    if rundir.exists(path):
        return
    batch, scores = rollout["batch"], rollout["scores"]
    lines = []
    for b, prompt in enumerate(index_B):
        response = [int(t) for t, m in zip(batch["rows"][b, batch["starts"][b]:],
                                           batch["mask"][b]) if m]
        lines.append(json.dumps({
            "task": run.prompts.tasks[prompt], "safety_prompt": bool(run.prompts.is_safety[prompt]),
            "prompt": run.vocab.decode([int(t) for t in run.prompts.tokens[
                prompt, :run.prompts.lengths[prompt]]]),
            "response": run.vocab.decode([t for t in response if t != run.decode.eos_id]),
            **{f"score_{k}": float(v[b]) for k, v in scores.items()}}, ensure_ascii=False))
    rundir.write_text(path, "\n".join(lines) + "\n")


def step_records(model_dir: str) -> dict[int, dict]:
    """{step: its newest metrics record}: a step run again after a restart is logged
    again, and the newer record wins."""
    return {r["step"]: r for r in metrics.read_jsonl(rundir.join(model_dir,
                                                                 metrics.JSONL_NAME))
            if "kl" in r}


def write_curve(model_dir: str, rounds: Sequence[str], steps_per_round: int) -> str:
    """MODEL_DIR/rlhf_curve.png: the mean scores and the KL to π_0 over the steps (the
    newest record of each step in metrics.jsonl), each round marked with its kind."""
    import matplotlib  # imported here: only this chart needs it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    records = step_records(model_dir)
    steps = sorted(records)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("combined", "helpful", "safety"):
        left.plot(steps, [records[s][f"score_{name}"] for s in steps], marker=".",
                  label=f"score_{name}")
    right.plot(steps, [records[s]["kl"] for s in steps], marker=".", color="tab:red")
    left.set_ylabel("mean reward-model score σ(r)")
    right.set_ylabel("KL(π_θ ‖ π_0) per response (nats)")
    for ax in (left, right):
        ax.set_xlabel("RLHF step")
        ax.grid(True, alpha=0.3)
        for index, kind in enumerate(rounds[:-(-max(steps, default=0) // steps_per_round)]):
            if index:
                ax.axvline(index * steps_per_round + 0.5, color="grey", alpha=0.4,
                           linestyle=":")
            ax.text(index * steps_per_round + 1, 1.0, kind.replace("_", " "), fontsize=8,
                    color="grey", transform=ax.get_xaxis_transform(), va="bottom")
    left.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    path = rundir.join(model_dir, CURVE_NAME)
    rundir.write_bytes(path, png.getvalue())
    return path


def write_round_summary(model_dir: str, round_index: int, kind: str, steps: int) -> dict:
    """round_NNN/summary.json: the round's kind and the mean of each step metric over
    its steps (the newest record of each step in metrics.jsonl), first and last step's."""
    first = round_index * steps + 1
    records = step_records(model_dir)
    rows = [records[s] for s in range(first, first + steps) if s in records]
    names = sorted({k for r in rows for k in r} - {"step", "round"})
    summary = {"round": round_index, "kind": kind, "steps": [first, first + steps - 1],
               "mean": {k: float(np.mean([r[k] for r in rows if k in r])) for k in names},
               "first": {k: rows[0].get(k) for k in names},
               "last": {k: rows[-1].get(k) for k in names}}
    rundir.write_text(rundir.join(_round_dir(model_dir, round_index), "summary.json"),
                      json.dumps(summary, indent=1) + "\n")
    return summary


def _check_resume(model_dir: str, settings: Mapping) -> None:
    """MODEL_DIR's settings file: written by the first start; a restart must agree on
    what the steps already taken depend on (more rounds may be added)."""
    path = rundir.join(model_dir, "rlhf.json")
    if not rundir.exists(path):
        rundir.write_text(path, json.dumps(settings, indent=1) + "\n")
        return
    before = json.loads(rundir.read_text(path))
    fixed = ("policy_checkpoint", "seed", "steps_per_round", "config", "prompts")
    changed = [k for k in fixed if before.get(k) != settings[k]]
    rounds = list(settings["rounds"])
    if changed or rounds[:len(before["rounds"])] != before["rounds"][:len(rounds)]:
        raise ValueError(
            f"{model_dir} holds an RLHF run started with other settings ({changed or 'rounds'}"
            f": {[before.get(k) for k in changed] or before['rounds']}); its checkpoints "
            "continue only that run. Use a new MODEL_DIR, or the settings in "
            f"{path}.")
    if len(rounds) > len(before["rounds"]):
        rundir.write_text(path, json.dumps(settings, indent=1) + "\n")


# ---------------------------------------------------------------------------
# The run


def _models_on_mesh(policy, policy_checkpoint, reward_models, reward_checkpoints,
                    value_model, value_checkpoint, mesh_config, config, decode):
    """(Learner, sampler, reference params, reward (Inference, params), fresh state)."""
    mesh, rules = launch.mesh_for(mesh_config)
    for model in (policy, value_model):
        partitioning.validate_for_mesh(model.make_module, mesh, rules,
                                       batch_size=config.minibatch_size)
    policy_graphdef, policy_params = _restore(policy, mesh_config, policy_checkpoint,
                                              "policy", "POLICY_CHECKPOINT")
    value_graphdef, value_params = _restore(value_model, mesh_config, value_checkpoint,
                                            "value model", "VALUE_CHECKPOINT")
    rewards = {}
    for name, model in reward_models.items():
        graphdef, params = _restore(model, mesh_config, reward_checkpoints[name],
                                    f"{name} reward model",
                                    f"{name.upper()}_REWARD_CHECKPOINT")
        rewards[name] = (Inference(model, mesh, rules, graphdef, DecodeConfig(),
                                   config.prompts_per_step), params)
    learner = Learner(policy_graphdef, value_graphdef, mesh, rules, config, decode.bos_id)
    sampler = Inference(policy, mesh, rules, policy_graphdef, decode, config.prompts_per_step)
    reference = jax.tree.map(jnp.copy, policy_params)  # π_0: frozen, never updated
    return learner, sampler, reference, rewards, learner.init_state(policy_params,
                                                                    value_params)


def _run_steps(run: _Run, state, rounds: Sequence[str], start: int, model_dir: str,
               ckpt: checkpoints.CheckpointManager, writer) -> dict:
    """Steps `start`.. of every round: each one's samples, metrics, checkpoint and, at a
    round's end, its policy and summary; returns the state."""
    per_round = run.steps_per_round
    for step in range(start, len(rounds) * per_round):
        round_index, in_round = divmod(step, per_round)
        kind = rounds[round_index]
        index_B = run.prompts.of_step(run.seed, round_index, in_round,
                                      run.config.prompts_per_step)
        state, step_metrics, rollout = STEPS[kind](run, state, step, index_B)
        round_dir = _round_dir(model_dir, round_index)
        if jax.process_index() == 0:
            rundir.makedirs(rundir.join(round_dir, "samples"))
            write_samples(rundir.join(round_dir, "samples", f"step_{in_round:05d}.jsonl"),
                          run, index_B, rollout)
        writer.write_scalars(step + 1, {**step_metrics, "round": round_index})
        log.info("round %d (%s) step %d/%d: %s", round_index, kind, in_round + 1, per_round,
                 ", ".join(f"{k} {v:.4g}" for k, v in sorted(step_metrics.items())))
        last = in_round == per_round - 1
        if last and not rundir.exists(rundir.join(round_dir, "policy")):
            checkpoints.save_params(rundir.join(round_dir, "policy"), state["policy"])
        if last and jax.process_index() == 0:
            writer.flush()
            write_round_summary(model_dir, round_index, kind, per_round)
        ckpt.save(step + 1, state, run={"round": round_index, "step_in_round": in_round + 1},
                  force=last)
    return state


def rlhf(*, policy, policy_checkpoint: str, helpful_reward_model,
         helpful_reward_checkpoint: str, safety_reward_model, safety_reward_checkpoint: str,
         value_model, value_checkpoint: str | None, mesh_config, mixture_or_task_name: str,
         task_feature_lengths: Mapping[str, int], model_dir: str,
         rounds: Sequence[str] = ("ppo",), steps_per_round: int = 10,
         config: PPOConfig = PPOConfig(),
         decode: DecodeConfig = DecodeConfig(method="sample"), split: str = "train",
         max_prompts: int | None = None, safety_tasks: Sequence[str] = (), seed: int = 0,
         save_every_steps: int = 1) -> dict:
    """Runs (or goes on with) the rounds (module docstring); returns the number of
    steps, the model dir and the chart's path."""
    rounds, value_checkpoint = list(rounds), value_checkpoint or helpful_reward_checkpoint
    reward_models = {"helpful": helpful_reward_model, "safety": safety_reward_model}
    reward_checkpoints = {"helpful": helpful_reward_checkpoint,
                          "safety": safety_reward_checkpoint}
    _check_models(policy, reward_models, value_model)
    _check_rounds(rounds, steps_per_round, save_every_steps, decode)
    vocab = mixtures.leaf_tasks(mixture_or_task_name)[0].output_features["inputs"].vocabulary
    check_vocabularies(vocab, {"policy": policy_checkpoint, "value model": value_checkpoint,
                               **{f"{k} reward model": v for k, v in reward_checkpoints.items()}},
                       {"policy": policy, "value model": value_model, **reward_models})
    decode = vocabulary.resolve_decode(decode, vocab)
    rundir.check_writable(model_dir)
    launch.start_devices(mesh_config)
    prompts = load_prompts(mixture_or_task_name, task_feature_lengths, split, max_prompts,
                           safety_tasks, decode.eos_id)
    learner, sampler, reference, rewards, state = _models_on_mesh(
        policy, policy_checkpoint, reward_models, reward_checkpoints, value_model,
        value_checkpoint, mesh_config, config, decode)
    run = _Run(learner, sampler, reference, rewards, prompts, config, decode, vocab, seed,
               steps_per_round)
    settings = {"policy_checkpoint": policy_checkpoint, "seed": seed,
                "steps_per_round": steps_per_round, "rounds": rounds,
                "config": dataclasses.asdict(config),
                "prompts": [mixture_or_task_name, split, max_prompts, sorted(safety_tasks)],
                "reward_checkpoints": reward_checkpoints, "value_checkpoint": value_checkpoint}
    rundir.makedirs(model_dir)
    with guards.RunLock(model_dir), checkpoints.CheckpointManager(
            rundir.join(model_dir, "checkpoints"), save_interval_steps=save_every_steps) as ckpt:
        _check_resume(model_dir, settings)
        writer = metrics.create_writer(model_dir, enabled=jax.process_index() == 0)
        restored = ckpt.restore_latest(checkpoints.abstract_like(state))
        start = 0 if restored is None else restored.step
        state = state if restored is None else restored.state
        if start:
            log.info("resuming %s after step %d", model_dir, start)
        try:
            state = _run_steps(run, state, rounds, start, model_dir, ckpt, writer)
        finally:
            writer.close()
    curve = (write_curve(model_dir, rounds, steps_per_round) if jax.process_index() == 0
             else None)
    return {"steps": len(rounds) * steps_per_round, "curve": curve, "model_dir": model_dir}


def main(argv: Sequence[str] | None = None) -> dict:
    return launch.run("t5x_like.recipes.rlhf.rlhf", argv, prog="python -m t5x_like.rlhf")
