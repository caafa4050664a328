"""Attention masks as structure, and the attention implementations that read them.

A `Mask` says which keys each query may see without building the [B, 1, L, M] boolean
matrix: segment ids (0 on padding; SeqIO's packed-row convention), causal or not (with the
slot offset of a KV cache's queries), and a prefix-LM prefix. Every mask the networks
use is one of these:

  causal LM (packed)      Mask.causal(segment_ids)
  prefix LM               Mask.causal(segment_ids, prefix=decoder_causal_attention)
  encoder (bidirectional) Mask.bidirectional(segment_ids)
  cross-attention         Mask.cross(decoder_segment_ids, encoder_segment_ids)
  KV-cache step/prefill   Mask.cached(valid_slots, offset, ...) (network._cached_layers)

`attend` runs one implementation (TransformerConfig.attention_impl, gin-bound):

  'xla'    jax.nn.dot_product_attention on the dense mask `Mask.dense` builds in the layer
           (XLA fuses it into the score select); every mask, every backend. The default on
           CPU: the same booleans as the masks built before this module, so the same losses.
  'splash' TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention) with
           segment ids: causal and bidirectional self-attention, cross-attention, packed
           rows, GQA/MQA (one MQA kernel per kv head), a KV-cache prefill at slot 0. Not
           the prefix LM (its mask is data; splash's masks are static) nor a query length
           that is not a multiple of 128 (the decode step). On CPU it runs in Pallas
           interpret mode, which is how tests/test_attention.py proves it.
  'cudnn'  cuDNN flash attention, GQA/MQA, bfloat16/float16 only. Unpacked rows (no
           segment ids given): jax.nn.dot_product_attention(implementation='cudnn'),
           causal, bidirectional and cross-attention. Packed rows (SeqIO's layout:
           segments 1, 2, ... in order from the row's first slot, padding only at the
           end): cuDNN's packed ("THD") layout, each segment a sequence of its own given by
           its first slot and length, at most TransformerConfig.max_segments_per_row per
           row (jax's fused_attention_stablehlo.dot_product_attention with q_offsets;
           Hopper or later). A row that breaks that layout or bound stops the step with
           an error naming the setting. Not the prefix LM (its mask is data) nor KV-cache
           steps (left padding).
  'auto'   the backend's kernel (TPU: splash, GPU: cudnn, CPU: xla); a mask or shape the
           kernel cannot do runs 'xla' with one log line naming why.

An explicit kernel that cannot do a mask, or that the backend lacks, is an error
paragraph naming the choices. No GPU or TPU was available where this was written: the
TPU and GPU paths follow the kernels' docstrings in jax 0.12.1 (splash_attention_kernel.py,
jax/_src/cudnn/fused_attention_stablehlo.py); splash is proven in interpret mode on CPU,
cuDNN's tests run only on a GPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec

from t5x_like.model.partitioning import BATCH, HEADS, KV_HEADS

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
# The kernel 'auto' picks per backend, and the backends each kernel runs on
# (splash on CPU: Pallas interpret mode, for tests; slow).
_AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla", "cpu": "xla"}
_RUNS_ON = {"xla": None, "splash": ("tpu", "cpu"), "cudnn": ("gpu", "cuda")}
_SPLASH_BLOCK = 128  # splash's smallest tile along a sequence (NUM_LANES)

_log = logging.getLogger(__name__)
_logged: set[str] = set()
# The platform the kernels are chosen for when it is not the default backend's
# (`platform_for`). A jax user context, so it is part of jax's trace and compile cache
# keys: a function traced for a TPU is traced again for the CPU, not reused. (jax
# versions without make_user_context: a plain context variable, whose traces do cross.)
_platform_override = (jax.make_user_context(None) if hasattr(jax, "make_user_context")
                      else contextvars.ContextVar("attention_platform", default=None))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query sees: q segment == kv segment != 0, and, when `causal`,
    key slot <= query slot (query l sits at slot `offset` + l), or both in the prefix.

    `packed` is static: False only when the rows are known to be single unpadded
    examples (segment ids all 1), which is what cuDNN's mask types can express.
    `max_segments` (static): when > 0, the ids are SeqIO's packed layout (segments 1,
    2, ... in order from slot 0, padding only at the end) with at most this many per
    row, which is what cuDNN's packed layout can express; 0: no such promise.
    """

    q_segment_ids: jax.Array  # [B, L] int32, 0 on padding
    kv_segment_ids: jax.Array  # [B, M]
    q_prefix: jax.Array | None = None  # [B, L] bool, prefix-LM prefix (causal only)
    kv_prefix: jax.Array | None = None  # [B, M] bool
    offset: jax.Array | None = None  # scalar int32 slot of query 0 (KV cache); None: 0
    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
    packed: bool = dataclasses.field(default=True, metadata=dict(static=True))
    max_segments: int = dataclasses.field(default=0, metadata=dict(static=True))

    @classmethod
    def causal_lm(cls, segment_ids_BL, prefix_BL=None, *, packed: bool = True,
                  max_segments: int = 0) -> Mask:
        """Decoder self-attention; prefix LM where `prefix_BL` (decoder_causal_attention)
        is non-zero: the prefix sees itself bidirectionally, within its segment."""
        prefix = None if prefix_BL is None else prefix_BL != 0
        return cls(segment_ids_BL, segment_ids_BL, prefix, prefix, causal=True,
                   packed=packed or prefix is not None, max_segments=max_segments)

    @classmethod
    def bidirectional(cls, segment_ids_BL, *, packed: bool = True,
                      max_segments: int = 0) -> Mask:
        """Encoder self-attention: every token sees its whole segment."""
        return cls(segment_ids_BL, segment_ids_BL, packed=packed, max_segments=max_segments)

    @classmethod
    def cross(cls, decoder_segment_ids_BL, encoder_segment_ids_BM, *,
              packed: bool = True, max_segments: int = 0) -> Mask:
        """Decoder segment k sees encoder segment k."""
        return cls(decoder_segment_ids_BL, encoder_segment_ids_BM, packed=packed,
                   max_segments=max_segments)

    @classmethod
    def cached(cls, num_queries: int, valid_BS, offset, prefix_BL=None, prefix_BS=None) -> Mask:
        """L new tokens at slots offset..offset+L-1 of a KV cache whose written real
        tokens are `valid_BS`: each sees the valid slots up to its own (left padding is
        invalid), and with a prefix LM prompt the prefix's later slots too. `offset` is
        the int 0 for a fresh cache's prefill (a static causal mask) or a traced index."""
        batch = valid_BS.shape[0]
        q_ids = jnp.ones((batch, num_queries), jnp.int32)
        prefix = None if prefix_BL is None else prefix_BL != 0
        return cls(q_ids, valid_BS.astype(jnp.int32), prefix, prefix_BS,
                   None if isinstance(offset, int) and offset == 0 else offset, causal=True)

    def dense(self):
        """The boolean [B, 1, L, M] matrix (for the 'xla' path and tests)."""
        q_BL, kv_BM = self.q_segment_ids, self.kv_segment_ids
        allowed_BLM = (q_BL[:, :, None] == kv_BM[:, None, :]) & (kv_BM != 0)[:, None, :]
        if self.causal:
            length, slots = q_BL.shape[1], kv_BM.shape[1]
            q_slot_L = jnp.arange(length) + (0 if self.offset is None else self.offset)
            causal_BLM = jnp.broadcast_to(
                (q_slot_L[:, None] >= jnp.arange(slots)[None, :])[None],
                (q_BL.shape[0], length, slots))
            if self.q_prefix is not None:
                causal_BLM = causal_BLM | (self.q_prefix[:, :, None] & self.kv_prefix[:, None, :])
            allowed_BLM = causal_BLM & allowed_BLM
        return allowed_BLM[:, None, :, :]


