"""Start-up shared by the entry points: flags, gin parsing, the imports gin files make."""

import gin
import pytest

from t5x_like import launch


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_flags_collect_gin_files_and_bindings():
    args = launch.parse_flags(["--gin_file=a.gin", "--gin.TRAIN_STEPS=7",
                               "--gin_bindings=BATCH_SIZE = 8", "--gin_file=b.gin"])
    assert args.gin_file == ["a.gin", "b.gin"]
    assert args.gin_bindings == ["BATCH_SIZE = 8", "TRAIN_STEPS = 7"]
    with pytest.raises(SystemExit):
        launch.parse_flags(["--gin.TRAIN_STEPS"])  # no value
    with pytest.raises(SystemExit):
        launch.parse_flags(["--gin.TRAIN_STEPS=1"])  # no gin file


def test_an_include_is_found_although_a_directory_of_its_name_is_in_the_cwd(
        tmp_path, monkeypatch, clean_gin):
    """gin's package-resource reader crashes on a plain ./runs directory (a namespace
    package) when a file includes 'runs/...'; launch keeps only the file reader."""
    (tmp_path / "runs").mkdir()  # where MODEL_DIRs live
    configs = tmp_path / "configs"
    (configs / "runs").mkdir(parents=True)
    (configs / "runs" / "base.gin").write_text("X = 1\n")
    (configs / "exp.gin").write_text("include 'runs/base.gin'\nimport json\nY = %X\n")
    monkeypatch.chdir(tmp_path)
    imported = launch.parse_gin(["exp.gin"], ["Z = 3"], [str(configs)])
    assert gin.query_parameter("%X") == 1
    assert gin.query_parameter("%Z") == 3
    assert imported == ["json"] == launch.gin_imports()


def test_the_shipped_experiments_import_the_shipped_tasks(clean_gin):
    imported = launch.parse_gin(["experiments/demo_encdec_ul2.gin"], [])
    assert imported == ["tasks"]  # t5x_like's own modules are not task modules


def test_gin_macro_builds_what_a_macro_names(clean_gin):
    launch.parse_gin(["models/tiny_llama.gin"], ["layers.TransformerConfig.num_decoder_layers = 3"])
    cfg = launch.gin_macro("MODEL_CONFIG")
    assert (cfg.num_decoder_layers, cfg.z_loss, cfg.block) == (3, 0.0, "sequential")
    assert launch.gin_macro("MODEL").cfg == cfg
    with pytest.raises(ValueError, match="bind no macro 'MESH_CONFIG'.*model gin file"):
        launch.gin_macro("MESH_CONFIG")


def test_a_mesh_that_does_not_match_the_devices_is_refused():
    from t5x_like.model import partitioning

    four = partitioning.MeshConfig(shape={"fsdp": 4}, rules="fsdp")
    with pytest.raises(ValueError, match="needs 4 devices but jax sees 8"):
        launch.mesh_for(four)
    mesh, rules = launch.mesh_for(partitioning.MeshConfig(shape={"fsdp": 8}, rules="fsdp"))
    assert mesh.size == 8 and rules == partitioning.RULE_PRESETS["fsdp"]


def test_entry_points_take_their_own_flags():
    extra = {"output": {"default": None, "help": "JSON file"}}
    args = launch.parse_flags(["--gin_file=a.gin", "--output=plan.json"], extra_flags=extra)
    assert args.output == "plan.json"
    assert launch.parse_flags(["--gin_file=a.gin"], extra_flags=extra).output is None
    with pytest.raises(SystemExit):
        launch.parse_flags(["--gin_file=a.gin", "--output=x"])  # not train's flag


def test_xla_flags_are_added_before_jax_starts_and_never_override_the_user(monkeypatch):
    from jax._src import xla_bridge

    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    launch.apply_xla_flags(["--xla_gpu_enable_triton_gemm=false",
                            "--xla_gpu_enable_latency_hiding_scheduler=true"])
    import os

    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_gpu_enable_triton_gemm=true", "--xla_gpu_enable_latency_hiding_scheduler=true"]


def test_xla_flags_after_start_up_are_refused_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("XLA_FLAGS", "")
    launch.apply_xla_flags(["--xla_gpu_enable_latency_hiding_scheduler=true"])  # jax is up
    import os

    assert os.environ["XLA_FLAGS"] == ""
    assert "take no effect" in caplog.text


def test_tensorflow_sees_no_gpu_after_start_up():
    import tensorflow as tf

    launch.hide_gpus_from_tensorflow()
    assert tf.config.get_visible_devices("GPU") == []
    assert tf.config.get_visible_devices("CPU")  # the host is still TensorFlow's


def test_entry_points_restart_with_huge_pages_unless_the_user_set_them(tmp_path):
    """`python -m t5x_like.<entry>` restarts itself once with glibc's huge-page tunable
    (t5x_like/process.py); a GLIBC_TUNABLES that names it is the user's choice."""
    import os
    import subprocess
    import sys

    import t5x_like
    from t5x_like import process

    assert process.with_huge_pages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert (process.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
            ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert (process.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
            ["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(t5x_like.__file__)))
    out = subprocess.run([sys.executable, "-m", "t5x_like.eval", "--gin_file=missing.gin"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "missing.gin" in out.stderr, out.stderr[-2000:]
    assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in out.stderr


def test_a_gin_file_naming_a_module_that_moved_is_told_where_it_is(tmp_path):
    """The layout moved modules into subpackages: a user's gin file or binding that names
    an old module fails with the new import and the gin name to use."""
    import gin

    old = tmp_path / "old.gin"
    old.write_text("from __gin__ import dynamic_registration\nfrom t5x_like import models\n"
                   "models.DecoderOnlyModel.cfg = None\n")
    with pytest.raises(ImportError, match="from t5x_like.model import families"):
        launch.parse_gin([str(old)], [])
    gin.clear_config()
    new = tmp_path / "new.gin"
    new.write_text("from __gin__ import dynamic_registration\n"
                   "from t5x_like.evaluation import evaluate\n")
    with pytest.raises(ValueError, match="gin names its configurables `evaluate.<name>`"):
        launch.parse_gin([str(new)], ["evaluation.EvalConfig.enabled = False"])
    gin.clear_config()
    with pytest.raises(ValueError, match="from t5x_like.objectives import preference"):
        launch.parse_gin([str(new)], ["models.RewardModel.margin = 'small'"])
    gin.clear_config()
    assert launch.moved_hint("No configurable matching 'my_tasks.Thing'.") is None
