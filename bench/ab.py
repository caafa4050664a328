"""A/B of train-step variants in one process, alternating, as ratios of medians.

    .venv/bin/python bench/ab.py --gin bench/reference_llama.gin --lengths targets=256 \
        --batch 8 --devices 1 --variant base: --variant fused:fused_loss=True \
        [--variant fused64:fused_loss=True,loss_chunk_length=64] [--rounds 3 --steps 10]

Each variant is a name and TransformerConfig overrides (name=value, Python literals).
All variants are compiled first; then each round times every variant in turn (steps as
bench/speed.py times them: metrics fetched one step late), so load from other processes
falls on all of them alike. Prints each variant's median step time and its ratio to the
first variant's (< 1: faster). This is how docs/PERFORMANCE.md's before/after numbers
were measured. One process has one glibc setting: start it with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 to time steps as `python -m t5x_like.train` runs
them (docs/PERFORMANCE.md, change 5).
"""
import argparse
import ast
import dataclasses
import os
import statistics
import sys

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
    import speed

    lengths = {k: int(v) for k, v in (kv.split("=") for kv in args.lengths.split(","))}
    base = speed.load_model(args.gin, args.dtype)
    built = {}
    for name, overrides in map(parse_variant, args.variant):
        model = type(base)(dataclasses.replace(base.cfg, **overrides))
        step_fn, state, batch, mesh, _ = speed.make_step(model, args.devices, args.batch,
                                                         lengths)
        built[name] = [step_fn, state, batch, mesh, []]
    for _ in range(args.rounds):
        for entry in built.values():
            step_fn, state, batch, mesh, times = entry
            _, intervals, entry[1], _ = speed.time_steps(step_fn, state, batch, mesh,
                                                         args.steps)
            times += intervals
    first = None
    for name, (*_, times) in built.items():
        median = statistics.median(times)
        first = first or median
        print(f"{name:<24} median {median * 1e3:8.1f} ms over {len(times)} steps  "
              f"ratio {median / first:.3f}")


if __name__ == "__main__":
    main()