@contextlib.contextmanager
def platform_for(platform: str):
    """Choose kernels for `platform` ('tpu', 'gpu', 'cpu') rather than the default backend:
    for compiling ahead of time for another platform (a TPU topology on a CPU host)."""
    if isinstance(_platform_override, contextvars.ContextVar):
        token = _platform_override.set(platform)
        try:
            yield
        finally:
            _platform_override.reset(token)
    else:
        with _platform_override(platform):
            yield


def platform() -> str:
    chosen = (_platform_override.get() if isinstance(_platform_override, contextvars.ContextVar)
              else _platform_override.value)
    return chosen or jax.default_backend()


def check_implementation(name: str) -> None:
    """A config check: `name` is one of IMPLEMENTATIONS (backend-independent)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"TransformerConfig.attention_impl={name!r} is not one of "
                         f"{IMPLEMENTATIONS}: 'auto' (the backend's kernel: splash on TPU, "
                         "cudnn on GPU, xla on CPU), 'xla' (every backend and mask), 'splash' "
                         "(TPU; interpret mode on CPU), 'cudnn' (GPU). Set "
                         "TransformerConfig.attention_impl in the model's gin file.")


def resolve(name: str, on: str | None = None) -> str:
    """The implementation `name` runs on platform `on` (default: this one); an error
    paragraph when the platform lacks it."""
    check_implementation(name)
    on = on or platform()
    if name == "auto":
        return _AUTO.get(on, "xla")
    runs_on = _RUNS_ON[name]
    if runs_on is not None and on not in runs_on:
        raise ValueError(f"attention_impl={name!r} does not run on this backend ({on!r}): "
                         f"'splash' runs on TPU (and in interpret mode on CPU), 'cudnn' on "
                         f"NVIDIA GPUs, 'xla' everywhere. Choose one of {IMPLEMENTATIONS} for "
                         f"{on!r} ('auto' picks {_AUTO.get(on, 'xla')!r} here) in the model's "
                         "gin file (TransformerConfig.attention_impl).")
    return name


def attend(q_BLHK, k_BMGK, v_BMGK, mask, implementation: str = "auto"):
    """Softmax(q·kᵀ/√K) v over the keys `mask` allows (a `Mask`, or a dense boolean
    [B, 1, L, M] array that only 'xla' reads); G kv heads serve H/G query heads each.
    A query with no allowed key (padding) gets an undefined finite value (the mean of V
    on 'xla'); such rows carry no loss weight."""
    on = platform()
    kernel = resolve(implementation, on)
    if kernel != "xla":
        reason = unsupported(kernel, q_BLHK, k_BMGK, mask)
        if reason is None:
            run = _splash if kernel == "splash" else _cudnn
            if kernel == "cudnn" and mask.packed:
                check_packed_rows(mask)
            return _per_shard(functools.partial(run, interpret=on == "cpu"), q_BLHK, k_BMGK,
                              v_BMGK, mask)
        if implementation != "auto":
            raise ValueError(f"attention_impl={implementation!r} cannot run this attention: "
                             f"{reason}. Use attention_impl='auto' (falls back to 'xla' for "
                             f"such masks, with a log line) or 'xla'; choices: "
                             f"{IMPLEMENTATIONS}.")
        if reason not in _logged:
            _logged.add(reason)
            _log.warning("attention_impl='auto' runs 'xla' instead of %r: %s.", kernel, reason)
    dense_B1LM = mask.dense() if isinstance(mask, Mask) else mask
    # Scale 1/√K, float32 softmax; broadcasts the G kv heads over the H query heads.
    return jax.nn.dot_product_attention(q_BLHK, k_BMGK, v_BMGK, mask=dense_B1LM,
                                        implementation="xla")


def unsupported(kernel: str, q_BLHK, k_BMGK, mask) -> str | None:
    """Why `kernel` cannot run this attention, or None when it can."""
    if not isinstance(mask, Mask):
        return "the mask was given as a dense boolean matrix, not as a Mask"
    if kernel == "splash":
        return _splash_unsupported(q_BLHK, k_BMGK, mask)
    return _cudnn_unsupported(q_BLHK, k_BMGK, mask)


# ----------------------------------------------------------------------------------------
# On a mesh: a kernel is one custom call, which XLA's partitioner would run on gathered
# (replicated) operands; so it runs under shard_map on each device's rows and heads, as
# the logical-axis rules shard them (batch over data/fsdp, heads over tensor).
# ----------------------------------------------------------------------------------------


def _mesh_axes(name: str, size: int, mesh) -> tuple[str, ...] | None:
    """The mesh axes the rules put logical axis `name` on, when they split `size`."""
    axes = nn.logical_to_mesh_axes((name,))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    ways = int(np.prod([mesh.shape[a] for a in axes]))
    return axes if axes and ways > 1 and size % ways == 0 else None


def _per_shard(run, q_BLHK, k_BMGK, v_BMGK, mask: Mask):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q_BLHK, k_BMGK, v_BMGK, mask)
    heads, kv_heads = q_BLHK.shape[2], k_BMGK.shape[2]
    batch_axes = _mesh_axes(BATCH, q_BLHK.shape[0], mesh)
    head_axes = _mesh_axes(HEADS, heads, mesh)
    kv_axes = _mesh_axes(KV_HEADS, kv_heads, mesh)
    ways = int(np.prod([mesh.shape[a] for a in head_axes])) if head_axes else 1
    if head_axes and kv_axes != head_axes and kv_heads % ways and ways % kv_heads:
        head_axes = None  # local query heads would not fall in whole kv groups
    split_kv = head_axes is not None and kv_axes == head_axes
    q_spec = PartitionSpec(batch_axes, None, head_axes, None)
    kv_spec = PartitionSpec(batch_axes, None, head_axes if split_kv else None, None)
    ids_spec = PartitionSpec(batch_axes, None)

    def local(q, k, v, q_ids, kv_ids):
        if head_axes and not split_kv:  # this device's query heads' kv heads
            per_kv = heads // kv_heads
            first_q = jax.lax.axis_index(head_axes) * q.shape[2]
            n = max(1, kv_heads // ways)
            k, v = (jax.lax.dynamic_slice_in_dim(a, first_q // per_kv, n, axis=2)
                    for a in (k, v))
        return run(q, k, v, dataclasses.replace(mask, q_segment_ids=q_ids,
                                                kv_segment_ids=kv_ids))

    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids_spec,
                                                     ids_spec),
                         out_specs=q_spec, check_vma=False)(
        q_BLHK, k_BMGK, v_BMGK, mask.q_segment_ids, mask.kv_segment_ids)


# ----------------------------------------------------------------------------------------
# TPU: splash attention (written from splash_attention_kernel.py in jax 0.12.1; no TPU
# here, so only interpret mode on CPU has run it).
# ----------------------------------------------------------------------------------------


def _splash_unsupported(q_BLHK, k_BMGK, mask: Mask) -> str | None:
    length, slots = q_BLHK.shape[1], k_BMGK.shape[1]
    if mask.q_prefix is not None:
        return "splash's masks are static, and a prefix LM's prefix is per-row data"
    if mask.offset is not None:
        return "splash's causal mask is static, and this KV-cache step's slot is traced"
    if length % _SPLASH_BLOCK or slots % _SPLASH_BLOCK:
        return (f"splash needs query and key lengths that are multiples of {_SPLASH_BLOCK}, "
                f"got {length} and {slots}")
    return None


def _block(length: int) -> int:
    return next(b for b in (512, 256, _SPLASH_BLOCK) if length % b == 0)


def _splash_kernel(heads_per_kv: int, length: int, slots: int, causal: bool, interpret: bool):
    # Built per trace (its block tables become constants of the traced step); caching it
    # across traces would leak the arrays made inside one.
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (length, slots)
    one = sa.CausalMask(shape) if causal else sa.FullMask(shape)
    bq, bkv = _block(length), _block(slots)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                          block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                          block_kv_dq=bkv)
    return sa.make_splash_mqa_single_device(sa.MultiHeadMask([one] * heads_per_kv),
                                            block_sizes=sizes, interpret=interpret)


def _splash(q_BLHK, k_BMGK, v_BMGK, mask: Mask, *, interpret: bool):
    """One MQA kernel per (row, kv head) over its H/G query heads (vmapped); q is scaled
    by 1/√K before the kernel, which does not scale."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, length, h, k = q_BLHK.shape
    slots, g = k_BMGK.shape[1], k_BMGK.shape[2]
    kernel = _splash_kernel(h // g, length, slots, mask.causal, interpret)
    # Scaled in float32 and rounded once to the compute dtype (in bfloat16 the one
    # rounding 'xla', which scales float32 logits, does not have; MaxText does the same).
    q_scaled = (q_BLHK.astype(jnp.float32) * (1.0 / np.sqrt(k))).astype(q_BLHK.dtype)
    q_BGhLK = q_scaled.reshape(b, length, g, h // g, k).transpose(0, 2, 3, 1, 4)
    k_BGMK, v_BGMK = k_BMGK.transpose(0, 2, 1, 3), v_BMGK.transpose(0, 2, 1, 3)
    ids = sa.SegmentIds(q=mask.q_segment_ids.astype(jnp.int32),
                        kv=mask.kv_segment_ids.astype(jnp.int32))
    per_head = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s),
                        in_axes=(0, 0, 0, None))
    o_BGhLK = jax.vmap(per_head)(q_BGhLK, k_BGMK, v_BGMK, ids)
    return o_BGhLK.transpose(0, 3, 1, 2, 4).reshape(b, length, h, k)


