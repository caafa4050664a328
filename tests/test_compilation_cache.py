"""jax's persistent compilation cache under the run directory: the second start of the
same run reads its compiled programs back (jax's cache-hit monitoring events, counted
by launch.compile_timer and logged) and compiles faster; the setting lives only while a
run does, a user's own cache directory is kept, and None turns it off."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import pytest

from t5x_like import launch
from t5x_like.training import metrics

REPO = pathlib.Path(__file__).resolve().parent.parent

# A program whose compile takes long enough to see (a chain of 100 matmuls and sines).
SCRIPT = """
import logging, sys
import jax, jax.numpy as jnp
from t5x_like import launch
logging.basicConfig(level=logging.INFO, format="%(message)s")

def chain(x):
    for _ in range(100):
        x = jnp.sin(x @ x) + x
    return x

with launch.compilation_cache(sys.argv[1], sys.argv[2]):
    with launch.compile_timer("chain"):
        jax.jit(chain).lower(jax.ShapeDtypeStruct((32, 32), jnp.float32)).compile()
"""

_COMPILED = re.compile(r"(\S[^\n]*?) compiled in ([\d.]+)s \(persistent compilation cache: "
                       r"(\d+) hits?, (\d+) miss(?:es)?\)")


def _compiles(output: str) -> dict[str, tuple[float, int, int]]:
    """{what: (seconds, hits, misses)} of the compile_timer lines of a log."""
    return {m.group(1).split(": ")[-1]: (float(m.group(2)), int(m.group(3)), int(m.group(4)))
            for m in _COMPILED.finditer(output)}


def _env(**extra):
    """This environment without a cache directory of the user's or the tests' 8 CPU
    devices (the runs here take their mesh's count)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("JAX_COMPILATION_CACHE") and k != "XLA_FLAGS"}
    return {**env, **extra}


def test_a_second_process_reads_the_cache_and_compiles_faster(tmp_path):
    # Every program is written, however quick its compile (jax's default skips < 1 s).
    env = _env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", SCRIPT, "{model_dir}/cache",
                               str(tmp_path / "run")], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(_compiles(proc.stderr)["chain"])
        if not (tmp_path / "run" / "cache").exists():
            pytest.fail("no cache directory after the first run")
    (first, first_hits, first_misses), (second, second_hits, second_misses) = runs
    assert (first_hits, first_misses) == (0, 1) and (second_hits, second_misses) == (1, 0)
    assert any(p.name.startswith("jit_chain-") for p in (tmp_path / "run" / "cache").iterdir())
    assert second < first, runs


def test_a_cache_on_an_object_store_is_read_back(tmp_path_factory):
    """The cache of a run whose MODEL_DIR is a bucket (fake-gcs-server, as in
    tests/test_object_store.py): jax writes and reads it through etils.epath, with the
    path layer's backend (t5x_like.training.rundir, imported by train before it)."""
    object_store = pytest.importorskip("test_object_store")
    started = object_store.emulator.__wrapped__(tmp_path_factory)  # that module's fixture
    emulator = next(started)
    try:
        model_dir = f"gs://{object_store.BUCKET}/cached-{os.getpid()}"
        env = _env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **emulator)
        script = "import t5x_like.training.rundir\n" + SCRIPT
        runs = []
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-c", script, "{model_dir}/cache",
                                   model_dir], env=env, cwd=REPO, capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs.append(_compiles(proc.stderr)["chain"][1:])
        assert runs == [(0, 1), (1, 0)], proc.stderr[-3000:]
        from t5x_like.training import rundir

        names = [p.name for p in rundir.path(f"{model_dir}/cache").iterdir()]
        assert any(name.startswith("jit_chain-") for name in names), names
    finally:
        next(started, None)


def test_the_setting_lives_only_while_the_run_does(tmp_path):
    assert jax.config.jax_compilation_cache_dir is None
    with launch.compilation_cache("{model_dir}/compilation_cache", tmp_path / "run") as path:
        assert path == str(tmp_path / "run" / "compilation_cache")
        assert jax.config.jax_compilation_cache_dir == path
        assert not os.path.exists(path)  # made by jax at the first compile, not before
    assert jax.config.jax_compilation_cache_dir is None
    with launch.compilation_cache(None, tmp_path / "run") as path:  # turned off
        assert path is None and jax.config.jax_compilation_cache_dir is None
    # A run directory on an object store is passed to jax as it is (etils.epath there).
    with launch.compilation_cache("{model_dir}/cc", "gs://bucket/run/") as path:
        assert path == "gs://bucket/run/cc"


def test_a_users_own_cache_directory_is_kept(tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))  # JAX_COMPILATION_..
    try:
        with launch.compilation_cache("{model_dir}/compilation_cache", tmp_path / "run") as path:
            assert path == str(tmp_path / "mine")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    finally:
        jax.config.update("jax_compilation_cache_dir", None)


GIN = """
include 'models/tiny_llama.gin'
include 'runs/pretrain.gin'
include 'meshes/cpu1.gin'

MIXTURE_OR_TASK_NAME = 'code_causal'
TASK_FEATURE_LENGTHS = {'targets': 64}
TRAIN_STEPS = 4
BATCH_SIZE = 8
WARMUP_STEPS = 1
evaluate.EvalConfig.enabled = False
train.DataConfig.data_workers = 1
train.CheckpointConfig.save_every_steps = 2
"""


def _train(tmp_path, model_dir, *flags):
    proc = subprocess.run(
        [sys.executable, "-m", "t5x_like.train", f"--gin_file={tmp_path / 'exp.gin'}",
         f"--gin.MODEL_DIR='{model_dir}'", *flags],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def _losses(model_dir):
    return {r["step"]: r["train/loss"] for r in
            metrics.read_jsonl(str(model_dir / metrics.JSONL_NAME)) if "train/loss" in r}


@pytest.mark.slow
def test_a_restarted_run_reads_its_train_step_from_the_cache(tmp_path):
    """The default settings, a real run: stopped at step 2 (as a preemption would), then
    the same command again. Its train step comes from the cache in the run directory,
    faster than the first compile, and trains as a run without the cache does."""
    (tmp_path / "exp.gin").write_text(GIN)
    run = tmp_path / "run"
    first = _compiles(_train(tmp_path, run, "--gin.train.train.stop_at_step=2"))
    cache = run / "compilation_cache"
    entries = sorted(p.name.split("-")[0] for p in cache.iterdir())
    assert "jit_step_fn" in entries, entries
    shutil.copytree(run, tmp_path / "uncached", ignore=shutil.ignore_patterns(cache.name))
    second = _compiles(_train(tmp_path, run))
    assert first["train step"][1:] == (0, 1) and second["train step"][1:] == (1, 0)
    assert second["train step"][0] < first["train step"][0], (first, second)
    _train(tmp_path, tmp_path / "uncached", "--gin.train.train.compilation_cache_dir=None")
    assert not (tmp_path / "uncached" / cache.name).exists()
    assert _losses(run) == _losses(tmp_path / "uncached")  # bitwise, steps 1-4
    print(json.dumps({"train step compile s": {"first start": first["train step"][0],
                                               "second start": second["train step"][0]}}))
