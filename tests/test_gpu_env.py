"""The GPU environment of the mesh presets: XLA flags, the memory fraction and NCCL
settings go into the environment before jax starts (launch.start_devices), never over
what the user set; the planner judges fit against the same memory fraction; bad
values are one paragraph. No GPU here: the variables are checked in the environment,
and jax's CPU backend is started after them."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import gin
import pytest
from test_configs import GIN_DIR, MESH_GINS, build_macro, model_config

from t5x_like import launch
from t5x_like.model import families, hardware, partitioning
from t5x_like.planning import planner
from t5x_like.training import optimizers

REPO = pathlib.Path(__file__).resolve().parent.parent
GPU_PRESETS = [p for p in MESH_GINS if "xla_flags/gpu.gin" in p.read_text()]
NCCL = ("CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_NVLS_ENABLE", "NCCL_PROTO",
        "NCCL_P2P_NVL_CHUNKSIZE", "NCCL_DEBUG")


def _gpu_gin_macro(name):
    gin.clear_config()
    try:
        gin.parse_config_file(str(GIN_DIR / "meshes" / "xla_flags" / "gpu.gin"))
        return gin.query_parameter(f"{name}/macro.value")
    finally:
        gin.clear_config()


@pytest.fixture
def before_jax(monkeypatch):
    """This process as it is before jax's backends start: no variable of the presets
    set, and start_devices' CPU device count recorded instead of applied."""
    from jax._src import xla_bridge

    for name in (*NCCL, launch.MEMORY_FRACTION_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    counts = []
    monkeypatch.setattr(launch, "use_cpu_devices", counts.append)
    return counts


def test_every_gpu_preset_binds_the_gpu_environment():
    assert {p.stem for p in GPU_PRESETS} == {
        "a100_node", "h100_node", "h100_8nodes_tp", "h100_312nodes", "h100_2048nodes",
        "h100_cluster"}
    fraction, env = _gpu_gin_macro("GPU_MEMORY_FRACTION"), _gpu_gin_macro("GPU_ENV")
    assert fraction == 0.9 and set(env) == set(NCCL)
    for path in GPU_PRESETS:
        mesh = build_macro(path, "MESH_CONFIG")
        assert mesh.memory_fraction == fraction, path.name
        assert mesh.environment() == {**env, launch.MEMORY_FRACTION_ENV: "0.9"}, path.name
    for path in set(MESH_GINS) - set(GPU_PRESETS):  # the CPU meshes set nothing
        mesh = build_macro(path, "MESH_CONFIG")
        assert (mesh.memory_fraction, mesh.env, mesh.xla_flags) == (None, (), ())


@pytest.mark.parametrize("path", GPU_PRESETS, ids=lambda p: p.stem)
def test_start_devices_sets_the_preset_environment_and_keeps_the_users(path, before_jax,
                                                                      monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="t5x_like.launch")
    mesh = build_macro(path, "MESH_CONFIG")
    monkeypatch.setenv("NCCL_PROTO", "LL128")  # the user's own
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
    launch.start_devices(mesh)
    assert os.environ["NCCL_PROTO"] == "LL128"
    for name, value in mesh.environment().items():
        if name != "NCCL_PROTO":
            assert os.environ[name] == value
    assert os.environ[launch.MEMORY_FRACTION_ENV] == "0.9"
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_gpu_enable_triton_gemm=true"
    assert "--xla_gpu_enable_triton_gemm=false" not in flags
    assert set(mesh.xla_flags) - {"--xla_gpu_enable_triton_gemm=false"} <= set(flags)
    assert before_jax == [mesh.num_devices]
    assert "NCCL_PROTO=LL128 (preset: Simple)" in caplog.text


def test_a_users_memory_fraction_wins_and_is_named_against_the_plan(before_jax, monkeypatch,
                                                                   caplog):
    monkeypatch.setenv(launch.MEMORY_FRACTION_ENV, "0.8")
    set_now = launch.apply_environment(build_macro(GPU_PRESETS[0], "MESH_CONFIG").environment())
    assert os.environ[launch.MEMORY_FRACTION_ENV] == "0.8"
    assert launch.MEMORY_FRACTION_ENV not in set_now and "NCCL_PROTO" in set_now
    assert "judged fit at the mesh preset's 0.9" in caplog.text
    assert "MeshConfig.memory_fraction=0.8" in caplog.text


def test_after_jax_started_nothing_is_set(monkeypatch, caplog):
    import jax

    jax.devices()  # the backends are up
    monkeypatch.delenv("NCCL_PROTO", raising=False)
    assert launch.apply_environment({"NCCL_PROTO": "Simple"}) == {}
    assert "NCCL_PROTO" not in os.environ and "take no effect" in caplog.text


def test_a_real_start_up_applies_the_preset_before_jax_starts(tmp_path):
    """A fresh process: the user's variables set, the h100_node preset applied by
    start_devices, then jax's (CPU) backend started with the preset's 8 devices."""
    script = (
        "import json, os, sys; sys.path.insert(0, 'tests')\n"
        "from test_configs import GIN_DIR, build_macro\n"
        "from t5x_like import launch\n"
        "launch.start_devices(build_macro(GIN_DIR / 'meshes' / 'h100_node.gin', 'MESH_CONFIG'))\n"
        "import jax\n"
        "print(json.dumps({'devices': jax.device_count(), 'env': dict(os.environ)}))\n")
    env = {k: v for k, v in os.environ.items() if k not in (*NCCL, "XLA_FLAGS")}
    env.update({"JAX_PLATFORMS": "cpu", "NCCL_DEBUG": "INFO",
                launch.MEMORY_FRACTION_ENV: "0.85"})
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    started = out["env"]
    assert (started["NCCL_DEBUG"], started[launch.MEMORY_FRACTION_ENV]) == ("INFO", "0.85")
    assert (started["NCCL_PROTO"], started["CUDA_DEVICE_MAX_CONNECTIONS"]) == ("Simple", "1")
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in started["XLA_FLAGS"].split()
    assert "judged fit at the mesh preset's 0.9" in result.stderr


def test_the_planner_judges_fit_at_the_presets_memory_fraction(capsys):
    """One definition: the plan's usable memory is the fraction the run exports."""
    mesh = partitioning.MeshConfig(shape={"fsdp": 8}, rules="fsdp", memory_fraction=0.5)
    report = planner.plan(model=families.model_for(model_config("tiny_llama")),
                          mesh_config=mesh, optimizer=optimizers.adamw_llama2(1e-3, 10, 100),
                          batch_size=8, task_feature_lengths={"targets": 64})
    assert report["memory_fraction"]["value"] == 0.5
    assert float(mesh.environment()[launch.MEMORY_FRACTION_ENV]) == 0.5
    for device in report["devices"]:
        assert device["usable_gb"] == pytest.approx(
            0.5 * hardware.spec(device["kind"]).hbm_bytes / 1e9)
    assert "usable = 50% of a GPU's memory (the mesh preset's memory_fraction" in (
        capsys.readouterr().out)
    h100 = build_macro(GIN_DIR / "meshes" / "h100_node.gin", "MESH_CONFIG")
    assert planner.memory_fraction(h100)["value"] == 0.9
    # A mesh that sets none is judged at what jax then takes by default; a TPU whole.
    assert planner.memory_fraction(partitioning.MeshConfig(shape={"fsdp": 8}))["value"] == 0.75
    assert planner.usable_fraction(hardware.spec("TPU v5p"), 0.9) == 1.0


@pytest.mark.parametrize("field,value,named", [
    ("memory_fraction", 1.5, "must be a number in (0, 1]"),
    ("memory_fraction", 0, "must be a number in (0, 1]"),
    ("memory_fraction", "0.9", "must be a number in (0, 1]"),
    ("env", {"nccl_proto": "Simple"}, "not an environment variable name"),
    ("env", {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}, "set MeshConfig.memory_fraction"),
    ("env", {"XLA_FLAGS": "--xla_foo"}, "MeshConfig.xla_flags instead"),
    ("env", {"JAX_PLATFORMS": "cuda"}, "read when jax is imported"),
    ("env", {"NCCL_PROTO": None}, "give a string or a number"),
    ("xla_flags", ["xla_gpu_enable_triton_gemm=false"], "not an XLA flag"),
    ("xla_flags", ["--xla_a=1 --xla_b=2"], "not an XLA flag"),
])
def test_bad_values_are_one_paragraph(field, value, named):
    with pytest.raises(ValueError) as raised:
        partitioning.MeshConfig(shape={"fsdp": 8}, **{field: value})
    message = str(raised.value)
    assert named in message and "\n" not in message and f"MeshConfig.{field}" in message


def test_a_bad_memory_fraction_on_the_command_line_writes_nothing(tmp_path, capsys):
    (tmp_path / "exp.gin").write_text(
        "include 'models/tiny_llama.gin'\ninclude 'runs/pretrain.gin'\n"
        "include 'meshes/h100_node.gin'\nMIXTURE_OR_TASK_NAME = 'code_causal'\n"
        "TASK_FEATURE_LENGTHS = {'targets': 64}\nTRAIN_STEPS = 2\nBATCH_SIZE = 8\n")
    gin.clear_config()
    try:
        with pytest.raises(SystemExit) as exited:
            launch.run("t5x_like.training.train.train", [
                f"--gin_file={tmp_path / 'exp.gin'}", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                "--gin.partitioning.MeshConfig.memory_fraction=1.5"])
    finally:
        gin.clear_config()
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "memory_fraction=1.5" in error and "must be a number in (0, 1]" in error
    assert "Traceback" not in error and not (tmp_path / "run").exists()
