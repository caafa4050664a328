"""Per-device temporary memory of a compiled training gradient under the memory options
(docs/MODELS.md, "Memory options"), on 8 emulated CPU devices:

    .venv/bin/python bench/memory_options.py

A 4-layer Llama-shaped model (D 512, 8 heads = 8 kv heads, MLP 2048, vocabulary 8192),
8 rows of 1,024 tokens, bfloat16. Each line compiles the step ahead of time (abstract
parameters, nothing runs) and prints XLA's temp_size_in_bytes per device. This is the
CPU compiler's buffer assignment, not a GPU's or TPU's; it shows the direction and the
rough size of each option, not an accelerator's number.
"""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from t5x_like.model import partitioning  # noqa: E402
from t5x_like.model.families import model_for  # noqa: E402
from t5x_like.model.layers import TransformerConfig  # noqa: E402

BASE = dict(vocab_size=8192, emb_dim=512, num_heads=8, num_kv_heads=8, head_dim=64,
            mlp_dim=2048, num_decoder_layers=4, dtype="bfloat16", block="sequential",
            tie_embeddings=False, remat_policy="full")
ROWS, LENGTH = 8, 1024
TP = {"fsdp": 2, "tensor": 4}
CASES = [
    ("fsdp 2 x tensor 4, fsdp_tp_kv, remat full", TP, "fsdp_tp_kv", {}),
    ("fsdp 2 x tensor 4, fsdp_tp_kv_sp, remat full", TP, "fsdp_tp_kv_sp", {}),
    ("fsdp 2 x tensor 4, fsdp_tp (kv whole), remat full", TP, "fsdp_tp", {}),
    ("fsdp 2 x tensor 4, fsdp_tp_kv, save_attention_and_mlp_projections", TP, "fsdp_tp_kv",
     dict(remat_policy="save_attention_and_mlp_projections")),
    ("fsdp 2 x tensor 4, fsdp_tp_kv, remat none", TP, "fsdp_tp_kv", dict(remat_policy="none")),
    ("fsdp 8, embed_lookup gather", {"fsdp": 8}, "fsdp", {}),
    ("fsdp 8, embed_lookup matmul", {"fsdp": 8}, "fsdp", dict(embed_lookup="matmul")),
]


def temp_mib(mesh_shape, preset, overrides) -> float:
    model = model_for(TransformerConfig(**{**BASE, **overrides}))
    mesh, rules = partitioning.make_mesh(mesh_shape), partitioning.get_rules(preset)
    graphdef, state = partitioning.abstract_sharded(
        lambda: model.make_module(nnx.Rngs(0)), mesh, rules)
    tokens = jax.ShapeDtypeStruct((ROWS, LENGTH), np.int32,
                                  sharding=partitioning.batch_sharding(mesh))
    batch = dict(decoder_input_tokens=tokens, decoder_target_tokens=tokens,
                 decoder_loss_weights=tokens)

    def gradient(state, batch):
        return jax.grad(lambda s: model.loss_fn(nnx.merge(graphdef, s), batch)[0])(state)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        compiled = jax.jit(gradient).lower(state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main():
    for label, mesh_shape, preset, overrides in CASES:
        print(f"{label:70s} {temp_mib(mesh_shape, preset, overrides):7.1f} MiB temp/device",
              flush=True)


if __name__ == "__main__":
    main()
