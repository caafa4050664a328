"""Tests for flops.py: the numbers of docs/FORMULAS.md, parameter counts, peak and MFU."""

import dataclasses

import jax
import pytest

from t5x_like.model import families, flops, hardware, layers

LLAMA3_8B = layers.TransformerConfig(
    vocab_size=128_256, emb_dim=4096, num_heads=32, num_kv_heads=8, head_dim=128,
    mlp_dim=14_336, num_decoder_layers=32, block="sequential", tie_embeddings=False)
PALM_8B = layers.TransformerConfig(
    vocab_size=256_000, emb_dim=4096, num_heads=16, num_kv_heads=1, head_dim=256,
    mlp_dim=16_384, num_decoder_layers=32, block="parallel", tie_embeddings=True)
PALM_62B = dataclasses.replace(PALM_8B, num_decoder_layers=64, emb_dim=8192, num_heads=32,
                               mlp_dim=32_768)
PALM_540B = dataclasses.replace(PALM_8B, num_decoder_layers=118, emb_dim=18_432,
                                num_heads=48, mlp_dim=73_728)


def _n(cfg):
    return families.model_for(cfg).num_params


def test_parameter_counts_from_spec():
    assert _n(LLAMA3_8B) == 8_030_261_248  # docs/MODELS.md
    assert _n(PALM_8B) / 1e9 == pytest.approx(8.632, abs=5e-4)
    assert _n(PALM_540B) / 1e9 == pytest.approx(540.356, abs=5e-4)


def test_llama3_8b_conventions_at_8192():
    per_token = flops.decoder_only_flops_per_token(LLAMA3_8B, 8192)
    # 6N with N the matmul parameters: the untied input table (525M) is not counted;
    # counting it, as a bare parameter count does, gave 61.06 (5.4% high).
    assert per_token.palm / 1e9 == pytest.approx(57.91, abs=0.01)
    assert per_token.maxtext / 1e9 == pytest.approx(51.47, abs=0.01)
    # The two differ only in the attention term, whole square (PaLM) or half (MaxText).
    attn = 12 * 32 * 32 * 128 * 8192
    assert per_token.palm - per_token.maxtext == pytest.approx(attn / 2)
    assert attn / per_token.palm == pytest.approx(0.222, abs=0.005)


def test_matmul_params_count_the_output_projection_once_tied_or_not():
    tied = dataclasses.replace(LLAMA3_8B, tie_embeddings=True)
    table = LLAMA3_8B.vocab_size * LLAMA3_8B.emb_dim
    assert flops.matmul_params(LLAMA3_8B) == flops.matmul_params(tied)
    norms = (2 * 32 + 1) * 4096
    assert flops.matmul_params(LLAMA3_8B) == _n(LLAMA3_8B) - table - norms
    assert flops.matmul_params(tied) == _n(tied) - norms


@pytest.mark.parametrize("cfg, tflops", [(PALM_8B, 0.0550), (PALM_62B, 0.388),
                                         (PALM_540B, 3.28)])
def test_palm_paper_tflops_per_token_at_2048(cfg, tflops):
    per_token = flops.decoder_only_flops_per_token(cfg, 2048)
    assert float(f"{per_token.palm / 1e12:.3g}") == tflops  # the paper's 3 figures


def test_palm_540b_mfu_from_paper():
    """238.3K tok/s on 6144 TPUv4 at 275 TF: 46.2% MFU with attention (PaLM appendix B)."""
    per_token = flops.decoder_only_flops_per_token(PALM_540B, 2048)
    step = per_token * 238.3e3  # one "step" = one second of tokens
    _, mfu = flops.mfu(step, 1.0, 6144, 275e12)
    assert mfu.palm == pytest.approx(0.462, abs=0.001)


