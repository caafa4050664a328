"""Hugging Face interop (t5x_like/interop/hf.py) against transformers itself: tiny random Llama
models saved with save_pretrained, imported, run, exported and loaded back in
transformers; and the golden files of tests/test_hf.py checked against the installed
transformers.

torch and transformers are the reference only (the `interop` extra); without them this
module is skipped, and tests/test_hf.py checks the same parity against the golden files.
Nothing is downloaded: every model is made here with random weights.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402  (after the skips, as every import below)
from hf_common import (  # noqa: E402
    ATOL,
    GOLDEN_MODELS,
    ROPE_ORIGINAL_LENGTH,
    ROPE_SCALINGS,
    VOCAB,
    hf_generate,
    hf_logits,
    max_diff,
    save_hf,
)
from test_hf import EXPORT_FORMS, golden, greedy_tokens, load_llama, our_llama, tensors  # noqa: E402
from tiny import jit_apply, random_tokens, strict_rank_promotion  # noqa: E402,F401

from t5x_like.interop import hf  # noqa: E402


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny GQA Llama (untied, rope_theta 500k, float32) and its save_pretrained folder:
    the golden `llama`."""
    directory = tmp_path_factory.mktemp("hf_llama")
    return save_hf(directory, **GOLDEN_MODELS["llama"]), directory


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
    module = load_llama(directory, scan_layers)
    tokens = random_tokens(0, (2, 40), VOCAB)
    ours, ref = jit_apply(module)(tokens), hf_logits(reference, tokens)
    assert np.abs(ref).max() > 2.0  # logits of real size: the tolerance means something
    assert max_diff(ours, ref) < ATOL


def test_greedy_32_tokens_match_generate(hf_llama):
    """Our KV-cache decoder against transformers' `generate(do_sample=False)`: the same
    32 tokens."""
    reference, directory = hf_llama
    model, module = hf.load(directory, dtype="float32")
    prompt = random_tokens(1, (2, 8), VOCAB)
    expected = hf_generate(reference, prompt, 32)
    assert expected.shape == (2, 32)
    assert len(set(expected[0].tolist())) > 3  # not a constant sequence
    np.testing.assert_array_equal(greedy_tokens(model, module, prompt), expected)


def test_tied_hf_model_imports_with_unscaled_tied_logits(tmp_path):
    reference = save_hf(tmp_path, **GOLDEN_MODELS["llama_tied"])
    model, module = hf.load(tmp_path, dtype="float32")
    assert model.cfg.tie_embeddings and not model.cfg.scale_tied_logits
    tokens = random_tokens(3, (2, 24), VOCAB)
    assert max_diff(jit_apply(module)(tokens), hf_logits(reference, tokens)) < ATOL


def test_mistral_without_sliding_window_is_the_same_network(tmp_path):
    reference = save_hf(tmp_path, **GOLDEN_MODELS["mistral"])
    _, module = hf.load(tmp_path, dtype="float32")
    tokens = random_tokens(5, (1, 24), VOCAB)
    assert max_diff(jit_apply(module)(tokens), hf_logits(reference, tokens)) < ATOL


# ------------------------------------------------------------------------------ golden files


@pytest.mark.parametrize("name", list(GOLDEN_MODELS))
def test_golden_files_are_what_this_transformers_builds_and_computes(tmp_path, name):
    """The golden files of tests/test_hf.py hold the models hf_common.save_hf builds here
    (bitwise) and what the installed transformers computes with them. If a new
    transformers release fails this, regenerate them (tests/golden/hf/make_golden.py)."""
    directory, ref = golden(name)
    built = save_hf(tmp_path, **GOLDEN_MODELS[name])
    golden_tensors, built_tensors = tensors(directory), tensors(tmp_path)
    assert sorted(built_tensors) == sorted(golden_tensors)
    for tensor_name, value in golden_tensors.items():
        np.testing.assert_array_equal(built_tensors[tensor_name], value, err_msg=tensor_name)
    loaded = type(built).from_pretrained(directory, dtype=torch.float32).eval()
    assert max_diff(hf_logits(loaded, ref["tokens"]), ref["logits"]) < ATOL
    if "generated" in ref:
        np.testing.assert_array_equal(hf_generate(loaded, ref["prompt"], 32), ref["generated"])


# ------------------------------------------------------------------------------ export


@pytest.mark.parametrize("changes, hf_tied", EXPORT_FORMS)
def test_exported_model_loads_in_transformers_with_the_same_logits(tmp_path, changes, hf_tied):
    cfg, module = our_llama(**changes)
    files = hf.write_hf(tmp_path, cfg, nnx.state(module, nnx.Param),
                        token_ids={"pad_token_id": None})
    assert files == ["config.json", "model.safetensors"]
    reference, info = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert reference.config.tie_word_embeddings == hf_tied
    tokens = random_tokens(9, (2, 24), cfg.vocab_size)
    ours, ref = jit_apply(module)(tokens), hf_logits(reference.eval(), tokens)
    assert np.abs(ref).max() > 1.0
    assert max_diff(ours, ref) < ATOL


def test_sharded_export_loads_in_transformers(tmp_path):
    cfg, module = our_llama()
    hf.write_hf(tmp_path, cfg, nnx.state(module, nnx.Param), max_shard_bytes=20_000)
    assert (tmp_path / hf.INDEX_FILE).exists()
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    tokens = random_tokens(10, (1, 16), cfg.vocab_size)
    assert max_diff(jit_apply(module)(tokens), hf_logits(reference.eval(), tokens)) < ATOL


# ------------------------------------------------------------------------------ RoPE scaling


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_scaled_rope_matches_transformers_past_the_original_context(tmp_path, kind):
    """A tiny Llama of each RoPE scaling (original context 32): logits on 96 tokens and
    the greedy continuation of a 64-token prompt to position 95, against transformers."""
    reference = save_hf(tmp_path, **GOLDEN_MODELS[f"rope_{kind}"])
    model, module = hf.load(tmp_path, dtype="float32")
    assert model.cfg.rope_scaling.rope_type == kind
    tokens = random_tokens(20, (2, 3 * ROPE_ORIGINAL_LENGTH), VOCAB)
    ref = hf_logits(reference, tokens)
    assert np.abs(ref).max() > 2.0
    assert max_diff(jit_apply(module)(tokens), ref) < ATOL
    prompt = random_tokens(21, (2, 2 * ROPE_ORIGINAL_LENGTH), VOCAB)
    expected = hf_generate(reference, prompt, 32)
    assert len(set(expected[0].tolist())) > 3
    np.testing.assert_array_equal(greedy_tokens(model, module, prompt), expected)


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
@pytest.mark.parametrize("form", hf.CONFIG_FORMS)
def test_exported_scaled_model_loads_in_transformers_with_the_same_logits(tmp_path, kind, form):
    cfg, module = our_llama(**ROPE_SCALINGS[kind])
    hf.write_hf(tmp_path, cfg, nnx.state(module, nnx.Param), config_form=form,
                token_ids={"pad_token_id": None})
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert reference.config.rope_parameters["rope_type"] == kind
    tokens = random_tokens(22, (2, 3 * ROPE_ORIGINAL_LENGTH), cfg.vocab_size)
    ours, ref = jit_apply(module)(tokens), hf_logits(reference.eval(), tokens)
    assert np.abs(ref).max() > 1.0
    assert max_diff(ours, ref) < ATOL
