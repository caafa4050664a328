"""Transformer building blocks shared by the decoder-only and encoder-decoder networks.

Dimension key (used as tensor-name suffixes and einsum letters everywhere):
  B batch, L query length, M key/memory length, D model dim (emb_dim),
  H query heads, G kv heads, K head dim, F MLP hidden, V vocab, N layers.

Dtype policy (stated once, here):
  * parameters are created and stored in float32, so optimizer updates do not lose
    the small increments bf16 would round away;
  * matmuls run in `cfg.dtype` (bfloat16 in the big configs), parameters are cast at use,
    because that is where the accelerator's throughput is;
  * RMSNorm statistics, RoPE angles, the attention softmax (jax.nn.dot_product_attention
    computes it in float32), the logits and the loss are float32, because these are the
    places where bf16 rounding visibly changes results (log-sum-exp over a 256k vocab,
    variance of the residual stream, rotation of large positions); their gradients
    flow back in `cfg.dtype`, as every other activation's (`head_logits`).

Every parameter declares its logical axes where it is created (`out_sharding=` metadata,
the names from partitioning.py); a rule preset maps them to mesh axes. Activations are
constrained only at block boundaries, with flax's logical constraint, which is a no-op
when no rules are active.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from t5x_like.model import attention
from t5x_like.model.partitioning import (
    BATCH,
    EMBED,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    LAYERS,
    LENGTH,
    MLP,
    NORM,
    VOCAB,
)

BLOCK_KINDS = ("parallel", "sequential")
MLP_ACTIVATIONS = ("swiglu", "geglu", "gelu")
# Remat policies by name (TransformerConfig.remat_policy; docs/MODELS.md "Memory options").
# 'full' and 'save_nothing' are one policy under two names ('full' is the older one).
REMAT_POLICIES = ("none", "minimal", "full", "save_nothing",
                  "save_attention_and_mlp_projections", "offload_to_host")
# The checkpoint_name tags the blocks put on their projections' outputs; the named
# policies save (or offload) exactly these and recompute everything else.
PROJECTION_NAMES = ("query_proj", "key_proj", "value_proj", "attention_context", "out_proj",
                    "mlp_wi", "mlp_wi_0", "mlp_wi_1", "mlp_out")
EMBED_LOOKUPS = ("gather", "matmul")
_DTYPES = ("float32", "bfloat16", "float16")


# RoPE frequency scaling (TransformerConfig.rope_scaling): transformers' `rope_scaling`
# (v4) / `rope_parameters` (v5) types that are a fixed function of the frequencies, so
# every position (training, prefill, each decode step) is rotated alike. For each type:
# the fields it needs, then the optional ones (all others must stay unset).
ROPE_SCALING_TYPES = {
    "linear": ((), ()),
    "llama3": (("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"), ()),
    "yarn": (("original_max_position_embeddings",),
             ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim",
              "truncate")),
}
ROPE_SCALING_CHOICES = (
    "'linear' (factor: every frequency divided by it), 'llama3' (Llama 3.1/3.2: factor, "
    "low_freq_factor, high_freq_factor, original_max_position_embeddings) and 'yarn' "
    "(factor, original_max_position_embeddings; optional beta_fast (32), beta_slow (1), "
    "attention_factor (default 0.1·ln(factor)+1), mscale, mscale_all_dim, truncate (True))")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling, computed as transformers' modeling_rope_utils does for the
    same `rope_type` (docs/MODELS.md "RoPE scaling"). Gin: a dict of these fields
    (`layers.TransformerConfig.rope_scaling = {'rope_type': 'llama3', 'factor': 8.0, ...}`)
    or `@layers.RopeScaling()`; frozen and hashable, as TransformerConfig is static."""

    rope_type: str
    factor: float
    original_max_position_embeddings: int | None = None  # llama3, yarn
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn (None: 32)
    beta_slow: float | None = None  # yarn (None: 1)
    attention_factor: float | None = None  # yarn: cos and sin times it (None: derived)
    mscale: float | None = None  # yarn: with mscale_all_dim, derives attention_factor
    mscale_all_dim: float | None = None
    truncate: bool | None = None  # yarn (None: True)

    def __post_init__(self):
        _check_rope_scaling(self)

    @classmethod
    def from_dict(cls, fields) -> RopeScaling:
        """From a mapping (gin's dict literal) or (name, value) pairs."""
        try:
            fields = dict(fields)
        except (TypeError, ValueError):
            raise ValueError(f"TransformerConfig.rope_scaling={fields!r} is not a dict of "
                             f"RopeScaling fields. {_rope_scaling_help()}") from None
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(known))
        problem = (f"has unknown keys {unknown}" if unknown else
                   rope_scaling_problem(fields))
        if problem:
            raise ValueError(f"TransformerConfig.rope_scaling={fields!r}: {problem}. "
                             f"{_rope_scaling_help()}")
        return cls(**fields)

    def as_dict(self) -> dict:
        """The fields that are set, as the gin dict literal and HF's rope_scaling write them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}


def _rope_scaling_help() -> str:
    return (f"The supported types are {ROPE_SCALING_CHOICES}. Set TransformerConfig."
            "rope_scaling in the model's gin file to a dict of those fields, e.g. {'rope_type': "
            "'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, "
            "'original_max_position_embeddings': 8192}, or to None for plain RoPE.")


def rope_scaling_problem(fields: Mapping[str, Any]) -> str | None:
    """What is wrong with RopeScaling `fields` (a mapping of its field names; absent means
    None), or None. The text names the field and its value; _rope_scaling_help (or
    ROPE_SCALING_CHOICES) says what would be right."""
    get = fields.get
    kind = get("rope_type")
    if kind not in ROPE_SCALING_TYPES:
        return f"rope_type={kind!r} is not supported"
    required, optional = ROPE_SCALING_TYPES[kind]
    missing = [n for n in ("factor", *required) if get(n) is None]
    if missing:
        return f"rope_type={kind!r} needs {missing}"
    unused = sorted(n for n, v in fields.items() if v is not None
                    and n not in ("rope_type", "factor", *required, *optional))
    if unused:
        return f"rope_type={kind!r} does not read {unused}"
    numbers = ("factor", *(n for n in required + optional if n != "truncate"))
    bad = {n: get(n) for n in numbers if get(n) is not None
           and (isinstance(get(n), bool) or not isinstance(get(n), (int, float))
                or not get(n) > 0)}
    if bad:
        return f"{bad} must be numbers > 0"
    if kind == "llama3" and not get("high_freq_factor") > get("low_freq_factor"):
        return (f"high_freq_factor={get('high_freq_factor')} must exceed low_freq_factor="
                f"{get('low_freq_factor')}")
    if not isinstance(get("original_max_position_embeddings"), (int, type(None))):
        return (f"original_max_position_embeddings={get('original_max_position_embeddings')!r}"
                " must be an int")
    if get("truncate") is not None and not isinstance(get("truncate"), bool):
        return f"truncate={get('truncate')!r} must be True or False"
    return None


def _check_rope_scaling(s: RopeScaling) -> None:
    problem = rope_scaling_problem({f.name: getattr(s, f.name) for f in dataclasses.fields(s)})
    if problem:
        raise ValueError(f"TransformerConfig.rope_scaling: {problem}. {_rope_scaling_help()}")
    for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                 "attention_factor", "mscale", "mscale_all_dim"):
        if getattr(s, name) is not None:  # 8 and 8.0 are one config (equal and hashed alike)
            object.__setattr__(s, name, float(getattr(s, name)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Everything that defines a network; one instance, passed whole, drives every variant.

    Sizes are gin-bound per model (gin_configs/models/*.gin); see docs/MODELS.md.
    """

    vocab_size: int
    emb_dim: int
    num_heads: int
    num_kv_heads: int  # == num_heads: MHA; fewer: GQA; 1: MQA (PaLM).
    head_dim: int
    mlp_dim: int
    num_decoder_layers: int
    num_encoder_layers: int = 0  # 0 means decoder-only.
    block: str = "parallel"  # 'parallel' (PaLM) or 'sequential' (Llama).
    mlp_activation: str = "swiglu"  # 'swiglu', 'geglu' (gated GELU), 'gelu' (T5 v1.0).
    norm_eps: float = 1e-6  # Llama uses 1e-5.
    rope_theta: float = 10_000.0  # Llama 3 uses 500,000.
    # RoPE frequency scaling (RopeScaling, or its fields as a gin dict; None: plain RoPE).
    # Llama 3.1/3.2: {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
    # 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}.
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = True  # tied: logits = x·Eᵀ/√D (PaLM); untied: separate head.
    # Tied logits divided by √D (PaLM, our models) or not (Hugging Face's tied Llama
    # models, e.g. Llama 3.2 1B and SmolLM: x·Eᵀ). Read only when tie_embeddings.
    scale_tied_logits: bool = True
    dropout_rate: float = 0.0
    dtype: str = "bfloat16"  # compute dtype; parameters are always float32.
    scan_layers: bool = True
    # What each layer keeps for the backward pass (REMAT_POLICIES; 'none': everything,
    # no recomputation). A name outside the list is one paragraph naming the choices.
    remat_policy: str = "none"
    # The token embedding: 'gather' (a row lookup; its gradient scatters every row's
    # cotangent, which XLA gathers onto every device of an fsdp mesh) or 'matmul'
    # (one-hot · table, MaxText's use_iota_embed: its gradient is a matmul that XLA
    # reduce-scatters). Same values; docs/MODELS.md "Memory options".
    embed_lookup: str = "gather"
    z_loss: float = 1e-4  # coefficient of log²Z (PaLM).
    # The training loss's logits: built whole (False) or one chunk of positions at a time
    # with the gradient made in the same pass (True: models.fused_loss_sums); chunks of
    # loss_chunk_length positions of every row (0: the whole length). On the bench's
    # reference model, 1 device, fused ran in 0.66x the plain loss's time, fused with
    # chunks of 32 in 0.42x; but on an fsdp mesh chunks reduce the head's gradient once
    # more (tests/test_collectives.py), so chunking is per model (bench/reference_llama.gin).
    # None (the default): fused, except on TPU without chunks, where XLA fuses the plain
    # loss's logits into the loss itself (Llama 3 8B at 8K on a v5p: 36.15 GiB a chip
    # against the fused loss's 37.60; families.fuses_loss).
    fused_loss: bool | None = None
    loss_chunk_length: int = 0
    # Which attention runs (model/attention.py, docs/MODELS.md "Attention implementations"):
    # 'auto' (the backend's kernel: splash on TPU, cuDNN on GPU, XLA on CPU, XLA with one
    # log line for a mask the kernel cannot do), 'xla', 'splash' or 'cudnn'.
    attention_impl: str = "auto"
    # cuDNN's attention on packed rows (GPU) lays out each row as at most this many
    # segments; a row with more stops the step with an error naming this setting. Its
    # softmax statistics, [rows x max_segments, heads, length] float32, grow with it.
    max_segments_per_row: int = 32

    def __post_init__(self):
        for name in ("vocab_size", "emb_dim", "num_heads", "num_kv_heads", "head_dim",
                     "mlp_dim", "num_decoder_layers", "max_segments_per_row"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerConfig.{name}={value!r}: expected a positive "
                                 f"int; set it in the model's gin file.")
        if not isinstance(self.num_encoder_layers, int) or self.num_encoder_layers < 0:
            raise ValueError(f"TransformerConfig.num_encoder_layers={self.num_encoder_layers!r}:"
                             " expected an int >= 0 (0 means decoder-only).")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TransformerConfig: num_heads={self.num_heads} is not divisible by "
                f"num_kv_heads={self.num_kv_heads}; each kv head must serve a whole group of "
                f"query heads. Use a divisor of {self.num_heads} (1 for MQA, "
                f"{self.num_heads} for MHA).")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            if not isinstance(self.rope_scaling, (dict, tuple, list)):
                raise ValueError(f"TransformerConfig.rope_scaling={self.rope_scaling!r}: "
                                 f"expected a dict of RopeScaling fields or None. "
                                 f"{_rope_scaling_help()}")
            # gin's dict literal, kept as the hashable frozen form (the config is static).
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        if self.head_dim % 2:
            raise ValueError(f"TransformerConfig.head_dim={self.head_dim}: RoPE rotates pairs "
                             "of dimensions, so head_dim must be even.")
        _check_choice("block", self.block, BLOCK_KINDS)
        _check_choice("mlp_activation", self.mlp_activation, MLP_ACTIVATIONS)
        _check_remat_policy(self.remat_policy)
        _check_choice("embed_lookup", self.embed_lookup, EMBED_LOOKUPS)
        _check_choice("dtype", self.dtype, _DTYPES)
        attention.check_implementation(self.attention_impl)
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"TransformerConfig.dropout_rate={self.dropout_rate!r}: expected "
                             "a rate in [0, 1).")
        if not isinstance(self.loss_chunk_length, int) or self.loss_chunk_length < 0:
            raise ValueError(f"TransformerConfig.loss_chunk_length={self.loss_chunk_length!r}: "
                             "expected an int >= 0 (0: the whole sequence in one chunk).")
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.z_loss < 0:
            raise ValueError(f"TransformerConfig: norm_eps={self.norm_eps}, rope_theta="
                             f"{self.rope_theta} must be > 0 and z_loss={self.z_loss} >= 0.")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.num_encoder_layers > 0


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"TransformerConfig.{name}={value!r} is not one of {allowed}; "
                         f"pick one of those in the model's gin file.")


