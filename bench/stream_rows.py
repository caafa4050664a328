"""A digest of the demo's streamed rows: which rows a run trains on, step by step.

    .venv/bin/python bench/stream_rows.py [--steps 300]

Prints one SHA-256 over the first `--steps` global batches of the demo's stream
(`experiments/demo_encdec_ul2.gin`'s data: reka_mix_ul2, inputs/targets 128/128, batch 16,
2 shards, seed 0) through the data workers, as training reads them. Run it in two
checkouts (each with its own .venv) to show that a change leaves the rows alone.
"""
import argparse
import hashlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    import tasks.reka_mix  # noqa: F401 - registers the demo's tasks
    from t5x_like.data import forms, stream

    it = stream.stream_for("reka_mix_ul2", {"inputs": 128, "targets": 128}, forms.ENCDEC, 0, 16, 2,
                           task_modules=["tasks.reka_mix"]).iterator()
    digest = hashlib.sha256()
    try:
        for _ in range(args.steps):
            batch = next(it)
            for name in sorted(batch):
                digest.update(name.encode() + batch[name].tobytes())
    finally:
        it.close()
    print(f"{args.steps} steps: sha256 {digest.hexdigest()}")


if __name__ == "__main__":
    main()
