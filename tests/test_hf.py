"""Hugging Face interop (t5x_like/hf.py) against transformers itself: tiny random Llama
models saved with save_pretrained, imported, run, exported and loaded back.

transformers and torch are the reference only (the `interop` extra); nothing is
downloaded: every model is made here with random weights.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from t5x_like import decoding, hf, layers
from tiny import build, jit_apply, make_module, random_tokens, strict_rank_promotion, tiny_config  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 256
ATOL = 1e-4  # float32 throughout; measured: 1.4e-6 to 2.2e-6 on logits up to ~5, 1.6e-5 on
# the tied models' logits up to ~60 (unscaled x·Eᵀ with N(0, 1) embeddings)
HF_SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500_000.0)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights of unit-scale activations (init_range 0.02 would leave logits near 0 and
    make a 1e-4 comparison weak); norm weights away from 1 so a misplaced norm shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            elif p.ndim == 1:  # biases, where a config has them
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


def _save_hf(directory, *, family="llama", seed=0, save_kwargs=None, **overrides):
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    config = config_class(**{**HF_SIZES, "tie_word_embeddings": False, **overrides})
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    _randomize(model, seed)
    model.save_pretrained(directory, **(save_kwargs or {}))
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny GQA Llama (untied, rope_theta 500k, float32) and its save_pretrained folder."""
    directory = tmp_path_factory.mktemp("hf_llama")
    return _save_hf(directory), directory


# ------------------------------------------------------------------------------ import


@pytest.mark.parametrize("sharded, scan_layers", [(False, True), (True, False)],
                         ids=["single_file_scanned", "sharded_unrolled"])
def test_imported_logits_match_transformers(tmp_path, hf_llama, sharded, scan_layers):
    reference, directory = hf_llama
    if sharded:
        directory = tmp_path / "sharded"
        reference.save_pretrained(directory, max_shard_size="20KB")
        assert len(json.loads((directory / hf.INDEX_FILE).read_text())["weight_map"]) > 10
        assert not (directory / hf.SAFETENSORS_FILE).exists()
    model, module = hf.load(directory, dtype="float32", scan_layers=scan_layers)
    cfg = model.cfg
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta) == (4, 2, 16, 5e5)
    assert (cfg.z_loss, cfg.block, cfg.tie_embeddings, cfg.scan_layers) == (
        0.0, "sequential", False, scan_layers)
    tokens = random_tokens(0, (2, 40), VOCAB)
    ours, ref = jit_apply(module)(tokens), _hf_logits(reference, tokens)
    assert np.abs(ref).max() > 2.0  # logits of real size: the tolerance means something
    assert _max_diff(ours, ref) < ATOL


def test_greedy_32_tokens_match_generate(hf_llama):
    """Our KV-cache decoder (models.predict_batch, greedy) against transformers'
    `generate(do_sample=False)`: the same 32 tokens. Hugging Face's Llama has no
    shifted-in start token (its tokenizer writes BOS into the prompt): bos_id=None."""
    reference, directory = hf_llama
    model, module = hf.load(directory, dtype="float32")
    prompt = random_tokens(1, (2, 8), VOCAB)
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor(prompt, dtype=torch.long), do_sample=False, max_new_tokens=32,
            eos_token_id=None, pad_token_id=0,
            attention_mask=torch.ones(prompt.shape, dtype=torch.long))[:, 8:].numpy()
    graphdef, state = nnx.split(module)
    decode = decoding.DecodeConfig(max_decode_length=32, eos_id=-1, bos_id=None)
    ours = jax.jit(lambda s, p: model.predict_batch(nnx.merge(graphdef, s), {"prompt": p},
                                                    decode))(state, jnp.asarray(prompt))
    assert expected.shape == (2, 32)
    assert len(set(expected[0].tolist())) > 3  # not a constant sequence
    np.testing.assert_array_equal(np.asarray(ours["tokens"]), expected)


def test_tied_hf_model_imports_with_unscaled_tied_logits(tmp_path):
    reference = _save_hf(tmp_path, tie_word_embeddings=True, seed=2)
    model, module = hf.load(tmp_path, dtype="float32")
    assert model.cfg.tie_embeddings and not model.cfg.scale_tied_logits
    tokens = random_tokens(3, (2, 24), VOCAB)
    assert _max_diff(jit_apply(module)(tokens), _hf_logits(reference, tokens)) < ATOL


def test_mistral_without_sliding_window_is_the_same_network(tmp_path):
    reference = _save_hf(tmp_path, family="mistral", sliding_window=None, seed=4)
    _, module = hf.load(tmp_path, dtype="float32")
    tokens = random_tokens(5, (1, 24), VOCAB)
    assert _max_diff(jit_apply(module)(tokens), _hf_logits(reference, tokens)) < ATOL


_LLAMA = {"model_type": "llama", **HF_SIZES, "hidden_act": "silu", "attention_bias": False,
          "mlp_bias": False, "tie_word_embeddings": False}


