"""Train-step speed of a model config on a CPU mesh, as a ratio to this machine's peak.

    .venv/bin/python bench/train_step_bench.py [--config.model=tiny_encdec] \
        [--config.devices=8] [--config.rules=fsdp] [--config.batch_size=16] \
        [--config.feature_lengths=inputs=128,targets=128] [--config.repeats=10]

Prints the median step time over `repeats` steps (after a compile and a warm-up step),
tokens/s (all input and target positions of a row) and MFU in both FLOPs conventions
against a matmul peak measured in the same process (docs/FORMULAS.md). The tokens/s is
the "model trains at" rate that bench/loader_bench.py must beat 10x. Random token
batches with the model's feature names stand in for data: speed does not depend on the
token values. The settings are an ml_collections ConfigDict (`--config.NAME=VALUE`).
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "tiny_encdec"  # gin_configs/models/<model>.gin
    config.devices = 8
    config.rules = "fsdp"
    config.batch_size = 16
    config.feature_lengths = "inputs=128,targets=128"
    config.repeats = 10
    return config


_CONFIG = config_flags.DEFINE_config_dict("config", default_config())


def random_batch(model, batch_size: int, lengths: dict[str, int], seed: int = 0) -> dict:
    """A packed-looking batch of the model's features: random tokens, one segment per
    row, positions 0..L-1, every target weighted (the prefix of a prefix LM bidirectional)."""
    rng = np.random.default_rng(seed)
    batch = model.get_initial_batch(batch_size, lengths)
    for name, array in batch.items():
        length = array.shape[1]
        if name.endswith("_tokens"):
            batch[name] = rng.integers(6, 8000, array.shape, dtype=np.int32)
        elif name.endswith("_positions"):
            batch[name] = np.tile(np.arange(length, dtype=np.int32), (batch_size, 1))
        elif name == "decoder_causal_attention":
            batch[name] = (np.arange(length) <= lengths.get("inputs", 0)).astype(
                np.int32)[None].repeat(batch_size, 0)
        else:  # segment ids, loss weights
            batch[name] = np.ones(array.shape, np.int32)
    return batch


def main(_):
    config = _CONFIG.value
    jax.config.update("jax_num_cpu_devices", config.devices)
    from t5x_like import flops, launch, loader, partitioning, trainer

    launch.parse_gin([f"models/{config.model}.gin"], [])
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    lengths = {k: int(v) for k, v in (kv.split("=") for kv in config.feature_lengths.split(","))}
    mesh = partitioning.make_mesh({"data": 1, "fsdp": config.devices, "tensor": 1})
    rules = partitioning.get_rules(config.rules)
    optimizer = trainer.adamw_llama2(peak_lr=1e-3, warmup_steps=10, total_steps=1000)
    graphdef, state, _ = trainer.init_or_restore(model, optimizer.tx, mesh, rules, seed=0)
    step_fn = trainer.make_train_step(
        graphdef, model.loss_fn, optimizer.schedule,
        state_sharding=trainer.state_shardings(state),
        batch_sharding=partitioning.batch_sharding(mesh), rules=rules)
    batch = loader.to_global_batch(random_batch(model, config.batch_size, lengths), mesh)
    key = jax.random.key(0)
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        state, m = step_fn(state, batch, key)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - start
        state, m = step_fn(state, batch, key)
        jax.block_until_ready(m)
        times = []
        for _ in range(config.repeats):
            start = time.perf_counter()
            state, m = step_fn(state, batch, key)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    peak = flops.peak_flops_per_device()
    step_flops = model.train_flops_per_step(config.batch_size, lengths)
    _, mfu = flops.mfu(step_flops, step_time, config.devices, peak)
    tokens = config.batch_size * model.tokens_per_example(lengths)
    print(f"{config.model} on {config.devices} CPU devices ({config.rules}), batch "
          f"{config.batch_size} x {lengths}: compile+first step {compile_s:.1f}s")
    print(f"step {step_time * 1e3:.1f} ms (median of {config.repeats}; min "
          f"{min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}) | {tokens / step_time:,.0f} "
          f"tok/s | MFU palm {mfu.palm:.1%} maxtext {mfu.maxtext:.1%} "
          f"(peak {peak / 1e9:.1f} GFLOP/s per device, measured)")


if __name__ == "__main__":
    app.run(main)
