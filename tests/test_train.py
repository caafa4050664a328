"""The training entry point end to end: exact resume, resharded resume, standalone eval,
a user's task module through the CLI, every experiment file parses, clear errors; for
a prepared store and for streamed data (the default).

Real parts throughout: the shipped corpus and tokenizer through SeqIO, grain (over a
prepared ArrayRecord store, or running the SeqIO shards in worker processes), orbax
checkpoints in tmp dirs, 8 CPU devices. One store is prepared per module and shared by
the store-based runs (their DataConfig is identical). The streaming runs start worker
processes, tens of seconds each on 2 cores: slow.
"""

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
from flax import nnx

import tasks  # noqa: F401  (registers code_causal and the validation tasks)
from t5x_like import launch
from t5x_like.data import prepare
from t5x_like.evaluation import evaluate
from t5x_like.model import families, layers, partitioning
from t5x_like.planning import memory
from t5x_like.training import checkpoints, optimizers, train, train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH, LENGTHS = 6, 8, {"targets": 64}

# A small Llama-style decoder (vocabulary of the shipped tokenizer); every sharded
# dimension divides by 8 (fsdp) and by 4 (tensor).
MODEL = families.DecoderOnlyModel(layers.TransformerConfig(
    vocab_size=8192, emb_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
    num_decoder_layers=2, num_encoder_layers=0, block="sequential", tie_embeddings=False,
    dtype="float32", scan_layers=True))
FSDP = partitioning.MeshConfig(shape={"data": 1, "fsdp": 8, "tensor": 1}, rules="fsdp")
FSDP_TP = partitioning.MeshConfig(shape={"data": 1, "fsdp": 2, "tensor": 4}, rules="fsdp_tp")
EVAL = evaluate.EvalConfig(every_steps=1000, tasks=(),
                             bpc_tasks={"code": "code_validation", "math": "math_validation"},
                             window=64, stride=32,
                             max_tokens=256, batch_size=8)
EVAL_OFF = evaluate.EvalConfig(enabled=False)


STORE_ROWS = (STEPS + 14) * BATCH  # enough for the spike test's skipped batches too


def _prepare(out_dir, seed=0):
    return prepare.prepare("code_causal", LENGTHS, "lm", STORE_ROWS, seed, str(out_dir),
                           num_shards=1, workers=1, task_modules=("tasks",))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "store"
    _prepare(out)
    return str(out)


def _optimizer():
    return optimizers.adamw_llama2(peak_lr=3e-3, warmup_steps=2, total_steps=STEPS)


def _train(model_dir, store, mesh_config=FSDP, evaluation=None, data_workers=None,
           **kwargs):
    """A run on the store at `store`, or streamed when `store` is None."""
    data = train.DataConfig(mixture_or_task_name="code_causal", task_feature_lengths=LENGTHS,
                            batch_size=BATCH, store_dir=store, data_workers=data_workers,
                            task_modules=("tasks",))
    return train.train(
        model=MODEL, mesh_config=mesh_config, data=data,
        optimizer=_optimizer(), train_steps=STEPS, model_dir=str(model_dir),
        checkpoint=train.CheckpointConfig(save_every_steps=2, keep=5),
        evaluation=evaluation or EVAL_OFF, log_every_steps=1, **kwargs)


def _final_state(summary, mesh_config=FSDP):
    """The run's train state at its last step, read back from its checkpoint onto
    `mesh_config` (train returns a summary, the state lives in the checkpoint)."""
    mesh, rules = launch.mesh_for(mesh_config)
    with checkpoints.CheckpointManager(os.path.join(summary.model_dir, "checkpoints")) as ckpt:
        graphdef, state, restored = train_state.init_or_restore(MODEL, _optimizer().tx, mesh,
                                                            rules, 0, ckpt)
    assert restored.step == summary.end_step
    return nnx.merge(graphdef, state)