def test_maxtext_matches_its_formula_per_device():
    """Cross-check against MaxText's expression for B=2 sequences per device."""
    cfg, B, S = LLAMA3_8B, 2, 8192
    d, V, L, Hq, Hkv, hd, mlp = 4096, 128_256, 32, 32, 8, 128, 14_336
    ffn = 2 * B * S * mlp * d * 2 + 2 * B * S * mlp * d
    qkv = 2 * B * S * d * (Hq + 2 * Hkv) * hd
    proj = 2 * B * S * d * Hq * hd
    attn = 4 * B * S**2 * Hq * hd / 2
    emb = 2 * B * S * d * V
    total_tf = (ffn * L + (qkv + proj) * L + emb) * 3 / 1e12 + attn * L * 3 / 1e12
    step = families.DecoderOnlyModel(cfg).train_flops_per_step(B, {"targets": S})
    assert step.maxtext / 1e12 == pytest.approx(total_tf, rel=1e-12)


def test_encoder_decoder_formula():
    cfg = dataclasses.replace(PALM_8B, num_encoder_layers=32, vocab_size=32_000,
                              num_kv_heads=16)
    S_e, S_d = 512, 512
    ex = flops.encoder_decoder_flops_per_example(cfg, S_e, S_d)
    # by hand, docs/FORMULAS.md; d=4096, HQ=KQ=4096, d_ff=16384, n_mlp=3
    d, HQ, KQ, dff = 4096, 4096, 4096, 16384
    dense = d * (HQ + 2 * KQ) + HQ * d + 3 * d * dff
    enc = 2 * S_e * dense + 4 * S_e**2 * HQ
    dec_common = 2 * S_d * dense + 2 * S_d * 2 * d * HQ + 2 * S_e * 2 * d * KQ + 4 * S_d * S_e * HQ
    logits = 2 * S_d * d * 32_000
    assert ex.palm == pytest.approx(3 * (32 * enc + 32 * (dec_common + 4 * S_d**2 * HQ) + logits))
    assert ex.maxtext == pytest.approx(
        3 * (32 * enc + 32 * (dec_common + 2 * S_d**2 * HQ) + logits))
    per_step = families.EncoderDecoderModel(cfg).train_flops_per_step(
        4, {"inputs": S_e, "targets": S_d})
    assert per_step.palm == pytest.approx(4 * ex.palm)


class _Dev:
    """A device as flops sees it: a kind and a platform."""

    def __init__(self, kind, platform="gpu"):
        self.device_kind, self.platform = kind, platform


def test_peak_table_and_cpu_measurement():
    assert flops.peak_flops_per_device(_Dev("NVIDIA H100 80GB HBM3")) == 989e12
    assert flops.peak_flops_per_device(_Dev("NVIDIA A100-SXM4-80GB")) == 312e12
    assert flops.peak_flops_per_device(_Dev("NVIDIA H100 PCIe")) == 756e12
    # float32 matmuls run on TF32 tensor cores: half the bf16 rate.
    assert flops.peak_flops_per_device(_Dev("NVIDIA A100-SXM4-40GB"), dtype="float32") == 156e12
    host = flops.measure_cpu_peak_flops(n=256, repeats=3)
    assert 1e8 < host < 1e14
    per_device = flops.peak_flops_per_device(jax.devices()[0], cpu_peak=host)
    assert per_device == pytest.approx(host / jax.local_device_count())


@pytest.mark.parametrize("kind", ["NVIDIA H800", "NVIDIA A800-SXM4-80GB", "NVIDIA B200",
                                  "NVIDIA L40S"])
def test_an_unknown_gpu_warns_and_uses_a_measured_rate(kind, monkeypatch, caplog):
    measured = []

    def fake_measure(device, dtype, n, repeats):
        measured.append((device.device_kind, dtype, n))
        return 600e12

    monkeypatch.setattr(flops, "measure_matmul_flops", fake_measure)
    assert flops.peak_flops_per_device(_Dev(kind)) == 600e12
    assert measured == [(kind, "bfloat16", 8192)]
    assert f"No datasheet peak for device kind {kind!r}" in caplog.text
    assert "train.train.peak_flops_per_device" in caplog.text
    # The gin-bindable override wins, measuring nothing.
    assert flops.peak_flops_per_device(_Dev(kind), override=2.25e15) == 2.25e15
    assert len(measured) == 1


# Published training arithmetic, reproduced with the hardware table's peaks.


