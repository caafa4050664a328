"""Inference and evaluation of a user's own task, and fine-tuning from a checkpoint.

A user's SeqIO task written the T5X way (TextLineDataSource of "question<TAB>answer"
lines, the shipped vocabulary, a postprocessor and a metric function of their own),
trained for a few steps, then run through `infer` (predict and score) and `evaluate`:
the outputs are the task's, not the Reka domains'.
"""

import json
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

import tasks  # noqa: F401  (registers code_causal / math_causal for the fine-tuning test)
from t5x_like import launch
from t5x_like.evaluation import evaluate, infer
from t5x_like.model import decoding, families, layers, partitioning
from t5x_like.training import optimizers, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USER_TASKS = '''
"""A user's question/answer task, with its own postprocessor and metric."""
import os

import seqio
import tensorflow as tf
from t5x_like.data import vocabulary

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = vocabulary.get_vocabulary()


@seqio.map_over_dataset
def split_line(line):
    parts = tf.strings.split(line, "\\t")
    return {"inputs": parts[0], "targets": parts[1]}


def strip(text, example=None, is_target=False):
    return text.strip()


def exact_match(targets, predictions):
    return {"exact_match": 100.0 * sum(t.strip() == p for t, p in zip(targets, predictions))
                           / max(len(targets), 1)}


seqio.TaskRegistry.remove("my_qa")
seqio.TaskRegistry.add(
    "my_qa",
    source=seqio.TextLineDataSource({s: os.path.join(HERE, f"qa_{s}.txt")
                                     for s in ("train", "validation")}),
    preprocessors=[split_line, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
    output_features={"inputs": seqio.Feature(VOCAB, add_eos=True),
                     "targets": seqio.Feature(VOCAB, add_eos=True)},
    postprocess_fn=strip,
    metric_fns=[exact_match],
)
'''

LENGTHS = {"inputs": 32, "targets": 16}
MODEL = families.DecoderOnlyModel(layers.TransformerConfig(
    vocab_size=8192, emb_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
    num_decoder_layers=2, block="sequential", tie_embeddings=False, dtype="float32",
    z_loss=0.0))
FSDP = partitioning.MeshConfig(shape={"fsdp": 8}, rules="fsdp")
FSDP_TP = partitioning.MeshConfig(shape={"fsdp": 2, "tensor": 4}, rules="fsdp_tp")


