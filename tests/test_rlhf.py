"""The RLHF loop (recipes/rlhf.py) on tiny models and the shipped preference prompts.

The reward is known in closed form: a reward model whose score is a fixed function of the
row's tokens (the share of the response's ids in a fixed set), through the same
interface (`score_batch`) the trained reward models answer. PPO must raise it while the
KL to the initial policy stays bounded; with a large β the policy must stay at π_0.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from flax import nnx
from tiny import tiny_config

import tasks  # noqa: F401 - registers the preference prompts
from t5x_like.data import vocabulary
from t5x_like.model import families, partitioning
from t5x_like.model.decoding import DecodeConfig
from t5x_like.objectives import preference
from t5x_like.recipes import rlhf
from t5x_like.training import checkpoints, metrics

DP = partitioning.MeshConfig(shape={"data": 8}, rules="dp")
CFG = tiny_config(vocab_size=8192, emb_dim=32, mlp_dim=64, z_loss=0.0)
LENGTHS = {"inputs": 8, "targets": 9, "rejected": 9, "rating": 1}


class SetShareReward(preference.RewardModel):
    """Raw reward 6·(share of the response's tokens in REWARDED) − 3, the response being
    the row's tokens after the prompt (every prompt here is LENGTHS["inputs"] tokens
    long): a fixed function of the tokens, answered through the reward model's
    interface. REWARDED (set by the `ckpts` fixture) is the quarter of the vocabulary
    whose output embeddings lean furthest along one direction of the initial policy's
    hidden space, so one shift of its final states raises them all: learnable in a few
    dozen steps, where a random set of 2,000 ids would need each logit moved alone."""

    rewarded = None  # [V] bool

    def score_batch(self, module, batch):
        tokens_BL, segments_BL = batch["decoder_target_tokens"], batch["decoder_segment_ids"]
        response_BL = segments_BL * (jnp.arange(tokens_BL.shape[1]) >= LENGTHS["inputs"])
        hit_BL = jnp.asarray(self.rewarded)[tokens_BL].astype(jnp.float32) * response_BL
        share_B = jnp.sum(hit_BL, axis=1) / jnp.maximum(jnp.sum(response_BL, axis=1), 1)
        return 6.0 * share_B - 3.0


def _save(directory, module, config_text=None):
    checkpoints.save_params(str(directory), nnx.state(module), config_text=config_text)
    return str(directory)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints of a random tiny policy and value model (its head at zero)."""
    root = tmp_path_factory.mktemp("rlhf_models")
    policy = families.DecoderOnlyModel(CFG).make_module(0)
    w_DV, _ = policy.projection()
    along_V = np.asarray(jax.random.normal(jax.random.key(7), (CFG.emb_dim,)) @ w_DV)
    SetShareReward.rewarded = along_V >= np.quantile(along_V, 0.75)
    return {"policy": _save(root / "policy", policy),
            "value": _save(root / "value", preference.RewardModel(CFG).make_module(1))}


def _run(ckpts, model_dir, *, beta=0.01, rounds=("ppo",), steps=12, **kwargs):
    reward = SetShareReward(CFG)
    arguments = dict(
        policy=families.DecoderOnlyModel(CFG), policy_checkpoint=ckpts["policy"],
        helpful_reward_model=reward, helpful_reward_checkpoint=ckpts["value"],
        safety_reward_model=reward, safety_reward_checkpoint=ckpts["value"],
        value_model=preference.RewardModel(CFG), value_checkpoint=ckpts["value"],
        mesh_config=DP, mixture_or_task_name="code_preference", task_feature_lengths=LENGTHS,
        model_dir=str(model_dir), rounds=list(rounds), steps_per_round=steps,
        config=rlhf.PPOConfig(beta=beta, prompts_per_step=32, minibatch_size=16,
                              learning_rate=3e-3, value_learning_rate=3e-3, rs_num_samples=2),
        decode=DecodeConfig(method="sample", max_decode_length=8), max_prompts=64, seed=0)
    return rlhf.rlhf(**{**arguments, **kwargs})


def _records(model_dir):
    return {r["step"]: r for r in metrics.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
            if "score_combined" in r}


