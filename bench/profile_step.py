"""Where a train step's time goes: a jax.profiler trace of bench/speed.py's step, by op.

    .venv/bin/python bench/profile_step.py [--only reference] [--devices 1]
        [--dtype float32] [--steps 3] [--trace-dir /tmp/profile_step]

Traces `steps` steady steps of the row's step (after bench/speed.py's warm-up), then
prints from the trace's XLA CPU threads: the wall time each kind of op (the fusion or
collective name without its number) covers, the time no op runs, and the longest ops
by thread time. Wall time: while several ops run at once each gets its share, so the
kinds add up to the steps' span. Op names map to the compiled HLO
(`step_fn.lower(...).compile().as_text()`). The trace can also be opened in
TensorBoard or Perfetto. Run it as `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python
bench/profile_step.py` to profile the step as `python -m t5x_like.train` runs it
(docs/PERFORMANCE.md, change 5).
"""
import argparse
import collections
import glob
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

IGNORED = ("ThunkExecutor", "while", "SlinkyThreadPool", "ThreadpoolListener")


def op_events(trace_dir: str):
    """(start ns, end ns, op name) of every op on XLA's CPU threads."""
    import jax

    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
    return sorted((e.start_ns, e.start_ns + e.duration_ns, e.name)
                  for plane in data.planes for line in plane.lines if "XLA" in line.name
                  for e in line.events if not e.name.startswith(IGNORED))


def wall_by_kind(events):
    """{kind: ns of wall time}, "(idle)" for time no op runs, over the events' span."""
    edges = sorted([(a, 1, i) for i, (a, _, _) in enumerate(events)]
                   + [(b, -1, i) for i, (_, b, _) in enumerate(events)])
    wall, active, last = collections.Counter(), set(), edges[0][0]
    for t, delta, i in edges:
        if t > last:
            kinds = {re.sub(r"\.\d+$", "", events[j][2]) for j in active} or {"(idle)"}
            for kind in kinds:
                wall[kind] += (t - last) / len(kinds)
        last = t
        (active.add if delta > 0 else active.discard)(i)
    return wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="reference")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--trace-dir", default="/tmp/profile_step")
    args = parser.parse_args()
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    import speed

    case = next(c for c in speed.CASES if c.name == args.only and c.devices == args.devices)
    model = speed.load_model(case.gin, args.dtype)
    step_fn, state, batch, mesh, _ = speed.make_step(model, case.devices, case.batch,
                                                     case.lengths)
    state = speed.time_steps(step_fn, state, batch, mesh, 2)[2]
    key = jax.random.key(0)
    with jax.set_mesh(mesh):
        jax.profiler.start_trace(args.trace_dir)
        for _ in range(args.steps):
            state, metrics = step_fn(state, batch, key)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
    events = op_events(args.trace_dir)
    span = (max(b for _, b, _ in events) - events[0][0]) / args.steps
    print(f"{case.name}, {case.devices} device(s), {args.dtype}: {span / 1e6:.0f} ms of "
          f"trace per step; wall ms per step by kind of op:")
    for kind, ns in wall_by_kind(events).most_common(15):
        print(f"  {ns / args.steps / 1e6:8.1f}  {kind}")
    thread = collections.Counter()
    for a, b, name in events:
        thread[name] += b - a
    print("longest ops, thread ms per step:")
    for name, ns in thread.most_common(12):
        print(f"  {ns / args.steps / 1e6:8.1f}  {name}")


if __name__ == "__main__":
    main()