def _check_remat_policy(name):
    if name not in REMAT_POLICIES:
        raise ValueError(
            f"TransformerConfig.remat_policy={name!r} is not a remat policy. The choices: "
            "'none' (keep every activation, recompute nothing), 'minimal' (save every "
            "matmul output, recompute the rest), 'full' or 'save_nothing' (save only each "
            "layer's input, recompute the whole layer), 'save_attention_and_mlp_projections' "
            "(save the q/k/v, attention context, output and MLP projections: "
            f"{', '.join(PROJECTION_NAMES)}), 'offload_to_host' (the same projections moved "
            "to host memory instead of kept on the device, on backends with host memory "
            "spaces: GPU, TPU). Set TransformerConfig.remat_policy in the model's gin file.")


# ----------------------------------------------------------------------------------------
# Parameters and small functions
# ----------------------------------------------------------------------------------------


def _normal_param(rngs: nnx.Rngs, shape, axes, stddev: float) -> nnx.Param:
    """A float32 N(0, stddev²) parameter carrying its logical axes."""
    value = stddev * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=axes)


def _kernel(rngs: nnx.Rngs, shape, axes, fan_in: int) -> nnx.Param:
    # PaLM: kernels N(0, 1/√fan_in), so activations keep unit scale without biases.
    return _normal_param(rngs, shape, axes, 1.0 / math.sqrt(fan_in))