@pytest.mark.slow
def test_ppo_raises_a_closed_form_reward_with_the_kl_bounded(ckpts, tmp_path):
    out = _run(ckpts, tmp_path / "run", steps=24)
    records = _records(out["model_dir"])
    assert sorted(records) == list(range(1, 25))
    first = np.mean([records[s]["score_combined"] for s in (1, 2, 3)])
    last = np.mean([records[s]["score_combined"] for s in (22, 23, 24)])
    # σ(6·share − 3) starts near σ(6/4 − 3) = 0.18 (a quarter of the ids are rewarded)
    assert first < 0.3 and last > first + 0.15, (first, last)
    # the bound: the summed per-token KL of an 8-token response stays under 8 nats
    # (about 3 at the end), having moved off π_0
    kl = [records[s]["kl"] for s in sorted(records)]
    assert max(kl) < 8.0 and np.mean(kl[-3:]) > 1.0, kl
    assert all(np.isfinite(r["value_loss"]) for r in records.values())
    samples = [json.loads(line) for line in open(os.path.join(
        out["model_dir"], "round_000", "samples", "step_00023.jsonl"))]
    assert len(samples) == 32 and {"prompt", "response", "score_combined"} <= set(samples[0])
    assert os.path.exists(out["curve"])
    summary = json.load(open(os.path.join(out["model_dir"], "round_000", "summary.json")))
    assert summary["kind"] == "ppo" and summary["steps"] == [1, 24]
    assert summary["mean"]["score_combined"] == pytest.approx(
        np.mean([r["score_combined"] for r in records.values()]), rel=1e-6)
    # the round's policy reads back as a params checkpoint
    target = nnx.state(families.DecoderOnlyModel(CFG).make_module(0), nnx.Param)
    checkpoints.restore_params(os.path.join(out["model_dir"], "round_000", "policy"), target)


@pytest.mark.slow
def test_a_large_beta_keeps_the_policy_at_the_reference(ckpts, tmp_path):
    out = _run(ckpts, tmp_path / "run", beta=100.0, steps=12)
    records = _records(out["model_dir"])
    # The KL penalty outweighs the reward: the summed per-token KL of a response stays
    # within the noise of its one-sample estimate (at β = 0.01 it passes 2 nats in the
    # test above), and the score does not rise.
    kl = [r["kl"] for r in records.values()]
    assert max(kl) < 0.3 and abs(np.mean(kl)) < 0.1, kl
    assert np.mean([records[s]["score_combined"] for s in (10, 11, 12)]) < 0.3


