"""Launching from a scheduler's environment alone (SLURM in both layouts, Cloud TPU pods),
the start-up timeout, and what happens when a process of a multi-process run dies.

The first half checks the jax.distributed.initialize arguments that launch derives from
SLURM variables as srun sets them (captured, nothing started). The second half runs the
real thing on localhost: several CPU processes of the tiny training started with only
srun's variables, in both layouts, against one process with all the devices; a process
killed with SIGKILL; a relaunch that resumes bitwise; bad input. No SLURM, GPU or TPU
was available here: the variables are the ones srun documents (srun(1), "OUTPUT
ENVIRONMENT VARIABLES"), and jax's own cluster code (jax/_src/clusters/slurm_cluster.py)
reads the same ones.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from t5x_like import cluster, launch
from t5x_like.training import metrics

JOB_ID = 4242  # jax's SLURM port rule: 4242 % 4096 + 61440 = 61586


def srun_env(nodes: int, tasks_per_node: int, procid: int, job_id: int = JOB_ID,
             nodelist: str = "gpu[017-018]", gpus_per_node: int | None = 8,
             cuda_visible: str | None = "0,1,2,3,4,5,6,7") -> dict[str, str]:
    """The SLURM variables srun gives task `procid` of a step of nodes x tasks_per_node
    tasks (block distribution: consecutive tasks share a node)."""
    tasks = nodes * tasks_per_node
    per_node = f"{tasks_per_node}(x{nodes})" if nodes > 1 else str(tasks_per_node)
    env = {"SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_STEP_ID": "0",
           "SLURM_STEPID": "0", "SLURM_PROCID": str(procid), "SLURM_NTASKS": str(tasks),
           "SLURM_NPROCS": str(tasks), "SLURM_STEP_NUM_TASKS": str(tasks),
           "SLURM_LOCALID": str(procid % tasks_per_node),
           "SLURM_NODEID": str(procid // tasks_per_node), "SLURM_STEP_NODELIST": nodelist,
           "SLURM_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist,
           "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
           "SLURM_STEP_TASKS_PER_NODE": per_node, "SLURM_TASKS_PER_NODE": per_node}
    if gpus_per_node is not None:
        env["SLURM_GPUS_ON_NODE"] = str(gpus_per_node)
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    return env


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No SLURM/TPU/jax launch variables from the machine running the tests, and no GPU
    seen by the driver's /proc listing (a CI machine with GPUs keeps these tests the same)."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "TPU_", "MEGASCALE_")) or name in (
                "CUDA_VISIBLE_DEVICES", "JAX_COORDINATOR_PORT", "JAX_COORDINATOR_ADDRESS",
                "JAX_LOCAL_DEVICE_IDS"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(cluster, "NVIDIA_GPUS_DIR", str(tmp_path / "no-nvidia"))
    return monkeypatch


def _set(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)


# ---------------------------------------------------------------------------
# The derived arguments


def test_one_process_per_node_drives_all_of_its_gpus(clean_env):
    _set(clean_env, srun_env(nodes=2, tasks_per_node=1, procid=1))
    assert cluster.slurm_step_tasks() == 2
    assert cluster.distributed_arguments() == dict(
        coordinator_address="gpu017:61586", num_processes=2, process_id=1,
        local_device_ids=[0, 1, 2, 3, 4, 5, 6, 7], cluster_detection_method="deactivate")
    # what jax's own SLURM detection would have given this process: one GPU
    from jax._src.clusters import cluster as jax_clusters

    detected = jax_clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, None)
    assert detected == ("gpu017:61586", 2, 1, [0])


def test_one_process_per_gpu_drives_the_gpu_of_its_local_id(clean_env):
    _set(clean_env, srun_env(nodes=2, tasks_per_node=8, procid=11))
    assert cluster.distributed_arguments() == dict(
        coordinator_address="gpu017:61586", num_processes=16, process_id=11,
        local_device_ids=[3], cluster_detection_method="deactivate")


@pytest.mark.parametrize("tasks_per_node,procid,cuda_visible,expected", [
    (8, 3, "3", [0]),                   # --gpu-bind: the task sees its own GPU only
    (2, 1, "0,1,2,3,4,5,6,7", [4, 5, 6, 7]),  # 2 tasks share the node's 8 GPUs
    (2, 1, "4,5,6,7", [0, 1, 2, 3]),    # --gpus-per-task=4: its own four
    (1, 0, "0,1,2,3", [0, 1, 2, 3]),    # a node of 4 GPUs (SLURM_GPUS_ON_NODE says 8: the
])                                      # task sees fewer, so it drives what it sees)
def test_gpus_bound_or_shared(clean_env, tasks_per_node, procid, cuda_visible, expected):
    _set(clean_env, srun_env(nodes=1, tasks_per_node=tasks_per_node, procid=procid,
                             cuda_visible=cuda_visible))
    assert cluster.distributed_arguments()["local_device_ids"] == expected


def test_gpus_counted_without_cuda_visible_devices(clean_env, tmp_path):
    _set(clean_env, srun_env(nodes=2, tasks_per_node=1, procid=0, gpus_per_node=None,
                             cuda_visible=None))
    gpus = tmp_path / "nvidia-gpus"
    for bus in ("0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0", "0000:5d:00.0"):
        (gpus / bus).mkdir(parents=True)
    clean_env.setattr(cluster, "NVIDIA_GPUS_DIR", str(gpus))
    assert cluster.distributed_arguments()["local_device_ids"] == [0, 1, 2, 3]


def test_a_cpu_host_uses_its_cpu_devices(clean_env):
    _set(clean_env, srun_env(nodes=2, tasks_per_node=1, procid=1, nodelist="localhost",
                             gpus_per_node=None, cuda_visible=None))
    assert cluster.distributed_arguments()["local_device_ids"] is None  # all it has
    _set(clean_env, srun_env(nodes=1, tasks_per_node=4, procid=2, nodelist="localhost",
                             gpus_per_node=None, cuda_visible=None))
    assert cluster.distributed_arguments()["local_device_ids"] == [2]  # as jax does


def test_explicit_flags_and_ids_win_over_slurm(clean_env):
    _set(clean_env, srun_env(nodes=2, tasks_per_node=8, procid=11))
    assert cluster.distributed_arguments("host0:1234", 2, 1) == dict(
        coordinator_address="host0:1234", num_processes=2, process_id=1,
        local_device_ids=None, cluster_detection_method="deactivate")
    assert cluster.distributed_arguments(local_device_ids=[6, 7])["local_device_ids"] == [6, 7]
    clean_env.setenv("JAX_COORDINATOR_PORT", "5555")  # jax's own override of the port
    assert cluster.distributed_arguments()["coordinator_address"] == "gpu017:5555"
    with pytest.raises(ValueError, match="Give all of --coordinator_address"):
        cluster.distributed_arguments("host0:1234", None, 1)


def test_outside_slurm_jax_detects_the_cluster_tpu_pods_included(clean_env):
    # A Cloud TPU VM of a pod (GKE's variables; on GCE jax asks the metadata server):
    # one process per host, jax.distributed.initialize() with no addresses.
    for name, value in {"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3",
                        "TPU_WORKER_ID": "2", "TPU_ACCELERATOR_TYPE": "v5p-32"}.items():
        clean_env.setenv(name, value)
    assert cluster.slurm_step_tasks() == 0  # not joined unless --multiprocess
    assert cluster.distributed_arguments() == dict(local_device_ids=None)


def test_only_a_step_of_several_tasks_joins_by_itself(clean_env):
    env = srun_env(nodes=1, tasks_per_node=1, procid=0)
    _set(clean_env, env)
    assert cluster.slurm_step_tasks() == 1  # srun -n 1: a single process, nothing to join
    # The batch script itself (sbatch runs it outside any step: no SLURM_STEP_NODELIST)
    _set(clean_env, srun_env(nodes=2, tasks_per_node=8, procid=0))
    clean_env.delenv("SLURM_STEP_NODELIST")
    assert cluster.slurm_step_tasks() == 0


def _captured_initialize(monkeypatch, argv_extra, gin_dir):
    """launch.run as far as jax.distributed.initialize, whose arguments are returned."""
    captured = {}

    class Joined(Exception):
        pass

    def initialize(**kwargs):
        captured.update(kwargs)
        raise Joined

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    (gin_dir / "x.gin").write_text("")
    with pytest.raises(Joined):
        launch.run("unused", ["--gin_file=x.gin", f"--gin_search_paths={gin_dir}",
                              *argv_extra])
    return captured


def test_run_joins_under_srun_with_the_timeouts(clean_env, tmp_path):
    port = _free_port()
    _set(clean_env, srun_env(nodes=2, tasks_per_node=1, procid=0, nodelist="localhost"))
    clean_env.setenv("JAX_COORDINATOR_PORT", str(port))
    got = _captured_initialize(clean_env, ["--distributed_timeout=42", "--heartbeat_timeout=7"],
                               tmp_path)
    assert got == dict(coordinator_address=f"localhost:{port}", num_processes=2, process_id=0,
                       local_device_ids=list(range(8)), cluster_detection_method="deactivate",
                       initialization_timeout=42, heartbeat_timeout_seconds=7)


def test_run_with_multiprocess_on_a_tpu_pod_passes_no_addresses(clean_env, tmp_path):
    got = _captured_initialize(clean_env, ["--multiprocess"], tmp_path)
    assert got == dict(local_device_ids=None, initialization_timeout=300,
                       heartbeat_timeout_seconds=100)


# ---------------------------------------------------------------------------
# Bad input: one paragraph each


@pytest.mark.parametrize("change,problem", [
    ({"SLURM_PROCID": "16"}, "SLURM_PROCID 16 is not below SLURM_NTASKS 16"),
    ({"SLURM_STEP_TASKS_PER_NODE": "8,4"}, "adds up to 12 tasks, not SLURM_NTASKS 16"),
    ({"SLURM_LOCALID": "8"}, "SLURM_LOCALID 8 is not below the 8 tasks of its node"),
    ({"SLURM_NODEID": "2"}, "SLURM_NODEID 2 is not one of the step's 2 nodes"),
    ({"SLURM_STEP_NUM_TASKS": "8"}, "SLURM_STEP_NUM_TASKS and SLURM_NTASKS differ"),
    ({"SLURM_STEP_TASKS_PER_NODE": "eight"}, "is not a SLURM task list such as 8\\(x2\\)"),
    ({"SLURM_STEP_TASKS_PER_NODE": "3(x2)", "SLURM_NTASKS": "6", "SLURM_STEP_NUM_TASKS": "6",
      "SLURM_PROCID": "4", "SLURM_LOCALID": "1"},
     "3 tasks on this node cannot share its 8 GPUs equally"),
])
def test_inconsistent_slurm_variables_are_one_paragraph(clean_env, tmp_path, capsys, change,
                                                          problem):
    _set(clean_env, {**srun_env(nodes=2, tasks_per_node=8, procid=11), **change})
    with pytest.raises(ValueError, match=problem):
        cluster.distributed_arguments()
    (tmp_path / "x.gin").write_text("")
    with pytest.raises(SystemExit) as stop:
        launch.run("unused", ["--gin_file=x.gin", f"--gin_search_paths={tmp_path}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "inconsistent" in err and "Start the entry point with srun" in err
    assert len(err.strip().splitlines()) == 2  # the paragraph, then the --debug hint


def test_local_device_ids_that_do_not_fill_the_mesh_are_refused(monkeypatch):
    monkeypatch.setattr(cluster, "_joined", {"local_device_ids": [0]})
    monkeypatch.setattr(cluster._jax_distributed.global_state, "num_processes", 2)
    with pytest.raises(ValueError, match=r"local devices \[0\] \(1 of them\), so the 2 "
                                         r"processes hold 2 devices, but the mesh needs 4"):
        cluster.check_local_devices(4)
    cluster.check_local_devices(2)


def test_bad_local_device_ids_flag(clean_env, tmp_path, capsys):
    (tmp_path / "x.gin").write_text("")
    with pytest.raises(SystemExit):
        launch.run("unused", ["--gin_file=x.gin", f"--gin_search_paths={tmp_path}",
                              "--coordinator_address=localhost:1", "--process_count=2",
                              "--process_index=1", "--local_device_ids=zero"])
    assert "--local_device_ids='zero': expected GPU ordinals" in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_a_coordinator_port_in_use_is_one_paragraph(clean_env):
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve the multi-process run's coordinator "
                                          f"on port {port}"):
            cluster.initialize_distributed(f"localhost:{port}", 2, 0, timeout_s=5)


def test_an_unreachable_coordinator_is_one_paragraph_after_the_timeout(clean_env):
    port = _free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(OSError, match=f"Process 1 could not reach the coordinator "
                                      f"localhost:{port} of its multi-process run within 2 s"):
        cluster.initialize_distributed(f"localhost:{port}", 2, 1, timeout_s=2)
    assert 2 <= time.monotonic() - start < 10
    assert not cluster._jax_distributed.global_state.client  # jax was never started


# ---------------------------------------------------------------------------
# Real multi-process runs on localhost: CPU processes started with srun's variables only

STEPS, BATCH = 40, 8
HEARTBEAT_S = 30  # the runs' --heartbeat_timeout; the default is cluster.HEARTBEAT_TIMEOUT_S
CLUSTER_GIN = f'''
from __gin__ import dynamic_registration
from t5x_like.evaluation import evaluate
from t5x_like.model import partitioning
from t5x_like.training import train
include 'models/tiny_llama.gin'
include 'runs/pretrain.gin'

MESH_CONFIG = @partitioning.MeshConfig()
partitioning.MeshConfig.shape = {{'data': 1, 'fsdp': 4, 'tensor': 1}}
partitioning.MeshConfig.rules = 'fsdp'

MIXTURE_OR_TASK_NAME = 'code_causal'
TASK_FEATURE_LENGTHS = {{'targets': 64}}
TRAIN_STEPS = {STEPS}
BATCH_SIZE = {BATCH}
WARMUP_STEPS = 1
EVAL_EVERY_STEPS = 1000
EVAL_WINDOW = 64
EVAL_STRIDE = 32
EVAL_MAX_TOKENS = 256
EVAL_TASKS = []
EVAL_BPC_TASKS = {{'code': 'code_validation'}}
evaluate.EvalConfig.batch_size = 8
train.DataConfig.store_dir = 'store'
train.train.log_every_steps = 1
train.CheckpointConfig.save_every_steps = 4
'''


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory):
    """A prepared store and the gin file of a 40-step tiny Llama on a 4-device FSDP mesh."""
    from t5x_like.data import prepare

    root = tmp_path_factory.mktemp("cluster")
    prepare.prepare("code_causal", {"targets": 64}, "lm", (STEPS + 20) * BATCH, 0,
                    str(root / "store"), num_shards=1, workers=1, task_modules=("tasks",))
    (root / "cluster.gin").write_text(CLUSTER_GIN)
    return root


def _slurm_job_id():
    """A job id whose coordinator port (jax: job id % 4096 + 61440) is free now."""
    for port in range(61440 + 512, 65536):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port - 61440 + 4096 * 5
    raise RuntimeError("no free port in jax's SLURM range")


def _command(root, model_dir, *flags):
    return [sys.executable, "-m", "t5x_like.train", f"--gin_search_paths={root}",
            "--gin_file=cluster.gin", f"--gin.MODEL_DIR='{model_dir}'", *flags]


def _base_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "TPU_")) and k not in (
               "XLA_FLAGS", "CUDA_VISIBLE_DEVICES")}
    env["PYTHONPATH"] = os.pathsep.join(  # the tests' task modules (tasks.py)
        p for p in (os.path.dirname(__file__), env.get("PYTHONPATH")) if p)
    return env


def srun(root, model_dir, nodes, tasks_per_node, *flags, job_id=None):
    """Starts the tasks of a step as srun would on `nodes` nodes (all on localhost), each
    writing to its own log file (a pipe nobody reads while waiting for another process
    could fill and stop the run)."""
    job_id = job_id or _slurm_job_id()
    procs = []
    for i in range(nodes * tasks_per_node):
        log = root / f"{model_dir}.{len(list(root.glob(f'{model_dir}.*.log')))}.log"
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                _command(root, model_dir, *flags),
                env={**_base_env(), **srun_env(nodes, tasks_per_node, i, job_id=job_id,
                                                nodelist="localhost", gpus_per_node=None,
                                                cuda_visible=None)},
                cwd=root, stdout=out, stderr=subprocess.STDOUT))
        procs[-1].log = log
    return procs


def _finish(procs, timeout=1500):
    for p in procs:
        p.wait(timeout=timeout)
    return [p.returncode for p in procs], [p.log.read_text() for p in procs]


def _scalars(run_dir, key):
    """{step: value}, the last record of each step (a resumed run rewrites a few)."""
    return {r["step"]: r[key] for r in metrics.read_jsonl(str(run_dir / "metrics.jsonl"))
            if key in r}


@pytest.fixture(scope="module")
def one_process(cluster_dir):
    """The reference: 1 process x 4 CPU devices."""
    done = subprocess.run(_command(cluster_dir, "one"), env=_base_env(), cwd=cluster_dir,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    return cluster_dir / "one"


@pytest.fixture(scope="module")
def per_node(cluster_dir):
    """2 nodes x 1 task (one process per node) x 2 CPU devices each, SLURM's variables only."""
    codes, outputs = _finish(srun(cluster_dir, "per_node", 2, 1,
                                  f"--heartbeat_timeout={HEARTBEAT_S}"))
    assert codes == [0, 0], outputs[0][-4000:] + outputs[1][-4000:]
    for i, out in enumerate(outputs):
        assert f"process {i} of 2 joins the run at localhost:" in out
        assert "(local devices: all;" in out  # every device of its node, not one
    return cluster_dir / "per_node"