def dense(x, w, contract: int = 1, preferred_element_type=None):
    """x [..., *in] · w [*in, *out] -> [..., *out], the last `contract` axes of x against
    the first of w, over x's rows flattened into one axis. XLA on CPU runs that dot and its
    gradient well; the same contraction written over 3-D operands (einsum "BLD,DF->BLF")
    gets transposing copies in its backward pass (1.8x the time for a SwiGLU block,
    docs/PERFORMANCE.md). On GPU both forms lower to the same GEMMs."""
    lead, out = x.shape[:x.ndim - contract], w.shape[contract:]
    # The weight as it is: a reshaped weight is a new array to the SPMD partitioner, so
    # an FSDP-split 3-D weight (wq, wk, wv, wo) was gathered twice in the backward pass.
    # The rows flattened, except under sequence parallelism, where they would merge a
    # batch split over fsdp with a length split over tensor (XLA then all-reduced whole
    # [B*L, D] outputs).
    rows = x if _length_is_split() else x.reshape(-1, *x.shape[x.ndim - contract:])
    first = rows.ndim - contract
    y = jax.lax.dot_general(rows, w, ((tuple(range(first, rows.ndim)), tuple(range(contract))),
                                      ((), ())), preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *out)


@jax.custom_vjp
def head_logits(x_BLD, w_DV):
    """x · w [..., V] in float32, accumulated from compute-dtype operands (the output head,
    tied or not). Its backward pass runs in the compute dtype, like every other layer's:
    the cotangent is cast to x's dtype before its two matmuls. Left to autodiff, the
    float32 cotangent made both matmuls read float32 logits-sized operands and write the
    weight's gradient in float32 (Llama 3 8B at 8K on a v5p: 1.8e9 more bytes accessed a
    chip, 0.0003 s more on the compiler's step estimate; docs/PERFORMANCE.md,
    "Measurements"). The fused loss (families.fused_loss_sums) has its own backward pass."""
    return dense(x_BLD, w_DV, preferred_element_type=jnp.float32)


