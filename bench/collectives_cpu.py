"""What the fsdp gradient reduction costs on emulated CPU devices, by collective.

    .venv/bin/python bench/collectives_cpu.py [--devices 8] [--rows 256] [--cols 32000]

Times, on `devices` emulated CPU devices, the reduction of one gradient the size of the
reference model's output head ([256, 32,000] float32 per device) three ways: an
all-reduce (what XLA's SPMD partitioner emits for an fsdp gradient on CPU: all-reduce,
then each device slices its shard), a reduce-scatter (what GPU pipelines rewrite that
pair into; XLA's CPU pipeline does not), and, for scale, the all-gather of one
parameter of that size (fsdp's forward). Prints each one's median over 7 runs and
whether the compiled HLO holds that collective.
"""
import argparse
import os
import statistics
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=32000)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((args.devices,), ("d",))
    n, rows = args.devices, args.rows
    x = jax.device_put(np.random.default_rng(0).standard_normal(
        (n * rows, args.cols), dtype=np.float32), NamedSharding(mesh, P("d")))
    cases = {
        "all-reduce": lambda g: jax.lax.psum(g, "d"),
        "reduce-scatter": lambda g: jax.lax.psum_scatter(g, "d", scatter_dimension=0,
                                                         tiled=True),
        "all-gather": lambda g: jax.lax.all_gather(g[: rows // n], "d", tiled=True),
    }
    for name, body in cases.items():
        fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
        in_hlo = f"{name}(" in fn.lower(x).compile().as_text()
        fn(x).block_until_ready()
        times = []
        for _ in range(7):
            start = time.perf_counter()
            fn(x).block_until_ready()
            times.append(time.perf_counter() - start)
        print(f"{name:<15} {statistics.median(times) * 1e3:8.1f} ms   in the HLO: {in_hlo}",
              file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
