"""Tensor parallelism across processes: each process feeds the rows of the batch slices
its devices hold, so processes that are replicas of each other (one process per GPU,
`tensor` over GPUs) read the same rows, and a run gives the losses, evaluation and data
metrics of the same run in one process.

Real jax.distributed processes on localhost, CPU devices, the tiny Llama streamed from
the shipped code corpus.
"""

import os
import subprocess
import sys

import pytest

from test_train import _free_port

MESH_GIN = '''
from __gin__ import dynamic_registration
from t5x_like.model import partitioning

MESH_CONFIG = @partitioning.MeshConfig()
partitioning.MeshConfig.rules = 'fsdp_tp'
partitioning.MeshConfig.shape = %s
'''
RUN_GIN = '''
include 'models/tiny_llama.gin'
include 'runs/pretrain.gin'

MIXTURE_OR_TASK_NAME = 'code_causal'
TASK_FEATURE_LENGTHS = {'targets': 64}
TRAIN_STEPS = 3
BATCH_SIZE = 8
WARMUP_STEPS = 1
EVAL_EVERY_STEPS = 3
EVAL_WINDOW = 64
EVAL_STRIDE = 32
EVAL_MAX_TOKENS = 256
EVAL_TASKS = []
EVAL_BPC_TASKS = {'code': 'code_validation'}
train.train.log_every_steps = 1
include 'mesh.gin'
'''


def _run(tmp_path, name, mesh_shape, processes):
    """Trains RUN_GIN on `mesh_shape` in `processes` processes; their outputs."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    (tmp_path / "run.gin").write_text(RUN_GIN)
    (tmp_path / "mesh.gin").write_text(MESH_GIN % mesh_shape)
    base = [sys.executable, "-m", "t5x_like.train", f"--gin_search_paths={tmp_path}",
            "--gin_file=run.gin", f"--gin.MODEL_DIR='{name}'",
]
    port = _free_port()
    flags = [[] if processes == 1 else
             [f"--coordinator_address=localhost:{port}", f"--process_count={processes}",
              f"--process_index={i}"] for i in range(processes)]
    procs = [subprocess.Popen(base + f, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for f in flags]
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


def _scalars(tmp_path, run, key):
    from t5x_like.training import metrics

    return {r["step"]: r[key] for r in metrics.read_jsonl(str(tmp_path / run / "metrics.jsonl"))
            if key in r}


def _assert_same_run(tmp_path, one, many):
    losses = _scalars(tmp_path, one, "train/loss")
    assert sorted(losses) == [1, 2, 3]
    assert _scalars(tmp_path, many, "train/loss") == pytest.approx(losses, abs=1e-5)
    assert _scalars(tmp_path, many, "eval/code/bpc") == pytest.approx(
        _scalars(tmp_path, one, "eval/code/bpc"), rel=1e-5)
    # Replicas read the same rows, but only one of them counts them.
    for key in ("data/examples", "data/padding_fraction"):
        assert _scalars(tmp_path, many, key) == _scalars(tmp_path, one, key)


@pytest.mark.slow
def test_two_processes_with_tensor_over_them_train_like_one(tmp_path):
    """2 processes × 1 device, tensor 2: both processes hold every row."""
    outputs = _run(tmp_path, "two", "{'data': 1, 'fsdp': 1, 'tensor': 2}", 2)
    # Both stream the same 2 shards: each holds all 8 rows of every batch.
    assert all("2 shards (4 rows of each per step), 2 in this process's" in out
               for out in outputs), outputs[0][-3000:]
    _run(tmp_path, "one", "{'data': 1, 'fsdp': 1, 'tensor': 2}", 1)
    _assert_same_run(tmp_path, "one", "two")


@pytest.mark.slow
def test_four_processes_with_tensor_across_them_train_like_one(tmp_path):
    """4 processes × 2 devices, fsdp 2 × tensor 4: processes 0 and 1 hold the first half
    of every batch, 2 and 3 the second; tensor spans processes."""
    outputs = _run(tmp_path, "four", "{'data': 1, 'fsdp': 2, 'tensor': 4}", 4)
    # Two data-parallel groups of processes: one shard each by default.
    assert all("2 shards (4 rows of each per step), 1 in this process's 1 worker" in out
               for out in outputs), outputs[0][-3000:]
    _run(tmp_path, "one", "{'data': 1, 'fsdp': 2, 'tensor': 4}", 1)
    _assert_same_run(tmp_path, "one", "four")