def _logits_forward(x_BLD, w_DV):
    return head_logits(x_BLD, w_DV), (x_BLD, w_DV)


def _logits_backward(residuals, g_BLV):
    x_BLD, w_DV = residuals
    g_BLV = g_BLV.astype(x_BLD.dtype)
    lead = tuple(range(x_BLD.ndim - 1))
    dx_BLD = jax.lax.dot_general(g_BLV, w_DV, (((g_BLV.ndim - 1,), (1,)), ((), ())))
    dw_DV = jax.lax.dot_general(x_BLD, g_BLV, ((lead, lead), ((), ())))
    # Split as the weight before anything else reads it: the barrier keeps XLA from
    # fusing the split (all-reduce, then each device's slice) into the optimizer's update,
    # which kept the whole [D, V] gradient alive through the layers' backward pass
    # (+0.74 GiB of peak a chip for the 8B above).
    dw_DV = jax.lax.optimization_barrier(nn.with_logical_constraint(dw_DV, (EMBED, VOCAB)))
    return dx_BLD, dw_DV


head_logits.defvjp(_logits_forward, _logits_backward)


def _length_is_split() -> bool:
    """Whether the active logical rules split LENGTH over a mesh axis (sequence
    parallelism: the _sp presets); False outside a rules context."""
    return nn.logical_to_mesh_axes((LENGTH,))[0] is not None


def dropout(x, rate: float, rng):
    """Inverted dropout; the identity when `rng` is None (deterministic) or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None
                     ) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim/2] float32, attention factor) of RoPE, scaled as
    transformers' modeling_rope_utils computes them for `scaling.rope_type` (written from
    its _compute_{linear_scaling,llama3,yarn}_parameters). The attention factor (yarn's
    mscale; 1 otherwise) multiplies cos and sin, so q·k gets its square. Computed in
    float64 from static config, once per trace: a constant of the compiled program."""
    return _rope_frequencies(int(head_dim), float(theta), scaling)


