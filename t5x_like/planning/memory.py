"""Per-device memory of a training step: the state exactly, the activations by formula.

The state (parameters, their gradients, the optimizer's moments) is counted from the
abstract sharded train state: each leaf's shard shape under its PartitionSpec, for any
mesh sizes (`state_bytes`), so a planner can price a mesh it has no devices for.

The activations are a formula in the model's shape (`activation_bytes`,
docs/PLANNING.md "Activation memory"): what the scan over layers keeps per layer for the
backward pass under the configured remat policy, one layer's full working set while it
is recomputed and differentiated, and the logits; `gathered_weight_bytes` adds the
weights FSDP gathers for the layer in flight. Checked against XLA's own count for
float32 models in tests/test_memory.py. It mirrors how the blocks in layers.py compute
(matmul outputs in the compute dtype; an attention the XLA path runs materialises float32
[B, H, L, M] scores and probabilities, one the fused kernels run holds none: see
`attention_kernels`; the training loss's float32 logits whole, or one chunk of positions
at a time under the fused loss) and is labelled an estimate next to the compiler's own
count. The memory options it reads from the rule preset and the config: kv heads and
the residual stream's length split over `tensor` (`Split`), and the matmul-form
embedding's one-hot rows and FLOPs (`embedding_matmul_flops`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from t5x_like.model import attention, families, partitioning
from t5x_like.model.partitioning import BATCH, HEADS, KV_HEADS, LAYERS, LENGTH

_F32 = 4  # attention logits and probabilities, the output logits: float32 (layers.py)


# ---------------------------------------------------------------------------- the state


def abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
    """A device-free mesh of these axis sizes (for shard shapes and size checks)."""
    names = tuple(partitioning.MESH_AXES)
    return AbstractMesh(tuple(sizes[a] for a in names), names,
                        axis_types=(AxisType.Auto,) * len(names))


def shard_bytes(leaf: jax.ShapeDtypeStruct, sizes: Mapping[str, int],
                gathered: tuple[str, ...] = ()) -> int:
    """Bytes of one device's shard of `leaf` (carrying a NamedSharding) on a mesh of
    `sizes`, with the mesh axes in `gathered` undone (an FSDP all-gather's result)."""
    sizes = {a: 1 if a in gathered else n for a, n in sizes.items()}
    shape = NamedSharding(abstract_mesh(sizes), leaf.sharding.spec).shard_shape(leaf.shape)
    return math.prod(shape) * jnp.dtype(leaf.dtype).itemsize


def state_bytes(state, sizes: Mapping[str, int]) -> int:
    """Per-device bytes of an abstract sharded pytree on a mesh of `sizes`."""
    return sum(shard_bytes(leaf, sizes) for leaf in jax.tree.leaves(state))


def gathered_weight_bytes(params, sizes: Mapping[str, int]) -> int:
    """What FSDP gathers at once: the weights of the layer in flight, whole along
    `fsdp` and still split along `tensor` (the largest layer of the model's stacks).
    Embedding and output head are not gathered whole: the compiled steps reduce their
    partial products instead.

    params: the abstract sharded parameters (an nnx.State whose variables keep their
    logical axes: a scanned stack's first axis is LAYERS, one slice per layer).
    """
    per_stack: dict[str, int] = {}
    for path, var in nnx.to_flat_state(params):
        leaf = var.get_value()
        if (var.get_metadata().get("out_sharding") or ())[:1] == (LAYERS,):
            nbytes = shard_bytes(leaf, sizes, gathered=("fsdp",)) // leaf.shape[0]
            per_stack[str(path[0])] = per_stack.get(str(path[0]), 0) + nbytes
    return max(per_stack.values(), default=0)


# ----------------------------------------------------------------------- activations


@dataclasses.dataclass(frozen=True)
class Split:
    """How a mesh and batch divide one device's activations.

    rows: batch rows per device per microbatch; tensor: ways heads, MLP and vocabulary
    are split; kv_tensor: ways kv heads are split (fsdp_tp_kv*: the tensor size);
    length: ways the residual stream between blocks is split along its length
    (sequence parallelism, the *_sp presets: the tensor size; else 1).
    """

    rows: int
    tensor: int
    kv_tensor: int
    length: int = 1

    @classmethod
    def of(cls, rules, sizes: Mapping[str, int], rows_per_microbatch: int) -> Split:
        def ways(name: str) -> int:
            return partitioning.split_ways(rules, name, sizes)

        return cls(max(1, rows_per_microbatch // ways(BATCH)), ways(HEADS),
                   ways(KV_HEADS), ways(LENGTH))


XLA = "xla"
# The attention sites of a layer stack: 'decoder' (causal self-attention), 'encoder'
# (bidirectional) and 'cross' (decoder to encoder).
SITES = ("decoder", "encoder", "cross")


def attention_kernels(cfg, on: str, stacks: Mapping[str, int], features=(),
                      rows: int = 1) -> dict[str, str]:
    """What runs each attention of the model on platform `on` ('tpu', 'gpu', 'cpu') under
    cfg.attention_impl: {site: 'xla' or the fused kernel's name}, decided by
    attention.py's own rules (attention.resolve, attention.unsupported) on abstract
    shapes. features: the batch's model feature names, which say the masks as the
    networks build them (network.py): `*_segment_ids` present means packed rows, and
    `decoder_causal_attention` a prefix LM. An implementation the platform lacks is
    attention.resolve's error paragraph."""
    kernel = attention.resolve(cfg.attention_impl, on)
    features = set(features)
    length, memory = stacks["decoder"], stacks.get("encoder")
    prefix = "decoder_causal_attention" in features
    packed_enc = "encoder_segment_ids" in features
    packed_dec = "decoder_segment_ids" in features or (memory is not None and packed_enc)

    def runs(q_len: int, kv_len: int, causal: bool, packed: bool, with_prefix: bool) -> str:
        if kernel == XLA:
            return XLA
        q = jax.ShapeDtypeStruct((rows, q_len, cfg.num_heads, cfg.head_dim), cfg.dtype)
        k = jax.ShapeDtypeStruct((rows, kv_len, cfg.num_kv_heads, cfg.head_dim), cfg.dtype)
        ids = [jax.ShapeDtypeStruct((rows, n), jnp.int32) for n in (q_len, kv_len)]
        marks = ([jax.ShapeDtypeStruct((rows, n), jnp.bool_) for n in (q_len, kv_len)]
                 if with_prefix else [None, None])
        mask = attention.Mask(*ids, *marks, causal=causal, packed=packed or with_prefix,
                              max_segments=cfg.max_segments_per_row)
        return kernel if attention.unsupported(kernel, q, k, mask) is None else XLA

    out = {"decoder": runs(length, length, True, packed_dec, prefix and memory is None)}
    if memory:
        out["encoder"] = runs(memory, memory, False, packed_enc, False)
        out["cross"] = runs(length, memory, False, packed_dec, False)
    return out


def _scores(r: int, heads: int, length: int, slots: int, c: int, kernel: str,
            segments: int = 1) -> int:
    """One attention's [r, heads, length, slots] float32 scores and probabilities and the
    probabilities cast back (the XLA path); a fused kernel keeps none (its per-row
    softmax statistics, [r, heads, length] float32, are counted instead; cuDNN keeps them
    for each of a packed row's `segments` slots, counted for unpacked rows too)."""
    if kernel == XLA:
        return r * heads * length * slots * (2 * _F32 + c)
    return r * heads * length * 2 * _F32 * (segments if kernel == "cudnn" else 1)


def _layer(cfg, split: Split, length: int, memory: int | None, c: int,
           kernels: Mapping[str, str] | None = None) -> dict[str, int]:
    """Bytes of one layer's tensors (names as in layers.py) for a stack of `length`
    positions; `memory`: the encoder length a decoder layer cross-attends to. kernels:
    this layer's {'self': ..., 'cross': ...} attention implementations (default 'xla')."""
    kernels = kernels or {}
    r, t = split.rows, split.tensor
    heads, kv_heads, mlp = cfg.num_heads // t, cfg.num_kv_heads // split.kv_tensor, cfg.mlp_dim // t
    x = r * length * cfg.emb_dim * c
    # The layer input, as the scan carries and saves it: under sequence parallelism
    # 1/length of the positions per device (the block gathers them back before its
    # projections, so everything else below keeps the whole length).
    carry = r * -(-length // split.length) * cfg.emb_dim * c
    q = r * length * heads * cfg.head_dim * c
    kv = 2 * r * length * kv_heads * cfg.head_dim * c
    h = r * length * mlp * c
    gated = cfg.mlp_activation != "gelu"
    # Dot outputs ("minimal" keeps exactly these): q, k, v, attention out, MLP in/out.
    dots = q + kv + x + (2 if gated else 1) * h + x
    # The rest of the forward: norms, RoPE'd q/k, attention values, activation output
    # and product, scores and probabilities (float32) and the probabilities cast back.
    norms = (1 if cfg.block == "parallel" else 2 + (memory is not None)) * x
    segments = cfg.max_segments_per_row
    scores = _scores(r, heads, length, length, c, kernels.get("self", XLA), segments)
    rest = norms + q + kv // 2 + q + (2 if gated else 1) * h + scores
    if memory is not None:  # cross-attention: q, k/v over the encoder, out; its scores
        cross_kv = 2 * r * memory * kv_heads * cfg.head_dim * c
        dots += q + cross_kv + x
        rest += q + _scores(r, heads, length, memory, c, kernels.get("cross", XLA), segments)
    return {"carry": carry, "dots": dots, "rest": rest}


# layers.py's named policies in the terms of the three above, by what stays in device
# memory: saving the tagged projections keeps the matmul outputs, as 'minimal' does;
# 'save_nothing' is 'full'; offloading moves the saved projections to host memory.
_PRICED_AS = {"save_nothing": "full", "save_attention_and_mlp_projections": "minimal",
              "offload_to_host": "full"}


def priced_policy(policy: str) -> str:
    """'none', 'minimal' or 'full': the policy whose device memory `policy` has."""
    return _PRICED_AS.get(policy, policy)


def _saved(layer: Mapping[str, int], policy: str) -> int:
    """What the scan keeps per layer for the backward pass (layers.py's remat policies:
    'full' saves nothing but the layer input, 'minimal' the dot outputs too)."""
    return {"full": layer["carry"], "minimal": layer["carry"] + layer["dots"],
            "none": layer["carry"] + layer["dots"] + layer["rest"]}[priced_policy(policy)]


def activation_bytes(cfg, split: Split, stacks: Mapping[str, int],
                     policy: str | None = None,
                     kernels: Mapping[str, str] | None = None) -> dict[str, int]:
    """Per-device activation bytes of one microbatch, by part.

    stacks: {'encoder': M, 'decoder': L} positions per row (no 'encoder' for a
    decoder-only model; a prefix LM's L is inputs + targets). policy: remat policy,
    default the config's. kernels: what runs each attention (`attention_kernels`);
    default 'xla' everywhere, as XLA:CPU compiles it.
    """
    policy = policy or cfg.remat_policy
    kernels = kernels or {}
    c = jnp.dtype(cfg.dtype).itemsize
    memory = stacks.get("encoder")
    layers = []
    if memory:
        layers.append((cfg.num_encoder_layers, _layer(
            cfg, split, memory, None, c, {"self": kernels.get("encoder", XLA)})))
    layers.append((cfg.num_decoder_layers, _layer(
        cfg, split, stacks["decoder"], memory, c,
        {"self": kernels.get("decoder", XLA), "cross": kernels.get("cross", XLA)})))
    saved = sum(n * _saved(layer, policy) for n, layer in layers)
    # The layer being differentiated: its whole forward, recomputed or kept (the
    # gradients reuse the buffers its forward frees).
    working = max(_saved(layer, "none") for _, layer in layers)
    # Float32 logits, their softmax and their gradient, over this device's vocabulary:
    # of every position, or under the fused loss of one chunk of positions at a time
    # (families.fused_loss_sums); with the vocabulary whole on every device (no tensor
    # split) the compiled steps also build the embedding's (or head's) gradient whole
    # before reducing it. The gradients are float32 in the fused loss, in the compute
    # dtype from the plain loss's head (layers.head_logits).
    vocab = cfg.vocab_size // split.tensor
    positions = stacks["decoder"]
    fused = families.fuses_loss(cfg)
    if fused:
        positions = families._chunk_length(positions, cfg.loss_chunk_length)
    grad = _F32 if fused else c
    logits = split.rows * positions * vocab * (2 * _F32 + grad)
    if split.tensor == 1:
        logits += vocab * cfg.emb_dim * grad
    # The matmul-form embedding (embed_lookup='matmul') holds its one-hot rows, [r, L,
    # this device's vocabulary] in the compute dtype, from the forward pass (outside the
    # remat'd layers) to the table's gradient; the row lookup holds none.
    embedding = (split.rows * sum(stacks.values()) * vocab * c
                 if cfg.embed_lookup == "matmul" else 0)
    return {"saved": saved, "working": working, "logits": logits, "embedding": embedding,
            "total": saved + working + logits + embedding}


def embedding_matmul_flops(cfg, batch_size: int, stacks: Mapping[str, int]) -> float:
    """FLOPs per step the matmul-form embedding adds to the model's (which count a row
    lookup as free): one-hot [T, V] · table [V, D] forward and onehotᵀ · cotangent [V, D]
    for the table's gradient, 4·T·V·D over the step's T positions (every stack's: an
    encoder-decoder embeds inputs and targets); 0 for the row lookup."""
    if cfg.embed_lookup != "matmul":
        return 0.0
    return 4.0 * batch_size * sum(stacks.values()) * cfg.vocab_size * cfg.emb_dim
