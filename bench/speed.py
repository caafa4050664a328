"""Training speed of our jitted step, against a matmul peak measured in the same process.

    .venv/bin/python bench/speed.py                    # the whole table (about 10 min)
    .venv/bin/python bench/speed.py --only reference   # the rows of these models
    .venv/bin/python bench/speed.py --only reference --dtypes bfloat16 --steps 20

For each device count (1 and 8 emulated CPU devices; XLA reads the count when it starts,
so each runs in a subprocess of its own, `--worker`), one process measures the matmul
peak (float32 and bfloat16, n=1024) and then times the train step of each model in
`CASES`: a compile and 3 warm-up steps, then `--steps` (≥ 10) steady-state steps run as
training runs them (dispatch a step, then fetch the previous step's metrics to the
host); the step time is the median interval between fetches. Batches are random tokens
with the model's feature names (speed does not depend on the values), placed on the
devices once. Per row: tokens/s (every input and target position of a row), step ms,
MFU in both FLOPs conventions against the same dtype's measured peak (per device: the
host's rate ÷ the device count), XLA's cost-analysis FLOPs of the unrolled step ÷ ours
(docs/FORMULAS.md) and the process's peak resident memory while the row ran.
The table is printed and written with every number to bench/results/speed-<time>.json
(and bench/results/latest.json).

A 2-core machine shared with other work moves absolute numbers by tens of percent from
run to run: compare rows of one run, or ratios, not rows of different runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
sys.path.insert(0, REPO)  # t5x_like, for a bench script run from any directory


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # the table's model column
    gin: str  # model gin file (search path: gin_configs/ and the repo root)
    lengths: dict
    batch: int
    devices: int
    dtypes: tuple = ("float32", "bfloat16")

    @property
    def key(self) -> str:
        return f"{self.name}@{self.devices}"


# MaxText's CPU reference model (bench/reference_llama.gin), its encoder-decoder twin,
# and the three demo models at their demo lengths and batches.
CASES = (
    Case("reference", "bench/reference_llama.gin", {"targets": 256}, 8, 1),
    Case("reference", "bench/reference_llama.gin", {"targets": 256}, 8, 8),
    Case("reference_encdec", "bench/reference_encdec.gin", {"inputs": 256, "targets": 256},
         8, 1),
    Case("tiny_encdec", "models/tiny_encdec.gin", {"inputs": 128, "targets": 128}, 16, 8,
         ("float32",)),
    Case("tiny_palm", "models/tiny_palm.gin", {"inputs": 128, "targets": 128}, 16, 8,
         ("float32",)),
    Case("tiny_llama", "models/tiny_llama.gin", {"targets": 256}, 16, 8, ("float32",)),
)


def random_batch(model, batch_size: int, lengths: dict, seed: int = 0) -> dict:
    """A packed-looking batch of the model's features: random tokens, one segment per
    row, positions 0..L-1, every target weighted (the prefix of a prefix LM bidirectional)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    batch = model.get_initial_batch(batch_size, lengths)
    for name, array in batch.items():
        length = array.shape[1]
        if name.endswith("_tokens"):
            batch[name] = rng.integers(6, 8000, array.shape, dtype=np.int32)
        elif name.endswith("_positions"):
            batch[name] = np.tile(np.arange(length, dtype=np.int32), (batch_size, 1))
        elif name == "decoder_causal_attention":
            batch[name] = (np.arange(length) <= lengths.get("inputs", 0)).astype(
                np.int32)[None].repeat(batch_size, 0)
        else:  # segment ids, loss weights
            batch[name] = np.ones(array.shape, np.int32)
    return batch


class PeakRss:
    """The process's peak resident set size between `reset()` and `peak`, sampled every
    10 ms from /proc/self/statm (ru_maxrss never comes down between rows)."""

    def __init__(self):
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.wait(0.01):
            self._max = max(self._max, self._rss())

    def reset(self):
        self._max = self._rss()

    @property
    def peak(self) -> int:
        return max(self._max, self._rss())


def load_model(gin_file: str, dtype: str):
    import gin

    from t5x_like import launch

    gin.clear_config()
    launch.parse_gin([gin_file], [f"layers.TransformerConfig.dtype = '{dtype}'"])
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    gin.clear_config()
    return model