def write_user_task(directory):
    """qa_{train,validation}.txt from real prose (data/PROVENANCE.md) and my_qa_tasks.py."""
    with open(os.path.join(REPO, "data", "PROVENANCE.md"), encoding="utf-8") as f:
        words = f.read().split()
    lines = [" ".join(words[i:i + 6]) + "\t" + " ".join(words[i + 6:i + 9])
             for i in range(0, len(words) - 9, 9)]
    (directory / "qa_train.txt").write_text("\n".join(lines[:-20]) + "\n", encoding="utf-8")
    (directory / "qa_validation.txt").write_text("\n".join(lines[-20:]) + "\n",
                                                 encoding="utf-8")
    (directory / "my_qa_tasks.py").write_text(USER_TASKS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few steps of the tiny decoder (a prefix LM: the task has inputs) on my_qa."""
    directory = tmp_path_factory.mktemp("user_task")
    write_user_task(directory)
    sys.path.insert(0, str(directory))
    import my_qa_tasks  # noqa: F401  (registers my_qa)

    data = train.DataConfig(mixture_or_task_name="my_qa", task_feature_lengths=LENGTHS,
                            batch_size=8, data_workers=1, task_modules=("my_qa_tasks",))
    train.train(model=MODEL, mesh_config=FSDP, data=data,
                optimizer=optimizers.adamw_llama2(peak_lr=3e-3, warmup_steps=1, total_steps=4),
                train_steps=4, model_dir=str(directory / "run"),
                evaluation=evaluate.EvalConfig(enabled=False), log_every_steps=2)
    return directory


def _infer(directory, out, **kwargs):
    return infer.infer(model=MODEL, mesh_config=FSDP, mixture_or_task_name="my_qa",
                       task_feature_lengths=LENGTHS, checkpoint_path=str(directory / "run"),
                       output_dir=str(out), batch_size=8,
                       decode=decoding.DecodeConfig(max_decode_length=8), **kwargs)


@pytest.mark.slow
def test_infer_writes_predictions_and_scores_of_the_users_task(trained, tmp_path):
    paths = _infer(trained, tmp_path)
    rows = [json.loads(line) for line in open(paths["my_qa"], encoding="utf-8")]
    assert len(rows) == 20  # every validation example once, the padded rows dropped
    assert all(set(r) == {"inputs", "targets", "prediction", "score"} for r in rows)
    assert rows[0]["inputs"] and rows[0]["targets"] and np.isfinite(rows[0]["score"])
    assert all(r["prediction"] == r["prediction"].strip() for r in rows)  # its postprocessor
    scored = _infer(trained, tmp_path, mode="score")
    score_rows = [json.loads(line) for line in open(scored["my_qa"], encoding="utf-8")]
    assert [r["targets"] for r in score_rows] == [r["targets"] for r in rows]
    assert all(r["score"] < 0 for r in score_rows)
    with pytest.raises(FileExistsError, match="never overwrites"):
        _infer(trained, tmp_path)


@pytest.mark.slow
def test_evaluate_reports_the_users_task_metrics(trained, request):
    cache = trained / "run" / "compilation_cache"
    before = set(cache.iterdir()) if cache.exists() else set()
    # The infer test compiled the same programs in this process (jax's in-memory cache
    # would answer, never the persistent one), and a fast machine compiles under jax's
    # 1 s threshold for writing an entry.
    jax.clear_caches()
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    request.addfinalizer(lambda: jax.config.update(
        "jax_persistent_cache_min_compile_time_secs", threshold))
    result = evaluate.evaluate(
        model=MODEL, mesh_config=FSDP,
        optimizer=optimizers.adamw_llama2(peak_lr=3e-3, warmup_steps=1, total_steps=4),
        model_dir=str(trained / "run"), mixture_or_task_name="my_qa",
        task_feature_lengths=LENGTHS,
        evaluation=evaluate.EvalConfig(batch_size=8, decode=decoding.DecodeConfig(
            max_decode_length=8)))
    assert set(result["results"]) == {"my_qa"}
    metrics = result["results"]["my_qa"]
    assert {"loss", "bpc", "exact_match"} <= set(metrics)
    assert 0.0 <= metrics["exact_match"] <= 100.0 and metrics["loss"] > 0 and metrics["bpc"] > 0
    # Its compiled programs went to the run's persistent compilation cache.
    assert set(cache.iterdir()) - before


@pytest.mark.slow
def test_the_cli_runs_a_users_task_through_train_infer_and_eval(tmp_path):
    """What docs/INFERENCE.md's "Evaluating and predicting on your own task" shows, in
    subprocesses: their gin file, their module."""
    write_user_task(tmp_path)
    (tmp_path / "my_exp.gin").write_text(
        "include 'models/tiny_llama.gin'\ninclude 'runs/pretrain.gin'\n"
        "include 'meshes/cpu8_fsdp.gin'\nimport my_qa_tasks\n\n"
        "MIXTURE_OR_TASK_NAME = 'my_qa'\n"
        "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 16}\n"
        "TRAIN_STEPS = 4\nBATCH_SIZE = 8\nWARMUP_STEPS = 1\nMODEL_DIR = 'run'\n"
        "train.DataConfig.data_workers = 1\nEVAL_EVERY_STEPS = 1000\n"
        "evaluate.EvalConfig.batch_size = 8\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}

    def run(module, *flags):
        proc = subprocess.run([sys.executable, "-m", module, "--gin_file=my_exp.gin",
                               f"--gin_search_paths={tmp_path}", *flags], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc.stdout + proc.stderr

    trained = run("t5x_like.train")
    assert "exact_match" in trained  # in-training eval: the task's metric
    run("t5x_like.infer", "--gin_file=runs/infer.gin", "--gin.CHECKPOINT_PATH='run'",
        "--gin.INFER_OUTPUT_DIR='out'", "--gin.decoding.DecodeConfig.max_decode_length=8")
    assert len((tmp_path / "out" / "my_qa-predict.jsonl").read_text().splitlines()) == 20
    evaluated = run("t5x_like.eval")
    assert "my_qa" in evaluated and "exact_match" in evaluated and "code" not in evaluated


@pytest.mark.slow
def test_fine_tuning_starts_from_the_pretrained_loss_on_another_rule_preset(tmp_path):
    """Pretrained on code (fsdp), fine-tuned on math under fsdp_tp: the first fine-tuning
    step's loss is the pretrained model's loss on that batch (not a fresh init's)."""
    model = families.DecoderOnlyModel(MODEL.cfg)
    pre = train.DataConfig(mixture_or_task_name="code_causal",
                           task_feature_lengths={"targets": 64}, batch_size=8,
                           data_workers=1, task_modules=("tasks",))
    opt = optimizers.adamw_llama2(peak_lr=3e-3, warmup_steps=1, total_steps=12)
    train.train(model=model, mesh_config=FSDP, data=pre, optimizer=opt, train_steps=12,
                model_dir=str(tmp_path / "pre"), evaluation=evaluate.EvalConfig(enabled=False))
    fine = train.DataConfig(mixture_or_task_name="math_causal",
                            task_feature_lengths={"targets": 64}, batch_size=8,
                            data_workers=1, task_modules=("tasks",))
    tuned = train.train(model=model, mesh_config=FSDP_TP, data=fine,
                        optimizer=optimizers.adamw_llama2(peak_lr=1e-4, warmup_steps=0,
                                                       total_steps=2),
                        train_steps=2, model_dir=str(tmp_path / "fine"), log_every_steps=1,
                        evaluation=evaluate.EvalConfig(enabled=False),
                        initial_checkpoint=str(tmp_path / "pre"))
    # The pretrained parameters' loss on the fine-tuning run's first batch.
    from t5x_like import launch as launch_lib
    from t5x_like.training import checkpoints

    mesh, rules = launch_lib.mesh_for(FSDP)
    graphdef, target = partitioning.abstract_sharded(model.make_module, mesh, rules)
    params = checkpoints.restore_params(str(tmp_path / "pre"), target)
    # The fine-tuning run's first batch: its stream is deterministic in (settings, step).
    rows = train.data_source(fine, model.data_form(fine.task_feature_lengths), 2,
                             partitioning.process_rows(mesh, fine.batch_size)).iterator()
    try:
        first = next(rows)
    finally:
        rows.close()
    loss, _ = model.loss_fn(gin_free_merge(graphdef, params), first)
    assert tuned.train_losses[0] == pytest.approx(float(loss), rel=0.01)
    # ... and not the loss of the parameters a fresh run would have started from.
    fresh, _ = model.loss_fn(model.make_module(0), first)
    assert tuned.train_losses[0] < float(fresh) - 0.1


def gin_free_merge(graphdef, params):
    from flax import nnx

    return nnx.merge(graphdef, params)


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()
    launch._gin_imports.clear()
