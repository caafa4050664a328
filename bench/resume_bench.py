"""Resume cost of the demo's stream: time to the first batch when resuming at an early and
at a far step, from the shards' saved tf.data states (t5x_like/data/stream.py).

    .venv/bin/python bench/resume_bench.py --workdir /tmp/resume_bench \\
        [--early 10] [--far 100000] [--repeats 2]

Setup (once per --workdir; a rerun skips it): each shard's pipeline is run from step 0 to
--far in its own process (one per shard, in parallel), and its tf.data state saved at
--early and at --far (`shard_{k}.step_{s}.tfdata`, as a checkpoint holds them), with a
SHA-256 of the shard's rows of the step after each state. Running the shard there is what
the old resume did on every restart (fast-forward inside tf.data): the setup's time per
shard is that cost, and is printed as such. Progress goes to <workdir>/setup.log.

Then, --repeats times, alternating: a fresh StreamIterator (the demo's settings, its
worker processes) resumed at --early and at --far from those states; the time from
creating it to its first batch (spawning the workers, importing TensorFlow, building the
35 task pipelines, restoring the states), and a check that the batch's rows are the ones
the unbroken run made there. With --old_early it also times the old way at --early (no
state: the shard replays --early steps).
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5x_like import launch  # noqa: E402
from t5x_like.data import forms, mixtures, pipeline, stream  # noqa: E402

MIXTURE, LENGTHS, CONVERTER, BATCH, SHARDS = (
    "reka_mix_ul2", {"inputs": 128, "targets": 128}, "encdec", 16, 2)  # the demo's


def _spec():
    mixtures.import_task_modules(["tasks"])
    return pipeline.shard_spec(MIXTURE, LENGTHS, forms.get(CONVERTER), 0, SHARDS)


def _digest(rows) -> str:
    h = hashlib.sha256()
    for name in sorted(rows):
        h.update(name.encode())
        h.update(rows[name].tobytes())
    return h.hexdigest()


def _state_path(workdir: str, shard: int, step: int) -> str:
    return os.path.join(workdir, f"shard_{shard:05d}.step_{step}.tfdata")


def _setup_shard(shard: int, steps: list[int], workdir: str) -> None:
    """Runs shard `shard` to each of `steps` (ascending), saving its state and the digest
    of its next step's rows there. Every PROGRESS_EVERY steps it saves where it is, and
    starts from there when run again (restoring that state), adding up the seconds."""
    launch.hide_gpus_from_tensorflow()
    import tensorflow as tf  # noqa: PLC0415

    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})  # as workers
    progress = _state_path(workdir, shard, 0).replace(".step_0.", ".progress.")
    at, seconds = 0, 0.0
    if os.path.exists(progress + ".json"):
        info = json.load(open(progress + ".json"))
        at, seconds = info["step"], info["seconds"]
    start = time.perf_counter() - seconds
    made = stream._ShardStream(_spec(), shard, BATCH // SHARDS, at,  # noqa: SLF001
                               saved=(at, progress if at else None),
                               snapshot_ratio=float("inf"))
    with open(os.path.join(workdir, "setup.log"), "a") as log:
        for target in steps:
            path = _state_path(workdir, shard, target)
            if os.path.exists(path + ".json"):
                continue
            while made.step < target:
                made.advance(min(PROGRESS_EVERY - made.step % PROGRESS_EVERY,
                                 target - made.step))
                elapsed = time.perf_counter() - start
                print(f"shard {shard}: step {made.step} after {elapsed:.0f} s "
                      f"({made.step * BATCH // SHARDS / elapsed:.0f} rows/s)", file=log,
                      flush=True)
                if made.step % PROGRESS_EVERY == 0:
                    _write(progress, made.snapshot(), {"step": made.step, "seconds": elapsed})
            state = made.snapshot()
            digest = _digest(made.next_block()["rows"])  # the stream is now at target + 1
            _write(path, state, {"step": target, "rows_sha256": digest,
                                 "state_bytes": len(state),
                                 "seconds_from_step_0": time.perf_counter() - start})


PROGRESS_EVERY = 5000


def _write(path: str, state: bytes, info: dict) -> None:
    for name, data in ((path, state), (path + ".json", json.dumps(info).encode())):
        with open(name + ".tmp", "wb") as f:
            f.write(data)
        os.replace(name + ".tmp", name)


def setup(workdir: str, steps: list[int]) -> dict:
    """The states (made now unless <workdir> has them) and what making them took."""
    os.makedirs(workdir, exist_ok=True)
    done = all(os.path.exists(_state_path(workdir, k, s) + ".json")
               for k in range(SHARDS) for s in steps)
    if not done:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_setup_shard, args=(k, sorted(steps), workdir))
                 for k in range(SHARDS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            if p.exitcode:
                raise SystemExit(f"setup process failed ({p.exitcode}); see {workdir}")
    return {(k, s): json.load(open(_state_path(workdir, k, s) + ".json"))
            for k in range(SHARDS) for s in steps}


def resume(workdir: str, step: int, made: dict, with_states: bool = True) -> float:
    """Seconds from a new iterator resumed at `step` to its first batch (checked)."""
    start = time.perf_counter()
    source = stream.Stream(_spec(), BATCH, task_modules=("tasks",),
                           worker_init=launch.hide_gpus_from_tensorflow)
    it = source.iterator()
    try:
        it.set_state({**it.get_state(), "next_index": step})
        if with_states:
            it.set_shard_states({k: (step, _state_path(workdir, k, step))
                                 for k in range(SHARDS)})
        batch = next(it)
        seconds = time.perf_counter() - start
        assert it.replayed == {k: 0 if with_states else step for k in range(SHARDS)}
    finally:
        it.close()
    rows = len(next(iter(batch.values())))
    for k in range(SHARDS):  # the shard's rows of the step are the unbroken run's
        part = {n: v[k * rows // SHARDS:(k + 1) * rows // SHARDS] for n, v in batch.items()
                if n in source.layout.names}
        if _digest(part) != made[(k, step)]["rows_sha256"]:
            raise SystemExit(f"shard {k} at step {step}: rows differ from the unbroken run")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--early", type=int, default=10)
    parser.add_argument("--far", type=int, default=100_000)
    parser.add_argument("--also", type=int, nargs="*", default=[],
                        help="steps between, also set up and timed")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--setup_only", action="store_true")
    parser.add_argument("--old_early", action="store_true",
                        help="also time the old way (replay, no state) at --early")
    args = parser.parse_args()
    made = setup(args.workdir, sorted({args.early, *args.also, args.far}))
    rows = args.far * BATCH // SHARDS
    for k in range(SHARDS):
        info = made[(k, args.far)]
        print(f"setup (= the old fast-forward to step {args.far}): shard {k} made {rows:,} "
              f"rows in {info['seconds_from_step_0']:.0f} s "
              f"({rows / info['seconds_from_step_0']:.0f} rows/s); state "
              f"{info['state_bytes'] / 1e6:.1f} MB")
    if args.setup_only:
        return
    times = {s: [] for s in sorted({args.early, *args.also, args.far})}
    for _ in range(args.repeats):
        for step in times:
            times[step].append(resume(args.workdir, step, made))
            print(f"resume at step {step:,}: first batch after {times[step][-1]:.1f} s "
                  "(rows equal to the unbroken run's)", flush=True)
    if args.old_early:
        print(f"old resume (replay) at step {args.early}: first batch after "
              f"{resume(args.workdir, args.early, made, with_states=False):.1f} s")
    early, far = min(times[args.early]), min(times[args.far])
    print(f"best of {args.repeats}: step {args.early:,} {early:.1f} s, step {args.far:,} "
          f"{far:.1f} s: the far resume costs {far / early:.2f}x the early one")


if __name__ == "__main__":
    main()