def make_step(model, devices: int, batch_size: int, lengths: dict):
    """(step_fn, state, batch, mesh) of `model` on the first `devices` CPU devices
    (fsdp over all of them), as train.py builds them."""
    import jax

    from t5x_like.model import partitioning
    from t5x_like.training import loader, optimizers, train_state

    mesh = partitioning.make_mesh({"data": 1, "fsdp": devices, "tensor": 1},
                                  jax.devices()[:devices])
    rules = partitioning.get_rules("fsdp")
    optimizer = optimizers.adamw_llama2(peak_lr=1e-3, warmup_steps=10, total_steps=1000)
    graphdef, state, _ = train_state.init_or_restore(model, optimizer.tx, mesh, rules, seed=0)
    step_fn = train_state.make_train_step(
        graphdef, model.loss_fn, optimizer.schedule,
        state_sharding=train_state.state_shardings(state),
        batch_sharding=partitioning.batch_sharding(mesh), rules=rules)
    batch = loader.to_global_batch(random_batch(model, batch_size, lengths), mesh,
                                   partitioning.process_rows(mesh, batch_size))
    return step_fn, state, batch, mesh, optimizer


def time_steps(step_fn, state, batch, mesh, steps: int, warmup: int = 3):
    """(compile+first step s, step intervals s, the new state, page faults per timed
    step): each iteration dispatches a step and fetches the previous one's metrics
    (train's loop does the same). The state given is donated: use the one returned.
    Faults are the process's minor faults (docs/PERFORMANCE.md, huge pages)."""
    import resource

    import jax

    key = jax.random.key(0)
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch, key)
        jax.device_get(metrics)
        compile_s = time.perf_counter() - start
        for _ in range(warmup):
            state, metrics = step_fn(state, batch, key)
        jax.device_get(metrics)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        stamps = [time.perf_counter()]
        for _ in range(steps):
            state, new_metrics = step_fn(state, batch, key)
            jax.device_get(metrics)
            metrics = new_metrics
            stamps.append(time.perf_counter())
        jax.device_get(metrics)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return (compile_s, [b - a for a, b in zip(stamps, stamps[1:])], state,
            faults // max(steps, 1))


def run_row(case: Case, dtype: str, steps: int, peaks: dict, rss: PeakRss,
            xla_ratio: dict) -> dict:
    from t5x_like.model import flops
    from t5x_like.planning import planner

    model = load_model(case.gin, dtype)
    rss.reset()
    step_fn, state, batch, mesh, optimizer = make_step(model, case.devices, case.batch,
                                                       case.lengths)
    compile_s, intervals, state, faults = time_steps(step_fn, state, batch, mesh, steps)
    del state, batch
    step_s = statistics.median(intervals)
    ours = model.train_flops_per_step(case.batch, case.lengths)
    _, mfu = flops.mfu(ours, step_s, case.devices, peaks[dtype] / case.devices)
    if case.name not in xla_ratio:  # dtype-independent: once per model, on one device
        xla = planner.xla_train_flops(model, optimizer, case.batch, case.lengths)
        xla_ratio[case.name] = {"palm": xla / ours.palm, "maxtext": xla / ours.maxtext}
    tokens = case.batch * model.tokens_per_example(case.lengths)
    return {"model": case.name, "devices": case.devices, "dtype": dtype,
            "batch": case.batch, "lengths": case.lengths, "tokens_per_step": tokens,
            "tokens_per_s": tokens / step_s, "step_ms": step_s * 1e3,
            "step_ms_all": [t * 1e3 for t in intervals], "compile_s": compile_s,
            "mfu_palm": mfu.palm, "mfu_maxtext": mfu.maxtext,
            "flops_palm": ours.palm, "flops_maxtext": ours.maxtext,
            "xla_over_palm": xla_ratio[case.name]["palm"],
            "xla_over_maxtext": xla_ratio[case.name]["maxtext"],
            "peak_rss_bytes": rss.peak, "faults_per_step": faults}


def worker(devices: int, keys: list[str], dtypes: list[str], steps: int) -> dict:
    """One process's rows: the peaks first, then each case and dtype asked for."""
    import jax

    from t5x_like.model import flops

    rss = PeakRss()
    peaks = {dt: flops.measure_matmul_flops(jax.devices()[0], dt, n=1024, repeats=20)
             for dt in ("float32", "bfloat16")}
    rows, xla_ratio = [], {}
    for case in CASES:
        if case.devices != devices or case.key not in keys:
            continue
        for dtype in case.dtypes:
            if dtype in dtypes:
                rows.append(run_row(case, dtype, steps, peaks, rss, xla_ratio))
                print(format_row(rows[-1]), file=sys.stderr, flush=True)
    return {"devices": devices, "peak_flops": peaks, "rows": rows}


def spawn(devices: int, keys: list[str], dtypes: list[str], steps: int) -> dict:
    """One worker process per device count, started as `python -m t5x_like.train` starts
    (XLA's buffers in huge pages: t5x_like/process.py)."""
    from t5x_like import with_huge_pages

    env = dict(with_huge_pages(os.environ), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                          + f" --xla_force_host_platform_device_count={devices}").strip(),
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", str(devices),
         "--keys", ",".join(keys), "--dtypes", ",".join(dtypes), "--steps", str(steps)],
        env=env, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


