"""DoReMi: the Group DRO update against a hand computation, the per-domain excess, the
domain labels of packed rows, mixture files, the proxy's train step, and (slow) the
whole `doremi` loop: a reference run, a proxy run, the learned mixture trained on."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from flax import nnx
from tiny import fill_params, tiny_config

import tasks  # noqa: F401  (registers reka_mix_ul2, reka_mix_causal)
from t5x_like.data import forms, mixtures, pipeline
from t5x_like.evaluation import evaluate
from t5x_like.model import families, network, partitioning
from t5x_like.objectives import group_dro
from t5x_like.recipes import best_of_n, doremi
from t5x_like.training import checkpoints, optimizers, train, train_state


def test_one_group_dro_update_matches_the_hand_computation():
    # Three domains, α_{t−1} = (0.5, 0.3, 0.2), η = 1, c = 1e-3.
    # Domain 0: 2 tokens, excess 0.6 + 0.4 -> λ = 0.5. Domain 1: 4 tokens, excess sum
    # 0.4 -> λ = 0.1. Domain 2: no token in the batch -> keeps its previous score 0.2.
    # α' = (0.5·e^0.5, 0.3·e^0.1, 0.2·e^0.2) = (0.82436064, 0.33155128, 0.24428055),
    # Σα' = 1.40019246, α'/Σα' = (0.58874809, 0.23678979, 0.17446212),
    # α = 0.999 · α'/Σα' + 0.001/3 = (0.58849267, 0.23688633, 0.17462100).
    alpha, scores = group_dro.update_weights(
        jnp.array([0.5, 0.3, 0.2]), excess_K=jnp.array([1.0, 0.4, 0.0]),
        tokens_K=jnp.array([2.0, 4.0, 0.0]), previous_scores_K=jnp.array([9.0, 9.0, 0.2]),
        eta=1.0, smoothing=1e-3)
    np.testing.assert_allclose(scores, [0.5, 0.1, 0.2], rtol=1e-6)
    np.testing.assert_allclose(alpha, [0.58849267, 0.23688633, 0.17462100], rtol=1e-6)
    assert float(jnp.sum(alpha)) == pytest.approx(1.0, abs=1e-6)
    # The defaults are DoReMi's: η = 1, c = 1e-3.
    again, _ = group_dro.update_weights(jnp.array([0.5, 0.3, 0.2]), jnp.array([1.0, 0.4, 0.0]),
                                        jnp.array([2.0, 4.0, 0.0]), jnp.array([9.0, 9.0, 0.2]))
    np.testing.assert_allclose(again, alpha, rtol=1e-7)


def test_excess_is_clipped_at_zero_and_counted_per_domain_token():
    nll = jnp.array([[2.0, 1.0, 3.0, 5.0], [1.0, 4.0, 2.0, 7.0]])
    ref = jnp.array([[1.5, 2.0, 1.0, 0.0], [3.0, 1.0, 1.0, 0.0]])
    domains = jnp.array([[1, 1, 2, 0], [2, 3, 3, 0]])  # 0: padding
    weights = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # 3rd of row 2 unscored
    excess, tokens = group_dro.domain_excess(nll, ref, weights, domains, 3)
    # domain 1 (index 0): max(0.5, 0) + max(-1, 0) = 0.5 over 2 tokens; domain 2: 2 + 0
    # over 2; domain 3: 3 over 1 (the unweighted token does not count).
    np.testing.assert_allclose(excess, [0.5, 2.0, 3.0])
    np.testing.assert_allclose(tokens, [2.0, 2.0, 1.0])


def test_domain_ids_label_each_position_with_its_tasks_domain():
    task_ids = np.array([[4, 4, 1, 1, 1, 0],  # 1 + leaf task of each position, 0: padding
                         [2, 3, 4, 4, 0, 0]])
    label_domains = [0, 0, 1, 1]  # leaf tasks 0, 1 are domain 0; 2, 3 domain 1
    ids = pipeline.domain_ids(task_ids, label_domains)
    np.testing.assert_array_equal(ids, [[2, 2, 1, 1, 1, 0],
                                        [1, 2, 2, 2, 0, 0]])
    assert ids.dtype == np.int32
    assert group_dro.DOMAIN_IDS == pipeline.DOMAIN_IDS  # what the proxy's loss reads


def test_the_domains_of_a_mixture_are_its_parts():
    parts = mixtures.components("reka_mix_ul2")
    assert [p[0] for p in parts] == ["code_ul2", "math_ul2", "multilingual_ul2", "stem_ul2",
                                     "web_ul2"]
    # Reka's 25/30/25/10/15 of 105, each over its seven denoiser tasks.
    np.testing.assert_allclose([p[1] for p in parts],
                               np.array([25, 10, 15, 30, 25]) / 105, rtol=1e-9)
    assert all(len(p[2]) == 7 for p in parts)
    domains = mixtures.leaf_components("reka_mix_ul2")
    leaves = mixtures.leaf_tasks_and_rates("reka_mix_ul2")
    assert [parts[d][0].split("_")[0] for d in domains] == [n.split("_")[0] for n, _ in leaves]
    assert mixtures.components("code_causal") == [("code_causal", 1.0, ["code_causal"])]


def test_a_mixture_file_registers_a_mixture_with_its_rates(tmp_path, monkeypatch):
    rates = {"code_causal": 0.1, "math_causal": 0.4, "multilingual_causal": 0.2,
             "stem_causal": 0.2, "web_causal": 0.1}
    path = tmp_path / "my_mix.gin"
    path.write_text(mixtures.mixture_file_text("my_learned_mix", rates, "a test"))
    text = path.read_text()
    assert "MIXTURE_OR_TASK_NAME = 'my_learned_mix'" in text and "import tasks" in text
    monkeypatch.delenv(mixtures.REGISTRATIONS_ENV, raising=False)  # restored afterwards
    mixtures.record_registration(mixtures.MIXTURE_FILE, str(path))
    assert mixtures.register_mixture_files() == ["my_learned_mix"]
    assert dict(mixtures.leaf_tasks_and_rates("my_learned_mix")) == pytest.approx(rates)
    # A stream of it, with each position's domain (its part of the mixture).
    spec = pipeline.shard_spec("my_learned_mix", {"targets": 64}, forms.LM, 0, 1, pack_pool=8)
    rows = next(pipeline.shard_rows(spec, 0).batch(16).as_numpy_iterator())
    ids = pipeline.domain_ids(rows[pipeline.TASK_IDS], mixtures.leaf_components("my_learned_mix"))
    assert ids.shape == rows["decoder_target_tokens"].shape
    np.testing.assert_array_equal(ids > 0, rows["decoder_segment_ids"] > 0)
    assert set(np.unique(ids)) - {0} <= {1, 2, 3, 4, 5}
    bad = tmp_path / "bad.gin"
    bad.write_text("MIXTURE_OR_TASK_NAME = 'x'\n")
    with pytest.raises(ValueError, match="not a mixture file"):
        mixtures.register_mixture_file(str(bad))


def test_registrations_are_replayed_in_a_new_process_that_imports_their_module(
        tmp_path, monkeypatch):
    """A data worker is a new Python process that imports the task modules: it inherits
    what was recorded here, and the modules that register replay it at import."""
    monkeypatch.delenv(mixtures.REGISTRATIONS_ENV, raising=False)  # restored afterwards
    path = tmp_path / "worker_mix.gin"
    path.write_text(mixtures.mixture_file_text("worker_mix", {"code_causal": 0.25,
                                                              "math_causal": 0.75}))
    assert mixtures.register_mixture_file(str(path), record=True) == "worker_mix"
    mixtures.record_registration("a_kind", "k", value=[1, 2])
    mixtures.record_registration("a_kind", "k", value=[3])  # the same key: replaced
    mixtures.record_registration(best_of_n.SFT_TASK, "sft_gone", directory=str(tmp_path / "gone"),
                                 form="lm")
    code = ("import json, tasks\n"
            "from t5x_like.data import mixtures\n"
            "from t5x_like.recipes import best_of_n\n"
            "print(json.dumps([dict(mixtures.leaf_tasks_and_rates('worker_mix')),\n"
            "                  mixtures.recorded_registrations('a_kind')]))\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rates, kind = json.loads(done.stdout.strip().splitlines()[-1])
    assert rates == {"code_causal": 0.25, "math_causal": 0.75}
    assert kind == {"k": {"value": [3]}}
    # best_of_n.py replayed its recorded SFT task: its output is gone, so it warns.
    assert "sft_gone" in done.stderr and "has no summary.json any more" in done.stderr


def _proxy_state(cfg, domains=("a", "b"), rates=(0.25, 0.75)):
    proxy = group_dro.DoReMiModel(families.DecoderOnlyModel(cfg), domains, rates)
    with nnx.use_eager_sharding(False):
        module = fill_params(nnx.eval_shape(lambda: proxy.make_module(0)), seed=1)
    # The reference: other parameters of the same shape.
    reference = fill_params(nnx.eval_shape(lambda: families.DecoderOnlyModel(cfg).make_module(0)),
                            seed=2)
    # fill_params fills Params only: the Group DRO state as make_module starts it.
    module.domain_weights.set_value(jnp.array([0.5, 0.5]))
    module.domain_weights_sum.set_value(jnp.zeros(2))
    module.domain_scores.set_value(jnp.zeros(2))
    nnx.update(module.reference, nnx.state(reference, nnx.Param))
    return proxy, module, reference


@pytest.mark.slow  # ~33 s here: one train step compiled on the shared cores
def test_the_proxy_step_updates_the_weights_and_trains_on_the_weighted_loss():
    cfg = tiny_config(z_loss=0.0)
    proxy, module, reference = _proxy_state(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (4, 8)).astype(np.int32)
    batch = {"decoder_input_tokens": np.pad(tokens[:, :-1], ((0, 0), (1, 0))),
             "decoder_target_tokens": tokens,
             "decoder_loss_weights": np.ones((4, 8), np.int32),
             "decoder_segment_ids": np.ones((4, 8), np.int32),
             "decoder_positions": np.tile(np.arange(8, dtype=np.int32), (4, 1)),
             group_dro.DOMAIN_IDS: np.array([[1] * 8, [2] * 8, [2] * 8, [2] * 8], np.int32)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    base = families.DecoderOnlyModel(cfg)
    nll = np.asarray(families.token_losses(base.logits(module, batch), tokens, 0.0)[0])
    ref = np.asarray(families.token_losses(base.logits(reference, batch), tokens, 0.0)[0])
    excess = np.maximum(nll - ref, 0.0)
    scores = np.array([excess[0].mean(), excess[1:].mean()])
    expect = np.array([0.5, 0.5]) * np.exp(scores)
    expect = 0.999 * expect / expect.sum() + 0.001 / 2
    # Loss: tokens weighted by α_d / s_d, normalised.
    token_w = np.where(np.arange(4)[:, None] == 0, expect[0] / 0.25, expect[1] / 0.75)
    token_w = np.broadcast_to(token_w, nll.shape)
    expect_loss = float(np.sum(token_w * nll) / np.sum(token_w))

    loss, metrics = proxy.loss_fn(module, batch)
    assert float(loss) == pytest.approx(expect_loss, rel=1e-5)
    np.testing.assert_allclose(metrics["doremi_alpha"], expect, rtol=1e-5)
    # Without domain ids (evaluation), the base model's own loss.
    plain = {k: v for k, v in batch.items() if k != group_dro.DOMAIN_IDS}
    assert float(proxy.loss_fn(module, plain)[0]) == pytest.approx(float(nll.mean()), rel=1e-5)

    optimizer = optimizers.adamw_llama2(peak_lr=1e-3, warmup_steps=0, total_steps=10)
    graphdef, state = train_state.create_train_state(module, optimizer.tx)
    step = train_state.make_train_step(graphdef, proxy.loss_fn, optimizer.schedule,
                                   after_update=proxy.after_update, donate=False)
    new_state, out = step(state, batch, jax.random.key(0))
    new = nnx.merge(graphdef, new_state).model
    np.testing.assert_allclose(new.domain_weights[...], expect, rtol=1e-5)
    np.testing.assert_allclose(new.domain_weights_sum[...], expect, rtol=1e-5)
    np.testing.assert_allclose(new.domain_scores[...], scores, rtol=1e-5)
    assert float(out["domain_weight/a"]) == pytest.approx(expect[0], rel=1e-5)
    assert "doremi_alpha" not in out
    # The reference is frozen, the proxy trained.
    for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(new.reference)),
                              nnx.to_flat_state(nnx.state(reference, nnx.Param))):
        np.testing.assert_array_equal(a.get_value(), b.get_value())
    moved = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))),
                         nnx.state(new, nnx.Param), nnx.state(module, nnx.Param))
    assert max(jax.tree.leaves(moved)) > 0
    # A step the non-finite guard skips (the drills' NaN loss scale) leaves α and its
    # running sum as they were: average_weights must not count it.
    skipped_state, out = step(new_state, batch, jax.random.key(1), float("nan"))
    assert float(out["nonfinite"]) == 1.0
    skipped = nnx.merge(graphdef, skipped_state).model
    np.testing.assert_array_equal(skipped.domain_weights_sum[...], new.domain_weights_sum[...])
    with pytest.raises(ValueError, match="NUM_MICROBATCHES"):
        train_state.make_train_step(graphdef, proxy.loss_fn, num_microbatches=2,
                                after_update=proxy.after_update)


def test_the_average_weights_count_updates_not_steps_the_guard_skipped(tmp_path):
    """A proxy run of 3 steps whose second was skipped as non-finite: its checkpoint at
    step 3 holds the sum of two α's (the skipped step kept the state, as the slow test
    above checks); ᾱ is their mean and a distribution, not their sum over 3 steps."""
    cfg = tiny_config(z_loss=0.0)
    proxy, module, _ = _proxy_state(cfg)
    alphas = np.array([[0.7, 0.3], [0.55, 0.45]])
    module.domain_weights.set_value(jnp.asarray(alphas[-1], jnp.float32))
    module.domain_weights_sum.set_value(jnp.asarray(alphas.sum(axis=0), jnp.float32))
    optimizer = optimizers.adamw_llama2(peak_lr=1e-3, warmup_steps=0, total_steps=10)
    _, state = train_state.create_train_state(module, optimizer.tx)
    with checkpoints.CheckpointManager(tmp_path / "proxy" / "checkpoints") as manager:
        manager.save(3, state, force=True)
    weights = doremi.average_weights(str(tmp_path / "proxy"), proxy)
    np.testing.assert_allclose(weights, alphas.mean(axis=0), rtol=1e-6)
    assert weights.sum() == pytest.approx(1.0, abs=1e-6)
    # A proxy run that never updated α learned nothing: said, not 0/0.
    module.domain_weights_sum.set_value(jnp.zeros(2))
    _, state = train_state.create_train_state(module, optimizer.tx)
    with checkpoints.CheckpointManager(tmp_path / "none" / "checkpoints") as manager:
        manager.save(3, state, force=True)
    with pytest.raises(ValueError, match="made no domain-weight update"):
        doremi.average_weights(str(tmp_path / "none"), proxy)


def test_a_proxy_needs_one_positive_rate_per_domain():
    base = families.DecoderOnlyModel(tiny_config())
    with pytest.raises(ValueError, match="positive sampling rates"):
        group_dro.DoReMiModel(base, ("a", "b"), (1.0, 0.0))
    with pytest.raises(ValueError, match="eta"):
        group_dro.DoReMiModel(base, ("a", "b"), (1.0, 1.0), eta=0.0)


STEPS = 4
MODEL = families.DecoderOnlyModel(tiny_config(vocab_size=8192, emb_dim=64, head_dim=16,
                                            mlp_dim=128))
FSDP = partitioning.MeshConfig(shape={"data": 1, "fsdp": 8, "tensor": 1}, rules="fsdp")


def _train_fn(**kwargs):
    kwargs.setdefault("reference_checkpoint", None)
    return train.train(
        mesh_config=FSDP, optimizer=optimizers.adamw_llama2(3e-3, 1, STEPS), train_steps=STEPS,
        checkpoint=train.CheckpointConfig(save_every_steps=STEPS, keep=1),
        evaluation=evaluate.EvalConfig(enabled=False), log_every_steps=1, **kwargs)


@pytest.mark.slow
def test_doremi_learns_weights_writes_a_mixture_and_it_trains(tmp_path, monkeypatch):
    monkeypatch.delenv(mixtures.REGISTRATIONS_ENV, raising=False)
    data = train.DataConfig(mixture_or_task_name="reka_mix_causal",
                            task_feature_lengths={"targets": 64}, batch_size=8,
                            stream_shards=1, data_workers=1, task_modules=("tasks",))
    summary = doremi.doremi(model=MODEL, data=data, model_dir=str(tmp_path / "doremi"),
                            mixture_name="reka_mix_doremi_test", rounds=1,
                            train_fn=_train_fn)
    weights = summary["weights"]
    assert sorted(weights) == ["code_causal", "math_causal", "multilingual_causal",
                               "stem_causal", "web_causal"]
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(w >= 1e-3 / 5 for w in weights.values())
    assert summary["rounds"][0]["weights"] != summary["rounds"][0]["sampling_rates"]
    # The proxy's reference is the reference run's final parameters.
    proxy = group_dro.DoReMiModel(MODEL, list(weights), [1.0] * 5)
    ref_params = _flat(checkpoints.restore_params(
        summary["rounds"][0]["reference_dir"],
        nnx.state(nnx.eval_shape(lambda: MODEL.make_module(0)), nnx.Param)))
    proxy_ref = _flat(checkpoints.restore_params(
        summary["rounds"][0]["proxy_dir"],
        nnx.state(nnx.eval_shape(lambda: proxy.make_module(0)), network.Frozen), part=True))
    assert sorted(proxy_ref) == sorted(f"reference/{k}" for k in ref_params)
    for key, value in ref_params.items():
        np.testing.assert_array_equal(value, proxy_ref[f"reference/{key}"])
    # The mixture file registers the learned mixture; a model trains on it.
    path = summary["mixture_file"]
    assert os.path.exists(path) and os.path.exists(tmp_path / "doremi" / "doremi.json")
    seqio.MixtureRegistry.remove("reka_mix_doremi_test")
    assert mixtures.register_mixture_files([path]) == ["reka_mix_doremi_test"]
    assert dict(mixtures.leaf_tasks_and_rates("reka_mix_doremi_test")) == pytest.approx(
        weights, abs=1e-6)
    run = _train_fn(model=MODEL, data=dataclasses.replace(
        data, mixture_or_task_name="reka_mix_doremi_test"), model_dir=str(tmp_path / "learned"))
    assert run.end_step == STEPS and all(np.isfinite(run.train_losses))


def _flat(state):
    return {"/".join(map(str, p)): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for p, v in nnx.to_flat_state(state)}


def test_iterated_doremi_trains_each_round_on_the_last_weights_until_they_settle(
        tmp_path, monkeypatch):
    """The rounds' bookkeeping, with stand-ins for the runs: round r + 1's reference and
    proxy train on round r's weights (a registered mixture), and the rounds stop once no
    weight moves by the tolerance."""
    monkeypatch.delenv(mixtures.REGISTRATIONS_ENV, raising=False)
    parts = ["code_causal", "math_causal", "multilingual_causal", "stem_causal", "web_causal"]
    learned = iter([[0.3, 0.1, 0.3, 0.2, 0.1], [0.3005, 0.1, 0.2995, 0.2, 0.1],
                    [0.9, 0.025, 0.025, 0.025, 0.025]])
    monkeypatch.setattr(doremi, "average_weights", lambda *_: np.array(next(learned)))
    calls = []

    def fake_train(*, model, data, model_dir, reference_checkpoint=None):
        calls.append((type(model).__name__, data.mixture_or_task_name, data.domain_ids,
                      os.path.relpath(model_dir, tmp_path), reference_checkpoint and
                      os.path.relpath(reference_checkpoint, tmp_path)))
        return train.RunSummary(model_dir, 0, 3, (1.0,) * 3)

    data = train.DataConfig(mixture_or_task_name="reka_mix_causal",
                            task_feature_lengths={"targets": 64}, batch_size=8)
    summary = doremi.doremi(model=MODEL, data=data, model_dir=str(tmp_path), rounds=3,
                            mixture_name="reka_mix_doremi_rounds", train_fn=fake_train)
    assert calls == [
        ("DecoderOnlyModel", "reka_mix_causal", False, "round1/reference", None),
        ("DoReMiModel", "reka_mix_causal", True, "round1/proxy", "round1/reference"),
        ("DecoderOnlyModel", "reka_mix_doremi_rounds_round1", False, "round2/reference",
         None),
        ("DoReMiModel", "reka_mix_doremi_rounds_round1", True, "round2/proxy",
         "round2/reference")]
    assert len(summary["rounds"]) == 2  # round 2 moved the weights by 5e-4 < 1e-3
    assert summary["rounds"][1]["max_change"] == pytest.approx(5e-4)
    assert summary["weights"] == dict(zip(parts, [0.3005, 0.1, 0.2995, 0.2, 0.1]))
    assert dict(mixtures.leaf_tasks_and_rates("reka_mix_doremi_rounds")) == pytest.approx(
        summary["weights"])
    assert os.path.exists(tmp_path / "reka_mix_doremi_rounds.gin")
    # A stopped run stops the rounds (run the command again to resume).
    with pytest.raises(doremi.Stopped, match="stopped at step 1"):
        doremi.doremi(model=MODEL, data=data, model_dir=str(tmp_path / "stop"),
                      train_fn=lambda **kw: train.RunSummary(kw["model_dir"], 0, 1, (),
                                                             stopped_by="SIGTERM"))
