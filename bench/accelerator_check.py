"""The accelerator check (issue 26): on one GPU or TPU, in one command, under 10 minutes.

    bash bench/accelerator_check.sh                  # on the device machine
    .venv/bin/python bench/accelerator_check.py --cpu-smoke   # here: tiny, < 60 s

Three sections, each under a time guard of its own (a watchdog that writes what is done
and exits 124 when a section overruns; units that would start after the budget are
skipped and said so):

1. kernels: the kernel-equality tests of tests/test_attention.py for the backend's kernel
   ('auto': cuDNN on GPU, splash on TPU; on CPU splash in Pallas interpret mode), run by
   `run_kernel_tests`, a plain function that imports the test module and calls its test
   functions over their parametrize marks. The device machines have no pytest: a
   stand-in module with the few names the tests use at import time (mark, param,
   fixture, raises) is installed when pytest is missing, so the tests are the very ones CI
   runs, not a copy.
2. train: a tiny Llama-shaped model trained a few steps with the production model and
   train step (families.DecoderOnlyModel; training/train_state.py: init_or_restore,
   make_train_step) on one fixed synthetic batch of packed rows (two documents a row,
   segment ids as SeqIO packs them), attention 'auto'; the loss must fall and stay finite.
3. bench: tokens/s and MFU (model/flops.py, both conventions, against the device's
   datasheet peak from model/hardware.py) of a ~1.2B-parameter Llama (Llama 3.2 1B's
   shape) at 2,048 and 8,192 tokens for 'xla' and the backend's kernel ('cudnn' on GPU,
   'splash' on TPU) on synthetic rows of one unpadded example each, and for the kernel
   on packed rows too (documents of 1,024 tokens: the production model, whose mask
   carries segment ids), the same tokens for every implementation.

Results: a JSON file (--out, default bench/results/accelerator_check-<time>.json, written
after every unit, so a cut-off run keeps what it finished) and a printed table.

Imports only jax, flax, optax, numpy and this package's model and training modules: no
TensorFlow, SeqIO, grain or gin (the lent GPU machines have none of them;
tests/test_accelerator_check.py checks the import). Written against jax 0.12.1 with only
APIs that jax 0.11 has. No GPU or TPU was available where this was written: only
--cpu-smoke has run (tests/test_accelerator_check.py); the cuDNN and splash paths follow
model/attention.py, which was written from the kernels' docstrings.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import itertools
import json
import logging
import os
import platform
import sys
import threading
import time
import traceback
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
sys.path.insert(0, REPO)  # t5x_like, for a bench script run from any directory

# Llama 3.2 1B's shape (Hugging Face meta-llama/Llama-3.2-1B config.json): 16 layers,
# d 2048, 32 query heads x 64, 8 kv heads, SwiGLU 8192, tied unscaled embedding 128,256,
# RoPE theta 500,000 (without its rope scaling, which does not change the speed).
LLAMA_1B = dict(vocab_size=128256, emb_dim=2048, num_heads=32, num_kv_heads=8, head_dim=64,
                mlp_dim=8192, num_decoder_layers=16, block="sequential", norm_eps=1e-5,
                rope_theta=500000.0, tie_embeddings=True, scale_tied_logits=False,
                z_loss=0.0, dtype="bfloat16", scan_layers=True)
# The smoke run's stand-in: the same family at a size that compiles in seconds on CPU.
SMOKE_LLAMA = dict(LLAMA_1B, vocab_size=512, emb_dim=64, num_heads=4, num_kv_heads=2,
                   head_dim=16, mlp_dim=128, num_decoder_layers=2, dtype="float32")
TINY = dict(vocab_size=256, emb_dim=128, num_heads=4, num_kv_heads=2, head_dim=32,
            mlp_dim=256, num_decoder_layers=2, block="sequential", z_loss=1e-4,
            scan_layers=True)


@dataclasses.dataclass
class Options:
    smoke: bool
    out: str
    kernel_budget_s: float
    train_budget_s: float
    bench_budget_s: float
    lengths: tuple[int, ...]
    tokens_per_step: int
    steps: int
    remat: str
    implementations: tuple[str, ...] | None
    max_kernel_cases: int | None
    slow_kernel_tests: bool


def parse(argv) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model, short lengths, one kernel case: proves the script on CPU")
    p.add_argument("--out", default=None, help="the JSON file (default bench/results/...)")
    p.add_argument("--kernel-budget", type=float, default=None, help="seconds (default 150)")
    p.add_argument("--train-budget", type=float, default=None, help="seconds (default 60)")
    p.add_argument("--bench-budget", type=float, default=None, help="seconds (default 330)")
    p.add_argument("--lengths", default=None, help="comma-separated (default 2048,8192)")
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="rows per step = this / length (default 8192)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5)")
    p.add_argument("--remat", default="full", help="the 1B model's remat_policy")
    p.add_argument("--implementations", default=None,
                   help="comma-separated attention_impl values (default: all the backend has)")
    p.add_argument("--max-kernel-cases", type=int, default=None)
    p.add_argument("--slow-kernel-tests", action=argparse.BooleanOptionalAction, default=None,
                   help="include tests marked slow (default: on an accelerator)")
    a = p.parse_args(argv)
    smoke = a.cpu_smoke
    pick = lambda value, device, cpu: value if value is not None else (cpu if smoke else device)
    return Options(
        smoke=smoke,
        out=a.out or os.path.join(RESULTS, f"accelerator_check-{time.strftime('%Y%m%d-%H%M%S')}"
                                  f"{'-cpu-smoke' if smoke else ''}.json"),
        kernel_budget_s=pick(a.kernel_budget, 150.0, 30.0),
        train_budget_s=pick(a.train_budget, 60.0, 40.0),
        bench_budget_s=pick(a.bench_budget, 330.0, 60.0),
        lengths=tuple(int(x) for x in pick(a.lengths, "2048,8192", "128").split(",")),
        tokens_per_step=pick(a.tokens_per_step, 8192, 512),
        steps=pick(a.steps, 5, 2),
        remat=a.remat,
        implementations=tuple(a.implementations.split(",")) if a.implementations else None,
        max_kernel_cases=pick(a.max_kernel_cases, None, 1),
        slow_kernel_tests=a.slow_kernel_tests,
    )


# ----------------------------------------------------------------------------------------
# Results and the time guard
# ----------------------------------------------------------------------------------------


class Report:
    """The results dict, written to `path` after every change (a cut-off run keeps them)."""

    def __init__(self, path: str, header: dict):
        self.path = path
        self.data = dict(header, sections={})
        self._lock = threading.Lock()
        self.write()

    def section(self, name: str) -> dict:
        return self.data["sections"].setdefault(name, {"status": "running", "units": []})

    def write(self) -> None:
        with self._lock:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1, default=str)
            os.replace(tmp, self.path)


class Guard:
    """A section's budget: `left()` for the units to check, and a watchdog that, when the
    section overruns by `grace_s` (a compile that hangs), records it, prints the table
    and ends the process with 124 (timeout's code)."""

    def __init__(self, report: Report, name: str, budget_s: float, grace_s: float = 45.0):
        self.report, self.name, self.budget_s = report, name, budget_s
        self.start = time.monotonic()
        self._timer = threading.Timer(budget_s + grace_s, self._expire)
        self._timer.daemon = True

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def _expire(self) -> None:
        section = self.report.section(self.name)
        section["status"] = f"timed out: over its {self.budget_s:.0f} s budget"
        self.report.write()
        print_table(self.report.data)
        print(f"accelerator_check: section {self.name!r} overran its budget; results so "
              f"far in {self.report.path}", flush=True)
        os._exit(124)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        section = self.report.section(self.name)
        section["seconds"] = round(time.monotonic() - self.start, 1)
        if section["status"] == "running":
            failed = [u for u in section["units"] if u.get("status") == "failed"]
            section["status"] = "failed" if failed else "passed"
        self.report.write()
        return False


# ----------------------------------------------------------------------------------------
# 1. Kernel-equality tests, without pytest where there is none
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Mark:
    """pytest's MarkDecorator as far as the tests use it: `@pytest.mark.slow`,
    `@pytest.mark.parametrize(...)`, `pytest.param(..., marks=pytest.mark.slow)`; applied
    marks are kept in `fn.pytestmark`, nearest the function first, as pytest keeps them."""

    name: str
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            args[0].pytestmark = [*getattr(args[0], "pytestmark", []), self]
            return args[0]
        return _Mark(self.name, args, kwargs)


class _MarkFactory:
    def __getattr__(self, name):
        return _Mark(name)


def _pytest_stand_in() -> types.ModuleType:
    """The names tests/test_attention.py and tests/tiny.py use at import time."""
    module = types.ModuleType("pytest")
    module.mark = _MarkFactory()
    module.param = lambda *values, marks=(), id=None: types.SimpleNamespace(  # noqa: A002
        values=values, marks=marks if isinstance(marks, (tuple, list)) else (marks,), id=id)
    module.fixture = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda fn: fn))

    @contextlib.contextmanager
    def raises(exc, match=None):
        import re
        try:
            yield
        except exc as e:
            if match is not None and not re.search(match, str(e)):
                raise AssertionError(f"{e!r} does not match {match!r}") from e
        else:
            raise AssertionError(f"did not raise {exc}")

    module.raises = raises
    module.__accelerator_check_stand_in__ = True
    return module