def _same_losses_and_bpc(run, reference):
    losses = _scalars(run, "train/loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == pytest.approx(_scalars(reference, "train/loss"), abs=1e-5)
    assert _scalars(run, "eval/code/bpc") == pytest.approx(
        _scalars(reference, "eval/code/bpc"), rel=1e-5)
    assert _scalars(run, "data/examples") == _scalars(reference, "data/examples")


@pytest.mark.slow
def test_one_process_per_node_from_slurm_variables_trains_like_one_process(per_node,
                                                                         one_process):
    _same_losses_and_bpc(per_node, one_process)


@pytest.mark.slow
def test_one_process_per_gpu_from_slurm_variables_trains_like_one_process(cluster_dir,
                                                                        one_process):
    """2 nodes x 2 tasks (one process per device), 1 CPU device each."""
    codes, outputs = _finish(srun(cluster_dir, "per_gpu", 2, 2))
    assert codes == [0] * 4, "\n".join(out[-3000:] for out in outputs)
    for i, out in enumerate(outputs):
        assert f"process {i} of 4 joins the run at localhost:" in out
        assert f"(local devices: [{i % 2}];" in out  # its SLURM_LOCALID
    _same_losses_and_bpc(cluster_dir / "per_gpu", one_process)


@pytest.mark.slow
def test_a_killed_process_stops_the_other_within_the_heartbeat_and_the_relaunch_resumes_bitwise(
        cluster_dir, per_node):
    job_id = _slurm_job_id()
    # With the defaults: a multi-process run keeps no persistent compilation cache unless
    # it names one (a relaunch reading a 2-process CPU run's cache hung in its first
    # cross-process computation).
    procs = srun(cluster_dir, "killed", 2, 1, f"--heartbeat_timeout={HEARTBEAT_S}",
                 job_id=job_id)
    checkpoint = cluster_dir / "killed" / "checkpoints" / "4"
    deadline = time.monotonic() + 900
    while (not (checkpoint / "commit_success.txt").is_file() and time.monotonic() < deadline
           and all(p.poll() is None for p in procs)):
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        procs[0].wait(timeout=HEARTBEAT_S + 60)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail(f"process 0 still ran {HEARTBEAT_S + 60} s after process 1 was killed")
    took = time.monotonic() - killed_at
    procs[1].wait()
    survivor = procs[0].log.read_text()
    assert procs[1].returncode == -signal.SIGKILL, "the run ended before the kill"
    assert procs[0].returncode != 0, survivor[-3000:]
    # The bound: the heartbeat timeout (plus the coordination service's polling and this
    # loaded 2-core machine's slack); on localhost a broken collective is often faster.
    assert took < HEARTBEAT_S + 20, (took, survivor[-3000:])
    print(f"process 0 exited {procs[0].returncode} {took:.1f} s after process 1's SIGKILL")
    done = max(int(p.name) for p in checkpoint.parent.iterdir() if p.name.isdigit())
    assert 4 <= done < STEPS

    codes, outputs = _finish(srun(cluster_dir, "killed", 2, 1, job_id=job_id))
    assert codes == [0, 0], outputs[0][-4000:]
    losses, unbroken = _scalars(cluster_dir / "killed", "train/loss"), _scalars(per_node,
                                                                               "train/loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == unbroken  # bitwise, every step, before the kill and after the relaunch


@pytest.mark.slow
def test_local_device_ids_that_do_not_fill_the_mesh_stop_every_process_writing_nothing(
        cluster_dir):
    """Two real processes, each told to drive one device, for a mesh of 4: one paragraph
    each, exit 2, no run directory."""
    port = _free_port()
    procs = [subprocess.Popen(
        _command(cluster_dir, "too_few", f"--coordinator_address=localhost:{port}",
                 "--process_count=2", f"--process_index={i}", "--local_device_ids=0"),
        env=_base_env(), cwd=cluster_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    errors = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errors[0][-3000:]
    for err in errors:
        assert ("error: This process drives local devices [0] (1 of them), so the 2 processes "
                "hold 2 devices, but the mesh needs 4") in err, err[-3000:]
        assert "Traceback" not in err
    assert not (cluster_dir / "too_few").exists()
