"""Preference pairs: the reward model's margin loss, its network, the SeqIO pair rows,
pairwise accuracy per rating level, and (slow) a reward model trained on the shipped
preference task through the ordinary train entry point."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_config

from t5x_like.objectives import preference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hand_loss(r_chosen, r_rejected, margin):
    return -math.log(1.0 / (1.0 + math.exp(-(r_chosen - r_rejected - margin))))


@pytest.mark.parametrize("name, table", [("small", (0, 1 / 3, 2 / 3, 1)), ("large", (0, 1, 2, 3)),
                                         ("none", (0, 0, 0, 0))])
def test_margin_loss_equals_a_hand_computation_for_each_rating(name, table):
    assert preference.margin_table(name) == pytest.approx(table)
    chosen = [1.5, 0.25, 2.0, -0.5]
    rejected = [0.5, 0.75, -1.0, -3.5]
    got = preference.reward_losses(jnp.array(chosen), jnp.array(rejected),
                                   jnp.array([0, 1, 2, 3]), preference.margin_table(name))
    for k in range(4):
        assert float(got[k]) == pytest.approx(_hand_loss(chosen[k], rejected[k], table[k]),
                                              rel=1e-6), k
    # r_c − r_r equal to the margin is log 2, whatever the level
    at_margin = preference.reward_losses(jnp.array(table, jnp.float32), jnp.zeros(4),
                                         jnp.arange(4), preference.margin_table(name))
    np.testing.assert_allclose(np.asarray(at_margin), [math.log(2)] * 4, rtol=1e-6)


def test_unknown_margin_names_the_choices():
    with pytest.raises(ValueError, match=r"Unknown reward margin 'huge'.*'large'"):
        preference.RewardModel(tiny_config(), margin="huge")


def _pair_batch():
    # rows: prompt + response, right-padded; the third row is an all-zero padding row
    chosen = np.array([[5, 6, 7, 8, 1, 0], [9, 3, 4, 1, 0, 0], [0] * 6], np.int32)
    rejected = np.array([[5, 6, 9, 9, 1, 0], [9, 3, 2, 2, 2, 1], [0] * 6], np.int32)
    response = lambda t: (np.arange(6)[None] >= 2) & (t != 0)  # noqa: E731
    return {"chosen_tokens": chosen, "rejected_tokens": rejected,
            "chosen_response": response(chosen).astype(np.int32),
            "rejected_response": response(rejected).astype(np.int32),
            "rating": np.array([[3], [1], [0]], np.int32)}


def test_reward_model_loss_on_a_tiny_network():
    model = preference.RewardModel(tiny_config(), margin="large")
    module = model.make_module(nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in _pair_batch().items()}

    @nnx.jit
    def evaluate(m):
        loss, metrics = model.loss_fn(m, batch)
        return (loss, metrics, model.rewards(m, batch["chosen_tokens"]),
                model.rewards(m, batch["rejected_tokens"]))

    # the head starts at zero: every reward 0, so each pair's loss is log(1 + e^m)
    loss, metrics, _, _ = evaluate(module)
    expected = np.mean([math.log1p(math.exp(3.0)), math.log1p(math.exp(1.0))])
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["weight_sum"]) == 2  # the padding row is no pair
    assert float(metrics["pairs_rating3_sum"]) == 1 and float(metrics["pairs_rating0_sum"]) == 0
    # with a head, a reward is the head on the final state of the row's last token:
    # trailing padding changes nothing (causal attention)
    module.reward_head[...] = jax.random.normal(jax.random.key(1), (32,))
    loss, metrics, r, rr = evaluate(module)
    hand = np.mean([_hand_loss(float(r[0]), float(rr[0]), 3.0),
                    _hand_loss(float(r[1]), float(rr[1]), 1.0)])
    assert float(loss) == pytest.approx(hand, rel=1e-5)
    assert float(metrics["correct_sum"]) == float(r[0] > rr[0]) + float(r[1] > rr[1])
    trimmed = jnp.asarray(batch["chosen_tokens"][:1, :5])  # row 0 without its padding
    states = nnx.jit(lambda m: m.final_states(trimmed))(module)
    assert float(r[0]) == pytest.approx(float(states[0, 4] @ module.reward_head[...]),
                                        rel=1e-4, abs=1e-5)


def test_pairwise_accuracy_per_rating_level_from_sums():
    totals = {"nll_sum": 6.0, "correct_sum": 5.0, "weight_sum": 8.0,
              "pairs_rating0_sum": 4.0, "correct_rating0_sum": 2.0,
              "pairs_rating1_sum": 0.0, "correct_rating1_sum": 0.0,
              "pairs_rating2_sum": 1.0, "correct_rating2_sum": 0.0,
              "pairs_rating3_sum": 3.0, "correct_rating3_sum": 3.0,
              "reward_margin_sum": 4.0}
    out = preference.summarize_pairs(totals)
    assert out["loss"] == 0.75 and out["accuracy"] == 0.625 and out["pairs"] == 8
    assert out["accuracy_rating0"] == 0.5 and out["accuracy_rating3"] == 1.0
    assert out["accuracy_rating2"] == 0.0 and "accuracy_rating1" not in out
    assert out["reward_margin"] == 0.5


def test_preference_rows_from_task_features():
    import tensorflow as tf

    from t5x_like.data import forms

    ds = tf.data.Dataset.from_tensors({
        "inputs": tf.constant([4, 5, 6], tf.int32), "targets": tf.constant([7, 8, 1], tf.int32),
        "rejected": tf.constant([9, 1], tf.int32), "rating": tf.constant([2], tf.int32)})
    lengths = {"inputs": 4, "targets": 3, "rejected": 3, "rating": 1}
    row = next(forms.PREFERENCE.converter()(ds, lengths).as_numpy_iterator())
    np.testing.assert_array_equal(row["chosen_tokens"], [4, 5, 6, 7, 8, 1, 0])
    np.testing.assert_array_equal(row["chosen_response"], [0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(row["rejected_tokens"], [4, 5, 6, 9, 1, 0, 0])
    np.testing.assert_array_equal(row["rejected_response"], [0, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["chosen_segment_ids"], [1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(row["rejected_segment_ids"], [1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["rating"], [2])
    with pytest.raises(ValueError, match="rejected length 4 exceeds targets length 3"):
        forms.PREFERENCE.converter().get_model_feature_lengths(
            {**lengths, "rejected": 4})


@pytest.mark.slow
def test_reward_model_trained_on_the_shipped_pairs_beats_chance(tmp_path):
    """The demo's reward model, shortened, through `python -m t5x_like.train`: held-out
    pairwise accuracy above chance, and the most corrupted pairs (rating 3) ranked better
    than the least (rating 0)."""
    model_dir = tmp_path / "rm"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run(
        [sys.executable, "-m", "t5x_like.train", "--gin_file=experiments/demo_reward_model.gin",
         f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=120", "--gin.EVAL_EVERY_STEPS=120",
         "--gin.train.CheckpointConfig.save_every_steps=120"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in open(model_dir / "metrics.jsonl")]
    final = _held_out_accuracy(records, step=120)
    assert final["all"] > 0.6, final
    assert final[3] > final[0], final


def _held_out_accuracy(records, step):
    """Pairwise accuracy at `step` over the mixture's tasks (each domain's held-out
    pairs), overall ("all") and per rating level."""
    ev = {k: v for r in records if r.get("step") == step for k, v in r.items()
          if k.startswith("eval/")}
    pairs, correct = {}, {}
    for task in {k.split("/")[1] for k in ev}:
        for key, suffix in (("all", ""), *((k, f"_rating{k}") for k in range(4))):
            n = ev.get(f"eval/{task}/pairs{suffix}", 0)
            pairs[key] = pairs.get(key, 0) + n
            correct[key] = correct.get(key, 0) + n * ev.get(f"eval/{task}/accuracy{suffix}", 0)
    return {k: correct[k] / pairs[k] for k in pairs if pairs[k]}


def test_dpo_loss_equals_a_hand_computation():
    # log π(y_c) = −10, log π(y_r) = −12, reference −11 for both; β = 0.1:
    # margin = 0.1·((−10 + 11) − (−12 + 11)) = 0.2, loss = log(1 + e^−0.2)
    loss, margin = preference.dpo_losses(jnp.array([-10.0, -11.0]), jnp.array([-12.0, -11.0]),
                                         jnp.array([-11.0, -11.0]), jnp.array([-11.0, -11.0]),
                                         beta=0.1)
    assert float(margin[0]) == pytest.approx(0.2, rel=1e-6)
    assert float(loss[0]) == pytest.approx(math.log1p(math.exp(-0.2)), rel=1e-6)
    assert float(loss[1]) == pytest.approx(math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="beta=0.0 must be > 0"):
        preference.DPOModel(tiny_config(), beta=0.0)


def test_dpo_is_log_2_where_the_policy_is_the_reference():
    model = preference.DPOModel(tiny_config(), beta=0.5)
    module = model.make_module(nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in _pair_batch().items()}
    tokens, response = batch["chosen_tokens"][:1], batch["chosen_response"][:1]

    @nnx.jit
    def evaluate(m):
        logits = m(jnp.pad(tokens[:, :-1], ((0, 0), (1, 0))))
        return (model.loss_fn(m, batch), jax.nn.log_softmax(logits, axis=-1),
                model.response_logprobs(m, tokens, response))

    (loss, metrics), logp, logprob = evaluate(module)
    assert float(loss) == pytest.approx(math.log(2), rel=1e-6)  # policy == reference
    assert float(metrics["reward_margin"]) == pytest.approx(0.0, abs=1e-6)
    # log π of a response is the sum of its tokens' log-probabilities, prompt excluded
    hand = sum(float(logp[0, i, tokens[0, i]]) for i in range(2, 5))
    assert float(logprob[0]) == pytest.approx(hand, rel=1e-5)


@pytest.mark.slow
def test_dpo_loss_falls_while_the_reference_stays():
    model = preference.DPOModel(tiny_config(), beta=0.5)
    module = model.make_module(nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in _pair_batch().items()}
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    assert not any("reference" in str(path) for path, _ in nnx.to_flat_state(params))

    @jax.jit
    def sgd_step(p, r):  # as the trainer differentiates: nnx.Param only
        def loss_of(p):
            return model.loss_fn(nnx.merge(graphdef, p, r), batch)[0]

        value, grads = jax.value_and_grad(loss_of)(p)
        return jax.tree.map(lambda x, g: x - 0.05 * g, p, grads), value

    losses = []
    for _ in range(5):
        params, value = sgd_step(params, rest)
        losses.append(float(value))
    assert losses[0] == pytest.approx(math.log(2), rel=1e-6)
    assert losses[-1] < losses[0] - 0.01, losses
    trained = nnx.merge(graphdef, params, rest)
    np.testing.assert_array_equal(np.asarray(trained.reference.embed.embedding[...]),
                                  np.asarray(module.embed.embedding[...]))  # frozen
    trained.reset_reference()  # after an initial checkpoint: the reference is the start
    assert float(nnx.jit(lambda m: model.loss_fn(m, batch)[0])(trained)) == pytest.approx(
        math.log(2), rel=1e-6)