# ----------------------------------------------------------------------------------------
# GPU: cuDNN flash attention through jax.nn.dot_product_attention (written from its
# docstring and jax/_src/cudnn/fused_attention_stablehlo.py in jax 0.12.1; no GPU here).
# ----------------------------------------------------------------------------------------


def _cudnn_unsupported(q_BLHK, k_BMGK, mask: Mask) -> str | None:
    if q_BLHK.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention takes bfloat16 or float16, got {q_BLHK.dtype}"
    before_hopper = _before_hopper()
    largest = 128 if before_hopper else 256
    if q_BLHK.shape[-1] % 8 or q_BLHK.shape[-1] > largest:
        return (f"cuDNN flash attention needs a head dim that is a multiple of 8 up to "
                f"{largest} on this GPU, got {q_BLHK.shape[-1]}")
    if not mask.packed:
        return None
    if mask.q_prefix is not None:
        return "cuDNN's masks are causal or full, and a prefix LM's prefix is per-row data"
    if mask.max_segments < 1:
        return ("cuDNN's packed layout needs segments in order from each row's first slot, "
                "which these segment ids do not promise (a KV cache's left padding)")
    if before_hopper:
        return "cuDNN's packed layout (segment ids) needs a Hopper or later GPU"
    return None


def _before_hopper() -> bool:
    """On a real GPU older than Hopper (sm_90): head dims up to 128 (Hopper: 256) and no
    packed layout. Planning for GPUs from another host assumes Hopper."""
    if jax.default_backend() != "gpu":
        return False
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return capability is not None and float(capability) < 9.0


