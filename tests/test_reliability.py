"""Real training subprocesses stopped the ways runs stop on clusters: SIGTERM, kill -9 at
random moments (while the data workers start, mid-step, during an asynchronous save),
NaN steps, a damaged newest checkpoint. Each run streams its data (the default: grain
worker processes) and is compared, bitwise, with a run that was never disturbed:
parameters and optimizer state of the final checkpoint. After a kill -9 no worker may
outlive its trainer.

Slow (a dozen short runs of a tiny Llama on 8 CPU devices); CI runs them.
"""

import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5x_like.training import metrics

pytestmark = pytest.mark.slow

STEPS = 16
GIN = f"""
include 'models/tiny_llama.gin'
include 'runs/pretrain.gin'
include 'meshes/cpu8_fsdp.gin'

MIXTURE_OR_TASK_NAME = 'code_causal'
TASK_FEATURE_LENGTHS = {{'targets': 64}}
TRAIN_STEPS = {STEPS}
BATCH_SIZE = 8
WARMUP_STEPS = 2
evaluate.EvalConfig.enabled = False
train.CheckpointConfig.save_every_steps = 4
train.CheckpointConfig.keep = 10
train.train.log_every_steps = 1
"""


class Run:
    """One `python -m t5x_like.train` subprocess with its output collected as it comes."""

    def __init__(self, tmp, model_dir, *flags, new_session=False, env=None):
        env = {**{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")},
               **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "t5x_like.train", "--gin_file=exp.gin",
             f"--gin_search_paths={tmp}", f"--gin.MODEL_DIR='{model_dir}'", *flags],
            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=new_session)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for(self, text, timeout=600):
        deadline = time.time() + timeout
        while text not in self.output:
            assert self.proc.poll() is None, f"exited before {text!r}:\n{self.output[-3000:]}"
            assert time.time() < deadline, f"no {text!r} in {timeout}s:\n{self.output[-3000:]}"
            time.sleep(0.05)

    def finish(self, timeout=900):
        code = self.proc.wait(timeout)
        self._reader.join(30)
        return code

    def children(self):
        """Pids of this run's child processes (data workers, a resource tracker)."""
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                            out.append(int(entry))
                except (OSError, IndexError):
                    pass
        return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _final_state(model_dir, step=STEPS):
    state = ocp.StandardCheckpointer().restore(str(model_dir / "checkpoints" / str(step) / "state"))
    leaves = {}

    def walk(prefix, tree):
        if isinstance(tree, dict):
            for k, v in tree.items():
                walk(f"{prefix}/{k}", v)
        else:
            leaves[prefix] = np.asarray(tree)

    walk("", state)
    return leaves


def _assert_same_state(a_dir, b_dir, a_step=STEPS, b_step=STEPS):
    a, b = _final_state(a_dir, a_step), _final_state(b_dir, b_step)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _train_rows(model_dir):
    return [r for r in metrics.read_jsonl(model_dir / "metrics.jsonl") if "train/loss" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    (tmp / "exp.gin").write_text(GIN)
    run = Run(tmp, tmp / "straight")
    assert run.finish() == 0, run.output[-4000:]
    assert "leaked" not in run.output, run.output[-4000:]  # the workers' shared memory
    return tmp


def test_sigterm_saves_and_the_same_command_resumes_bitwise(straight, tmp_path):
    model_dir = tmp_path / "run"
    run = Run(straight, model_dir)
    run.wait_for("step  3/16")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.output[-4000:]
    stopped = max(int(s) for s in os.listdir(model_dir / "checkpoints") if s.isdigit())
    assert 3 <= stopped < STEPS
    assert (f"stopped by SIGTERM at step {stopped}: checkpoint saved in {model_dir}"
            in run.output) and "run the same command to resume" in run.output
    assert "leaked" not in run.output, run.output[-4000:]
    # Metric lines are complete for every step the checkpoint covers.
    assert [r["step"] for r in _train_rows(model_dir)] == list(range(1, stopped + 1))
    resumed = Run(straight, model_dir)
    assert resumed.finish() == 0, resumed.output[-4000:]
    assert f"resumed from {model_dir} at step {stopped}" in resumed.output
    _assert_same_state(straight / "straight", model_dir)


def test_ctrl_c_stops_cleanly_and_leaves_no_shared_memory(straight, tmp_path):
    """SIGINT to the trainer and its data workers, as Ctrl-C in a terminal sends it to
    the whole process group: a checkpoint, exit 0, no warning of leaked shared memory,
    and none of the run's blocks left behind."""
    model_dir = tmp_path / "run"
    run = Run(straight, model_dir, new_session=True)
    run.wait_for("step  2/16")
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.finish() == 0, run.output[-4000:]
    assert "stopped by SIGINT" in run.output and "leaked" not in run.output, run.output[-4000:]
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"t5x_like_{run.proc.pid}_")]


