"""Prepare and loader throughput for the demo mixture at demo lengths.

    .venv/bin/python bench/loader_bench.py [--mixture reka_mix_ul2] \
        [--feature_lengths inputs=256,targets=256] [--converter encdec] \
        [--num_examples 1024] [--num_shards 2] [--workers 2] [--batch_size 32] \
        [--model_tokens_per_s RATE]

Prints:
  - prepare: rows/s and tokens/s of a fresh store (wall clock including the per-shard
    set-up of one seqio pipeline per leaf task, which dominates small stores);
  - loader: tokens/s of shuffled batches out of the grain iterator, and of batches made
    into global jax.Arrays, median over repeats. "tokens" are non-padding token positions
    (encoder inputs + decoder targets); "positions" counts padding too.
The loader must deliver >= 10x the tokens/s the demo model trains at; pass that rate as
--model_tokens_per_s to get the check printed.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from t5x_like.data import prepare as prepare_lib  # noqa: E402
from t5x_like.data import store  # noqa: E402
from t5x_like.model import partitioning  # noqa: E402
from t5x_like.training import loader as loader_lib  # noqa: E402


def _bench_loader(loader, num_batches, mesh=None):
    it = loader.iterator()
    next(it)  # warm up threads (and jax transfer) outside the timing
    tokens = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(it)
        tokens += sum(
            int(np.count_nonzero(batch[seg]))
            for seg in ("encoder_segment_ids", "decoder_segment_ids")
            if seg in batch
        )
        if mesh is not None:
            rows = partitioning.process_rows(mesh, len(next(iter(batch.values()))))
            global_batch = loader_lib.to_global_batch(batch, mesh, rows)
            for array in global_batch.values():
                array.block_until_ready()
    return tokens / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixture", default="reka_mix_ul2")
    parser.add_argument("--feature_lengths", default="inputs=256,targets=256")
    parser.add_argument("--converter", default="encdec")
    parser.add_argument("--num_examples", type=int, default=1024)
    parser.add_argument("--num_shards", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_batches", type=int, default=200, help="per loader repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="store dir (default: a fresh tmp dir)")
    parser.add_argument("--task_module", action="append", default=None,
                        help="module registering the mixture (repeatable); default: tasks")
    parser.add_argument("--model_tokens_per_s", type=float, default=None)
    args = parser.parse_args()

    out = args.out or tempfile.mkdtemp(prefix="loader_bench_")
    fresh = not os.path.exists(os.path.join(out, store.MANIFEST_NAME))
    start = time.perf_counter()
    manifest = prepare_lib.prepare(
        args.mixture, args.feature_lengths, args.converter, args.num_examples, 0, out,
        args.num_shards, args.workers,
        task_modules=tuple(args.task_module or ["tasks"]),
    )
    prepare_s = time.perf_counter() - start
    rows = manifest["num_examples"]
    if fresh:
        print(
            f"prepare {args.mixture} {args.converter} {args.feature_lengths}: {rows} rows in "
            f"{prepare_s:.1f} s with {args.workers} workers x {args.num_shards} shards = "
            f"{rows / prepare_s:.1f} rows/s, {manifest['tokens'] / prepare_s:,.0f} tokens/s "
            f"(padding {manifest['padding_fraction']:.3f}; per-shard seconds "
            f"{manifest['shard_seconds']})"
        )
    else:
        print(f"prepare: store {out} existed, validated in {prepare_s:.1f} s (not timed)")

    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()).reshape(-1, 1, 1), ("data", "fsdp", "tensor"))
    loader = loader_lib.Loader(out, args.batch_size, seed=0, num_epochs=None)
    results = {}
    for label, m in (("numpy batches", None), ("global jax.Array batches", mesh)):
        rates = [_bench_loader(loader, args.num_batches, m) for _ in range(args.repeats)]
        results[label] = statistics.median(rates)
        print(
            f"loader ({label}, batch {args.batch_size}, {args.num_batches} batches x "
            f"{args.repeats} repeats): median {results[label]:,.0f} tokens/s "
            f"(min {min(rates):,.0f}, max {max(rates):,.0f})"
        )
    if args.model_tokens_per_s:
        ratio = results["global jax.Array batches"] / args.model_tokens_per_s
        verdict = "OK" if ratio >= 10 else "TOO SLOW"
        print(f"loader / model = {ratio:,.1f}x (need >= 10x): {verdict}")
    if args.out is None:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
