"""Hugging Face interop (t5x_like/interop/hf.py) without torch: tiny random Llama and Mistral
models that transformers saved with save_pretrained, and the logits and greedy tokens it
computed with them (tests/golden/hf/, made by make_golden.py there), imported, run,
exported and read back; and what needs no model (refusals, config forms, RoPE).

The golden files keep Hugging Face parity in the default suite, where torch and
transformers are not installed (the way MaxText keeps HF golden logits).
tests/test_hf_live.py runs the same comparisons against transformers itself where the
`interop` extra is installed; nothing is downloaded by either.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from hf_common import ATOL, GOLDEN_DIR, GOLDEN_REFERENCE_FILE, LLAMA_CONFIG, max_diff
from tiny import (  # noqa: F401
    build,
    jit_apply,
    make_module,
    random_tokens,
    strict_rank_promotion,
    tiny_config,
)

from t5x_like.interop import hf
from t5x_like.model import decoding, layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def golden(name):
    """(save_pretrained folder, reference arrays) of a golden model: `tokens` and
    transformers' `logits` for them; for `llama` also `prompt` and its `generated`
    greedy continuation."""
    directory = pathlib.Path(GOLDEN_DIR) / name
    with np.load(directory / GOLDEN_REFERENCE_FILE) as arrays:
        return directory, dict(arrays)


def tensors(directory):
    """{name: array} of every safetensors file of a folder (one file or shards)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(safetensors.numpy.load_file(str(pathlib.Path(directory) / name)))
    return out


def shard_copy(source, directory, tensors_per_shard):
    """`source` (a single-file save_pretrained folder) as save_pretrained writes a model
    above max_shard_size: shards model-0000i-of-0000n.safetensors listed in
    model.safetensors.index.json. torch-free: safetensors.numpy splits the file."""
    weights = safetensors.numpy.load_file(str(source / hf.SAFETENSORS_FILE))
    names = list(weights)
    groups = [names[i:i + tensors_per_shard] for i in range(0, len(names), tensors_per_shard)]
    directory.mkdir(parents=True)
    weight_map = {}
    for i, group in enumerate(groups):
        file_name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        safetensors.numpy.save_file({n: weights[n] for n in group}, str(directory / file_name),
                                    metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file_name))
    total = sum(w.nbytes for w in weights.values())
    (directory / hf.INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    shutil.copy(source / hf.CONFIG_FILE, directory / hf.CONFIG_FILE)
    return directory


def greedy_tokens(model, module, prompt_BL, length=32):
    """Our KV-cache decoder (models.predict_batch, greedy) continuing `prompt_BL` by
    `length` tokens, as transformers' `generate(do_sample=False)` without EOS. Hugging
    Face's Llama has no shifted-in start token (its tokenizer writes BOS into the
    prompt): bos_id=None."""
    graphdef, state = nnx.split(module)
    decode = decoding.DecodeConfig(max_decode_length=length, eos_id=-1, bos_id=None)
    out = jax.jit(lambda s, p: model.predict_batch(nnx.merge(graphdef, s), {"prompt": p},
                                                   decode))(state, jnp.asarray(prompt_BL))
    return np.asarray(out["tokens"])


def _assert_golden_logits(module, ref):
    """The message names the difference alone (pytest would print both logit arrays)."""
    diff = max_diff(jit_apply(module)(ref["tokens"]), ref["logits"])
    assert diff < ATOL, f"max |ours - transformers'| logit difference {diff:.3g}"


# ------------------------------------------------------------------------------ import


def load_llama(directory, scan_layers: bool):
    """`hf.load` of the tiny GQA Llama (golden or live), its config checked field by field."""
    model, module = hf.load(directory, dtype="float32", scan_layers=scan_layers)
    cfg = model.cfg
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta) == (4, 2, 16, 5e5)
    assert (cfg.z_loss, cfg.block, cfg.tie_embeddings, cfg.scan_layers) == (
        0.0, "sequential", False, scan_layers)
    return module


@pytest.mark.parametrize("sharded, scan_layers", [(False, True), (True, False)],
                         ids=["single_file_scanned", "sharded_unrolled"])
def test_imported_logits_match_the_golden_logits(tmp_path, sharded, scan_layers):
    directory, ref = golden("llama")
    if sharded:
        directory = shard_copy(directory, tmp_path / "sharded", tensors_per_shard=4)
        index = json.loads((directory / hf.INDEX_FILE).read_text())
        assert len(set(index["weight_map"].values())) > 2
        assert not (directory / hf.SAFETENSORS_FILE).exists()
    module = load_llama(directory, scan_layers)
    assert np.abs(ref["logits"]).max() > 2.0  # logits of real size: the tolerance means something
    _assert_golden_logits(module, ref)


