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

from test_cluster_launch import _slurm_job_id, srun_env
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


def _run(tmp_path, name, mesh_shape, processes, slurm_nodes=None):
    """Trains RUN_GIN on `mesh_shape` in `processes` processes, joined by explicit flags,
    or with `slurm_nodes` from the variables srun gives its tasks alone (processes /
    slurm_nodes tasks per node, all on localhost); their outputs."""
    env = {k: v for k, v in os.environ.items()
           if k != "XLA_FLAGS" and not k.startswith(("SLURM_", "JAX_COORDINATOR"))}
    (tmp_path / "run.gin").write_text(RUN_GIN)
    (tmp_path / "mesh.gin").write_text(MESH_GIN % mesh_shape)
    base = [sys.executable, "-m", "t5x_like.train", f"--gin_search_paths={tmp_path}",
            "--gin_file=run.gin", f"--gin.MODEL_DIR='{name}'"]
    port, job_id = _free_port(), _slurm_job_id()
    if slurm_nodes:
        launches = [([], {**env, **srun_env(slurm_nodes, processes // slurm_nodes, i,
                                            job_id=job_id, nodelist="localhost",
                                            gpus_per_node=None, cuda_visible=None)})
                    for i in range(processes)]
    else:
        launches = [([] if processes == 1 else
                     [f"--coordinator_address=localhost:{port}",
                      f"--process_count={processes}", f"--process_index={i}"], env)
                    for i in range(processes)]
    procs = [subprocess.Popen(base + flags, cwd=tmp_path, env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for flags, e in launches]
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


def _train_like_one(tmp_path, stem, mesh, processes, slurm_nodes, shards_line):
    """The run of `processes` processes, joined by flags and from srun's variables as
    `slurm_nodes` nodes, each equal to one process's run; every process logs
    `shards_line` (the stream shards it makes)."""
    for name, nodes in ((stem, None), (f"{stem}_slurm", slurm_nodes)):
        outputs = _run(tmp_path, name, mesh, processes, slurm_nodes=nodes)
        assert all(shards_line in out for out in outputs), outputs[0][-3000:]
    _run(tmp_path, "one", mesh, 1)
    _assert_same_run(tmp_path, "one", stem)
    _assert_same_run(tmp_path, "one", f"{stem}_slurm")


@pytest.mark.slow
def test_two_processes_with_tensor_over_them_train_like_one(tmp_path):
    """2 processes × 1 device, tensor 2: both processes hold every row. Joined by flags,
    and from srun's variables as one node's two tasks (one process per GPU)."""
    # Both stream the same 2 shards: each holds all 8 rows of every batch.
    _train_like_one(tmp_path, "two", "{'data': 1, 'fsdp': 1, 'tensor': 2}", 2, 1,
                    "2 shards (4 rows of each per step), 2 in this process's")


@pytest.mark.slow
def test_four_processes_with_tensor_across_them_train_like_one(tmp_path):
    """4 processes × 2 devices, fsdp 2 × tensor 4: processes 0 and 1 hold the first half
    of every batch, 2 and 3 the second; tensor spans processes. Joined by flags, and from
    srun's variables as four nodes of one task each (one process per node)."""
    # Two data-parallel groups of processes: one shard each by default.
    _train_like_one(tmp_path, "four", "{'data': 1, 'fsdp': 2, 'tensor': 4}", 4, 4,
                    "2 shards (4 rows of each per step), 1 in this process's 1 worker")
