"""Streaming throughput: a mixture's SeqIO shards made on the fly by grain workers.

    .venv/bin/python bench/stream_bench.py [--mixture reka_mix_ul2] \
        [--feature_lengths inputs=128,targets=128] [--converter encdec] [--shards 2] \
        [--workers 2] [--batch_size 16] [--num_batches 150] [--pack_pool 256] \
        [--model_tokens_per_s RATE]

What the trainer's data iterator (t5x_like/data/stream.py) delivers, alone on the machine:
  - start-up: seconds from creating the iterator to the first batch (spawning the
    workers, importing TensorFlow, building every task's SeqIO pipeline, filling their
    shuffle buffers);
  - then rows/s and tokens/s over `num_batches` batches: "positions" counts every
    position of a row (what the model consumes, the unit of train_step_bench.py and the
    trainer's tok/s), "tokens" the non-padding ones.
With --model_tokens_per_s (bench/train_step_bench.py at the same lengths) it prints the
ratio; the stream should deliver at least 5x what the model consumes.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from t5x_like import launch
from t5x_like.data import forms, mixtures, pipeline, stream  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixture", default="reka_mix_ul2")
    parser.add_argument("--feature_lengths", default="inputs=128,targets=128")
    parser.add_argument("--converter", default="encdec")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_batches", type=int, default=150)
    parser.add_argument("--pack_pool", type=int, default=pipeline.DEFAULT_PACK_POOL,
                        help="examples packed together, best-fit; 1: seqio's greedy")
    parser.add_argument("--task_module", action="append", default=None,
                        help="module registering the mixture (repeatable); default: tasks")
    parser.add_argument("--model_tokens_per_s", type=float, default=None)
    args = parser.parse_args()
    lengths = {k: int(v) for k, v in (kv.split("=") for kv in args.feature_lengths.split(","))}
    modules = tuple(args.task_module or ["tasks"])
    mixtures.import_task_modules(modules)

    start = time.perf_counter()
    source = stream.stream_for(args.mixture, lengths, forms.get(args.converter), 0, args.batch_size,
                               args.shards, pack_pool=args.pack_pool,
                               workers=args.workers, task_modules=modules,
                               worker_init=launch.hide_gpus_from_tensorflow)
    it = source.iterator()
    try:
        first = next(it)
        first_s = time.perf_counter() - start
        row_positions = sum(v.shape[1] for k, v in first.items()
                            if k in pipeline.TOKEN_SEGMENTS)
        tokens = 0
        start = time.perf_counter()
        for _ in range(args.num_batches):
            batch = next(it)
            tokens += sum(int(np.count_nonzero(batch[seg]))
                          for seg in pipeline.TOKEN_SEGMENTS.values() if seg in batch)
        seconds = time.perf_counter() - start
    finally:
        it.close()
    rows = args.num_batches * args.batch_size
    positions = rows * row_positions
    print(f"stream {args.mixture} {args.converter} {lengths}: {args.shards} shards in "
          f"{args.workers} worker processes, batch {args.batch_size}, pack pool "
          f"{args.pack_pool}")
    print(f"first batch after {first_s:.1f} s (workers start, pipelines build)")
    print(f"{args.num_batches} batches in {seconds:.1f} s: {rows / seconds:,.1f} rows/s, "
          f"{positions / seconds:,.0f} positions/s, {tokens / seconds:,.0f} non-padding "
          f"tokens/s (padding {1 - tokens / positions:.3f})")
    if args.model_tokens_per_s:
        ratio = positions / seconds / args.model_tokens_per_s
        verdict = "OK" if ratio >= 5 else "TOO SLOW"
        print(f"stream / model = {ratio:,.1f}x the model's {args.model_tokens_per_s:,.0f} "
              f"positions/s (need >= 5x): {verdict}")


if __name__ == "__main__":
    main()