def test_greedy_32_tokens_match_the_golden_generate():
    directory, ref = golden("llama")
    model, module = hf.load(directory, dtype="float32")
    expected = ref["generated"]
    assert expected.shape == (2, 32)
    assert len(set(expected[0].tolist())) > 3  # not a constant sequence
    np.testing.assert_array_equal(greedy_tokens(model, module, ref["prompt"]), expected)


def test_tied_hf_model_imports_with_unscaled_tied_logits():
    directory, ref = golden("llama_tied")
    model, module = hf.load(directory, dtype="float32")
    assert model.cfg.tie_embeddings and not model.cfg.scale_tied_logits
    _assert_golden_logits(module, ref)


def test_mistral_without_sliding_window_is_the_same_network():
    directory, ref = golden("mistral")
    assert json.loads((directory / hf.CONFIG_FILE).read_text())["model_type"] == "mistral"
    _, module = hf.load(directory, dtype="float32")
    _assert_golden_logits(module, ref)


@pytest.mark.parametrize("changes, option", [
    # RoPE scalings that change with the sequence length (tests/test_rope_scaling.py has
    # the ones we compute)
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_scaling.rope_type='dynamic'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type='dynamic'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 5e5, "factor": 32.0}},
     "rope_parameters.rope_type='longrope'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "qwen2"}, "model_type='qwen2'"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
])
def test_unsupported_options_are_refused_by_name(changes, option):
    with pytest.raises(ValueError) as err:
        hf.config_from_hf({**LLAMA_CONFIG, **changes})
    assert option in str(err.value) and "not supported" in str(err.value)