@pytest.mark.slow
def test_a_run_stopped_mid_round_resumes_bitwise(ckpts, tmp_path, monkeypatch):
    rounds = ("rejection_sampling", "ppo")
    whole = _run(ckpts, tmp_path / "whole", rounds=rounds, steps=3)
    calls = []
    real = rlhf.STEPS["ppo"]

    def crash_on_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped mid-round")
        return real(*args)

    monkeypatch.setitem(rlhf.STEPS, "ppo", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _run(ckpts, tmp_path / "cut", rounds=rounds, steps=3)
    monkeypatch.setitem(rlhf.STEPS, "ppo", real)
    assert checkpoints.CheckpointManager(tmp_path / "cut" / "checkpoints").latest_step() == 4
    cut = _run(ckpts, tmp_path / "cut", rounds=rounds, steps=3)
    target = nnx.state(families.DecoderOnlyModel(CFG).make_module(0), nnx.Param)
    a, b = (checkpoints.restore_params(os.path.join(o["model_dir"], "round_001", "policy"),
                                       target) for o in (whole, cut))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert _records(whole["model_dir"])[6] == _records(cut["model_dir"])[6]
    with pytest.raises(ValueError, match="other settings"):
        _run(ckpts, tmp_path / "cut", rounds=rounds, steps=4)


def test_bad_input_is_one_paragraph_and_writes_nothing(ckpts, tmp_path):
    model_dir = tmp_path / "never"
    with pytest.raises(ValueError, match="PPO_BETA"):
        _run(ckpts, model_dir, beta=-0.1)
    small = tiny_config(vocab_size=8192, emb_dim=16, mlp_dim=32, z_loss=0.0)
    with pytest.raises(ValueError, match="VALUE_CHECKPOINT.*does not fit"):
        _run(ckpts, model_dir, value_model=preference.RewardModel(small))
    # a reward model trained on text of another vocabulary (its run recorded the task)
    seqio.TaskRegistry.remove("test_rlhf_bytes")
    seqio.TaskRegistry.add(
        "test_rlhf_bytes", source=seqio.FunctionDataSource(lambda split, shuffle_files: None,
                                                           splits=("train",)),
        output_features={"targets": seqio.Feature(seqio.ByteVocabulary())}, metric_fns=[])
    other = _save(tmp_path / "bytes_rm", preference.RewardModel(CFG).make_module(2),
                  config_text="MIXTURE_OR_TASK_NAME = 'test_rlhf_bytes'\n")
    with pytest.raises(ValueError, match="safety reward model.*not the prompts'"):
        _run(ckpts, model_dir, safety_reward_checkpoint=other)
    with pytest.raises(ValueError, match="temperature=1.0"):
        _run(ckpts, model_dir, decode=DecodeConfig(method="sample", temperature=0.7))
    with pytest.raises(ValueError, match="RLHF_ROUNDS"):
        _run(ckpts, model_dir, rounds=("dpo",))
    assert not model_dir.exists()


def test_a_second_run_on_the_same_directory_is_refused(ckpts, tmp_path):
    from t5x_like.training import guards

    with guards.RunLock(str(tmp_path / "busy")):
        with pytest.raises(guards.RunLockedError, match="is in use by process"):
            _run(ckpts, tmp_path / "busy", steps=1)
    assert not (tmp_path / "busy" / "rlhf.json").exists()


def test_response_rows_mark_the_response_up_to_its_eos():
    prompts = np.array([[5, 6, 0], [7, 0, 0]], np.int32)
    tokens = np.array([[9, 1, 0, 0], [0, 4, 8, 3]], np.int32)  # EOS 1; 0 is a token before it
    batch = rlhf.response_rows(prompts, np.array([2, 1]), tokens, eos_id=1)
    assert batch["rows"].tolist() == [[5, 6, 9, 1, 0, 0, 0], [7, 0, 4, 8, 3, 0, 0]]
    assert batch["segments"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]]
    assert batch["mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["starts"].tolist() == [2, 1]


def test_response_logits_are_the_policys_own_decoding_logprobs():
    """The log-probabilities PPO takes ratios of are those the KV-cache decoder sampled
    with (full forward from BOS == cached decoding)."""
    policy = families.DecoderOnlyModel(CFG)
    module = policy.make_module(0)
    decode = vocabulary.resolve_decode(DecodeConfig(method="sample", max_decode_length=6),
                                       vocabulary.get_vocabulary())
    prompts = np.array([[11, 12, 13], [14, 15, 0]], np.int32)
    lengths = np.array([3, 2], np.int32)
    out = nnx.jit(lambda m, p, n, k: policy.predict_batch(
        m, {"prompt": p, "prompt_lengths": n}, decode, k))(module, prompts, lengths,
                                                            jax.random.key(4))
    batch = rlhf.response_rows(prompts, lengths, np.asarray(out["tokens"]), decode.eos_id)
    logp, _ = nnx.jit(lambda m, b: rlhf.response_logits(m, b, decode.bos_id))(
        module, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(np.asarray(logp) * batch["mask"],
                               np.asarray(out["token_logprobs"]) * batch["mask"], atol=2e-5)


def test_prompts_of_a_step_follow_the_rounds_order():
    prompts = rlhf.Prompts(np.zeros((5, 2), np.int32), np.ones(5, np.int32),
                           np.zeros(5, bool), ["t"] * 5)
    first = [prompts.of_step(0, 0, s, 2) for s in range(3)]
    assert sorted(np.concatenate(first)[:5].tolist()) == [0, 1, 2, 3, 4]  # each once
    assert np.array_equal(first[2][1], first[0][0])  # then around again
    assert not all(np.array_equal(a, b) for a, b in zip(first, [
        prompts.of_step(0, 1, s, 2) for s in range(3)]))  # another round, another order
