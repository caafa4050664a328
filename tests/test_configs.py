"""Every gin file the repo ships under models/ and meshes/ parses and builds (Levanter's habit).

Also pins the exact parameter counts of the full-size models, counted from abstract
shapes (nothing is allocated).
"""
import math
import os
import pathlib
import subprocess
import sys

import gin
import jax
import pytest

from t5x_like.model import families, layers, partitioning

GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin_configs"
MODEL_GINS = sorted((GIN_DIR / "models").glob("*.gin"))
MESH_GINS = sorted((GIN_DIR / "meshes").glob("*.gin"))


def build_macro(path: pathlib.Path, macro: str):
    """Parses one gin file in a clean config and builds the object its macro names."""
    gin.clear_config()
    gin.add_config_file_search_path(str(GIN_DIR))  # for includes (meshes/xla_flags/gpu.gin)
    try:
        gin.parse_config_file(str(path))
        return gin.query_parameter(f"{macro}/macro.value").scoped_configurable_fn()
    finally:
        gin.clear_config()


def model_config(name: str) -> layers.TransformerConfig:
    return build_macro(GIN_DIR / "models" / f"{name}.gin", "MODEL_CONFIG")


def factory(cfg: layers.TransformerConfig):
    """The zero-argument module factory that partitioning takes, for a bare config."""
    return families.model_for(cfg).make_module


def test_the_repo_ships_the_expected_configs():
    assert {p.stem for p in MODEL_GINS} >= {
        "tiny_palm", "tiny_llama", "tiny_encdec", "palm_8b", "palm_62b", "llama3_8b",
        "llama3_70b", "llama2_7b", "reka_edge_7b_encdec",
    }
    assert {p.stem for p in MESH_GINS} >= {
        "cpu1", "cpu8_fsdp", "cpu8_fsdp_tp", "h100_node", "a100_node", "h100_cluster",
        "h100_8nodes_tp", "h100_312nodes", "h100_2048nodes",
    }


@pytest.mark.parametrize("path", MODEL_GINS, ids=lambda p: p.stem)
def test_every_model_gin_builds_a_config_whose_params_all_have_logical_axes(path):
    cfg = build_macro(path, "MODEL_CONFIG")
    assert isinstance(cfg, layers.TransformerConfig)
    specs = partitioning.logical_specs(factory(cfg))  # raises if a parameter lacks axes
    assert specs and all(set(s) <= set(partitioning.LOGICAL_AXES) for s in specs.values())
    assert cfg.is_encoder_decoder == ("encdec" in path.stem)
    # MODEL (what train.train takes) wraps the same config, in the right family.
    model = build_macro(path, "MODEL")
    expected = families.EncoderDecoderModel if cfg.is_encoder_decoder else families.DecoderOnlyModel
    assert type(model) is expected and model.cfg == cfg


def test_command_line_overrides_bind_the_config():
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(
            [str(GIN_DIR / "models" / "tiny_palm.gin")],
            ["layers.TransformerConfig.num_decoder_layers = 4"])
        model = gin.query_parameter("MODEL/macro.value").scoped_configurable_fn()
    finally:
        gin.clear_config()
    assert model.cfg.num_decoder_layers == 4


@pytest.mark.parametrize("path", MESH_GINS, ids=lambda p: p.stem)
def test_every_mesh_gin_builds_a_mesh_config(path):
    mesh_cfg = build_macro(path, "MESH_CONFIG")
    assert isinstance(mesh_cfg, partitioning.MeshConfig)
    assert mesh_cfg.rule_set() == partitioning.RULE_PRESETS[mesh_cfg.rules]
    if mesh_cfg.num_devices == len(jax.devices()) and mesh_cfg.dcn_shape is None:
        # Single-node shapes of 8 (or 1) devices build for real on the emulated devices.
        mesh = mesh_cfg.make_mesh()
        assert dict(mesh.shape) == mesh_cfg.global_shape
    elif mesh_cfg.num_devices == 1:
        mesh = mesh_cfg.make_mesh(jax.devices()[:1])
        assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_cluster_mesh_shape_is_ici_times_dcn():
    mesh_cfg = build_macro(GIN_DIR / "meshes" / "h100_cluster.gin", "MESH_CONFIG")
    assert mesh_cfg.global_shape == {"data": 8, "fsdp": 32, "tensor": 1}
    assert mesh_cfg.num_devices == 256
    assert math.prod(mesh_cfg.shape) == 8  # one node of 8 GPUs


