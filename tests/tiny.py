"""Tiny model configs and helpers for the model tests (layers, network, models).

Kept out of conftest.py (shared by every engineer); import with `from tiny import ...`
(pytest puts tests/ on sys.path).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_like.model.families import model_for
from t5x_like.model.layers import TransformerConfig
from t5x_like.model.partitioning import EMBED, LAYERS

_TINY = dict(vocab_size=64, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
             num_decoder_layers=2, num_encoder_layers=0, dtype="float32", scan_layers=True,
             z_loss=1e-4)


def tiny_config(**overrides) -> TransformerConfig:
    """A 2-layer float32 GQA config small enough to compile in about a second."""
    return TransformerConfig(**{**_TINY, **overrides})


def abstract_module(cfg: TransformerConfig, seed: int = 0):
    """The module with ShapeDtypeStructs for values (metadata intact), no compile."""
    return nnx.eval_shape(lambda: model_for(cfg).make_module(nnx.Rngs(seed)))


def make_module(cfg: TransformerConfig, seed: int = 0):
    """A module of `cfg` (built by the production code, abstractly) with numpy-drawn values.

    Values follow the production scales (embedding N(0,1), kernels N(0, 1/fan_in), norm
    scales 1) but are drawn with numpy: a compiled jax init costs 5-20 s per config on the
    shared cores, too much for a suite that builds dozens of configs. test_layers checks
    the production init itself. Values depend only on parameter shapes and order, so the
    bf16 / remat / dropout variants of a config start from identical parameters.
    """
    return fill_params(abstract_module(cfg, seed), seed)


def build(constructor, seed: int = 0):
    """`constructor()` (e.g. lambda: layers.Attention(cfg, rngs=nnx.Rngs(0))), numpy-filled."""
    with nnx.use_eager_sharding(False):
        return fill_params(nnx.eval_shape(constructor), seed)


def fill_params(module, seed: int = 0):
    """Give every Param of an (abstract) module numpy N(0, 1/fan_in) values; see make_module."""
    rng = np.random.default_rng(seed)
    values = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        shape = var.get_value().shape
        axes = tuple(var.get_metadata()["out_sharding"])
        if axes[0] == LAYERS:
            axes, layer_shape = axes[1:], shape[1:]
        else:
            layer_shape = shape
        if path[-1] == "scale":
            value = np.ones(shape, np.float32)
        else:
            if path[-1] == "embedding":
                std = 1.0
            else:  # fan-in: emb_dim for input projections, all but the output dim otherwise
                std = 1.0 / np.sqrt(layer_shape[0] if axes[0] == EMBED
                                    else np.prod(layer_shape[:-1]))
            value = (std * rng.standard_normal(shape)).astype(np.float32)
        values[path] = var.replace(jnp.asarray(value))
    nnx.update(module, nnx.from_flat_state(values))
    return module


def jit_apply(module, method: str = "__call__"):
    """A jitted `module.<method>(*args, **kwargs)` over the module's current state."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def run(state, *args, **kwargs):
        return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

    return lambda *args, **kwargs: run(state, *args, **kwargs)


def with_config(module, cfg: TransformerConfig, seed: int = 0):
    """A module built from `cfg` carrying `module`'s parameters (same structure required)."""
    other = make_module(cfg, seed)
    nnx.update(other, nnx.state(module, nnx.Param))
    return other


def unrolled_copy(scanned_module, cfg_unrolled: TransformerConfig):
    """The same parameters in an unrolled module: slice every stacked 'layers' leaf."""
    unrolled = make_module(cfg_unrolled)
    flat = dict(nnx.to_flat_state(nnx.state(scanned_module, nnx.Param)))
    new = {}
    for path, var in nnx.to_flat_state(nnx.state(unrolled, nnx.Param)):
        if "layers" in path and isinstance(path[path.index("layers") + 1], int):
            i = path.index("layers")
            layer = path[i + 1]
            stacked = flat[path[: i + 1] + path[i + 2:]]
            new[path] = var.replace(stacked[...][layer])
        else:
            new[path] = var.replace(flat[path][...])
    nnx.update(unrolled, nnx.from_flat_state(new))
    return unrolled


def random_tokens(seed, shape, vocab=64):
    return np.random.default_rng(seed).integers(1, vocab, size=shape).astype(np.int32)


def packed_ids(lengths, total):
    """(segment_ids, positions) for one row holding examples of the given lengths + padding."""
    seg, pos = np.zeros(total, np.int32), np.zeros(total, np.int32)
    start = 0
    for k, n in enumerate(lengths, start=1):
        seg[start:start + n] = k
        pos[start:start + n] = np.arange(n)
        start += n
    return seg, pos


@pytest.fixture(autouse=True)
def strict_rank_promotion():
    """nanodo's habit: implicit rank promotion is a bug in model code; make it raise."""
    with jax.numpy_rank_promotion("raise"):
        yield


def assert_close(a, b, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=atol, rtol=rtol)


def max_abs(a):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32))))


__all__ = ["tiny_config", "model_for", "abstract_module", "make_module", "build", "fill_params", "jit_apply", "with_config",
           "unrolled_copy", "random_tokens", "packed_ids", "strict_rank_promotion",
           "assert_close", "max_abs"]


def assert_no_compile_while(fn) -> None:
    """Runs `fn` and fails if XLA compiled anything meanwhile (shape-only work)."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def tiny_model_gin(**bindings) -> str:
    """A gin model file of a tiny decoder-only (2 layers, 32 wide, float32) over the
    shipped vocabulary's 8,192 ids, for tests that run an entry point; `bindings` are
    more layers.TransformerConfig settings (as Python values)."""
    settings = dict(vocab_size=8192, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=64, num_decoder_layers=2, num_encoder_layers=0, z_loss=0.0,
                    dtype="float32", scan_layers=True, **bindings)
    lines = [f"layers.TransformerConfig.{k} = {v!r}" for k, v in settings.items()]
    return "\n".join(["from __gin__ import dynamic_registration",
                      "from t5x_like.model import layers", "from t5x_like.model import families",
                      "MODEL = @families.DecoderOnlyModel()",
                      "families.DecoderOnlyModel.cfg = %MODEL_CONFIG",
                      "MODEL_CONFIG = @layers.TransformerConfig()", *lines, ""])


def entry_point_runner(directory, model_gin: str, timeout: int = 1200):
    """run(module, *flags): `python -m module` in `directory` with `model_gin` (written
    there as tiny_model.gin) and the 8-device CPU mesh, XLA flags left to the entry point;
    asserts it exits 0 and returns its output."""
    (directory / "tiny_model.gin").write_text(model_gin)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}

    def run(module: str, *flags: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", module, "--gin_file=tiny_model.gin",
             "--gin_file=meshes/cpu8_fsdp.gin", f"--gin_search_paths={directory}", *flags],
            cwd=directory, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc.stdout + proc.stderr

    return run