@functools.lru_cache(maxsize=64)
def _rope_frequencies(k: int, theta: float, s: RopeScaling | None):
    inv_freq = 1.0 / theta ** (np.arange(0, k, 2, dtype=np.float64) / k)
    attention_factor = 1.0
    if s is None:
        pass
    elif s.rope_type == "linear":
        inv_freq = inv_freq / s.factor
    elif s.rope_type == "llama3":
        # Wavelengths above original/low_freq_factor are divided by factor, below
        # original/high_freq_factor kept, and interpolated smoothly in between.
        old_len = s.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / s.low_freq_factor, inv_freq / s.factor, inv_freq)
        smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor
                                                            - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ((wavelen >= old_len / s.high_freq_factor)
                  & (wavelen <= old_len / s.low_freq_factor))
        inv_freq = np.where(medium, smoothed, scaled)
    else:  # yarn
        inv_freq, attention_factor = _yarn(inv_freq, k, theta, s)
    out = inv_freq.astype(np.float32)
    out.flags.writeable = False  # cached: shared by every caller
    return out, float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv_freq, k: int, theta: float, s: RopeScaling):
    """YaRN (arXiv 2309.00071): frequencies that turn fewer than beta_slow times over the
    original context are interpolated (÷ factor), more than beta_fast times kept, a
    linear ramp between; cos and sin scaled by the attention factor."""
    attention_factor = s.attention_factor
    if attention_factor is None:
        attention_factor = (
            _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
            if s.mscale and s.mscale_all_dim else _yarn_mscale(s.factor))

    def correction_dim(rotations):
        return (k * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = correction_dim(s.beta_fast or 32), correction_dim(s.beta_slow or 1)
    if s.truncate is None or s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, k - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(k // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = inv_freq / s.factor * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, attention_factor


def apply_rope(x_BLHK, positions_BL, theta: float, scaling: RopeScaling | None = None):
    """Rotary embedding (half-split convention) at the given per-token positions, with
    `scaling`'s frequencies (rope_frequencies; None: plain RoPE).

    Positions are SeqIO's per-segment positions, so a packed example is rotated exactly as
    it would be alone; a decode step's are its cache slots, rotated by the same constant
    frequencies. Angles, sines and cosines are computed in float32 (large positions ×
    small frequencies lose digits in bf16); the rotation itself in x's dtype, as
    transformers and MaxText do: rotating in float32 made XLA write the bf16 query
    projection out as float32 on TPU (Llama 3 8B: +0.5 GB of memory traffic per layer
    and pass, docs/PERFORMANCE.md).
    """
    k = x_BLHK.shape[-1]
    inv_freq, attention_factor = rope_frequencies(k, theta, scaling)
    freq_k = jnp.asarray(inv_freq)
    angle_BLk = positions_BL.astype(jnp.float32)[:, :, None] * freq_k[None, None, :]
    sin_BL1k = jnp.sin(angle_BLk)[:, :, None, :]
    cos_BL1k = jnp.cos(angle_BLk)[:, :, None, :]
    if attention_factor != 1.0:
        sin_BL1k, cos_BL1k = sin_BL1k * attention_factor, cos_BL1k * attention_factor
    sin_BL1k, cos_BL1k = sin_BL1k.astype(x_BLHK.dtype), cos_BL1k.astype(x_BLHK.dtype)
    x1, x2 = jnp.split(x_BLHK, 2, axis=-1)
    return jnp.concatenate([x1 * cos_BL1k - x2 * sin_BL1k, x2 * cos_BL1k + x1 * sin_BL1k],
                           axis=-1)


# ----------------------------------------------------------------------------------------
# Dense masks. A mask is boolean (B, 1, L, M): True where query l may attend to key m.
# Segment id 0 is padding; tokens never attend across segments or to padding.
# The networks pass the structure instead (attention.Mask, which the fused kernels read
# and whose .dense() gives these same booleans for 'xla'); these builders are the
# reference tests/test_attention.py compares it with, and Attention still takes them.
# A query row with no allowed key (padding) gets the mean of V from
# jax.nn.dot_product_attention; such rows carry zero loss weight.
# ----------------------------------------------------------------------------------------


def _segment_mask(q_segment_ids_BL, kv_segment_ids_BM):
    same_BLM = q_segment_ids_BL[:, :, None] == kv_segment_ids_BM[:, None, :]
    return same_BLM & (kv_segment_ids_BM != 0)[:, None, :]


def bidirectional_mask(segment_ids_BL):
    """Encoder self-attention: every token sees its whole segment."""
    return _segment_mask(segment_ids_BL, segment_ids_BL)[:, None, :, :]


def causal_mask(segment_ids_BL, causal_attention_BL=None):
    """Decoder self-attention: causal within a segment; prefix-LM if causal_attention given.

    SeqIO semantics: tokens where `decoder_causal_attention` is 1 form the prefix, and
    attend to each other bidirectionally (within their segment); every token also sees
    all earlier tokens of its segment.
    """
    length = segment_ids_BL.shape[1]
    idx_L = jnp.arange(length)
    causal_LM = idx_L[:, None] >= idx_L[None, :]
    allowed_BLM = jnp.broadcast_to(causal_LM[None, :, :], (segment_ids_BL.shape[0],
                                                           length, length))
    if causal_attention_BL is not None:
        prefix_BL = causal_attention_BL != 0
        allowed_BLM = allowed_BLM | (prefix_BL[:, :, None] & prefix_BL[:, None, :])
    return (allowed_BLM & _segment_mask(segment_ids_BL, segment_ids_BL))[:, None, :, :]


def cross_mask(decoder_segment_ids_BL, encoder_segment_ids_BM):
    """Cross-attention: decoder segment k attends only to encoder segment k."""
    return _segment_mask(decoder_segment_ids_BL, encoder_segment_ids_BM)[:, None, :, :]


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """RMSNorm without bias; statistics in float32, output in the compute dtype."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        del rngs
        self.eps = cfg.norm_eps
        self.dtype = cfg.compute_dtype
        self.scale = nnx.Param(jnp.ones((cfg.emb_dim,), jnp.float32), out_sharding=(NORM,))

    def __call__(self, x_BLD):
        x_BLD = x_BLD.astype(jnp.float32)
        ms_BL1 = jnp.mean(jnp.square(x_BLD), axis=-1, keepdims=True)
        y_BLD = x_BLD * jax.lax.rsqrt(ms_BL1 + self.eps) * self.scale[...][None, None, :]
        return y_BLD.astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table; when tied, also the output projection (x·Eᵀ, times 1/√D
    when cfg.scale_tied_logits)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.compute_dtype
        self.scale_logits = cfg.scale_tied_logits
        self.lookup = cfg.embed_lookup
        # PaLM: embeddings N(0, 1); with tied logits scaled by 1/√D the logits start O(1).
        self.embedding = _normal_param(rngs, (cfg.vocab_size, cfg.emb_dim), (VOCAB, EMBED), 1.0)

    def __call__(self, tokens_BL):
        table_VD = self.embedding[...].astype(self.dtype)
        if self.lookup == "gather":
            return jnp.take(table_VD, tokens_BL, axis=0)
        # One-hot rows times the table: exact (one non-zero product per output), and
        # its gradient onehotᵀ · cotangent is a matmul over the batch, not a scatter.
        vocab_V = jnp.arange(table_VD.shape[0], dtype=tokens_BL.dtype)
        one_hot_BLV = tokens_BL[..., None] == vocab_V.reshape((1,) * tokens_BL.ndim + (-1,))
        return dense(one_hot_BLV.astype(self.dtype), table_VD)

    def attend(self, x_BLD):
        """Tied logits, float32 (accumulated in float32 from compute-dtype operands)."""
        logits_BLV = head_logits(x_BLD.astype(self.dtype), self.embedding[...].astype(self.dtype).T)
        if not self.scale_logits:
            return logits_BLV
        return logits_BLV / jnp.sqrt(jnp.float32(x_BLD.shape[-1]))


class LmHead(nnx.Module):
    """Untied output projection (Llama); float32 logits."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.compute_dtype
        self.kernel = _kernel(rngs, (cfg.emb_dim, cfg.vocab_size), (EMBED, VOCAB), cfg.emb_dim)

    def __call__(self, x_BLD):
        return head_logits(x_BLD.astype(self.dtype), self.kernel[...].astype(self.dtype))


def _heads_split(x_BLHK, heads: str):
    """Per-head activations split over their heads, the length whole: what the tensor-
    parallel presets want, and under sequence parallelism what keeps XLA from computing
    them split along the length (and moving them all-to-all) in the backward pass."""
    return nn.with_logical_constraint(x_BLHK, (BATCH, None, heads, None))


class Attention(nnx.Module):
    """Multi-head attention with H query heads and G kv heads (MHA, GQA or MQA).

    Self-attention applies RoPE at the given positions; cross-attention does not (query and
    memory positions live in different sequences).
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        d, h, g, k = cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dtype = cfg.compute_dtype
        self.rope_theta = cfg.rope_theta
        self.rope_scaling = cfg.rope_scaling
        self.attention_impl = cfg.attention_impl
        self.wq = _kernel(rngs, (d, h, k), (EMBED, HEADS, HEAD_DIM), d)
        self.wk = _kernel(rngs, (d, g, k), (EMBED, KV_HEADS, HEAD_DIM), d)
        self.wv = _kernel(rngs, (d, g, k), (EMBED, KV_HEADS, HEAD_DIM), d)
        self.wo = _kernel(rngs, (h, k, d), (HEADS, HEAD_DIM, EMBED), h * k)

    def __call__(self, x_BLD, memory_BMD, mask_B1LM, positions_BL=None, memory_positions_BM=None,
                 *, kv=None):
        """Attention of x over memory; `kv` passes the memory's keys and values already
        projected (`project_kv`: decoding reuses the encoder's across steps)."""
        if kv is None:
            kv = self.project_kv(memory_BMD, memory_positions_BM)
        return self.attend(self.query(x_BLD, positions_BL), kv, mask_B1LM)

    def query(self, x_BLD, positions_BL=None):
        q_BLHK = _heads_split(dense(x_BLD, self.wq[...].astype(self.dtype)), HEADS)
        if positions_BL is not None:
            q_BLHK = apply_rope(q_BLHK, positions_BL, self.rope_theta, self.rope_scaling)
        # Tags (identities outside remat) that the named remat policies save.
        return checkpoint_name(q_BLHK, "query_proj")

    def project_kv(self, memory_BMD, memory_positions_BM=None):
        """(keys, values) [B, M, G, K] of the memory, keys rotated when positions are given."""
        k_BMGK = _heads_split(dense(memory_BMD, self.wk[...].astype(self.dtype)), KV_HEADS)
        v_BMGK = _heads_split(dense(memory_BMD, self.wv[...].astype(self.dtype)), KV_HEADS)
        if memory_positions_BM is not None:
            k_BMGK = apply_rope(k_BMGK, memory_positions_BM, self.rope_theta, self.rope_scaling)
        return checkpoint_name(k_BMGK, "key_proj"), checkpoint_name(v_BMGK, "value_proj")

    def attend(self, q_BLHK, kv, mask_B1LM):
        """`mask_B1LM`: an attention.Mask (what the networks pass; every implementation
        reads it) or a dense boolean [B, 1, L, M] array (read by 'xla' only)."""
        k_BMGK, v_BMGK = kv
        o_BLHK = attention.attend(q_BLHK, k_BMGK, v_BMGK, mask_B1LM, self.attention_impl)
        o_BLHK = checkpoint_name(_heads_split(o_BLHK, HEADS), "attention_context")
        return checkpoint_name(dense(o_BLHK, self.wo[...].astype(self.dtype), contract=2),
                               "out_proj")

    def cached(self, x_BLD, positions_BL, cache, index, mask_B1LS):
        """Self-attention of L new tokens against a KV cache of S slots.

        Their keys and values are written at slots index..index+L-1 of `cache`
        ({"k", "v"}: [B, S, G, K]); they attend over all S slots as `mask_B1LS` allows.
        Returns (output, updated cache).
        """
        k_BLGK, v_BLGK = self.project_kv(x_BLD, positions_BL)
        k_BSGK = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_BLGK.astype(cache["k"].dtype),
                                                     index, axis=1)
        v_BSGK = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_BLGK.astype(cache["v"].dtype),
                                                     index, axis=1)
        k_BSGK = nn.with_logical_constraint(k_BSGK, _CACHE_AXES)
        v_BSGK = nn.with_logical_constraint(v_BSGK, _CACHE_AXES)
        out_BLD = self.attend(self.query(x_BLD, positions_BL), (k_BSGK, v_BSGK), mask_B1LS)
        return out_BLD, {"k": k_BSGK, "v": v_BSGK}


# A KV cache is sharded like the activations it holds: batch over the data axes, kv heads
# as the rules say (split under fsdp_tp_kv), slots and head dimension whole.
_CACHE_AXES = (BATCH, None, KV_HEADS, HEAD_DIM)


class Mlp(nnx.Module):
    """Feed-forward layer: gated (SwiGLU / GeGLU: act(x·wi_0)·(x·wi_1)) or plain GELU."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        d, f = cfg.emb_dim, cfg.mlp_dim
        self.dtype = cfg.compute_dtype
        self.activation = cfg.mlp_activation
        if self.activation == "gelu":
            self.wi = _kernel(rngs, (d, f), (EMBED, MLP), d)
        else:
            self.wi_0 = _kernel(rngs, (d, f), (EMBED, MLP), d)
            self.wi_1 = _kernel(rngs, (d, f), (EMBED, MLP), d)
        self.wo = _kernel(rngs, (f, d), (MLP, EMBED), f)

    def __call__(self, x_BLD):
        dt = self.dtype
        # Split over the hidden units, the length whole (the backward pass otherwise
        # computed them split along the length under sequence parallelism).
        project = lambda w, name: checkpoint_name(nn.with_logical_constraint(
            dense(x_BLD, w[...].astype(dt)), (BATCH, None, MLP)), name)
        if self.activation == "gelu":
            h_BLF = jax.nn.gelu(project(self.wi, "mlp_wi"))
        else:
            act = jax.nn.silu if self.activation == "swiglu" else jax.nn.gelu
            h_BLF = act(project(self.wi_0, "mlp_wi_0")) * project(self.wi_1, "mlp_wi_1")
        return checkpoint_name(dense(h_BLF, self.wo[...].astype(dt)), "mlp_out")


class Block(nnx.Module):
    """One transformer layer: self-attention, optional cross-attention, MLP.

    'sequential' (Llama):  x += SelfAttn(LN₁x); x += CrossAttn(LN₂x, enc); x += MLP(LN₃x)
    'parallel' (PaLM):     h = LN(x); x += SelfAttn(h) + CrossAttn(h, enc) + MLP(h)
    In the parallel form cross-attention is a third parallel branch reading the same
    normalised input, so the layer keeps one norm and one residual add (PaLM's speed
    argument); encoder information reaches the MLP one layer later.
    """

    def __init__(self, cfg: TransformerConfig, *, cross_attention: bool, rngs: nnx.Rngs):
        self.block = cfg.block
        self.dropout_rate = cfg.dropout_rate
        self.has_cross_attention = cross_attention
        self.self_attention = Attention(cfg, rngs=rngs)
        if cross_attention:
            self.cross_attention = Attention(cfg, rngs=rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        if cfg.block == "parallel":
            self.pre_norm = RMSNorm(cfg, rngs=rngs)
        else:
            self.pre_self_attention_norm = RMSNorm(cfg, rngs=rngs)
            if cross_attention:
                self.pre_cross_attention_norm = RMSNorm(cfg, rngs=rngs)
            self.pre_mlp_norm = RMSNorm(cfg, rngs=rngs)

    def __call__(self, x_BLD, *, mask_B1LL, positions_BL, encoded_BMD=None,
                 cross_mask_B1LM=None, rng=None):
        def self_attention(h_BLD):
            return self.self_attention(h_BLD, h_BLD, mask_B1LL, positions_BL, positions_BL), None

        return self._forward(x_BLD, self_attention, encoded_BMD, cross_mask_B1LM, None, rng)[0]

    def decode(self, x_BLD, *, cache, index, mask_B1LS, positions_BL, cross_kv=None,
               cross_mask_B1LM=None):
        """The layer on L new tokens with a KV cache (decoding; no dropout). `cross_kv`:
        the encoder's keys and values for this layer's cross-attention. Returns
        (x, updated cache)."""

        def self_attention(h_BLD):
            return self.self_attention.cached(h_BLD, positions_BL, cache, index, mask_B1LS)

        return self._forward(x_BLD, self_attention, None, cross_mask_B1LM, cross_kv, None)

    def _forward(self, x_BLD, self_attention, encoded_BMD, cross_mask_B1LM, cross_kv, rng):
        rngs = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
        # Sequence parallelism (the _sp presets split LENGTH over `tensor`; elsewhere both
        # constraints are the residual stream's own sharding): each branch reads its
        # normalised input with the length whole (one all-gather over tensor) and its
        # output goes back split along the length (one reduce-scatter), Megatron-SP's
        # pattern. Without them XLA's partitioner gathered the weights instead.
        whole = lambda h: nn.with_logical_constraint(h, (BATCH, None, None))
        drop = lambda y, i: nn.with_logical_constraint(dropout(y, self.dropout_rate, rngs[i]),
                                                       (BATCH, LENGTH, None))
        cross = lambda h: self.cross_attention(h, encoded_BMD, cross_mask_B1LM, kv=cross_kv)
        if self.block == "parallel":
            h_BLD = whole(self.pre_norm(x_BLD))
            attended_BLD, cache = self_attention(h_BLD)
            y_BLD = drop(attended_BLD, 0)
            if self.has_cross_attention:
                y_BLD += drop(cross(h_BLD), 1)
            y_BLD += drop(self.mlp(h_BLD), 2)
            return x_BLD + y_BLD, cache
        attended_BLD, cache = self_attention(whole(self.pre_self_attention_norm(x_BLD)))
        x_BLD = x_BLD + drop(attended_BLD, 0)
        if self.has_cross_attention:
            x_BLD = x_BLD + drop(cross(whole(self.pre_cross_attention_norm(x_BLD))), 1)
        return x_BLD + drop(self.mlp(whole(self.pre_mlp_norm(x_BLD))), 2), cache


def remat_policy(name: str):
    """The jax.checkpoint policy of a REMAT_POLICIES name ('none' has none).

    'offload_to_host' moves the tagged projections to the 'pinned_host' memory space in
    the forward pass and back for the backward (jax's save_and_offload_only_these_names).
    Written from jax 0.12.1's checkpoint_policies; only CPU was available here, where
    host and device memory are one, so the moves are in the traced step (tests check the
    jaxpr) and XLA's CPU compiler drops them; GPU and TPU compilers keep them.
    """
    policies = jax.checkpoint_policies
    return {
        "minimal": policies.dots_with_no_batch_dims_saveable,
        "full": policies.nothing_saveable,
        "save_nothing": policies.nothing_saveable,
        "save_attention_and_mlp_projections": policies.save_only_these_names(
            *PROJECTION_NAMES),
        "offload_to_host": policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(PROJECTION_NAMES),
            offload_src="device", offload_dst="pinned_host"),
    }[name]


_SCAN_METADATA = {nnx.PARTITION_NAME: LAYERS}


class BlockStack(nnx.Module):
    """N Blocks, scanned (parameters stacked on a leading 'layers' axis) or unrolled.

    Scanned: created under nnx.vmap and applied with nnx.scan, both with the 'layers'
    partition metadata so each parameter's logical axes gain/lose LAYERS at axis 0.
    Remat (nnx.remat with the configured policy) wraps one layer's application.
    """

    def __init__(self, cfg: TransformerConfig, num_layers: int, *, cross_attention: bool,
                 rngs: nnx.Rngs):
        self.num_layers = num_layers
        self.scan_layers = cfg.scan_layers
        self.remat_policy = cfg.remat_policy
        self.dropout_rate = cfg.dropout_rate
        make_block = lambda r: Block(cfg, cross_attention=cross_attention, rngs=r)
        if cfg.scan_layers:
            @nnx.split_rngs(splits=num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_SCAN_METADATA)
            def make_stack(r):
                return make_block(r)

            self.layers = make_stack(rngs)
        else:
            self.layers = nnx.List([make_block(rngs) for _ in range(num_layers)])

    def __call__(self, x_BLD, *, mask_B1LL, positions_BL, encoded_BMD=None,
                 cross_mask_B1LM=None, rng=None):
        deterministic = rng is None or self.dropout_rate == 0.0
        context = dict(mask_B1LL=mask_B1LL, positions_BL=positions_BL,
                       encoded_BMD=encoded_BMD, cross_mask_B1LM=cross_mask_B1LM)

        def apply_block(block, x_BLD, layer_rng, context):
            x_BLD = block(x_BLD, rng=None if deterministic else layer_rng, **context)
            # The one activation constraint: the residual stream between blocks.
            return nn.with_logical_constraint(x_BLD, (BATCH, LENGTH, None))

        if self.remat_policy != "none":
            apply_block = nnx.remat(apply_block, policy=remat_policy(self.remat_policy))
        layer_rngs = jax.random.split(jax.random.key(0) if deterministic else rng,
                                      self.num_layers)
        if self.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry, 0, None), out_axes=nnx.Carry,
                      transform_metadata=_SCAN_METADATA)
            def scan_fn(block, x_BLD, layer_rng, context):
                return apply_block(block, x_BLD, layer_rng, context)

            return scan_fn(self.layers, x_BLD, layer_rngs, context)
        for i, block in enumerate(self.layers):
            x_BLD = apply_block(block, x_BLD, layer_rngs[i], context)
        return x_BLD

    def decode(self, x_BLD, *, caches, index, mask_B1LS, positions_BL, cross_kv=None,
               cross_mask_B1LM=None):
        """All layers on L new tokens with KV caches (decoding).

        caches: {"k", "v"}: [B, N, S, G, K], layer i's cache at [:, i]; cross_kv: the
        encoder's (keys, values), [B, N, M, G, K] each (`cross_kv`), or None. Returns
        (x, updated caches).
        """

        def layer(block, x_BLD, cache, kv):
            x_BLD, cache = block.decode(x_BLD, cache=cache, index=index, mask_B1LS=mask_B1LS,
                                        positions_BL=positions_BL, cross_kv=kv,
                                        cross_mask_B1LM=cross_mask_B1LM)
            # Length whole: a decode step's few tokens cannot be split over `tensor`
            # (sequence parallelism is a training layout).
            return nn.with_logical_constraint(x_BLD, (BATCH, None, None)), cache

        if self.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry, 1, 1), out_axes=(nnx.Carry, 1),
                      transform_metadata=_SCAN_METADATA)
            def scan_fn(block, x_BLD, cache, kv):
                return layer(block, x_BLD, cache, kv)

            return scan_fn(self.layers, x_BLD, caches, cross_kv)
        new = []
        for i, block in enumerate(self.layers):
            at_i = lambda tree: jax.tree.map(lambda a: a[:, i], tree)
            x_BLD, cache = layer(block, x_BLD, at_i(caches), at_i(cross_kv))
            new.append(cache)
        return x_BLD, jax.tree.map(lambda *a: jnp.stack(a, axis=1), *new)

    def cross_kv(self, encoded_BMD):
        """Every layer's cross-attention (keys, values) of the encoder output, [B, N, M, G, K]
        each: computed once per decoded sequence."""
        if self.scan_layers:
            @nnx.scan(in_axes=(0, None), out_axes=1, transform_metadata=_SCAN_METADATA)
            def scan_fn(block, encoded_BMD):
                return block.cross_attention.project_kv(encoded_BMD)

            return scan_fn(self.layers, encoded_BMD)
        kvs = [block.cross_attention.project_kv(encoded_BMD) for block in self.layers]
        return jax.tree.map(lambda *a: jnp.stack(a, axis=1), *kvs)