@pytest.mark.parametrize("name,shape,nodes", [
    ("a100_node", {"data": 1, "fsdp": 4, "tensor": 2}, 1),
    ("h100_node", {"data": 1, "fsdp": 8, "tensor": 1}, 1),
    ("h100_8nodes_tp", {"data": 1, "fsdp": 8, "tensor": 8}, 8),
    ("h100_312nodes", {"data": 39, "fsdp": 8, "tensor": 8}, 312),
    ("h100_2048nodes", {"data": 128, "fsdp": 16, "tensor": 8}, 2048),
])
def test_gpu_presets_fill_their_meshes_from_the_cluster(name, shape, nodes):
    mesh_cfg = build_macro(GIN_DIR / "meshes" / f"{name}.gin", "MESH_CONFIG")
    assert mesh_cfg.global_shape == shape and mesh_cfg.nodes == nodes
    assert math.prod(mesh_cfg.shape) == 8  # 8 GPUs per node
    assert mesh_cfg.ici_shape["tensor"] == shape["tensor"]  # tensor never leaves a node
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in mesh_cfg.xla_flags


@pytest.mark.parametrize("mesh_gin", [p for p in MESH_GINS if "xla_flags" in p.read_text()],
                         ids=lambda p: p.stem)
def test_every_presets_xla_flags_are_known_to_this_xla(mesh_gin):
    """XLA aborts at start-up on a flag it does not know (flags are renamed between
    releases), and warns of one it deprecated: start jax's CPU backend with all of the
    preset's flags, as a GPU run would (XLA parses every backend's flags at start-up)."""
    flags = build_macro(mesh_gin, "MESH_CONFIG").xla_flags
    assert flags, f"{mesh_gin.name} names XLA flags but binds none"
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CpuDevice" in result.stdout
    assert "deprecated" not in result.stderr.lower(), result.stderr[-2000:]


def test_an_unknown_xla_flag_fails_that_check():
    """The check above can fail: XLA refuses a flag name it does not know."""
    env = {**os.environ, "XLA_FLAGS": "--xla_gpu_enable_pipelined_everything=true",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "xla_gpu_enable_pipelined_everything" in result.stderr


# Exact counts from abstract shapes (docs/MODELS.md): Llama 3 8B 8,030,261,248;
# Llama 2 7B 6,738,415,616 (Meta's published count); PaLM 8B 8.63B, 256,000 vocabulary
# gives 8.632B [D]. The others pin our own counting so a layer change cannot slip by.
EXPECTED_PARAMS = {
    "llama3_8b": 8_030_261_248,
    "llama2_7b": 6_738_415_616,
    "palm_8b": 8_632_012_800,
    "palm_62b": 62_495_662_080,
    "llama3_70b": 70_553_706_496,
    "reka_edge_7b_encdec": 7_105_273_856,
    "tiny_palm": 1_524_096,
    "tiny_llama": 2_491_008,
    "tiny_encdec": 2_130_688,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_exact_parameter_counts(name):
    assert partitioning.count_params(factory(model_config(name))) == EXPECTED_PARAMS[name]


def test_palm_8b_is_8_63b_to_three_significant_figures():
    n = partitioning.count_params(factory(model_config("palm_8b")))
    assert f"{n / 1e9:.3g}" == "8.63"


def test_reka_edge_is_about_7b():
    assert 6.5e9 < partitioning.count_params(factory(model_config("reka_edge_7b_encdec"))) < 7.5e9


def test_public_api_resolves_every_name():
    import t5x_like
    from t5x_like.data import prepare as prepare_module

    for name in t5x_like.__all__:
        assert getattr(t5x_like, name) is not None, name
    assert t5x_like.prepare_store is prepare_module.prepare
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        t5x_like.nope  # noqa: B018