def _cudnn(q_BLHK, k_BMGK, v_BMGK, mask: Mask, *, interpret: bool):
    del interpret
    if not mask.packed:
        return jax.nn.dot_product_attention(q_BLHK, k_BMGK, v_BMGK, is_causal=mask.causal,
                                            implementation="cudnn")
    # jax.nn.dot_product_attention's public form takes right-padding lengths only; the
    # packed layout is its private cuDNN entry point (the same one jax.nn calls).
    from jax._src.cudnn import fused_attention_stablehlo as fused

    layout = packed_layout(mask.q_segment_ids, mask.kv_segment_ids, mask.max_segments)
    kind = fused.MaskType.PADDING_CAUSAL if mask.causal else fused.MaskType.PADDING
    # cuDNN neither reads nor writes the tokens outside its sequences (padding): their
    # outputs and their q/k/v gradients are whatever the buffers held, so both are cut.
    q_in, k_in, v_in = (jnp.where(keep[:, :, None, None], x, 0) for keep, x in (
        (layout.queries_BL, q_BLHK), (layout.keys_BM, k_BMGK), (layout.keys_BM, v_BMGK)))
    o_BLHK = fused.dot_product_attention(
        q_in, k_in, v_in, q_seqlen=layout.q_lengths, kv_seqlen=layout.kv_lengths,
        q_offsets=layout.q_starts, kv_offsets=layout.kv_starts,
        scale=float(1.0 / np.sqrt(q_BLHK.shape[-1])), mask_type=kind, qkv_layout="BTNH")
    return jnp.where(layout.queries_BL[:, :, None, None], o_BLHK, 0).astype(q_BLHK.dtype)


