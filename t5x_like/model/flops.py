"""Model FLOPs of a training step in two labelled conventions, peak FLOP/s, and MFU.

docs/FORMULAS.md ("Model FLOPs and MFU"): every number is reported twice, because the two
conventions differ in the attention term, by ~12% at long sequence lengths (Llama-3-8B
at 8192 tokens: 57.91 GFLOP/token by PaLM, 51.47 by MaxText).

- **palm** (PaLM appendix B): 6N + 12·L·H·Q·T per token, N the *matmul* parameters:
  every layer's projections and the output projection once (the tied table of PaLM, or
  an untied head); the input embedding lookup, norm scales and biases do no matmul and
  are not counted (for a tied model that is PaLM's own count, so its 8B/62B/540B figures
  come out). Attention over the full T×T square, not halved for causal masking.
- **maxtext** (`calculate_tflops_training_per_device`): the matmuls one by one: gated
  MLP as 3 matmuls, QKV and output projections, the unembedding (the embedding lookup is
  free), and causal attention halved (Megatron/NeMo). With N the matmul parameters,
  6N is exactly MaxText's matmul sum: the conventions differ only in attention.
- **encoder-decoder** (our derivation; neither paper covers it): a per-example
  forward count times 3. The two conventions differ only in the decoder's causal
  self-attention, counted whole (palm) or halved (maxtext); embeddings free in both.

All counts are model FLOPs (rematerialisation excluded), training = forward + backward.
Dimension letters: L layers, D emb_dim, H query heads, G kv heads, K head dim (PaLM's
Q), F mlp_dim, V vocab, T / S sequence lengths.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.model import hardware

log = logging.getLogger("t5x_like.model.flops")

_GATED = ("swiglu", "geglu")


@dataclasses.dataclass(frozen=True)
class Flops:
    """One quantity in both conventions (FLOPs, per token or per step as named)."""

    palm: float
    maxtext: float

    def __mul__(self, factor: float) -> Flops:
        return Flops(self.palm * factor, self.maxtext * factor)

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> Flops:
        return Flops(self.palm / divisor, self.maxtext / divisor)


def _num_mlp_matrices(cfg) -> int:
    return 3 if getattr(cfg, "mlp_activation", "swiglu") in _GATED else 2


def palm_flops_per_token(num_params: float, num_layers: int, num_heads: int,
                         head_dim: int, seq_len: int) -> float:
    """PaLM appendix B: 6N + 12·L·H·Q·T training FLOPs per token (attention not halved);
    N: the matmul parameters (`matmul_params`)."""
    return 6.0 * num_params + 12.0 * num_layers * num_heads * head_dim * seq_len


def maxtext_flops_per_token(cfg, seq_len: int) -> float:
    """MaxText's training FLOPs per token of a decoder-only model (causal attn halved)."""
    D, F, V = cfg.emb_dim, cfg.mlp_dim, cfg.vocab_size
    H, G, K, L = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_decoder_layers
    ffn = 2.0 * F * D * _num_mlp_matrices(cfg)
    qkv = 2.0 * D * (H + 2 * G) * K
    proj = 2.0 * D * H * K
    emb = 2.0 * D * V  # unembedding only; the lookup is free
    attn = 4.0 * seq_len * H * K / 2  # causal: half the T×T square
    return 3.0 * ((ffn + qkv + proj) * L + emb) + 3.0 * attn * L


def matmul_params(cfg) -> int:
    """Parameters a token's forward pass multiplies by (the N of 6N): each decoder
    layer's Q, K, V, O and MLP matrices and the output projection, once whether tied or
    not. The input lookup (a gather), norm scales and biases are not counted."""
    D, F, V = cfg.emb_dim, cfg.mlp_dim, cfg.vocab_size
    H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = D * (H + 2 * G) * K + H * K * D + _num_mlp_matrices(cfg) * D * F
    return cfg.num_decoder_layers * per_layer + D * V


def decoder_only_flops_per_token(cfg, seq_len: int) -> Flops:
    """Training FLOPs per token of a decoder-only model at sequence length `seq_len`."""
    palm = palm_flops_per_token(matmul_params(cfg), cfg.num_decoder_layers, cfg.num_heads,
                                cfg.head_dim, seq_len)
    return Flops(palm=palm, maxtext=maxtext_flops_per_token(cfg, seq_len))