def _params(summary):
    state = _final_state(summary)
    return {"/".join(map(str, path)): np.asarray(jax.device_get(v.get_value()))
            for path, v in nnx.to_flat_state(nnx.state(state.model, nnx.Param))}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, store):
    """The uninterrupted run every other run is compared with (with in-training eval)."""
    model_dir = tmp_path_factory.mktemp("straight")
    return _train(model_dir, store, evaluation=EVAL)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, store):
    """A run of the same schedule stopped (with a checkpoint) half-way."""
    model_dir = tmp_path_factory.mktemp("stopped")
    summary = _train(model_dir, store, stop_at_step=STEPS // 2)
    assert summary.end_step == STEPS // 2
    return summary


def _continue(stopped, model_dir, store, **kwargs):
    shutil.copytree(stopped.model_dir, model_dir)
    return _train(model_dir, store, **kwargs)


def test_exact_resume_gives_bitwise_the_same_params_and_losses(tmp_path, store, straight,
                                                               stopped):
    resumed = _continue(stopped, tmp_path / "run", store)
    assert resumed.start_step == STEPS // 2
    losses = stopped.train_losses + resumed.train_losses
    assert len(losses) == STEPS
    assert losses == straight.train_losses  # bitwise: same floats
    assert straight.train_losses[-1] < straight.train_losses[0]
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.slow
def test_resume_under_another_mesh_and_rule_preset(tmp_path, store, straight, stopped):
    resumed = _continue(stopped, tmp_path / "run", store, mesh_config=FSDP_TP,
                        stop_at_step=STEPS // 2 + 1)
    specs = [v.get_value().sharding.spec
             for _, v in nnx.to_flat_state(nnx.state(_final_state(resumed, FSDP_TP)))
             if hasattr(v.get_value(), "sharding")]
    assert any("tensor" in jax.tree.leaves(tuple(spec)) for spec in specs)  # really fsdp_tp
    assert resumed.train_losses == pytest.approx(
        straight.train_losses[STEPS // 2: STEPS // 2 + 1], abs=1e-5)


def test_standalone_eval_of_the_last_checkpoint_equals_the_in_training_eval(straight):
    result = evaluate.evaluate(model=MODEL, mesh_config=FSDP_TP, optimizer=_optimizer(),
                                 model_dir=straight.model_dir, evaluation=EVAL,
                                 mixture_or_task_name="code_causal", task_feature_lengths=LENGTHS)
    assert result["step"] == STEPS
    for domain, expected in straight.eval_end.items():
        got = result["results"][domain]
        assert got["tokens"] == expected["tokens"] and got["chars"] == expected["chars"]
        assert got["bpc"] == pytest.approx(expected["bpc"], rel=1e-5)
    start, end = straight.eval_start, straight.eval_end
    assert all(end[d]["bpc"] < start[d]["bpc"] for d in EVAL.bpc_tasks)


@pytest.mark.slow
def test_eval_over_checkpoints_writes_bpc_by_step_and_training_flops(straight, tmp_path):
    restore = evaluate.RestoreCheckpointConfig(mode="specific", steps=[6, 2],
                                                 include_init=True)
    result = evaluate.evaluate(model=MODEL, mesh_config=FSDP, optimizer=_optimizer(),
                                 model_dir=straight.model_dir, evaluation=EVAL,
                                 mixture_or_task_name="code_causal", restore=restore,
                                 batch_size=BATCH, task_feature_lengths=LENGTHS,
                                 output_dir=str(tmp_path))
    with open(result["files"]["json"]) as f:
        curve = json.load(f)
    points = curve["checkpoints"]
    assert [p["step"] for p in points] == [0, 2, 6]
    per_step = MODEL.train_flops_per_step(BATCH, LENGTHS)
    for p in points:
        assert p["train_flops"]["palm"] == pytest.approx(per_step.palm * p["step"])
        assert p["train_flops"]["maxtext"] == pytest.approx(per_step.maxtext * p["step"])
        assert set(p["results"]) == set(EVAL.bpc_tasks)
        assert all(np.isfinite(r["bpc"]) and r["bpc"] > 0 for r in p["results"].values())
    # step 0 is the run's own initialisation, step 6 its last checkpoint
    for label, point in (("eval_start", points[0]), ("eval_end", points[-1])):
        for domain, expected in getattr(straight, label).items():
            assert point["results"][domain]["bpc"] == pytest.approx(expected["bpc"], rel=1e-5)
    assert curve["eval"]["window"] == EVAL.window and curve["batch_size"] == BATCH
    assert curve["eval"]["bpc_tasks"] == dict(EVAL.bpc_tasks)
    with open(result["files"]["png"], "rb") as f:
        png = f.read()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_checkpoint_selection_modes_and_their_errors():
    steps = [300, 50, 100]
    assert evaluate.RestoreCheckpointConfig().select(steps, "d") == [300]
    assert evaluate.RestoreCheckpointConfig(mode="all").select(steps, "d") == [50, 100, 300]
    specific = evaluate.RestoreCheckpointConfig(mode="specific", steps=[300, 50])
    assert specific.select(steps, "d") == [50, 300]
    with pytest.raises(FileNotFoundError, match=r"names \[7\], not in d"):
        evaluate.RestoreCheckpointConfig(mode="specific", steps=[7]).select(steps, "d")
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        evaluate.RestoreCheckpointConfig(mode="all").select([], "d")
    with pytest.raises(ValueError, match="expected 'latest', 'all' or 'specific'"):
        evaluate.RestoreCheckpointConfig(mode="every")
    with pytest.raises(ValueError, match="steps go with mode 'specific'"):
        evaluate.RestoreCheckpointConfig(mode="all", steps=[5])


def test_outputs_in_the_model_dir(straight):
    model_dir = straight.model_dir
    assert os.path.isfile(os.path.join(model_dir, "config.gin"))
    steps = sorted(int(os.path.basename(p)) for p in
                   glob.glob(os.path.join(model_dir, "checkpoints", "*")) if
                   os.path.basename(p).isdigit())
    assert steps == [2, 4, 6]
    assert glob.glob(os.path.join(model_dir, "**", "events.out.tfevents*"), recursive=True)
    from t5x_like.training import metrics

    rows = metrics.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    for key in ("train/z_loss", "train/learning_rate", "train/grad_norm", "train/accuracy"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    # Speed is timed from the second step on: the first one compiles.
    assert "train/step_time_s" not in train_rows[0]
    for key in ("train/step_time_s", "train/tokens_per_s", "train/mfu/palm",
                "train/mfu/maxtext", "train/tflops_per_device/palm"):
        assert all(np.isfinite(r[key]) for r in train_rows[1:]), key
    assert not any(k.endswith("_sum") for r in train_rows for k in r)
    assert any("eval/code/bpc" in r for r in rows)


def test_a_store_prepared_otherwise_is_a_clear_error_and_is_kept(tmp_path, store, straight):
    before = {p: os.path.getmtime(os.path.join(store, p)) for p in os.listdir(store)}
    data = train.DataConfig(mixture_or_task_name="code_causal", task_feature_lengths=LENGTHS,
                            batch_size=BATCH, store_dir=store, seed=5)
    with pytest.raises(prepare.ManifestMismatchError,
                       match=r"seed: store has 0, requested 5.*train.DataConfig.store_dir"):
        train.train(model=MODEL, mesh_config=FSDP, data=data, optimizer=_optimizer(),
                    train_steps=STEPS, model_dir=str(tmp_path / "run"), evaluation=EVAL_OFF)
    assert {p: os.path.getmtime(os.path.join(store, p)) for p in os.listdir(store)} == before
    assert not (tmp_path / "run").exists()


def test_training_never_prepares_a_store_and_says_how_to(tmp_path):
    """A store_dir without a store is an error that names the prepare command; nothing
    is written (training streams unless a store is named)."""
    with pytest.raises(FileNotFoundError, match=r"python -m t5x_like.prepare .*--mixture "
                       r"code_causal --feature_lengths targets=64 --converter lm --seed 0 "
                       r"--num_examples 48 --out .*missing"):
        _train(tmp_path / "run", str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists() and not (tmp_path / "run").exists()


def test_an_eval_batch_the_mesh_cannot_split_is_a_clear_error(tmp_path, store):
    odd = dataclasses.replace(EVAL, batch_size=12)
    with pytest.raises(ValueError, match=r"EvalConfig.batch_size=12 is not a multiple of 8"):
        _train(tmp_path, store, evaluation=odd)


def test_microbatches_that_do_not_split_the_batch_are_a_clear_error(tmp_path, store):
    with pytest.raises(ValueError, match="BATCH_SIZE=8 must split into NUM_MICROBATCHES=3"):
        _train(tmp_path, store, num_microbatches=3)
    # 8 rows in 2 microbatches of 4 cannot be split over 8 devices either.
    with pytest.raises(ValueError, match=r"batch size 4 .* is not divisible by 8"):
        _train(tmp_path, store, num_microbatches=2)


def test_mesh_that_does_not_match_the_devices_is_a_clear_error(tmp_path, store):
    four = partitioning.MeshConfig(shape={"data": 1, "fsdp": 4, "tensor": 1}, rules="fsdp")
    with pytest.raises(ValueError, match="needs 4 devices but jax sees 8"):
        _train(tmp_path, store, mesh_config=four)


def test_a_model_smaller_than_the_tokenizer_is_refused_before_anything_starts(tmp_path):
    small = families.DecoderOnlyModel(dataclasses.replace(MODEL.cfg, vocab_size=4096))
    data = train.DataConfig(mixture_or_task_name="code_causal", task_feature_lengths=LENGTHS,
                            batch_size=BATCH)
    with pytest.raises(ValueError, match="vocab_size=4096 is smaller than the vocabulary's 8192"):
        train.train(model=small, mesh_config=FSDP, data=data, optimizer=_optimizer(),
                    train_steps=STEPS, model_dir=str(tmp_path / "run"), evaluation=EVAL_OFF)
    assert not (tmp_path / "run").exists()


USER_TASKS = '''
"""A user's own SeqIO task, written the way a T5X user writes one."""
import os

import seqio
from t5x_like.data import vocabulary

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = vocabulary.get_vocabulary()


@seqio.map_over_dataset
def lines_to_targets(line):
    return {"targets": line}


seqio.TaskRegistry.add(
    "my_notes_lm",
    source=seqio.TextLineDataSource({"train": os.path.join(HERE, "notes.txt")}),
    preprocessors=[
        lines_to_targets,
        seqio.preprocessors.tokenize,
        seqio.preprocessors.append_eos,
    ],
    output_features={"targets": seqio.Feature(VOCAB, add_eos=True)},
)
'''

USER_GIN = '''
include 'models/tiny_llama.gin'
include 'runs/pretrain.gin'
include 'meshes/cpu8_fsdp.gin'
import my_tasks

MIXTURE_OR_TASK_NAME = 'my_notes_lm'
TASK_FEATURE_LENGTHS = {'targets': 64}
TRAIN_STEPS = 3
WARMUP_STEPS = 1
BATCH_SIZE = 8
EVAL_EVERY_STEPS = 1000
evaluate.EvalConfig.enabled = False
train.DataConfig.data_workers = 1
'''


@pytest.mark.slow
def test_a_users_task_module_trains_through_the_cli(tmp_path):
    # Real prose: lines of the shipped README-like docs are not needed, the corpus is.
    with open(os.path.join(REPO, "data", "PROVENANCE.md"), encoding="utf-8") as f:
        lines = [line.strip() for line in f if len(line.strip()) > 20]
    (tmp_path / "notes.txt").write_text("\n".join(lines * 4) + "\n", encoding="utf-8")
    (tmp_path / "my_tasks.py").write_text(USER_TASKS)
    (tmp_path / "my_exp.gin").write_text(USER_GIN)
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "GLIBC_TUNABLES")}
    proc = subprocess.run(
        [sys.executable, "-m", "t5x_like.train", "--gin_file=my_exp.gin",
         f"--gin_search_paths={tmp_path}", "--gin.MODEL_DIR='run'"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 3/3" in proc.stdout + proc.stderr
    # the entry point restarted itself with huge pages for XLA's buffers (process.py)
    assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in proc.stderr
    config = (tmp_path / "run" / "config.gin").read_text()
    assert "import my_tasks" in config and "'my_notes_lm'" in config
    assert "layers.TransformerConfig.emb_dim = 128" in config  # the model it trained
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "gin_configs",
                                                             "experiments", "*.gin"))))
def test_every_experiment_parses_and_binds_a_model_and_a_mesh(path):
    gin.clear_config()
    try:
        launch.parse_gin([path], ["MODEL_DIR = '/tmp/unused'"])
        model = gin.query_parameter("%MODEL").scoped_configurable_fn()
        mesh_config = gin.query_parameter("%MESH_CONFIG").scoped_configurable_fn()
        rlhf = "runs/rlhf.gin" in open(path).read()  # an RLHF run: its policy's settings
        lengths = gin.query_parameter("%RLHF_TASK_FEATURE_LENGTHS" if rlhf
                                      else "%TASK_FEATURE_LENGTHS")
        if os.path.basename(path).startswith("demo_"):  # the demos run here, on 8 CPUs
            assert mesh_config.num_devices == 8 and mesh_config.rules == "fsdp"
        # Every experiment fits its own mesh (GPU ones too: checked on a device-free
        # mesh of the same sizes), each microbatch split over the data-parallel ways.
        rows = (gin.query_parameter("%PPO_MINIBATCH_SIZE") if rlhf else
                gin.query_parameter("%BATCH_SIZE") // gin.query_parameter("%NUM_MICROBATCHES"))
        partitioning.validate_for_mesh(
            model.make_module, memory.abstract_mesh(mesh_config.global_shape),
            mesh_config.rule_set(), batch_size=rows)
        assert model.data_form(lengths).name in ("encdec", "prefix_lm", "lm", "chat", "preference")
    finally:
        gin.clear_config()


MULTIPROCESS_GIN = '''
include 'models/tiny_llama.gin'
include 'runs/pretrain.gin'
include 'meshes/cpu8_fsdp.gin'

MIXTURE_OR_TASK_NAME = 'code_causal'
TASK_FEATURE_LENGTHS = {'targets': 64}
TRAIN_STEPS = 4
BATCH_SIZE = 8
WARMUP_STEPS = 1
EVAL_EVERY_STEPS = 1000
EVAL_WINDOW = 64
EVAL_STRIDE = 32
EVAL_MAX_TOKENS = 256
EVAL_TASKS = []
EVAL_BPC_TASKS = {'code': 'code_validation'}
evaluate.EvalConfig.batch_size = 8
train.DataConfig.store_dir = 'store'
train.train.log_every_steps = 1
'''
# The demo itself, streamed, cut to 4 steps and a small evaluation.
MULTIPROCESS_DEMO_FLAGS = [
    "--gin_file=experiments/demo_encdec_ul2.gin", "--gin.TRAIN_STEPS=4",
    "--gin.EVAL_MAX_TOKENS=256", "--gin.EVAL_EVERY_STEPS=1000",
    "--gin.EVAL_BPC_TASKS={'code': 'code_validation'}", "--gin.train.train.log_every_steps=1"]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("data", ["stream", "store"])
def test_two_processes_train_and_evaluate_like_one(tmp_path, data):
    """jax.distributed on localhost: 2 processes x 4 CPU devices == 1 process x 8. Streamed
    (the demo: each process makes its own shard of reka_mix_ul2) and from a store."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base = [sys.executable, "-m", "t5x_like.train", f"--gin_search_paths={tmp_path}"]
    if data == "store":
        (tmp_path / "mp.gin").write_text(MULTIPROCESS_GIN)
        _prepare(tmp_path / "store")
        base.append("--gin_file=mp.gin")
    else:
        base += MULTIPROCESS_DEMO_FLAGS
    port = _free_port()
    procs = [subprocess.Popen(
        base + ["--gin.MODEL_DIR='two'", f"--coordinator_address=localhost:{port}",
                "--process_count=2", f"--process_index={i}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    if data == "stream":  # each process streamed its own shard in its own worker
        assert all("2 shards (8 rows of each per step), 1 in this process's 1 worker" in out
                   for out in outputs), outputs[0][-3000:]
    one = subprocess.run(base + ["--gin.MODEL_DIR='one'"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert one.returncode == 0, one.stderr[-4000:]

    from t5x_like.training import metrics

    def scalars(run, key):
        return {r["step"]: r[key] for r in metrics.read_jsonl(str(tmp_path / run / "metrics.jsonl"))
                if key in r}

    losses_one, losses_two = scalars("one", "train/loss"), scalars("two", "train/loss")
    assert sorted(losses_one) == [1, 2, 3, 4]
    assert losses_two == pytest.approx(losses_one, abs=1e-5)
    assert scalars("two", "eval/code/bpc") == pytest.approx(scalars("one", "eval/code/bpc"),
                                                            rel=1e-5)
    # The data metrics count the rows of both processes: the same as one process's.
    assert scalars("two", "data/examples") == scalars("one", "data/examples")
    data_states = sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "4").rglob(
        "process_*.json"))
    assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]


SPIKE_GUARD = dict(spike_factor=3.0, spike_window=3, spike_rewind_steps=2,
                   spike_skip_batches=3, max_rewinds=2)


def _spiky(model_dir, store, **kwargs):
    """A run whose batch 3 (step 4) spikes (its loss and gradients × 1000): the guard goes
    back to checkpoint 2 and reads on from batch 5 (2 + 3 skipped)."""
    from t5x_like.training import guards

    return _train(model_dir, store, guard=guards.GuardConfig(**SPIKE_GUARD),
                  drills=guards.FaultDrills(spike_at_batches=(3,)), **kwargs)


@pytest.mark.slow
def test_a_loss_spike_rewinds_skips_and_keeps_exact_resume(tmp_path, store):
    spiky_store = store
    straight_spiky = _spiky(tmp_path / "a", spiky_store)
    assert straight_spiky.rewinds == 1 and straight_spiky.end_step == STEPS
    # Stopped before the spike and resumed: the same rewind (its checkpoint 3 is of
    # the abandoned path: moved aside), the same end, bitwise.
    stopped = _spiky(tmp_path / "b", spiky_store, stop_at_step=3)
    assert stopped.rewinds == 0 and stopped.end_step == 3
    resumed = _spiky(tmp_path / "b", spiky_store)
    assert resumed.rewinds == 1 and resumed.end_step == STEPS
    abandoned = os.listdir(tmp_path / "b" / "checkpoints" / "abandoned")
    assert [d.split("-")[0] for d in abandoned] == ["3"]
    a, b = _params(straight_spiky), _params(resumed)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # The spike's update is gone: without the drill the same data order ends elsewhere.
    assert straight_spiky.train_losses[-1] < 50


def _notes_lines_to_targets(dataset):
    return dataset.map(lambda line: {"targets": line})


@pytest.mark.slow
def test_resuming_on_data_that_no_longer_gives_the_same_examples_is_refused(tmp_path):
    """The corpus of a task changed and its store was prepared again: the saved data
    position would read other examples, so the resume is refused, naming the store."""
    import seqio

    from t5x_like.data import vocabulary

    notes = tmp_path / "notes.txt"
    # A module-level preprocessor: a nested one let autograph read this test's own body
    # in a full run (a TypeError from `tmp_path / "notes.txt"`).
    seqio.TaskRegistry.remove("t13_notes")
    seqio.TaskRegistry.add(
        "t13_notes", source=seqio.TextLineDataSource({"train": str(notes)}),
        preprocessors=[_notes_lines_to_targets, seqio.preprocessors.tokenize,
                       seqio.preprocessors.append_eos],
        output_features={"targets": seqio.Feature(vocabulary.get_vocabulary(), add_eos=True)})
    with open(os.path.join(REPO, "data", "PROVENANCE.md"), encoding="utf-8") as f:
        lines = [line.strip() for line in f if len(line.strip()) > 20]
    store_dir = tmp_path / "store"
    data = train.DataConfig(mixture_or_task_name="t13_notes", task_feature_lengths=LENGTHS,
                            batch_size=BATCH, store_dir=str(store_dir))

    def prepare_store():
        prepare.prepare("t13_notes", LENGTHS, "lm", STEPS * BATCH, 0, str(store_dir),
                        num_shards=1, workers=1)

    def run(**kwargs):
        return train.train(model=MODEL, mesh_config=FSDP, data=data, optimizer=_optimizer(),
                           train_steps=STEPS, model_dir=str(tmp_path / "run"),
                           checkpoint=train.CheckpointConfig(save_every_steps=2),
                           evaluation=EVAL_OFF, **kwargs)

    try:
        notes.write_text("\n".join(lines * 4) + "\n", encoding="utf-8")
        prepare_store()
        assert run(stop_at_step=2).end_step == 2
        notes.write_text("\n".join(reversed(lines * 4)) + "\n", encoding="utf-8")
        shutil.rmtree(store_dir)
        prepare_store()  # prepared again, from the new text
        with pytest.raises(ValueError, match=r"Cannot resume the data iterator.*store"):
            run()
    finally:
        seqio.TaskRegistry.remove("t13_notes")


# --------------------------------------------------------------------------- streamed data


def test_switching_a_run_from_its_store_to_streaming_is_refused(tmp_path, stopped):
    """The rows would differ (a store's are shuffled, a stream's are its shards' in order):
    the resume check names the changed field before any worker starts."""
    shutil.copytree(stopped.model_dir, tmp_path / "run")
    with pytest.raises(ValueError, match=r"data.source: checkpoint 'store', now 'stream'"):
        _train(tmp_path / "run", None)


def test_stream_shards_that_do_not_divide_the_batch_are_a_clear_error(tmp_path):
    data = train.DataConfig(mixture_or_task_name="code_causal", task_feature_lengths=LENGTHS,
                            batch_size=BATCH, stream_shards=3)
    with pytest.raises(ValueError, match=r"stream_shards=3 must divide BATCH_SIZE=8"):
        train.train(model=MODEL, mesh_config=FSDP, data=data, optimizer=_optimizer(),
                    train_steps=STEPS, model_dir=str(tmp_path / "run"), evaluation=EVAL_OFF)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """6 steps of streamed data (2 shards in 2 worker processes), never stopped."""
    return _train(tmp_path_factory.mktemp("streamed") / "run", None)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 1], ids=["same-workers", "one-worker"])
def test_streamed_runs_resume_bitwise_after_a_stop_whatever_the_worker_count(
        tmp_path, streamed, workers):
    stopped = _train(tmp_path / "run", None, stop_at_step=STEPS // 2)
    resumed = _train(tmp_path / "run", None, data_workers=workers)
    assert resumed.start_step == STEPS // 2
    assert stopped.train_losses + resumed.train_losses == streamed.train_losses  # bitwise
    assert streamed.train_losses[-1] < streamed.train_losses[0]
    a, b = _params(streamed), _params(resumed)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    from t5x_like.training import metrics

    rows = [r for r in metrics.read_jsonl(os.path.join(resumed.model_dir, "metrics.jsonl"))
            if "data/examples" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    last = rows[-1]  # what the resumed process read: its 3 steps of 8 rows
    # (code documents run to thousands of tokens: most rows hold one full 64-token piece)
    assert 0 <= last["data/padding_fraction"] < 0.5
    assert last["data/task_share/code_causal"] == last["data/task_rate/code_causal"] == 1.0
    assert last["data/task_examples/code_causal"] == last["data/examples"] >= 3 * BATCH


def test_how_the_model_is_computed_is_not_the_runs_identity():
    """A run saved before an implementation choice existed (or with another one) resumes:
    the identity holds what the model computes, not how."""
    import dataclasses

    data = train.DataConfig("code_causal", LENGTHS, BATCH, stream_shards=2)
    optimizer = optimizers.adamw_llama2(peak_lr=1e-3, warmup_steps=1, total_steps=STEPS)

    def identity(**changes):
        model = families.DecoderOnlyModel(dataclasses.replace(MODEL.cfg, **changes))
        return train._run_identity(model, data, optimizer, STEPS, 1, 0)

    base = identity()
    assert not {"attention_impl", "embed_lookup", "remat_policy", "scan_layers",
                "max_segments_per_row", "fused_loss", "loss_chunk_length"} & set(base["model"])
    assert identity(attention_impl="xla", embed_lookup="matmul", remat_policy="full",
                    max_segments_per_row=64, fused_loss=False, loss_chunk_length=32) == base
    assert identity(rope_theta=123.0) != base