HEADER = (f"{'model':<17}{'dev':>4} {'dtype':<9}{'tokens/s':>10}{'step ms':>9}"
          f"{'MFU palm':>10}{'MFU mt':>8}{'XLA/palm':>10}{'XLA/mt':>8}{'peak RSS':>10}")


def format_row(r: dict) -> str:
    return (f"{r['model']:<17}{r['devices']:>4} {r['dtype']:<9}{r['tokens_per_s']:>10,.0f}"
            f"{r['step_ms']:>9.1f}{r['mfu_palm']:>10.1%}{r['mfu_maxtext']:>8.1%}"
            f"{r['xla_over_palm']:>10.3f}{r['xla_over_maxtext']:>8.3f}"
            f"{r['peak_rss_bytes'] / 2**30:>8.2f}GB")


def format_table(results: list[dict]) -> str:
    lines = [HEADER]
    for result in results:
        peaks = result["peak_flops"]
        lines.append(f"-- {result['devices']} device(s): matmul peak float32 "
                     f"{peaks['float32'] / 1e9:.1f}, bfloat16 {peaks['bfloat16'] / 1e9:.1f} "
                     "GFLOP/s (host, measured in this process)")
        lines += [format_row(r) for r in result["rows"]]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--devices", default="1,8", help="device counts to run")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/)")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--keys", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 10:
        parser.error(f"--steps={args.steps}: the median needs at least 10 steady steps")
    dtypes = args.dtypes.split(",")
    if args.worker:
        print(json.dumps(worker(args.worker, args.keys.split(","), dtypes, args.steps)))
        return []
    names = [p for p in args.only.split(",") if p]
    unknown = set(names) - {c.name for c in CASES}
    if unknown:
        parser.error(f"--only: no model {sorted(unknown)}; the models: "
                     f"{sorted({c.name for c in CASES})}")
    wanted = [int(d) for d in args.devices.split(",")]
    cases = [c for c in CASES if c.devices in wanted and (not names or c.name in names)]
    results = [spawn(d, [c.key for c in cases if c.devices == d], dtypes, args.steps)
               for d in sorted({c.devices for c in cases})]
    print(format_table(results))
    write_results(results, args.out, " ".join(sys.argv[1:]))
    return results


def write_results(results: list[dict], out: str | None, args: str) -> str:
    """The table as `out`, or as bench/results/speed-<time>.json and latest.json."""
    record = {"command": f"bench/speed.py {args}".strip(), "results": results}
    path = save_json("speed", record, out)
    if out is None:
        save_json("speed", record, os.path.join(RESULTS, "latest.json"))
    return path


def save_json(kind: str, record: dict, out: str | None = None) -> str:
    """`record` stamped with the UTC time ("time_utc"), written to `out` or to
    bench/results/<kind>-<time>.json; prints and returns the path. Every bench script
    writes its results this way."""
    os.makedirs(RESULTS, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = out or os.path.join(RESULTS, f"{kind}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"time_utc": stamp, **record}, f, indent=1)
    print(f"written: {os.path.relpath(path, REPO)}")
    return path


if __name__ == "__main__":
    main()
