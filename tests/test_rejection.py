"""Rejection sampling: N samples per prompt from a tiny policy, scored by a tiny reward
model, the best kept and written as a SeqIO source that reads back the same tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import entry_point_runner, tiny_config, tiny_model_gin

from t5x_like.data import vocabulary
from t5x_like.model import families
from t5x_like.objectives import preference
from t5x_like.model.decoding import DecodeConfig
from t5x_like.recipes import best_of_n


def test_best_of_n_keeps_the_highest_reward_and_reads_back_through_seqio(tmp_path):
    cfg = tiny_config()
    policy = families.DecoderOnlyModel(cfg)
    reward_model = preference.RewardModel(cfg)
    policy_module = policy.make_module(nnx.Rngs(0))
    reward_module = reward_model.make_module(nnx.Rngs(1))
    reward_module.reward_head[...] = jax.random.normal(jax.random.key(2), (cfg.emb_dim,))
    prompts = np.array([[5, 6, 7, 0], [9, 10, 11, 12], [13, 14, 0, 0]], np.int32)
    decode = vocabulary.resolve_decode(  # the shipped vocabulary's: EOS 1, start 0
        DecodeConfig(method="sample", max_decode_length=6, temperature=1.0),
        vocabulary.get_vocabulary())
    assert (decode.eos_id, decode.bos_id) == (1, 0)
    responses, rewards = best_of_n.sample_and_score(policy, policy_module, reward_model,
                                                    reward_module, prompts, 4, decode, seed=3)
    assert responses.shape == (4, 3, 6) and rewards.shape == (4, 3)
    assert len({responses[i].tobytes() for i in range(4)}) > 1  # the samples differ
    # each reward is the reward model's on prompt + response up to its EOS
    for i in (0, 3):
        row = list(prompts[1][prompts[1] != 0]) + best_of_n._response_tokens(responses[i, 1], 1)
        one = nnx.jit(lambda m, t: reward_model.rewards(m, t))(
            reward_module, jnp.asarray([row], jnp.int32))
        assert float(one[0]) == pytest.approx(float(rewards[i, 1]), rel=1e-4, abs=1e-5)
    best = [rewards[best_of_n.best_of(rewards, k), range(3)].mean() for k in (1, 2, 4)]
    assert best[0] <= best[1] <= best[2]
    assert np.array_equal(best_of_n.best_of(rewards, 4), rewards.argmax(axis=0))
    with pytest.raises(ValueError, match="k=5 must be in 1..4"):
        best_of_n.best_of(rewards, 5)
    with pytest.raises(ValueError, match="method='sample'"):
        best_of_n.sample_and_score(policy, policy_module, reward_model, reward_module, prompts,
                                   2, DecodeConfig())
    chosen = best_of_n.best_of(rewards, 4)
    path = str(tmp_path / "sft.tfrecord.gz")
    vocab = vocabulary.get_vocabulary()
    assert best_of_n.write_sft_source(path, prompts, responses, chosen, vocab, 1) == 3
    task = best_of_n.sft_task("test_rejection_sft", path, vocab)
    read = list(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
    for b, ex in enumerate(read):
        assert ex["inputs"].tolist() == [int(t) for t in prompts[b] if t]
        assert ex["targets"].tolist() == best_of_n._response_tokens(responses[chosen[b], b], 1)


# ---------------------------------------------------------------------------
# The entry point (`python -m t5x_like.rejection_sample`) and fine-tuning on its output

import json  # noqa: E402
import os  # noqa: E402

import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from t5x_like.data import mixtures
from t5x_like.model import partitioning
from t5x_like.recipes import rejection_sampling  # noqa: E402
from t5x_like.training import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DP = partitioning.MeshConfig(shape={"data": 8}, rules="dp")  # cheapest to compile
SMALL = dict(vocab_size=8192, emb_dim=32, mlp_dim=64, z_loss=0.0)  # the shipped vocabulary


def _prompt_task(name="test_rs_prompts", lines=10):
    """Prompts from real prose (data/PROVENANCE.md), one `inputs` feature."""
    with open(os.path.join(REPO, "data", "PROVENANCE.md"), encoding="utf-8") as f:
        words = f.read().split()
    texts = [" ".join(words[i:i + 6]) for i in range(0, 6 * lines, 6)]
    vocab = vocabulary.get_vocabulary()

    @seqio.map_over_dataset
    def as_inputs(text):
        return {"inputs": text}

    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(
            lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices(texts),
            splits=("validation",)),
        preprocessors=[as_inputs, seqio.preprocessors.tokenize],
        output_features={"inputs": seqio.Feature(vocab, add_eos=True)}, metric_fns=[])
    return name


def _save_module(directory, module):
    checkpoints.save_params(str(directory), nnx.state(module))
    return str(directory)


def test_rejection_sample_writes_the_kept_set_and_registers_it_for_fine_tuning(
        tmp_path, monkeypatch):
    monkeypatch.setenv(mixtures.REGISTRATIONS_ENV, "{}")  # removed again afterwards
    cfg = tiny_config(**SMALL)
    policy, reward_model = families.DecoderOnlyModel(cfg), preference.RewardModel(cfg)
    policy_dir = _save_module(tmp_path / "policy", policy.make_module(nnx.Rngs(0)))
    reward_module = reward_model.make_module(nnx.Rngs(1))
    reward_module.reward_head[...] = jax.random.normal(jax.random.key(2), (cfg.emb_dim,))
    reward_dir = _save_module(tmp_path / "reward", reward_module)
    out = str(tmp_path / "rs")

    def run(**kwargs):
        return rejection_sampling.rejection_sample(
            policy=policy, policy_checkpoint=policy_dir, reward_model=reward_model,
            reward_checkpoint=reward_dir, mesh_config=DP,
            mixture_or_task_name=_prompt_task(), task_feature_lengths={"inputs": 12},
            output_dir=out, num_samples=4, batch_size=8,
            decode=DecodeConfig(method="sample", max_decode_length=6), **kwargs)

    summary = run()
    assert summary["prompts"] == 10 and summary["num_samples"] == 4
    best = summary["mean_best_of_k_reward"]
    assert list(best) == ["1", "2", "4"] and best["1"] <= best["2"] <= best["4"]
    assert summary["mean_reward_kept"] == pytest.approx(best["4"])
    assert summary["mean_reward_kept"] > summary["mean_reward_all_samples"]
    rows = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    assert len(rows) == 10 and all(len(r["rewards"]) == 4 for r in rows)
    assert all(r["rewards"][r["kept"]] == max(r["rewards"]) for r in rows)
    assert len({tuple(r["rewards"]) for r in rows}) > 1
    vocab = vocabulary.get_vocabulary()
    with pytest.raises(FileExistsError, match="never overwrites"):
        run()

    # The kept set through the gin-configurable registration, both forms.
    name = best_of_n.register_sft_task(out)
    assert name == summary["sft_task_name"] and name in mixtures.recorded_registrations(
        best_of_n.SFT_TASK)
    read = list(seqio.get_mixture_or_task(name).get_dataset(
        None, split="train", shuffle=False).as_numpy_iterator())
    assert len(read) == 10
    # the kept row is the prompt (its EOS dropped) + the kept response, and its reward
    # under the reward model is the one recorded for that response
    reward_of = nnx.jit(lambda m, t: reward_model.rewards(m, t))
    for b in (0, 3, 9):
        tokens = read[b]["targets"].tolist()
        assert vocab.decode(tokens).startswith(rows[b]["prompt"])
        assert float(reward_of(reward_module, jnp.asarray([tokens], jnp.int32))[0]) == (
            pytest.approx(rows[b]["rewards"][rows[b]["kept"]], abs=1e-4))
    prefix = best_of_n.register_sft_task(out, form="prefix_lm", name="test_rs_prefix")
    pairs = list(seqio.get_mixture_or_task(prefix).get_dataset(
        None, split="validation", shuffle=False).as_numpy_iterator())
    assert [p["inputs"].tolist() + p["targets"].tolist() for p in pairs] == [
        ex["targets"].tolist() for ex in read]
    gin_text = open(os.path.join(out, "finetune.gin")).read()
    assert "@best_of_n.register_sft_task()" in gin_text and "{'targets': 18}" in gin_text
    import gin  # the file parses (its statements, not yet bound)
    list(gin.config_parser.ConfigParser(gin_text, gin.config.ParserDelegate(skip_unknown=True)))
    with pytest.raises(FileNotFoundError, match="not the output"):
        best_of_n.register_sft_task(str(tmp_path))


def test_a_dpo_checkpoint_reads_as_its_policy(tmp_path):
    """A DPOModel's state (policy + frozen reference) restores onto a plain decoder-only
    LM as the policy's parameters, never the reference's."""
    cfg = tiny_config()
    dpo = preference.DPOModel(cfg).make_module(nnx.Rngs(0))
    dpo.embed.embedding[...] = dpo.embed.embedding[...] + 1.0  # policy != reference
    path = _save_module(tmp_path / "dpo", dpo)
    target = nnx.state(families.DecoderOnlyModel(cfg).make_module(nnx.Rngs(5)))
    restored = checkpoints.restore_params(path, target)
    np.testing.assert_array_equal(np.asarray(restored["embed"]["embedding"][...]),
                                  np.asarray(dpo.embed.embedding[...]))
    assert "reference" not in restored
    # a mismatch is still refused
    with pytest.raises(checkpoints.CheckpointMismatchError):
        checkpoints.restore_params(path, nnx.state(families.DecoderOnlyModel(
            tiny_config(emb_dim=64)).make_module(nnx.Rngs(0))))




@pytest.mark.slow
def test_rejection_sampling_then_fine_tuning_on_the_kept_set_end_to_end(tmp_path):
    """Tiny policy (a few steps on code) and reward model (a few steps on the shipped
    preference pairs) trained here; `python -m t5x_like.rejection_sample` over the
    held-out preference prompts; `python -m t5x_like.train` with runs/finetune.gin and
    the finetune.gin it wrote, from the policy: the kept responses' reward beats the
    samples' mean, the loss on the kept set falls, and the fine-tuned checkpoint loads."""
    import tasks  # noqa: F401  (code_causal, reka_preference)
    from t5x_like.evaluation import evaluate
    from t5x_like.training import metrics, optimizers, train
    from tasks.preference import PREFERENCE_FEATURE_LENGTHS

    cfg = tiny_config(**SMALL, tie_embeddings=False)
    opt = optimizers.adamw_llama2(peak_lr=3e-3, warmup_steps=1, total_steps=6)
    off = evaluate.EvalConfig(enabled=False)
    train.train(model=families.DecoderOnlyModel(cfg), mesh_config=DP, optimizer=opt,
                data=train.DataConfig(mixture_or_task_name="code_causal",
                                      task_feature_lengths={"targets": 64}, batch_size=8,
                                      data_workers=1, task_modules=("tasks",)),
                train_steps=6, model_dir=str(tmp_path / "policy"), evaluation=off)
    train.train(model=preference.RewardModel(cfg), mesh_config=DP, optimizer=opt,
                data=train.DataConfig(mixture_or_task_name="reka_preference",
                                      task_feature_lengths=PREFERENCE_FEATURE_LENGTHS,
                                      batch_size=8, data_workers=1, task_modules=("tasks",)),
                train_steps=6, model_dir=str(tmp_path / "reward"), evaluation=off)
    run = entry_point_runner(tmp_path, tiny_model_gin(tie_embeddings=False))

    run("t5x_like.rejection_sample", "--gin_file=runs/rejection_sample.gin",
        "--gin.POLICY_CHECKPOINT='policy'", "--gin.REWARD_CHECKPOINT='reward'",
        "--gin.RS_OUTPUT_DIR='rs'", "--gin.RS_MAX_PROMPTS=2", "--gin.RS_NUM_SAMPLES=4",
        "--gin.decoding.DecodeConfig.max_decode_length=16")
    summary = json.loads((tmp_path / "rs" / "summary.json").read_text())
    assert summary["prompts"] == 10 and len(summary["tasks"]) == 5  # 2 per domain
    best = summary["mean_best_of_k_reward"]
    assert best["1"] <= best["2"] <= best["4"] == pytest.approx(summary["mean_reward_kept"])
    assert summary["mean_reward_kept"] > summary["mean_reward_all_samples"]

    run("t5x_like.train", "--gin_file=runs/finetune.gin", "--gin_file=rs/finetune.gin",
        "--gin.INITIAL_CHECKPOINT_PATH='policy'", "--gin.MODEL_DIR='tuned'",
        "--gin.TRAIN_STEPS=8", "--gin.BATCH_SIZE=8", "--gin.LEARNING_RATE=3e-3",
        "--gin.EVAL_EVERY_STEPS=8", "--gin.train.DataConfig.data_workers=1",
        "--gin.train.train.log_every_steps=1")
    records = metrics.read_jsonl(str(tmp_path / "tuned" / metrics.JSONL_NAME))
    evals = {r["step"]: v for r in records for k, v in r.items()
             if k.startswith("eval/") and k.endswith("/loss")}
    assert evals[8] < evals[0], evals  # the loss on the kept set falls
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert np.mean(losses[-2:]) < losses[0], losses
    # the fine-tuned checkpoint loads as the policy and moved away from it
    tuned = checkpoints.restore_params(str(tmp_path / "tuned"), nnx.state(
        families.DecoderOnlyModel(cfg).make_module(nnx.Rngs(0))))
    start = checkpoints.restore_params(str(tmp_path / "policy"), tuned)
    assert not np.allclose(np.asarray(tuned["embed"]["embedding"][...]),
                           np.asarray(start["embed"]["embedding"][...]))


def test_the_cli_refuses_an_existing_output_before_loading_anything(tmp_path, capsys):
    """runs/rejection_sample.gin parses with a model and a mesh file, and an earlier
    output is never written over: exit code 2 and a message naming it and the fix."""
    import gin

    from t5x_like import launch

    (tmp_path / "rs").mkdir()
    (tmp_path / "rs" / "summary.json").write_text("{}")
    try:
        with pytest.raises(SystemExit) as stopped:
            rejection_sampling.main([
                "--gin_file=models/tiny_llama.gin", "--gin_file=meshes/cpu8_fsdp.gin",
                "--gin_file=runs/rejection_sample.gin", "--gin.POLICY_CHECKPOINT='p'",
                "--gin.REWARD_CHECKPOINT='r'", f"--gin.RS_OUTPUT_DIR='{tmp_path / 'rs'}'"])
    finally:
        gin.clear_config()
        launch._gin_imports.clear()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'rs'} exists and is not empty" in err and "RS_OUTPUT_DIR" in err