def test_llama3_405b_on_16k_h100_at_400_tflops_is_about_67_days():
    """Llama 3 (arXiv 2407.21783): 3.8e25 FLOPs, 16,384 H100s at ~400 TFLOP/s each."""
    total = 6 * 405e9 * 15.6e12
    assert total == pytest.approx(3.8e25, rel=0.01)
    assert flops.training_days(total, 16_384, 400e12) == pytest.approx(67, abs=0.5)


def test_palm_540b_mfu_with_the_tpu_v4_peak_from_the_table():
    per_token = flops.decoder_only_flops_per_token(PALM_540B, 2048)
    peak = hardware.spec("TPU v4").peak("bfloat16")
    assert peak == 275e12
    _, mfu = flops.mfu(per_token * 238.3e3, 1.0, 6144, peak)
    assert mfu.palm == pytest.approx(0.462, abs=0.001)
    no_attention = 6 * _n(PALM_540B) * 238.3e3 / (6144 * peak)
    assert no_attention == pytest.approx(0.457, abs=0.001)


def test_70b_on_12t_tokens_fits_three_months_on_2500_h100_not_a100():
    """The seed's claim: ~70B on ~12T tokens, 2,500 H100s, about three months."""
    total = 6 * 70e9 * 12e12  # 5.04e24, attention left out
    h100 = hardware.spec("H100 80GB").peak("bfloat16") * 0.40
    a100 = hardware.spec("A100 80GB").peak("bfloat16") * 0.40
    assert flops.training_days(total, 2500, h100) == pytest.approx(59, abs=0.5)
    assert flops.training_days(total, 2500, h100) < 90
    # 2,500 A100s supply about 48% of the FLOPs in 90 days: not feasible.
    assert flops.flops_supplied(2500, a100, 90) / total == pytest.approx(0.48, abs=0.005)
    # At peak the H100 cluster supplies 1.92e25 in 90 days: MFU >= 26% suffices.
    assert total / flops.flops_supplied(2500, h100 / 0.40, 90) == pytest.approx(0.26, abs=0.005)


def test_mfu_units():
    tflops, mfu = flops.mfu(flops.Flops(8e12, 4e12), step_time_s=2.0, num_devices=4,
                            peak_per_device=2e12)
    assert (tflops.palm, tflops.maxtext) == (1.0, 0.5)
    assert (mfu.palm, mfu.maxtext) == (0.5, 0.25)


# Both conventions against XLA's own count of the compiled step (layers unrolled, so the
# loop body is not counted once for all layers). XLA also counts the optimizer update
# and the elementwise work (softmax, norms, activations), and the whole attention square
# (the causal mask skips nothing), so it sits a little above both conventions.
@pytest.mark.slow  # one compile per family, 10-20 s each on the shared cores
@pytest.mark.parametrize("name, lengths", [
    # Short decoder sequences: XLA counts the whole causal square, MaxText half of it.
    ("tiny_llama", {"targets": 64}),  # causal LM, untied head
    ("tiny_palm", {"inputs": 32, "targets": 32}),  # prefix LM, tied, multi-query
    ("tiny_encdec", {"inputs": 128, "targets": 128}),  # encoder-decoder, tied
])
def test_both_conventions_within_5_percent_of_xla_cost_analysis(name, lengths):
    import gin

    from t5x_like import launch
    from t5x_like.planning import planner
    from t5x_like.training import optimizers

    gin.clear_config()
    launch.parse_gin([f"models/{name}.gin"], [])
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    gin.clear_config()
    optimizer = optimizers.adamw_llama2(peak_lr=1e-3, warmup_steps=10, total_steps=100)
    xla = planner.xla_train_flops(model, optimizer, 16, lengths)
    ours = model.train_flops_per_step(16, lengths)
    assert xla / ours.palm == pytest.approx(1.0, abs=0.05)
    assert xla / ours.maxtext == pytest.approx(1.0, abs=0.05)
    # The counts this replaced, 6·(all parameters), were 31% (tiny_llama) too high.
    if name == "tiny_llama":
        assert 6 * model.num_params * 16 * 64 / xla > 1.25
