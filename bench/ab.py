"""A/B of train-step variants in one process, interleaved step by step, as ratios.

    .venv/bin/python bench/ab.py --gin bench/reference_llama.gin --lengths targets=256 \
        --batch 8 --devices 1 --variant base: --variant noscan:scan_layers=False \
        [--variant base2:] [--rounds 3 --steps 10]

Each variant is a name and TransformerConfig overrides (name=value, Python literals).
All variants are compiled and warmed up first; then rounds x steps steps of each are
timed one at a time, interleaved (A B C, then C B A, ...), each step waited for, so load
from other processes falls on all of them alike. Prints each variant's fastest, 20th
percentile and median step and their ratios to the first variant's (< 1: faster).
On a shared 2-core VM the fastest step is usually the steadiest of the three (load
only ever adds time), though not always. An A/A run (the same variant twice, `--variant
base: --variant base2:`) shows how far the numbers can be trusted in that sitting
(docs/PERFORMANCE.md, "How speed is measured on this machine"). One process has one
glibc setting: start it with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 to time steps as
`python -m t5x_like.train` runs them (docs/PERFORMANCE.md, change 5).
"""
import argparse
import ast
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_variant(text: str):
    name, _, overrides = text.partition(":")
    pairs = [kv.split("=", 1) for kv in overrides.split(",") if kv]
    return name, {k: ast.literal_eval(v) for k, v in pairs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gin", default="bench/reference_llama.gin")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lengths", default="targets=256")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                               f"platform_device_count={args.devices}").strip()
    import jax
    import speed

    lengths = {k: int(v) for k, v in (kv.split("=") for kv in args.lengths.split(","))}
    base = speed.load_model(args.gin, args.dtype)
    built = {}
    for name, overrides in map(parse_variant, args.variant):
        model = type(base)(dataclasses.replace(base.cfg, **overrides))
        step_fn, state, batch, mesh, _ = speed.make_step(model, args.devices, args.batch,
                                                         lengths)
        built[name] = [step_fn, speed.time_steps(step_fn, state, batch, mesh, 0)[2], batch,
                       mesh, []]
    key = jax.random.key(0)
    order = list(built.values())
    for i in range(args.rounds * args.steps):
        for entry in (order if i % 2 == 0 else order[::-1]):
            step_fn, state, batch, mesh, times = entry
            with jax.set_mesh(mesh):
                start = time.perf_counter()
                entry[1], metrics = step_fn(state, batch, key)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - start)
    first = None
    for name, (*_, times) in built.items():
        times.sort()
        stats = (times[0], times[len(times) // 5], statistics.median(times))
        first = first or stats
        print(f"{name:<16} fastest {stats[0] * 1e3:7.1f} ms  p20 {stats[1] * 1e3:7.1f}  "
              f"median {stats[2] * 1e3:7.1f}  over {len(times)} steps;  ratios "
              + " / ".join(f"{s / f:.3f}" for s, f in zip(stats, first)))


if __name__ == "__main__":
    main()