def _cases(fn):
    """[(id, kwargs, mark names)] over the product of fn's parametrize marks."""
    axes = []
    # pytestmark lists the decorator nearest the function first; pytest loops over it
    # outermost and names it first in a case's id ("causal-8-2"), and so does this.
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = [n.strip() for n in mark.args[0].split(",")] if isinstance(
            mark.args[0], str) else list(mark.args[0])
        ids = mark.kwargs.get("ids")
        options = []
        for i, value in enumerate(mark.args[1]):
            marks = tuple(getattr(m, "name", "") for m in getattr(value, "marks", ()))
            values = value.values if hasattr(value, "values") and hasattr(value, "marks") \
                else (value if len(names) > 1 else (value,))
            label = ids[i] if ids else "-".join(str(v) for v in values)
            options.append((label, dict(zip(names, values)), marks))
        axes.append(options)
    for combo in itertools.product(*axes):
        kwargs = {k: v for _, kw, _ in combo for k, v in kw.items()}
        yield "-".join(label for label, _, _ in combo), kwargs, {m for *_, ms in combo for m in ms}


def _skip_reason(fn, kwargs, marks, options, devices: int) -> str | None:
    names = {m.name for m in getattr(fn, "pytestmark", [])} | marks
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "skipif" and mark.args and mark.args[0]:
            return mark.kwargs.get("reason", "skipif")
    if "slow" in names and not options.slow_kernel_tests:
        return "marked slow (--slow-kernel-tests to run it)"
    missing = [p for p in inspect.signature(fn).parameters if p not in kwargs]
    if missing:
        return f"needs pytest fixtures {missing}"
    if "make_mesh" in inspect.getsource(fn) and devices < 8:
        return f"needs an 8-device mesh, {devices} device(s) here"
    return None


