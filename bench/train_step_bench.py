"""Train-step speed of a model config on a CPU mesh, as a ratio to this machine's peak.

    .venv/bin/python bench/train_step_bench.py [--model tiny_encdec] [--devices 8] \
        [--rules fsdp] [--batch_size 16] [--feature_lengths inputs=128,targets=128] \
        [--repeats 10]

Prints the median step time over `repeats` steps (after a compile and a warm-up step),
tokens/s (encoder inputs + decoder targets for encoder-decoders) and MFU in both FLOPs
conventions against a matmul peak measured in the same process (SPEC section 3). The
tokens/s is the "model trains at" rate that bench/loader_bench.py must beat 10x.
Random token batches with the model's feature names stand in for data: speed does not
depend on the token values.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_encdec", help="gin_configs/models/<name>.gin")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rules", default="fsdp")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--feature_lengths", default="inputs=128,targets=128")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    import gin
    import numpy as np

    from t5x_like import flops, loader, models, partitioning, train, trainer

    train.parse_gin([f"models/{args.model}.gin"], [])
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    lengths = {k: int(v) for k, v in (kv.split("=") for kv in args.feature_lengths.split(","))}
    encdec = isinstance(model, models.EncoderDecoderModel)
    batch_lengths = ({"encoder_input_tokens": lengths["inputs"],
                      "decoder_target_tokens": lengths["targets"]} if encdec else
                     {"decoder_target_tokens": sum(lengths.values())})

    mesh = partitioning.make_mesh({"data": 1, "fsdp": args.devices, "tensor": 1})
    rules = partitioning.get_rules(args.rules)
    optimizer = trainer.adamw_llama2(peak_lr=1e-3, warmup_steps=10, total_steps=1000)
    graphdef, state, _ = train.init_or_restore(model, optimizer.tx, mesh, rules, seed=0)
    step_fn = trainer.make_train_step(
        graphdef, model.loss_fn, optimizer.schedule,
        state_sharding=trainer.state_shardings(state),
        batch_sharding=loader.batch_sharding(mesh), rules=rules)
    rng = np.random.default_rng(0)
    batch = {}
    for name, length in batch_lengths.items():
        prefix = name.split("_")[0]
        batch[name] = rng.integers(6, 8000, (args.batch_size, length), dtype=np.int32)
        batch[f"{prefix}_segment_ids"] = np.ones((args.batch_size, length), np.int32)
        batch[f"{prefix}_positions"] = np.tile(np.arange(length, dtype=np.int32),
                                               (args.batch_size, 1))
    batch["decoder_input_tokens"] = np.roll(batch["decoder_target_tokens"], 1, axis=1)
    batch["decoder_loss_weights"] = np.ones_like(batch["decoder_target_tokens"], np.float32)
    batch = loader.to_global_batch(batch, mesh)
    key = jax.random.key(0)
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        state, m = step_fn(state, batch, key)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - start
        state, m = step_fn(state, batch, key)
        jax.block_until_ready(m)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            state, m = step_fn(state, batch, key)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    peak = flops.peak_flops_per_device()
    step_flops = flops.train_flops_per_step(model.cfg, args.batch_size, lengths)
    tflops, mfu = flops.mfu(step_flops, step_time, args.devices, peak)
    tokens = args.batch_size * sum(batch_lengths.values())
    print(f"{args.model} on {args.devices} CPU devices ({args.rules}), batch {args.batch_size} "
          f"x {lengths}: compile+first step {compile_s:.1f}s")
    print(f"step {step_time * 1e3:.1f} ms (median of {args.repeats}; min {min(times) * 1e3:.1f}, "
          f"max {max(times) * 1e3:.1f}) | {tokens / step_time:,.0f} tok/s | "
          f"MFU palm {mfu.palm:.1%} maxtext {mfu.maxtext:.1%} "
          f"(peak {peak / 1e9:.1f} GFLOP/s per device, measured)")


if __name__ == "__main__":
    main()