def check_packed_rows(mask: Mask) -> None:
    """Stops the step, with an error at the host, when a row breaks what the packed layout
    assumes: more than `mask.max_segments` segments, or segments out of order or after
    padding (not SeqIO's packing)."""
    def out_of_order(ids):
        now, after = ids[:, :-1], ids[:, 1:]
        return jnp.any((after != 0) & ((now == 0) | (after < now)))

    ids = (mask.q_segment_ids, mask.kv_segment_ids)
    most = jnp.maximum(*(a.max() for a in ids))
    jax.debug.callback(functools.partial(_raise_on_rows, mask.max_segments), most,
                       out_of_order(ids[0]) | out_of_order(ids[1]))


def _raise_on_rows(max_segments: int, most, out_of_order) -> None:
    if most > max_segments:
        raise ValueError(
            f"A row of this batch holds {int(most)} packed segments, more than "
            f"TransformerConfig.max_segments_per_row={max_segments}, the most cuDNN's packed "
            "attention was built for. Raise max_segments_per_row in the model's gin file "
            "(cuDNN's softmax statistics grow with it), pack fewer examples per row, or "
            "set attention_impl='xla'.")
    if out_of_order:
        raise ValueError(
            "A row's segment ids are not SeqIO's packed layout (segments 1, 2, ... in order "
            "from the row's first slot, padding only at the end), which cuDNN's packed "
            "attention needs. Pack the rows with seqio or t5x_like's packing, or set "
            "attention_impl='xla'.")