@pytest.mark.parametrize("changes, option", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "rope_scaling.rope_type='llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0}},
     "rope_parameters.rope_type='llama3'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "qwen2"}, "model_type='qwen2'"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
])
def test_unsupported_options_are_refused_by_name(changes, option):
    with pytest.raises(ValueError) as err:
        hf.config_from_hf({**_LLAMA, **changes})
    assert option in str(err.value) and "not supported" in str(err.value)


def test_both_config_json_forms_and_defaults():
    v4 = hf.config_from_hf({**_LLAMA, "rope_scaling": None, "torch_dtype": "bfloat16"})
    v5 = hf.config_from_hf({**{k: v for k, v in _LLAMA.items() if k != "rope_theta"},
                            "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
                            "dtype": "bfloat16"})
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.dtype == "bfloat16"
    minimal = hf.config_from_hf({k: _LLAMA[k] for k in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads")})
    assert (minimal.num_kv_heads, minimal.head_dim, minimal.norm_eps, minimal.rope_theta) == (
        4, 16, 1e-6, 10_000.0)  # transformers' LlamaConfig defaults
    with pytest.raises(ValueError, match="no 'intermediate_size'"):
        hf.config_from_hf({k: v for k, v in _LLAMA.items() if k != "intermediate_size"})


def test_weights_the_config_does_not_describe_are_refused(tmp_path):
    _save_hf(tmp_path, attention_bias=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": False}))
    with pytest.raises(ValueError, match=r"does not use: \['model.layers.0.self_attn.k_proj.bias'"):
        hf.load(tmp_path, dtype="float32")


def test_a_folder_without_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_LLAMA))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        hf.load(tmp_path)


# ------------------------------------------------------------------------------ export


def _our_llama(**changes):
    """Our tiny Llama-form model with random weights, norm scales away from 1."""
    cfg = tiny_config(**{"block": "sequential", "tie_embeddings": False,
                         "rope_theta": 500_000.0, "norm_eps": 1e-5, **changes})
    module = make_module(cfg, seed=7)
    rng = np.random.default_rng(8)
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        if path[-1] == "scale":
            var[...] = jnp.asarray(1 + 0.2 * rng.standard_normal(var[...].shape), jnp.float32)
    return cfg, module


@pytest.mark.parametrize("changes, hf_tied", [
    ({}, False),
    ({"tie_embeddings": True, "scale_tied_logits": False}, True),
    ({"tie_embeddings": True}, False),  # PaLM-scaled tied logits: exported untied, head E/√D
    ({"scan_layers": False}, False),
], ids=["untied", "tied_unscaled", "tied_scaled_as_untied", "unrolled"])
def test_exported_model_loads_in_transformers_with_the_same_logits(tmp_path, changes, hf_tied):
    cfg, module = _our_llama(**changes)
    files = hf.write_hf(tmp_path, cfg, nnx.state(module, nnx.Param),
                         token_ids={"pad_token_id": None})
    assert files == ["config.json", "model.safetensors"]
    reference, info = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert reference.config.tie_word_embeddings == hf_tied
    tokens = random_tokens(9, (2, 24), cfg.vocab_size)
    ours, ref = jit_apply(module)(tokens), _hf_logits(reference.eval(), tokens)
    assert np.abs(ref).max() > 1.0
    assert _max_diff(ours, ref) < ATOL


@pytest.mark.parametrize("changes, words", [
    (dict(block="parallel"), ["block='parallel'", "sequential"]),
    (dict(mlp_activation="gelu"), ["mlp_activation='gelu'", "swiglu"]),
    (dict(num_encoder_layers=2), ["num_encoder_layers=2", "encoder-decoder"]),
])
def test_export_refuses_what_llama_cannot_express(tmp_path, changes, words):
    cfg = tiny_config(**{"block": "sequential", **changes})
    with pytest.raises(ValueError) as err:
        hf.write_hf(tmp_path / "out", cfg, nnx.state(make_module(cfg), nnx.Param))
    assert all(w in str(err.value) for w in words)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_large_exports_are_sharded_with_an_index(tmp_path):
    cfg, module = _our_llama()
    files = hf.write_hf(tmp_path, cfg, nnx.state(module, nnx.Param), max_shard_bytes=20_000)
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and files == ["config.json", *shards, hf.INDEX_FILE]
    assert index["metadata"]["total_size"] == 4 * sum(
        v[...].size for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    tokens = random_tokens(10, (1, 16), cfg.vocab_size)
    assert _max_diff(jit_apply(module)(tokens), _hf_logits(reference.eval(), tokens)) < ATOL
    with pytest.raises(FileExistsError, match="not empty"):
        hf.write_hf(tmp_path, cfg, nnx.state(module, nnx.Param))


# ------------------------------------------------------------------------------ commands


def _run_cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-m", "t5x_like.hf", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _tensors(directory):
    names = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    out = {}
    for name in names:
        out.update(safetensors.numpy.load_file(str(directory / name)))
    return out


@pytest.mark.slow
def test_import_then_export_commands_round_trip_the_weights_bitwise(tmp_path, hf_llama):
    reference, _ = hf_llama
    source = tmp_path / "hf"
    reference.save_pretrained(source, max_shard_size="40KB")
    ckpt, gin_file, out = tmp_path / "ckpt", tmp_path / "model.gin", tmp_path / "out"
    _run_cli("import", f"--hf_dir={source}", f"--out={ckpt}", f"--gin_out={gin_file}",
             "--dtype=float32")
    assert {"config", "params"} <= set(os.listdir(ckpt))
    assert "layers.TransformerConfig.scale_tied_logits = False" in gin_file.read_text()
    _run_cli("export", f"--gin_file={gin_file}", f"--checkpoint={ckpt}", f"--out={out}",
             "--max_shard_bytes=40000", "--bos_token_id=1", "--eos_token_id=2",
             "--pad_token_id=none")
    original, exported = _tensors(source), _tensors(out)
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    hf_config = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert hf_config[key] == reference.config.to_dict()[key], key
    assert hf_config["rope_theta"] == 500_000.0


def test_model_gin_text_builds_the_same_config():
    import gin

    cfg = hf.config_from_hf({**_LLAMA, "tie_word_embeddings": True}, dtype="bfloat16")
    gin.clear_config()
    try:
        gin.parse_config(hf.model_gin_text(cfg, "somewhere"))
        built = gin.query_parameter("MODEL_CONFIG/macro.value").scoped_configurable_fn()
        model = gin.query_parameter("MODEL/macro.value").scoped_configurable_fn()
    finally:
        gin.clear_config()
    assert built == cfg and model.cfg == cfg


# ------------------------------------------------------------------------------ RoPE


def _interleaved_rope(x_BLHK, positions_L, theta):
    """Meta's original RoPE: pairs (x[2j], x[2j+1]) rotated as complex numbers."""
    k = x_BLHK.shape[-1]
    freq = theta ** (-np.arange(0, k, 2, dtype=np.float64) / k)
    rotation = np.exp(1j * positions_L[:, None] * freq[None, :])  # [L, K/2]
    pairs = x_BLHK[..., 0::2] + 1j * x_BLHK[..., 1::2]
    rotated = pairs * rotation[None, :, None, :]
    return np.stack([rotated.real, rotated.imag], axis=-1).reshape(x_BLHK.shape)


def test_interleaved_weights_permuted_give_the_same_attention():
    cfg = tiny_config(rope_theta=10_000.0)
    rng = np.random.default_rng(11)
    d, h, g, k = cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    wq, wk, wv = (rng.standard_normal(s) / d ** 0.5 for s in ((d, h, k), (d, g, k), (d, g, k)))
    wo = rng.standard_normal((h, k, d)) / (h * k) ** 0.5
    x = rng.standard_normal((2, 12, d))
    positions = np.arange(12)
    # Reference: interleaved-convention weights with interleaved RoPE (float64 numpy).
    q = _interleaved_rope(np.einsum("BLD,DHK->BLHK", x, wq), positions, cfg.rope_theta)
    kk = np.repeat(_interleaved_rope(np.einsum("BLD,DGK->BLGK", x, wk), positions,
                                     cfg.rope_theta), h // g, axis=2)
    v = np.repeat(np.einsum("BLD,DGK->BLGK", x, wv), h // g, axis=2)
    scores = np.einsum("BLHK,BMHK->BHLM", q, kk) / k ** 0.5
    scores = np.where(np.tril(np.ones((12, 12), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.einsum("BHLM,BMHK,HKD->BLD", p, v, wo)
    # Ours: half-split RoPE (layers.Attention) with the permuted q/k weights.
    attn = build(lambda: layers.Attention(cfg, rngs=nnx.Rngs(0)))
    for name, value in (("wq", hf.interleaved_to_half_split(wq)),
                        ("wk", hf.interleaved_to_half_split(wk)), ("wv", wv), ("wo", wo)):
        getattr(attn, name)[...] = jnp.asarray(value, jnp.float32)
    mask = layers.causal_mask(jnp.ones((2, 12), jnp.int32))
    pos = jnp.broadcast_to(jnp.arange(12)[None, :], (2, 12))
    xj = jnp.asarray(x, jnp.float32)
    ours = attn(xj, xj, mask, pos, pos)
    assert _max_diff(ours, expected) < 1e-4 and np.abs(expected).max() > 0.1
    # Without the permutation the two conventions disagree: the test can fail.
    attn.wq[...], attn.wk[...] = jnp.asarray(wq, jnp.float32), jnp.asarray(wk, jnp.float32)
    assert _max_diff(attn(xj, xj, mask, pos, pos), expected) > 1e-2
    for w in (wq, wk):
        np.testing.assert_array_equal(hf.half_split_to_interleaved(hf.interleaved_to_half_split(w)), w)
