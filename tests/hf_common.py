"""What the Hugging Face tests (tests/test_hf.py, tests/test_hf_live.py) and the script
that makes their golden files (tests/golden/hf/make_golden.py) share: the tiny models'
sizes, how they are built and randomized, where the golden files are, the tolerance.

One definition, so the golden files are the models the live tests build. numpy only at
import: the default suite imports it without torch, and make_golden.py imports it under
any Python that has torch and transformers (no jax, no t5x_like). torch and
transformers are imported by the functions that need them.
"""
import copy
import os

import numpy as np

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "hf")
VOCAB = 256
ATOL = 1e-4  # float32 throughout; measured: 1.4e-6 to 2.2e-6 on logits up to ~5, 1.6e-5 on
# the tied models' logits up to ~60 (unscaled x·Eᵀ with N(0, 1) embeddings)
HF_SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500_000.0)
# A config.json of HF_SIZES as a dict, for the tests of config_from_hf alone.
LLAMA_CONFIG = {"model_type": "llama", **HF_SIZES, "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}
# RoPE scalings (tests/test_rope_scaling.py), each of a tiny Llama whose original context
# is 32 tokens, run on 96: rope_theta 10,000 with head_dim 16 puts llama3's frequencies in
# all three of its bands (kept, smoothed, divided) and yarn's ramp across dims 0-2.
ROPE_ORIGINAL_LENGTH = 32
ROPE_SCALINGS = {
    "llama3": dict(rope_theta=10_000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": ROPE_ORIGINAL_LENGTH}),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "yarn": dict(rope_theta=10_000.0, rope_scaling={
        "rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": ROPE_ORIGINAL_LENGTH}),
}
# The golden models (tests/golden/hf/<name>/): save_hf's arguments, as the live tests use
# them: the hf_llama fixture, the tied model, Mistral without a sliding window, and a
# Llama of each RoPE scaling (rope_<type>).
GOLDEN_MODELS = {
    "llama": dict(family="llama", seed=0),
    "llama_tied": dict(family="llama", seed=2, tie_word_embeddings=True),
    "mistral": dict(family="mistral", seed=4, sliding_window=None),
    **{f"rope_{kind}": dict(family="llama", seed=6 + i, **overrides)
       for i, (kind, overrides) in enumerate(ROPE_SCALINGS.items())},
}
GOLDEN_VERSIONS_FILE = "versions.json"  # in GOLDEN_DIR: the versions that made the files
GOLDEN_REFERENCE_FILE = "reference.npz"  # in each model's folder: inputs and outputs


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def randomize(model, seed: int) -> None:
    """Weights of unit-scale activations (init_range 0.02 would leave logits near 0 and
    make a 1e-4 comparison weak); norm weights away from 1 so a misplaced norm shows."""
    import torch

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


def save_hf(directory, *, family="llama", seed=0, save_kwargs=None, **overrides):
    """A tiny float32 transformers model of HF_SIZES (untied unless overridden), randomized
    with `seed` and saved by save_pretrained in `directory`; returns the model (eval)."""
    import torch
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    # A copy: transformers' config fills the rope_scaling dict it is given (rope_theta).
    config = config_class(**copy.deepcopy({**HF_SIZES, "tie_word_embeddings": False,
                                           **overrides}))
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    randomize(model, seed)
    model.save_pretrained(directory, **(save_kwargs or {}))
    return model


def hf_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def hf_generate(model, prompt, max_new_tokens: int) -> np.ndarray:
    """transformers' greedy `generate` of the tokens after `prompt` [B, L]: no EOS, no
    padding (every position attended), as our decoder with eos_id=-1 runs."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor(np.asarray(prompt), dtype=torch.long), do_sample=False,
            max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0,
            attention_mask=torch.ones(prompt.shape, dtype=torch.long))
    return out[:, prompt.shape[1]:].numpy()