class PackedLayout(NamedTuple):
    """cuDNN's packed ("THD") layout of a batch: sequence s of row b is query segment
    s+1 against key segment s+1 of that row, given by its length ([B, S]) and first slot
    ([B, S + 1]); -1 past a row's last segment, as jax's cuDNN entry point asks."""

    q_lengths: jax.Array
    kv_lengths: jax.Array
    q_starts: jax.Array
    kv_starts: jax.Array
    queries_BL: jax.Array  # bool: the query lies in a sequence that has keys
    keys_BM: jax.Array  # bool: the key lies in a sequence


def packed_layout(q_ids_BL, kv_ids_BM, max_segments: int) -> PackedLayout:
    """The packed layout of SeqIO-packed rows (segments 1, 2, ... in order from slot 0,
    padding at the end) with S = max_segments sequences per row (at least 2: with 1,
    jax reads no offsets)."""
    slots = max(max_segments, 2)
    last_B1 = jnp.maximum(q_ids_BL.max(1), kv_ids_BM.max(1))[:, None]
    present_BS = jnp.arange(1, slots + 1)[None, :] <= last_B1

    def lengths_and_starts(ids):
        count_BS = jax.vmap(lambda row: jnp.bincount(row, length=slots + 1))(ids)[:, 1:]
        start_BS = jnp.pad(jnp.where(present_BS, jnp.cumsum(count_BS, axis=1) - count_BS, -1),
                           ((0, 0), (0, 1)), constant_values=-1)
        return jnp.where(present_BS, count_BS, -1).astype(jnp.int32), start_BS.astype(jnp.int32)

    (q_lengths, q_starts), (kv_lengths, kv_starts) = map(lengths_and_starts,
                                                          (q_ids_BL, kv_ids_BM))
    in_sequence = lambda ids: (ids > 0) & (ids <= slots)
    has_keys_BS = jnp.pad(kv_lengths > 0, ((0, 0), (1, 0)))  # by segment id; id 0: none
    queries_BL = in_sequence(q_ids_BL) & jnp.take_along_axis(
        has_keys_BS, jnp.clip(q_ids_BL, 0, slots), axis=1)
    return PackedLayout(q_lengths, kv_lengths, q_starts, kv_starts, queries_BL,
                        in_sequence(kv_ids_BM))
