"""Makes the golden files of tests/test_hf.py: tiny random Hugging Face models and what
transformers computes with them, so the default suite checks Hugging Face parity without
torch or transformers (the way MaxText keeps Hugging Face golden logits).

To regenerate them (after changing the models of tests/hf_common.py, or to check a new
transformers release), in any environment with torch, transformers, safetensors and
numpy (`pip install -e '.[interop]'`; it needs neither jax nor t5x_like, so any Python
3 will do), from the repository root:

    python tests/golden/hf/make_golden.py [NAME ...]

(NAMEs: only those models; np.savez stamps the time into reference.npz, so remaking an
unchanged model still shows a diff) then run `pytest tests/test_hf.py
tests/test_rope_scaling.py` and commit tests/golden/hf/. The live tests
(tests/test_hf_live.py) compare against transformers directly where it is installed.

For each model of hf_common.GOLDEN_MODELS (`llama`: untied GQA, rope_theta 500k;
`llama_tied`; `mistral` without a sliding window; `rope_llama3`, `rope_linear`,
`rope_yarn`: RoPE scaling with a 32-token original context) it writes
tests/golden/hf/<name>/: the save_pretrained folder (config.json, model.safetensors,
float32) and reference.npz with `tokens` and transformers' `logits` for them, and for
`llama` and the rope models a `prompt` and the 32 tokens `generate(do_sample=False)`
continues it with (`generated`; the rope models' reach position 95). versions.json here
records the versions that made them.
"""
import json
import os
import platform
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # tests/, for hf_common

import hf_common  # noqa: E402  (after the path)

GENERATED_TOKENS = 32
# name -> (seed, shape) of its reference inputs; the seeds and shapes of the live tests.
TOKENS = {"llama": (0, (2, 40)), "llama_tied": (3, (2, 24)), "mistral": (5, (1, 24)),
          **{f"rope_{kind}": (20 + i, (2, 3 * hf_common.ROPE_ORIGINAL_LENGTH))
             for i, kind in enumerate(hf_common.ROPE_SCALINGS)}}
# The prompts that generate continues (the rope models' run past the original context).
PROMPTS = {"llama": (1, (2, 8)),
           **{f"rope_{kind}": (30 + i, (2, 2 * hf_common.ROPE_ORIGINAL_LENGTH))
              for i, kind in enumerate(hf_common.ROPE_SCALINGS)}}


def _tokens(seed, shape):
    """Token ids in [1, VOCAB): no pad (0) anywhere."""
    return np.random.default_rng(seed).integers(1, hf_common.VOCAB, size=shape).astype(np.int32)


def make(name: str) -> dict[str, np.ndarray]:
    import torch
    import transformers

    directory = os.path.join(HERE, name)
    shutil.rmtree(directory, ignore_errors=True)  # no file of an earlier run stays
    built = hf_common.save_hf(directory, **hf_common.GOLDEN_MODELS[name])
    # The reference is the saved folder as transformers loads it (what the tests import),
    # checked to be the model that was saved.
    model_class = type(built)
    model = model_class.from_pretrained(directory, dtype=torch.float32).eval()
    tokens = _tokens(*TOKENS[name])
    out = {"tokens": tokens, "logits": hf_common.hf_logits(model, tokens)}
    np.testing.assert_array_equal(out["logits"], hf_common.hf_logits(built, tokens))
    assert np.abs(out["logits"]).max() > 2.0, name  # logits of real size
    if name in PROMPTS:
        out["prompt"] = _tokens(*PROMPTS[name])
        out["generated"] = hf_common.hf_generate(model, out["prompt"], GENERATED_TOKENS
                                                 ).astype(np.int32)
        assert out["generated"].shape == (2, GENERATED_TOKENS)
        assert len(set(out["generated"][0].tolist())) > 3  # not a constant sequence
    np.savez(os.path.join(directory, hf_common.GOLDEN_REFERENCE_FILE), **out)
    sizes = {f: os.path.getsize(os.path.join(directory, f)) for f in sorted(os.listdir(directory))}
    print(f"{name} (transformers {transformers.__version__}):",
          ", ".join(f"{f} {size:,} B" for f, size in sizes.items()))
    return out


def main() -> None:
    import safetensors
    import torch
    import transformers

    names = sys.argv[1:] or list(hf_common.GOLDEN_MODELS)
    unknown = sorted(set(names) - set(hf_common.GOLDEN_MODELS))
    if unknown:
        raise SystemExit(f"unknown golden models {unknown}; expected "
                         f"{list(hf_common.GOLDEN_MODELS)}")
    for name in names:
        make(name)
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__,
                "safetensors": safetensors.__version__, "numpy": np.__version__}
    with open(os.path.join(HERE, hf_common.GOLDEN_VERSIONS_FILE), "w") as f:
        f.write(json.dumps(versions, indent=2) + "\n")
    print(versions)


if __name__ == "__main__":
    main()
