"""Logical axis names, rule presets, meshes and sharded initialisation.

Every parameter declares its logical axes where it is created (layers.py) using the
constants below; a rule preset maps them to the mesh axes (`data`, `fsdp`, `tensor`).
"""

# The closed set of logical axis names. Nothing else may appear in a parameter's or
# an activation's sharding annotation.
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
VOCAB = "vocab"
LAYERS = "layers"

LOGICAL_AXES = (BATCH, LENGTH, EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS)

MESH_AXES = ("data", "fsdp", "tensor")