def test_both_config_json_forms_and_defaults():
    v4 = hf.config_from_hf({**LLAMA_CONFIG, "rope_scaling": None, "torch_dtype": "bfloat16"})
    v5 = hf.config_from_hf({**{k: v for k, v in LLAMA_CONFIG.items() if k != "rope_theta"},
                            "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
                            "dtype": "bfloat16"})
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.dtype == "bfloat16"
    minimal = hf.config_from_hf({k: LLAMA_CONFIG[k] for k in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads")})
    assert (minimal.num_kv_heads, minimal.head_dim, minimal.norm_eps, minimal.rope_theta) == (
        4, 16, 1e-6, 10_000.0)  # transformers' LlamaConfig defaults
    with pytest.raises(ValueError, match="no 'intermediate_size'"):
        hf.config_from_hf({k: v for k, v in LLAMA_CONFIG.items() if k != "intermediate_size"})


def test_weights_the_config_does_not_describe_are_refused(tmp_path):
    """The golden Llama with layer 0's attention biases added (as a model saved with
    attention_bias=True has them) and config.json left saying attention_bias=False."""
    source, _ = golden("llama")
    shutil.copy(source / hf.CONFIG_FILE, tmp_path / hf.CONFIG_FILE)
    weights = safetensors.numpy.load_file(str(source / hf.SAFETENSORS_FILE))
    rng = np.random.default_rng(12)
    for proj, size in (("q", 64), ("k", 32), ("v", 32), ("o", 64)):
        weights[f"model.layers.0.self_attn.{proj}_proj.bias"] = (
            0.1 * rng.standard_normal(size)).astype(np.float32)
    safetensors.numpy.save_file(weights, str(tmp_path / hf.SAFETENSORS_FILE),
                                metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not use: \['model.layers.0.self_attn.k_proj.bias'"):
        hf.load(tmp_path, dtype="float32")


def test_a_folder_without_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        hf.load(tmp_path)


# ------------------------------------------------------------------------------ export


def our_llama(**changes):
    """Our tiny Llama-form model with random weights, norm scales away from 1."""
    cfg = tiny_config(**{"block": "sequential", "tie_embeddings": False,
                         "rope_theta": 500_000.0, "norm_eps": 1e-5, **changes})
    module = make_module(cfg, seed=7)
    rng = np.random.default_rng(8)
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        if path[-1] == "scale":
            var[...] = jnp.asarray(1 + 0.2 * rng.standard_normal(var[...].shape), jnp.float32)
    return cfg, module


# (our_llama's changes, whether the export is HF-tied) of each Llama form we export.
EXPORT_FORMS = [
    pytest.param({}, False, id="untied"),
    pytest.param({"tie_embeddings": True, "scale_tied_logits": False}, True, id="tied_unscaled"),
    # PaLM-scaled tied logits: exported untied, head E/√D
    pytest.param({"tie_embeddings": True}, False, id="tied_scaled_as_untied"),
    pytest.param({"scan_layers": False}, False, id="unrolled"),
]


@pytest.mark.parametrize("name", ["llama", "llama_tied"])
def test_export_of_an_imported_model_is_the_golden_folder_bitwise(tmp_path, name):
    """Import then export gives back transformers' own files: every tensor (names, dtypes,
    values) and the config fields a loader reads. With the import tests, this pins the
    export's mapping to Hugging Face's, not just to our import."""
    source, _ = golden(name)
    model, module = hf.load(source, dtype="float32")
    original = json.loads((source / hf.CONFIG_FILE).read_text())
    files = hf.write_hf(tmp_path, model.cfg, nnx.state(module, nnx.Param),
                        token_ids={k: original[k] for k in hf.TOKEN_ID_FIELDS})
    assert files == [hf.CONFIG_FILE, hf.SAFETENSORS_FILE]
    golden_tensors, exported = tensors(source), tensors(tmp_path)
    assert sorted(exported) == sorted(golden_tensors)  # tied: no lm_head.weight in either
    for tensor_name, value in golden_tensors.items():
        assert exported[tensor_name].dtype == value.dtype == np.float32
        np.testing.assert_array_equal(exported[tensor_name], value, err_msg=tensor_name)
    config = json.loads((tmp_path / hf.CONFIG_FILE).read_text())
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "hidden_act", "rms_norm_eps", "attention_bias", "mlp_bias",
                "tie_word_embeddings", *hf.TOKEN_ID_FIELDS):
        assert config[key] == original[key], key
    assert config["rope_theta"] == original["rope_parameters"]["rope_theta"] == 5e5
    assert hf.config_from_hf(config, dtype="float32") == model.cfg


@pytest.mark.parametrize("changes, hf_tied", EXPORT_FORMS)
def test_exported_model_imports_back_with_the_same_logits(tmp_path, changes, hf_tied):
    """Each Llama form of ours, exported and read back by hf.load (tests/test_hf_live.py
    loads the same exports in transformers)."""
    cfg, module = our_llama(**changes)
    files = hf.write_hf(tmp_path, cfg, nnx.state(module, nnx.Param),
                        token_ids={"pad_token_id": None})
    assert files == [hf.CONFIG_FILE, hf.SAFETENSORS_FILE]
    model, imported = hf.load(tmp_path, dtype="float32")
    assert model.cfg.tie_embeddings == hf_tied and not model.cfg.scale_tied_logits
    assert ("lm_head.weight" in tensors(tmp_path)) != hf_tied
    tokens = random_tokens(9, (2, 24), cfg.vocab_size)
    ours, back = jit_apply(module)(tokens), jit_apply(imported)(tokens)
    assert np.abs(ours).max() > 1.0
    assert max_diff(ours, back) < ATOL


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
    cfg, module = our_llama()
    files = hf.write_hf(tmp_path, cfg, nnx.state(module, nnx.Param), max_shard_bytes=20_000)
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and files == ["config.json", *shards, hf.INDEX_FILE]
    assert index["metadata"]["total_size"] == 4 * sum(
        v[...].size for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))
    assert sorted(index["weight_map"]) == sorted(tensors(tmp_path))
    _, imported = hf.load(tmp_path, dtype="float32")
    tokens = random_tokens(10, (1, 16), cfg.vocab_size)
    assert max_diff(jit_apply(module)(tokens), jit_apply(imported)(tokens)) < ATOL
    with pytest.raises(FileExistsError, match="not empty"):
        hf.write_hf(tmp_path, cfg, nnx.state(module, nnx.Param))


# ------------------------------------------------------------------------------ commands


def _run_cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-m", "t5x_like.hf", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_import_then_export_commands_round_trip_the_weights_bitwise(tmp_path):
    golden_dir, _ = golden("llama")
    source = shard_copy(golden_dir, tmp_path / "hf", tensors_per_shard=2)
    ckpt, gin_file, out = tmp_path / "ckpt", tmp_path / "model.gin", tmp_path / "out"
    _run_cli("import", f"--hf_dir={source}", f"--out={ckpt}", f"--gin_out={gin_file}",
             "--dtype=float32")
    assert {"config", "params"} <= set(os.listdir(ckpt))
    assert "layers.TransformerConfig.scale_tied_logits = False" in gin_file.read_text()
    _run_cli("export", f"--gin_file={gin_file}", f"--checkpoint={ckpt}", f"--out={out}",
             "--max_shard_bytes=40000", "--bos_token_id=1", "--eos_token_id=2",
             "--pad_token_id=none")
    original, exported = tensors(source), tensors(out)
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    hf_config = json.loads((out / "config.json").read_text())
    golden_config = json.loads((golden_dir / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert hf_config[key] == golden_config[key], key
    assert hf_config["rope_theta"] == 500_000.0


def test_model_gin_text_builds_the_same_config():
    import gin

    cfg = hf.config_from_hf({**LLAMA_CONFIG, "tie_word_embeddings": True}, dtype="bfloat16")
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
    assert max_diff(ours, expected) < 1e-4 and np.abs(expected).max() > 0.1
    # Without the permutation the two conventions disagree: the test can fail.
    attn.wq[...], attn.wk[...] = jnp.asarray(wq, jnp.float32), jnp.asarray(wk, jnp.float32)
    assert max_diff(attn(xj, xj, mask, pos, pos), expected) > 1e-2
    for w in (wq, wk):
        np.testing.assert_array_equal(hf.half_split_to_interleaved(hf.interleaved_to_half_split(w)), w)