def kernel_under_test(backend: str) -> str:
    """The kernel whose equality tests run: the backend's 'auto' kernel; on CPU, splash in
    Pallas interpret mode (what CI proves)."""
    from t5x_like.model import attention
    return "splash" if backend == "cpu" else attention.resolve("auto", backend)


def run_kernel_tests(options: Options, guard: Guard | None = None):
    """Runs tests/test_attention.py's `test_*<kernel>*equals_xla*` tests for this backend's
    kernel (every parametrization the marks give, the slow ones when asked) as tiny.py's
    autouse fixture would (rank promotion raising); yields one dict per case."""
    import jax
    tests_dir = os.path.join(REPO, "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    try:
        import pytest  # noqa: F401
    except ImportError:
        sys.modules["pytest"] = _pytest_stand_in()
    import test_attention
    kernel = kernel_under_test(jax.default_backend())
    devices = jax.device_count()
    results = []
    for name, fn in sorted(vars(test_attention).items()):
        if not (name.startswith("test_") and kernel in name and "equals_xla" in name):
            continue
        for case, kwargs, marks in _cases(fn):
            unit = {"test": f"{name}[{case}]" if case else name}
            results.append(unit)
            if options.max_kernel_cases is not None and sum(
                    u.get("status") != "skipped" for u in results) > options.max_kernel_cases:
                unit.update(status="skipped", why="--max-kernel-cases")
            elif guard is not None and guard.left() <= 0:
                unit.update(status="skipped", why="section budget spent")
            elif reason := _skip_reason(fn, kwargs, marks, options, devices):
                unit.update(status="skipped", why=reason)
            else:
                unit.update(_call(fn, kwargs))
            yield unit


def _call(fn, kwargs) -> dict:
    import jax
    start = time.monotonic()
    try:
        with jax.numpy_rank_promotion("raise"):
            fn(**kwargs)
        status, why = "passed", None
    except Exception as e:  # a failing case is reported, the others still run
        status = "failed"
        why = "".join(traceback.format_exception_only(type(e), e)).strip()[-2000:]
    out = {"status": status, "seconds": round(time.monotonic() - start, 2)}
    if why:
        out["why"] = why
    return out


# ----------------------------------------------------------------------------------------
# 2 and 3. The production train step on synthetic rows
# ----------------------------------------------------------------------------------------


class _Fallbacks(logging.Handler):
    """Collects model/attention.py's "runs 'xla' instead of ..." lines while a unit runs
    (attention logs each reason once per process, so its memory is cleared first)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        from t5x_like.model import attention
        attention._logged.clear()
        logging.getLogger(attention.__name__).addHandler(self)
        return self

    def __exit__(self, *exc):
        from t5x_like.model import attention
        logging.getLogger(attention.__name__).removeHandler(self)
        return False


def unpadded_rows_model(cfg):
    """A decoder-only model whose rows are each one whole example (no padding, no
    packing), as the synthetic batches are: the network is called without segment ids,
    so the mask is `Mask.causal_lm(..., packed=False)`, the one cuDNN can run.
    (families.DecoderOnlyModel.logits always passes the ids it reads off the targets,
    which makes every training mask 'packed': under it cuDNN never runs.)"""
    from t5x_like.model import families

    class UnpaddedRows(families.DecoderOnlyModel):
        def logits(self, module, batch, rng=None, hidden: bool = False):
            return module(batch["decoder_input_tokens"], rng=rng, hidden=hidden)

    return UnpaddedRows(cfg)


def synthetic_batch(rows: int, length: int, vocab: int, seed: int = 0,
                    documents: int = 1) -> dict:
    """Random non-zero tokens (speed does not depend on the values), the targets the
    inputs shifted by one, every position weighted; with `documents` > 1, each row packs
    that many equal documents (segment ids 1.., positions from 0 in each, as SeqIO's
    packing writes them)."""
    import numpy as np
    tokens = np.random.default_rng(seed).integers(1, vocab, size=(rows, length + 1),
                                                  dtype=np.int32)
    batch = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
             "decoder_loss_weights": np.ones((rows, length), np.int32)}
    if documents > 1:
        slot = np.arange(length)
        size = -(-length // documents)
        batch["decoder_segment_ids"] = np.broadcast_to(1 + slot // size, (rows, length)).astype(
            np.int32)
        batch["decoder_positions"] = np.broadcast_to(slot % size, (rows, length)).astype(
            np.int32)
    return batch


def _compiled_step(model, total_steps: int, lr: float):
    """(state, train_step, mesh, batch sharding) of `model` on all local devices (fsdp),
    built as training builds them (init_or_restore, make_train_step, AdamW)."""
    import jax
    from t5x_like.model import partitioning
    from t5x_like.training import optimizers, train_state
    mesh = partitioning.make_mesh({"fsdp": jax.device_count()})
    rules = partitioning.get_rules("fsdp")
    opt = optimizers.adamw_llama2(lr, warmup_steps=1, total_steps=total_steps)
    graphdef, state, _ = train_state.init_or_restore(model, opt.tx, mesh, rules, seed=0)
    step = train_state.make_train_step(
        graphdef, model.loss_fn, opt.schedule, state_sharding=train_state.state_shardings(state),
        batch_sharding=partitioning.batch_sharding(mesh), rules=rules)
    return state, step, mesh, partitioning.batch_sharding(mesh)


def train_tiny(options: Options) -> dict:
    """Trains TINY ('auto' attention; bfloat16 on an accelerator) 12 steps on one fixed
    batch of 8 packed rows x 128 (two documents each): the loss must stay finite and fall
    by a tenth."""
    import jax
    import numpy as np
    from t5x_like.model import attention, families
    from t5x_like.model.layers import TransformerConfig
    on_cpu = jax.default_backend() == "cpu"
    cfg = TransformerConfig(**TINY, dtype="float32" if on_cpu else "bfloat16",
                            attention_impl="auto")
    steps, start = 12, time.monotonic()
    with _Fallbacks() as fallbacks:
        state, step, mesh, sharding = _compiled_step(families.DecoderOnlyModel(cfg), steps,
                                                     3e-3)
        batch = jax.device_put(synthetic_batch(8, 128, cfg.vocab_size, documents=2), sharding)
        losses = []
        with jax.set_mesh(mesh):
            for _ in range(steps):
                state, metrics = step(state, batch, jax.random.key(0))
                losses.append(float(metrics["loss"]))
    finite = bool(np.all(np.isfinite(losses)))
    fell = finite and losses[-1] < 0.9 * losses[0]
    return {"test": "tiny model, 12 steps on one batch of packed rows", "status": "passed" if fell else "failed",
            "attention": attention.resolve("auto"), "fallbacks": fallbacks.lines,
            "losses": [round(x, 4) for x in losses], "seconds": round(time.monotonic() - start, 1),
            **({} if fell else {"why": "the loss did not fall by a tenth or was not finite"})}


def bench_implementations(backend: str) -> tuple[str, ...]:
    """'xla' and the backend's kernel (splash on CPU: Pallas interpret mode)."""
    return ("xla", kernel_under_test(backend))


DOCUMENT = 1024  # the packed rows' documents, tokens


def bench_units(impls: tuple[str, ...], lengths: tuple[int, ...], kernel: str):
    """(attention, length, documents per row): every implementation on unpadded rows,
    and the kernel on rows packing documents of DOCUMENT tokens (at least two)."""
    for length in lengths:
        for impl in impls:
            yield impl, length, 1
            if impl == kernel:
                yield impl, length, max(2, length // DOCUMENT)


_PEAKS: dict[str, float] = {}


def bench_row(cfg_fields: dict, impl: str, length: int, options: Options,
              documents: int = 1) -> dict:
    """tokens/s and MFU of one (implementation, length, documents per row): the first
    step (compile included), one warm-up step, then `options.steps` steps timed end to
    end. Packed rows (documents > 1) run the production model, whose mask carries the
    segment ids; unpadded rows a model called without them."""
    import jax
    from t5x_like.model import families, flops
    from t5x_like.model.layers import TransformerConfig
    cfg = TransformerConfig(**cfg_fields, attention_impl=impl, remat_policy=options.remat)
    rows = max(1, options.tokens_per_step // length) * jax.device_count()
    row = {"attention": impl, "length": length, "documents": documents, "rows": rows,
           "remat": options.remat}
    model = families.DecoderOnlyModel(cfg) if documents > 1 else unpadded_rows_model(cfg)
    row["params"] = model.num_params
    with _Fallbacks() as fallbacks:
        state, step, mesh, sharding = _compiled_step(model, 1000, 1e-4)
        batch = jax.device_put(synthetic_batch(rows, length, cfg.vocab_size,
                                               documents=documents), sharding)
        key = jax.random.key(0)
        with jax.set_mesh(mesh):
            start = time.perf_counter()
            state, metrics = step(state, batch, key)
            jax.block_until_ready(metrics)
            row["first_step_s"] = round(time.perf_counter() - start, 2)
            state, metrics = step(state, batch, key)
            jax.block_until_ready((state, metrics))
            start = time.perf_counter()
            for _ in range(options.steps):
                state, metrics = step(state, batch, key)
            jax.block_until_ready((state, metrics))
            seconds = (time.perf_counter() - start) / options.steps
    row["fallbacks"] = fallbacks.lines
    row["loss"] = round(float(metrics["loss"]), 4)
    per_step = flops.decoder_only_flops_per_token(cfg, length) * (rows * length)
    if cfg.dtype not in _PEAKS:  # once per run (on CPU it is measured, and noisy)
        _PEAKS[cfg.dtype] = flops.peak_flops_per_device(jax.devices()[0], dtype=cfg.dtype)
    peak = _PEAKS[cfg.dtype]
    tflops, mfu = flops.mfu(per_step, seconds, jax.device_count(), peak)
    row.update(step_ms=round(1e3 * seconds, 2), tokens_per_s=round(rows * length / seconds, 1),
               tflops_per_device_palm=round(tflops.palm, 3), mfu_palm=round(mfu.palm, 4),
               mfu_maxtext=round(mfu.maxtext, 4), peak_flops_per_device=peak,
               status="passed" if not fallbacks.lines else "fell back")
    del state, metrics, batch
    gc.collect()
    return row


def run_bench(options: Options, guard: Guard):
    import jax
    impls = options.implementations or bench_implementations(jax.default_backend())
    fields = SMOKE_LLAMA if options.smoke else LLAMA_1B
    kernel = kernel_under_test(jax.default_backend())
    last_s = 0.0  # a row starts only when the budget leaves the time the last one took
    for impl, length, documents in bench_units(impls, options.lengths, kernel):
        unit = {"attention": impl, "length": length, "documents": documents}
        if guard.left() <= last_s:
            yield {**unit, "status": "skipped",
                   "why": f"section budget spent ({guard.left():.0f} s left, the last "
                          f"row took {last_s:.0f} s)"}
            continue
        start = time.monotonic()
        try:
            row = bench_row(fields, impl, length, options, documents)
            last_s = time.monotonic() - start
            yield row
        except Exception as e:  # e.g. out of memory: recorded, the next row runs
            gc.collect()
            yield {**unit, "status": "failed",
                   "why": "".join(traceback.format_exception_only(type(e), e))[-1500:]}


# ----------------------------------------------------------------------------------------
# The table and the command
# ----------------------------------------------------------------------------------------


def print_table(data: dict) -> None:
    print(f"\naccelerator check on {data.get('device')} ({data.get('backend')}), jax "
          f"{data.get('jax')}")
    for name, section in data["sections"].items():
        units = section["units"]
        counts = {s: sum(u.get("status") == s for u in units) for s in
                  ("passed", "failed", "skipped", "fell back")}
        print(f"[{name}] {section['status']} in {section.get('seconds', '?')} s: "
              + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
        for u in units:
            if u.get("status") == "failed":
                print(f"  FAILED {u.get('test') or (u.get('attention'), u.get('length'))}: "
                      f"{u.get('why', '')[:300]}")
    rows = data["sections"].get("bench", {}).get("units", [])
    if rows:
        print(f"\n{'attention':>9} {'length':>6} {'docs':>4} {'rows':>4} {'step ms':>9} "
              f"{'tokens/s':>10} "
              f"{'MFU palm':>8} {'MFU maxtext':>11} {'1st step s':>10}  status")
        for r in rows:
            num = lambda k, fmt: format(r[k], fmt) if k in r else "-"  # noqa: E731
            print(f"{r['attention']:>9} {r['length']:>6} {num('documents', 'd'):>4} "
                  f"{num('rows', 'd'):>4} "
                  f"{num('step_ms', '.1f'):>9} {num('tokens_per_s', ',.0f'):>10} "
                  f"{num('mfu_palm', '.1%'):>8} {num('mfu_maxtext', '.1%'):>11} "
                  f"{num('first_step_s', '.1f'):>10}  {r['status']}")
    print(f"\nresults: {data.get('path')}", flush=True)


def _header(options: Options) -> dict:
    import flax
    import jax
    import optax
    device = jax.devices()[0]
    return {"device": device.device_kind, "backend": jax.default_backend(),
            "device_count": jax.device_count(), "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__,
            "python": platform.python_version(), "smoke": options.smoke,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "options": dataclasses.asdict(options), "path": options.out}


def _section(report: Report, name: str, budget_s: float, units) -> None:
    with Guard(report, name, budget_s) as guard:
        section = report.section(name)
        for unit in units(guard):
            section["units"].append(unit)
            report.write()
            print(f"[{name}] {json.dumps(unit, default=str)[:400]}", flush=True)


def main(argv=None) -> int:
    options = parse(sys.argv[1:] if argv is None else argv)
    if options.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = Report(options.out, _header(options))
    if options.slow_kernel_tests is None:
        options.slow_kernel_tests = report.data["backend"] != "cpu"
    _section(report, "kernels", options.kernel_budget_s,
             lambda guard: run_kernel_tests(options, guard))
    _section(report, "train", options.train_budget_s, lambda guard: iter([train_tiny(options)]))
    _section(report, "bench", options.bench_budget_s, lambda guard: run_bench(options, guard))
    print_table(report.data)
    sections = report.data["sections"]
    ran = [u for u in sections["kernels"]["units"] if u["status"] != "skipped"]
    ok = (sections["kernels"]["status"] == "passed" and ran
          and sections["train"]["status"] == "passed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