def encoder_decoder_flops_per_example(cfg, inputs_len: int, targets_len: int) -> Flops:
    """Training FLOPs per (inputs, targets) example (docs/FORMULAS.md): 3 × forward."""
    D, F, V = cfg.emb_dim, cfg.mlp_dim, cfg.vocab_size
    H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    S_e, S_d = inputs_len, targets_len
    n_mlp = _num_mlp_matrices(cfg)
    dense = D * (H * K + 2 * G * K) + H * K * D + n_mlp * D * F
    encoder = cfg.num_encoder_layers * (2.0 * S_e * dense + 4.0 * S_e**2 * H * K)
    cross = 2.0 * S_d * 2 * D * H * K + 2.0 * S_e * 2 * D * G * K + 4.0 * S_d * S_e * H * K
    logits = 2.0 * S_d * D * V

    def forward(causal_fraction: float) -> float:
        self_attn = 4.0 * S_d**2 * H * K * causal_fraction
        decoder = cfg.num_decoder_layers * (2.0 * S_d * dense + self_attn + cross)
        return encoder + decoder + logits

    return Flops(palm=3.0 * forward(1.0), maxtext=3.0 * forward(0.5))


# ---------------------------------------------------------------------------
# Peak FLOP/s, MFU and training time

_SECONDS_PER_DAY = 86_400.0


def measure_matmul_flops(device: Any = None, dtype: str = "float32", n: int = 1024,
                         repeats: int = 7) -> float:
    """Matmul rate (FLOP/s) of `device`: the fastest of `repeats` runs of a jitted n×n
    `dtype` matmul (a peak is the best rate the device reaches; a median of runs a few
    ms long took a burst of load for the device's speed and once read a third of it).

    On CPU, XLA runs one matmul on all host cores, so this is the rate of the whole host.
    On a shared 2-core machine, other processes move it by tens of percent between runs:
    measure in the same process as the run it normalises, and read MFU on CPU as a
    rough efficiency, not a hardware fact.
    """
    device = device or jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)),
                                   dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / min(times)


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 7) -> float:
    """The host's float32 matmul rate (the peak CPU MFU is read against)."""
    return measure_matmul_flops(jax.local_devices(backend="cpu")[0], "float32", n, repeats)


def peak_flops_per_device(device: Any = None, *, dtype: str = "bfloat16",
                          cpu_peak: float | None = None,
                          override: float | None = None) -> float:
    """Peak FLOP/s of one device for `dtype` matmuls.

    - `override` (gin: train.train.peak_flops_per_device) wins: for a device the table
      lacks, or to read MFU against another figure.
    - A device in hardware.DEVICE_SPECS: its datasheet dense peak.
    - CPU: the measured host rate (or `cpu_peak`) ÷ the local devices, so MFU reads the
      same whether the work is spread over 8 emulated devices or run on one.
    - Any other accelerator (H800, B200, L40S, ...): a warning, and the rate of a
      large matmul measured on it, which sits below the datasheet peak: MFU reads high.
    """
    if override is not None:
        return float(override)
    device = device or jax.local_devices()[0]
    spec = hardware.spec_for_device_kind(device.device_kind)
    if spec is not None:
        return spec.peak(dtype)
    if device.platform == "cpu":
        host = cpu_peak if cpu_peak is not None else measure_cpu_peak_flops()
        return host / jax.local_device_count(backend="cpu")
    measured = measure_matmul_flops(device, dtype, n=8192, repeats=5)
    log.warning(
        "No datasheet peak for device kind %r (the table knows %s); MFU is read against "
        "a measured %s matmul rate of %.0f TFLOP/s, below the true peak. Set "
        "train.train.peak_flops_per_device to the datasheet's dense %s peak, or add the "
        "device to hardware.DEVICE_SPECS.", device.device_kind, hardware.known_names(),
        dtype, measured / 1e12, dtype)
    return measured


def mfu(flops_per_step: Flops, step_time_s: float, num_devices: int,
        peak_per_device: float) -> tuple[Flops, Flops]:
    """(model TFLOP/s per device, MFU), each in both conventions."""
    per_device = flops_per_step / (num_devices * step_time_s)
    return per_device / 1e12, per_device / peak_per_device


def training_days(total_flops: float, num_devices: int, flops_per_device_s: float) -> float:
    """Days to compute `total_flops` on `num_devices` that each sustain
    `flops_per_device_s` (peak × MFU): the arithmetic behind published training times."""
    return total_flops / (num_devices * flops_per_device_s) / _SECONDS_PER_DAY


def flops_supplied(num_devices: int, flops_per_device_s: float, days: float) -> float:
    """Model FLOPs a cluster delivers in `days` at a sustained per-device rate."""
    return num_devices * flops_per_device_s * days * _SECONDS_PER_DAY
