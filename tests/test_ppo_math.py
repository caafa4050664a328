"""PPO's math (objectives/ppo.py) against hand computations: the reward of Llama 2's RLHF
(safety/helpfulness rule, logit, whitening, KL penalty at each token, score at the last),
GAE by an explicit backward loop, the clipped policy and value losses, the entropy, and
the settings check."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.objectives import ppo


def test_masked_mean_counts_only_the_masked_entries_and_is_zero_when_none_are():
    x = np.array([[1.0, 2.0, 100.0], [3.0, 200.0, 300.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.int32)
    assert float(ppo.masked_mean(x, mask)) == pytest.approx((1 + 2 + 3) / 3)
    np.testing.assert_allclose(ppo.masked_mean(x, mask, axis=1), [1.5, 3.0])
    assert float(ppo.masked_mean(x, np.zeros_like(mask))) == 0.0


def test_whiten_gives_mean_zero_variance_one_over_the_valid_entries_and_zeros_the_rest():
    x = np.array([2.0, 4.0, 1000.0, 6.0, 8.0, -1000.0])
    valid = np.array([True, True, False, True, True, False])
    got = np.asarray(ppo.whiten(x, valid))
    kept = [2.0, 4.0, 6.0, 8.0]
    mean = sum(kept) / 4  # 5
    var = sum((k - mean) ** 2 for k in kept) / 4  # population: 5
    want = [(k - mean) / math.sqrt(var + 1e-8) for k in kept]
    np.testing.assert_allclose(got[valid], want, rtol=1e-6)
    assert got[2] == 0.0 and got[5] == 0.0
    assert got[valid].mean() == pytest.approx(0.0, abs=1e-6)
    assert got[valid].var() == pytest.approx(1.0, rel=1e-5)
    # no mask: every entry counts
    everything = np.asarray(ppo.whiten(np.array([1.0, 2.0, 3.0, 4.0])))
    np.testing.assert_allclose(everything, (np.arange(1, 5) - 2.5) / math.sqrt(1.25 + 1e-8),
                               rtol=1e-6)


def test_logit_inverts_the_sigmoid_and_clips_scores_of_zero_and_one():
    raw = np.array([-6.0, -1.5, 0.0, 0.3, 2.0, 7.0], np.float32)
    np.testing.assert_allclose(ppo.logit(jax.nn.sigmoid(raw)), raw, atol=2e-4)
    assert float(ppo.logit(0.5)) == 0.0
    bound = math.log(1e-6) - math.log1p(-1e-6)
    ends = np.asarray(ppo.logit(np.array([0.0, 1.0])))
    assert np.all(np.isfinite(ends))
    np.testing.assert_allclose(ends, [bound, -bound], rtol=1e-3)
    assert ends.dtype == np.float32


def test_combined_score_takes_safety_below_0_15_strictly_and_always_on_safety_prompts():
    helpful = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    safety = np.array([0.1499, 0.15, 0.9, 0.15, 0.02])
    is_safety = np.array([False, False, False, True, True])
    got = np.asarray(ppo.combined_score(helpful, safety, is_safety))
    # 0.1499 < 0.15: safety; exactly 0.15: helpful; safe and not a safety prompt: helpful;
    # safety prompts: safety whatever its value
    np.testing.assert_allclose(got, [0.1499, 0.8, 0.7, 0.15, 0.02], rtol=1e-6)
    assert ppo.SAFETY_THRESHOLD == 0.15


def test_per_token_kl_is_the_log_ratio_on_the_mask_and_zero_when_the_policies_agree():
    policy = np.array([[-1.0, -2.0, -0.5], [-3.0, -0.1, -4.0]])
    reference = np.array([[-1.5, -1.0, -0.5], [-2.0, -9.0, -9.0]])
    mask = np.array([[1, 1, 1], [1, 0, 0]])
    np.testing.assert_allclose(ppo.per_token_kl(policy, reference, mask),
                               [[0.5, -1.0, 0.0], [-1.0, 0.0, 0.0]], rtol=1e-6)
    assert np.all(np.asarray(ppo.per_token_kl(policy, policy, np.ones((2, 3)))) == 0.0)


def test_token_rewards_put_the_score_on_the_last_response_token_and_skip_an_empty_row():
    score = np.array([2.0, -1.0, 5.0])
    kl = np.array([[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0], [7.0, 7.0, 7.0, 7.0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    beta = 0.5
    want = np.zeros((3, 4))
    for b in range(3):
        n = int(mask[b].sum())
        for t in range(n):
            want[b, t] = -beta * kl[b, t]
        if n > 0:
            want[b, n - 1] += score[b]
    got = np.asarray(ppo.token_rewards(score, kl, mask, beta))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0, 2] == pytest.approx(2.0 - 0.15) and got[0, 3] == 0.0
    assert np.all(got[2] == 0.0)


def _hand_gae(rewards, values, mask, gamma, lam):
    """GAE by an explicit backward loop, row by row, over each row's own length."""
    advantages = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            advantages[b, t] = running
    returns = (advantages + values) * mask
    return advantages, returns


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 1.0)])
def test_gae_equals_a_hand_loop_on_rows_of_different_lengths(gamma, lam):
    rng = np.random.default_rng(0)
    lengths = [5, 3, 1, 0]
    mask = np.array([[1.0 if t < n else 0.0 for t in range(5)] for n in lengths])
    rewards = rng.normal(size=(4, 5)) * mask
    values = rng.normal(size=(4, 5))  # junk on padding: it must not leak in
    got_adv, got_ret = ppo.gae(rewards, values, mask, gamma=gamma, lam=lam)
    want_adv, want_ret = _hand_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(got_adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_ret, want_ret, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got_adv)[mask == 0] == 0.0)
    assert np.all(np.asarray(got_ret)[mask == 0] == 0.0)


