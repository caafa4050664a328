"""Packing: padding and per-task shares of packed rows, greedy against pool packing.

    .venv/bin/python bench/packing.py [--mixture reka_mix_ul2] [--converter encdec] \
        [--lengths 128,512] [--pools 1,256] [--rows 2048] [--out bench/results/packing.json]

For each feature length L (inputs=L,targets=L; `--converter lm`: targets=L) and pack
pool P (1 = seqio's greedy, in-order packing), the first `--rows` rows of shard 0 of a
1-shard stream (seed 0, made in this process, as a worker makes them):
  - padding: 1 - non-padding tokens / positions, over every token feature;
  - the volume bound: the padding no packer can go below (rows are at least the
    largest of Σ lengths_f / L_f over the features f of the examples packed);
  - per-task shares of the packed examples against the configured rates (max |Δ|);
  - rows/s of the shard in this one process (the pipeline's SeqIO work included).
Results go to --out as JSON.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from t5x_like import launch
from t5x_like.data import forms, mixtures, pipeline  # noqa: E402


def measure(mixture, lengths, converter, pool, rows):
    spec = pipeline.shard_spec(mixture, lengths, forms.get(converter), 0, 1, pack_pool=pool)
    layout = pipeline.record_layout(spec)
    widths = {f: n for f, n in zip(layout.names, layout.lengths) if f in pipeline.TOKEN_SEGMENTS}
    start = time.perf_counter()
    batch = next(pipeline.shard_rows(spec, 0).batch(rows).as_numpy_iterator())
    seconds = time.perf_counter() - start
    counts = batch.pop(pipeline.TASK_COUNTS).sum(axis=0)
    tokens = pipeline.row_stats(batch)["tokens"]
    leaves = mixtures.leaf_tasks_and_rates(mixture)
    rates = np.array([r for _, r in leaves]) / sum(r for _, r in leaves)
    shares = counts / counts.sum()
    positions = rows * sum(widths.values())
    volume_rows = max(tokens[f] / widths[f] for f in widths)
    worst = int(np.argmax(np.abs(shares - rates)))
    return {
        "pack_pool": pool, "rows": rows, "examples": int(counts.sum()),
        "padding": 1 - sum(tokens.values()) / positions,
        "padding_per_feature": {f: 1 - tokens[f] / (rows * widths[f]) for f in widths},
        "volume_bound_padding": 1 - sum(tokens.values()) / (volume_rows * sum(widths.values())),
        "max_abs_share_minus_rate": float(np.abs(shares - rates).max()),
        "worst_task": leaves[worst][0],
        "shares": {name: float(s) for (name, _), s in zip(leaves, shares)},
        "rates": {name: float(r) for (name, _), r in zip(leaves, rates)},
        "seconds": seconds, "rows_per_s_one_process": rows / seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixture", default="reka_mix_ul2")
    parser.add_argument("--converter", default="encdec")
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--pools", default="1,256")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--task_module", action="append", default=None)
    parser.add_argument("--out", default="bench/results/packing.json")
    args = parser.parse_args()
    launch.hide_gpus_from_tensorflow()
    mixtures.import_task_modules(tuple(args.task_module or ["tasks"]))
    features = ["targets"] if args.converter == "lm" else ["inputs", "targets"]
    results = []
    for length in map(int, args.lengths.split(",")):
        for pool in map(int, args.pools.split(",")):
            lengths = {f: length for f in features}
            r = measure(args.mixture, lengths, args.converter, pool, args.rows)
            r.update(mixture=args.mixture, converter=args.converter, lengths=lengths)
            results.append(r)
            print(f"{args.mixture} {args.converter} {lengths} pool {pool}: padding "
                  f"{r['padding']:.4f} (per feature "
                  f"{ {f: round(v, 4) for f, v in r['padding_per_feature'].items()} }, "
                  f"volume bound {r['volume_bound_padding']:.4f}), {r['examples']} examples "
                  f"in {args.rows} rows, max |share - rate| {r['max_abs_share_minus_rate']:.4f}"
                  f" ({r['worst_task']}), {r['rows_per_s_one_process']:.0f} rows/s", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