def test_nan_steps_leave_the_state_unchanged_and_stop_the_run(straight, tmp_path):
    model_dir = tmp_path / "run"
    # Batches 4..6 are steps 5..7; the guard stops after 3 in a row.
    run = Run(straight, model_dir, "--gin.guards.FaultDrills.nan_at_batches=[4, 5, 6]",
              "--gin.guards.GuardConfig.max_nonfinite_steps=3")
    assert run.finish() == 1, run.output[-4000:]
    assert "3 steps in a row (up to step 7) had a NaN or Inf" in run.output
    assert "Traceback" not in run.output
    rows = _train_rows(model_dir)
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["train/nonfinite_steps"] for r in rows] == [0, 0, 0, 0, 1, 1, 1]
    # The checkpoint written at the stop holds exactly the state after step 4.
    _assert_same_state(straight / "straight", model_dir, a_step=4, b_step=7)


def _truncate_biggest_array_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def test_a_damaged_newest_checkpoint_falls_back_and_ends_the_same(straight, tmp_path):
    model_dir = tmp_path / "run"
    run = Run(straight, model_dir, "--gin.train.train.stop_at_step=8")
    assert run.finish() == 0, run.output[-4000:]
    _truncate_biggest_array_file(model_dir / "checkpoints" / "8")
    resumed = Run(straight, model_dir)
    assert resumed.finish() == 0, resumed.output[-4000:]
    assert "checkpoints/8 is damaged and was moved to" in resumed.output
    assert f"resumed from {model_dir} at step 4" in resumed.output
    assert [d.split("-")[0] for d in os.listdir(model_dir / "checkpoints" / "damaged")] == ["8"]
    _assert_same_state(straight / "straight", model_dir)


def _kill_during_worker_start_up(run, model_dir):
    deadline = time.time() + 300
    while len(run.children()) < 2:  # the spawned data workers (and a resource tracker)
        assert run.proc.poll() is None and time.time() < deadline, run.output[-3000:]
        time.sleep(0.05)
    time.sleep(random.uniform(0.5, 3.0))  # importing TensorFlow, building the pipelines


def _kill_mid_step(run, model_dir):
    run.wait_for(f"step {random.randint(2, 10):>2}/16")
    time.sleep(random.uniform(0.0, 0.3))


def _kill_during_a_save(run, model_dir):
    checkpoints_dir = model_dir / "checkpoints"
    deadline = time.time() + 600
    while True:  # an orbax temporary step directory: a save is being written
        assert run.proc.poll() is None and time.time() < deadline, run.output[-3000:]
        if checkpoints_dir.is_dir() and any("tmp" in n for n in os.listdir(checkpoints_dir)):
            return
        time.sleep(0.002)


@pytest.mark.parametrize("moment", [_kill_during_worker_start_up, _kill_mid_step,
                                    _kill_during_a_save],
                         ids=["during-worker-start-up", "mid-step", "during-a-save"])
def test_kill_9_at_a_random_moment_then_the_same_command_ends_bitwise_the_same(
        straight, tmp_path, moment):
    model_dir = tmp_path / "run"
    flags = ["--gin.train.CheckpointConfig.save_every_steps=1"] if moment is _kill_during_a_save else []
    run = Run(straight, model_dir, *flags)
    moment(run, model_dir)
    children = run.children()
    assert children, "the data workers run as child processes"
    run.proc.kill()
    run.finish()
    deadline = time.time() + 60
    while any(_alive(pid) for pid in children):
        assert time.time() < deadline, f"still alive after the kill: {children}"
        time.sleep(0.2)
    resumed = Run(straight, model_dir, *flags)
    assert resumed.finish() == 0, resumed.output[-4000:]
    _assert_same_state(straight / "straight", model_dir)