def test_gae_of_a_two_token_row_written_out():
    rewards = np.array([[0.0, 1.0]])
    values = np.array([[0.5, 0.25]])
    adv, ret = ppo.gae(rewards, values, np.ones((1, 2)), gamma=0.9, lam=0.8)
    a1 = 1.0 - 0.25  # last token: no next value
    a0 = (0.0 + 0.9 * 0.25 - 0.5) + 0.9 * 0.8 * a1
    np.testing.assert_allclose(adv, [[a0, a1]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[a0 + 0.5, a1 + 0.25]], rtol=1e-6)
    jitted = jax.jit(ppo.gae)(rewards, values, np.ones((1, 2)), 0.9, 0.8)
    np.testing.assert_allclose(jitted[0], adv, rtol=1e-6)


def test_clipped_surrogate_clips_only_the_side_that_would_gain_and_counts_clipped_tokens():
    ratios = np.array([[1.1, 1.5, 0.5, 1.5, 0.5, 3.0]])
    advantages = np.array([[2.0, 1.0, 1.0, -1.0, -2.0, 9.0]])
    mask = np.array([[1, 1, 1, 1, 1, 0]])
    old = np.array([[-1.0, -2.0, -0.5, -3.0, -1.5, -1.0]])
    new = old + np.log(ratios)
    eps = 0.2
    terms = []
    for r, a in zip(ratios[0, :5], advantages[0, :5]):
        terms.append(-min(r * a, min(max(r, 1 - eps), 1 + eps) * a))
    # by hand: inside (1.1·2); A>0 and ρ>1+ε: clipped 1.2; A>0, ρ<1−ε: unclipped 0.5;
    # A<0, ρ>1+ε: unclipped −1.5; A<0, ρ<1−ε: clipped 0.8·(−2)
    assert terms == pytest.approx([-2.2, -1.2, -0.5, 1.5, 1.6])
    loss, stats = ppo.clipped_surrogate(new, old, advantages, mask, clip=eps)
    assert float(loss) == pytest.approx(sum(terms) / 5, rel=1e-5)
    assert float(stats["clip_fraction"]) == pytest.approx(4 / 5)
    approx_kl = sum(o - n for o, n in zip(old[0, :5], new[0, :5])) / 5
    assert float(stats["approx_kl"]) == pytest.approx(approx_kl, rel=1e-5)
    same, same_stats = ppo.clipped_surrogate(old, old, advantages, mask)
    assert float(same) == pytest.approx(-np.mean(advantages[0, :5]), rel=1e-6)
    assert float(same_stats["clip_fraction"]) == 0.0 and float(same_stats["approx_kl"]) == 0.0


def test_value_loss_clipped_and_unclipped():
    values = np.array([[1.0, 0.0, 2.0, 5.0]])
    old = np.array([[0.5, 0.5, 2.5, 0.0]])
    returns = np.array([[2.0, -1.0, 2.0, 0.0]])
    mask = np.array([[1, 1, 1, 0]])
    eps = 0.2
    plain = [(1.0 - 2.0) ** 2, (0.0 + 1.0) ** 2, 0.0]
    moved = [0.5 + 0.2, 0.5 - 0.2, 2.5 - 0.2]  # old + clip(v − old, −ε, ε)
    clipped = [(m - r) ** 2 for m, r in zip(moved, returns[0, :3])]
    want = 0.5 * sum(max(p, c) for p, c in zip(plain, clipped)) / 3
    assert want == pytest.approx(0.5 * (1.69 + 1.69 + 0.09) / 3)  # the clipped side wins
    got = ppo.value_loss(values, old, returns, mask, clip=eps)
    assert float(got) == pytest.approx(want, rel=1e-5)
    unclipped = ppo.value_loss(values, old, returns, mask, clip=None)
    assert float(unclipped) == pytest.approx(0.5 * sum(plain) / 3, rel=1e-6)


def test_entropy_of_a_uniform_distribution_is_log_v_and_a_peaked_one_is_near_zero():
    V = 7
    logits = np.zeros((2, 3, V), np.float32)
    logits[1, 2] = [0.0] * (V - 1) + [60.0]  # one-hot, masked out below
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    assert float(ppo.token_entropy(logits, mask)) == pytest.approx(math.log(V), rel=1e-6)
    peaked = np.full((1, 1, V), -60.0, np.float32)
    peaked[0, 0, 0] = 60.0
    assert float(ppo.token_entropy(peaked, np.ones((1, 1)))) == pytest.approx(0.0, abs=1e-6)
    half = jnp.asarray([[[0.0, 0.0, -1e9]]], jnp.bfloat16)
    got = ppo.token_entropy(half, np.ones((1, 1)))
    assert got.dtype == jnp.float32 and float(got) == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("setting, kwargs, names", [
    ("beta", dict(beta=-0.01), ("PPO_BETA", "0.01")),
    ("clip", dict(clip=0.0), ("clip",)),
    ("clip", dict(clip=-0.2), ("clip",)),
    ("gamma", dict(gamma=1.01), ("gamma", "[0, 1]")),
    ("lam", dict(lam=-0.1), ("lam", "[0, 1]")),
])
def test_check_settings_names_the_bad_setting_and_its_fix(setting, kwargs, names):
    good = dict(beta=0.01, clip=0.2, gamma=1.0, lam=0.95)
    ppo.check_settings(**good)
    ppo.check_settings(beta=0.0, clip=0.2, gamma=0.0, lam=1.0)  # the ends are allowed
    with pytest.raises(ValueError) as error:
        ppo.check_settings(**{**good, **kwargs})
    for name in names:
        assert name in str(error.value), (setting, str(error.value))
