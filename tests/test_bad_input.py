"""Every case of the "what happens when ..." bad-input table (docs/OPERATIONS.md): the
command exits with one clear paragraph (no traceback) naming the problem, and MODEL_DIR
is unchanged byte for byte (or, for a new one, not created).

In-process through `launch.run`, the code path of `python -m t5x_like.train`, on a small
finished run made once per module.
"""

import os
import shutil

import gin
import pytest

from t5x_like import launch

GIN = """
include 'models/tiny_llama.gin'
include 'runs/pretrain.gin'
include 'meshes/cpu8_fsdp.gin'

MIXTURE_OR_TASK_NAME = 'code_causal'
TASK_FEATURE_LENGTHS = {'targets': 64}
TRAIN_STEPS = 2
BATCH_SIZE = 8
WARMUP_STEPS = 1
evaluate.EvalConfig.enabled = False
train.DataConfig.data_workers = 1
train.CheckpointConfig.save_every_steps = 2
"""


def _run(tmp, model_dir, *flags):
    gin.clear_config()
    try:
        return launch.run("t5x_like.training.train.train", [
            f"--gin_file={tmp / 'exp.gin'}", f"--gin.MODEL_DIR='{model_dir}'", *flags])
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished (streamed) run, and a store prepared with the run's settings."""
    from t5x_like.data import prepare

    tmp = tmp_path_factory.mktemp("bad_input")
    (tmp / "exp.gin").write_text(GIN)
    summary = _run(tmp, tmp / "run")
    assert summary.end_step == 2
    prepare.prepare("code_causal", {"targets": 64}, "lm", 16, 0, str(tmp / "store"),
                    num_shards=1, workers=1, task_modules=("tasks",))
    return tmp


def _snapshot(directory):
    if not os.path.exists(directory):
        return None
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


CASES = {
    # name: (flags, expected message, on a new MODEL_DIR instead of the finished run)
    "misspelt macro": (["--gin.TRAIN_STPES=6"],
                       r"TRAIN_STPES, which nothing in the config uses.*TRAIN_STEPS", False),
    "misspelt parameter": (["--gin.train.train.log_every=5"], r"log_every", False),
    "unknown mixture": (["--gin.MIXTURE_OR_TASK_NAME='code_casual'"],
                        r"No SeqIO task or mixture named 'code_casual'.*'code_causal'", True),
    "UL2 targets too short": (
        ["--gin.MIXTURE_OR_TASK_NAME='code_ul2'",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}"],
        r"'code_ul2'.*denoiser 'x1'.*needs a targets length of at least", True),
    "mesh does not match the devices": (["--gin_file=meshes/cpu1.gin"],
                                        r"needs 1 devices but jax sees 8", False),
    "batch the mesh cannot split": (["--gin.BATCH_SIZE=12"],
                                    r"batch size 12 .* not divisible by 8", False),
    "microbatches do not split the batch": (["--gin.NUM_MICROBATCHES=3"],
                                            r"BATCH_SIZE=8 must split into NUM_MICROBATCHES=3",
                                            False),
    "eval batch the mesh cannot split": (
        ["--gin.evaluate.EvalConfig.enabled=True",
         "--gin.evaluate.EvalConfig.batch_size=12"],
        r"EvalConfig.batch_size=12 is not a multiple of 8", False),
    "resume with another architecture of the same shapes": (
        ["--gin.layers.TransformerConfig.rope_theta=10000.0"],
        r"model.rope_theta: checkpoint 500000.0, now 10000.0.*allow_resume_changes", False),
    "resume with a longer schedule": (["--gin.TRAIN_STEPS=4"],
                                      r"schedule.train_steps: checkpoint 2, now 4", False),
    "a store prepared with other settings": (
        ["--gin.DATA_SEED=5", "--gin.train.DataConfig.store_dir='{finished}/store'"],
        r"seed: store has 0, requested 5", True),
    "fine-tuning from another architecture": (
        ["--gin.train.train.initial_checkpoint='{finished}/run'",
         "--gin.layers.TransformerConfig.mlp_dim=256"],
        r"decoder.*mlp.*checkpoint shape \(2, 128, 384\) != model shape \(2, 128, 256\)", True),
    "a store_dir with no store (training never prepares one)": (
        ["--gin.train.DataConfig.store_dir='{finished}/nowhere'"],
        r"holds no complete prepared store.*python -m t5x_like.prepare --task_module tasks "
        r"--mixture code_causal", True),
    "UL2 inputs with more spans than the vocabulary has sentinels": (
        ["--gin.MIXTURE_OR_TASK_NAME='code_ul2'",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 4096, 'targets': 4096}"],
        r"'code_ul2'.*inputs length 4096.*denoiser 'x1'.*needs 1023 sentinels.*has 512 "
        r"extra ids", True),
    "stream shards that do not divide the batch": (
        ["--gin.train.DataConfig.stream_shards=3"],
        r"stream_shards=3 must divide BATCH_SIZE=8", True),
    "zero training steps": (["--gin.TRAIN_STEPS=0"], r"total_steps=0 must be ≥ 1 \(TRAIN_STEPS\)",
                            True),
    "unknown rule preset": (["--gin.partitioning.MeshConfig.rules='fsdq'"],
                            r"Unknown rule preset 'fsdq'.*'fsdp'", False),
    "a gin file that does not exist": (["--gin_file=meshes/cpu9.gin"],
                                       r"Unable to open file: meshes/cpu9.gin", False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_paragraph_and_changes_nothing(case, finished, tmp_path,
                                                             capsys):
    flags, expected, new_dir = CASES[case]
    flags = [f.replace("{finished}", str(finished)) for f in flags]
    model_dir = tmp_path / "new" if new_dir else tmp_path / "run"
    if not new_dir:
        shutil.copytree(finished / "run", model_dir)
    watched = [model_dir, finished / "store", finished / "nowhere"]
    before = [_snapshot(d) for d in watched]
    with pytest.raises(SystemExit) as exit_info:
        _run(finished, model_dir, *flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err and "--debug" in err
    import re

    assert re.search(expected, err, re.S), err[-3000:]
    assert [_snapshot(d) for d in watched] == before


def test_debug_shows_the_traceback(finished, tmp_path):
    gin.clear_config()
    with pytest.raises(ValueError, match="TRAIN_STPES"):
        _run(finished, tmp_path / "x", "--gin.TRAIN_STPES=6", "--debug")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_smoke_run_shortens_a_long_warmup(finished, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        summary = _run(finished, tmp_path / "smoke", "--gin.WARMUP_STEPS=2000")
    assert summary.end_step == 2
    assert "WARMUP_STEPS=2000 is not shorter than TRAIN_STEPS=2" in caplog.text
