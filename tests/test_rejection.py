"""Rejection sampling: N samples per prompt from a tiny policy, scored by a tiny reward
model, the best kept and written as a SeqIO source that reads back the same tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_like import models, rejection, vocabulary
from t5x_like.decoding import DecodeConfig
from tiny import tiny_config


def test_best_of_n_keeps_the_highest_reward_and_reads_back_through_seqio(tmp_path):
    cfg = tiny_config()
    policy = models.DecoderOnlyModel(cfg)
    reward_model = models.RewardModel(cfg)
    policy_module = policy.make_module(nnx.Rngs(0))
    reward_module = reward_model.make_module(nnx.Rngs(1))
    reward_module.reward_head[...] = jax.random.normal(jax.random.key(2), (cfg.emb_dim,))
    prompts = np.array([[5, 6, 7, 0], [9, 10, 11, 12], [13, 14, 0, 0]], np.int32)
    decode = DecodeConfig(method="sample", max_decode_length=6, temperature=1.0)
    responses, rewards = rejection.sample_and_score(policy, policy_module, reward_model,
                                                    reward_module, prompts, 4, decode, seed=3)
    assert responses.shape == (4, 3, 6) and rewards.shape == (4, 3)
    assert len({responses[i].tobytes() for i in range(4)}) > 1  # the samples differ
    # each reward is the reward model's on prompt + response up to its EOS
    for i in (0, 3):
        row = list(prompts[1][prompts[1] != 0]) + rejection._response_tokens(responses[i, 1], 1)
        one = nnx.jit(lambda m, t: reward_model.rewards(m, t))(
            reward_module, jnp.asarray([row], jnp.int32))
        assert float(one[0]) == pytest.approx(float(rewards[i, 1]), rel=1e-4, abs=1e-5)
    best = [rewards[rejection.best_of(rewards, k), range(3)].mean() for k in (1, 2, 4)]
    assert best[0] <= best[1] <= best[2]
    assert np.array_equal(rejection.best_of(rewards, 4), rewards.argmax(axis=0))
    with pytest.raises(ValueError, match="k=5 must be in 1..4"):
        rejection.best_of(rewards, 5)
    with pytest.raises(ValueError, match="method='sample'"):
        rejection.sample_and_score(policy, policy_module, reward_model, reward_module, prompts,
                                   2, DecodeConfig())
    chosen = rejection.best_of(rewards, 4)
    path = str(tmp_path / "sft.tfrecord.gz")
    vocab = vocabulary.get_vocabulary()
    assert rejection.write_sft_source(path, prompts, responses, chosen, vocab, 1) == 3
    task = rejection.sft_task("test_rejection_sft", path, vocab)
    read = list(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
    for b, ex in enumerate(read):
        assert ex["inputs"].tolist() == [int(t) for t in prompts[b] if t]
        assert ex["targets"].tolist() == rejection._response_tokens(responses[chosen[b], b], 1)
