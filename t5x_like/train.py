"""The training entry point: `python -m t5x_like.train --gin_file=... --gin.NAME=VALUE`.

One function, `train(...)`, joins the parts in the order data flows:

  gin → tasks (SeqIO registry) → prepare (ArrayRecord store) → loader (grain)
      → sharded train state (partitioning) → jitted train step (trainer)
      → orbax checkpoints (checkpoints) and clu metrics with MFU (metrics, flops)
      → per-domain evaluation with bits per character (eval)

Gin binds `train` and the small frozen dataclasses below (gin_configs/runs/*.gin); the
library modules it calls never import gin. The macros T5X users know
(`MIXTURE_OR_TASK_NAME`, `TASK_FEATURE_LENGTHS`, `TRAIN_STEPS`, `BATCH_SIZE`,
`MODEL_DIR`) are defined in gin_configs/runs/pretrain.gin; a model file binds `MODEL`
and a mesh file binds `MESH_CONFIG`.

Resume: started again with the same model dir, training continues from the newest
checkpoint, with the data iterator where it was, and gives bitwise the same parameters
and losses as a run that never stopped (tests/test_train.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gin

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GIN_SEARCH_PATHS = (os.path.join(_REPO_ROOT, "gin_configs"), _REPO_ROOT)

log = logging.getLogger("t5x_like.train")


# ---------------------------------------------------------------------------
# Configuration groups (bound by gin, plain frozen dataclasses)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to train on and how it is prepared and read.

    mixture_or_task_name: a registered SeqIO Mixture or Task (tasks/ or a user module
      brought in by an `import` line in the gin file).
    task_feature_lengths: e.g. {"inputs": 128, "targets": 128}; a decoder-only model
      with "inputs" trains as a prefix LM, without as a causal LM.
    batch_size: global batch (rows per step over all processes).
    seed: seed of data preparation (task sampling, denoising) and of the read order.
    num_examples: packed rows to prepare; default train_steps × batch_size (one epoch).
    store_dir: where the prepared ArrayRecord store lives; default MODEL_DIR/data.
    prepare_shards: ArrayRecord shards = SeqIO shards prepared in parallel (default:
      what an existing store has, else one per core; every shard pays each task's
      pipeline set-up once). Part of the store's identity: the shards hold other
      examples when their count changes.
    """

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    batch_size: int
    seed: int = 0
    num_examples: int | None = None
    store_dir: str | None = None
    prepare_shards: int | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing: every `save_every_steps`, keep the newest `keep`, async."""

    save_every_steps: int = 100
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Per-domain evaluation (loss, token accuracy, bits per character).

    Runs before the first step, every `every_steps` and after the last step, over the
    `{domain}_validation` tasks, in windows of `window` tokens moved by `stride`
    (SPEC section 4; the reference uses 1900/512, the demo less). `max_documents` and
    `max_tokens` cap each domain's stream at whole documents (None: all).
    `batch_size` windows per eval step.
    """

    every_steps: int = 100
    domains: Sequence[str] = ("code", "stem", "web", "math", "multilingual")
    window: int = 1900
    stride: int = 512
    max_documents: int | None = None
    max_tokens: int | None = None
    batch_size: int = 16
    enabled: bool = True


# ---------------------------------------------------------------------------
# Pieces of `train`, each a few lines, in data-flow order


def converter_for(model, task_feature_lengths: Mapping[str, int]) -> str:
    """The SeqIO feature converter a model trains with (T5X: the model decides)."""
    from t5x_like import models

    if isinstance(model, models.EncoderDecoderModel):
        return "encdec"
    return "prefix_lm" if "inputs" in task_feature_lengths else "lm"


def initialize_distributed(coordinator_address: str | None = None,
                           process_count: int | None = None,
                           process_index: int | None = None) -> None:
    """Joins a multi-process run: one process per host (GPU node), all running the same
    command. With no arguments, jax detects the cluster (SLURM, Open MPI, Cloud TPU);
    otherwise all three are needed, as in T5X's --coordinator_address flags. On CPU
    each process emulates mesh devices / process_count devices."""
    import jax

    explicit = (coordinator_address, process_count, process_index)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError(
            "Give all of --coordinator_address, --process_count and --process_index (or "
            "none of them, with --multiprocess, to let jax detect the cluster); got "
            f"{coordinator_address!r}, {process_count!r}, {process_index!r}.")
    jax.distributed.initialize(coordinator_address, process_count, process_index)


def _use_cpu_devices(n: int) -> None:
    """On a CPU-only host, emulate the `n` mesh devices over this run's processes (must
    run before jax's first computation)."""
    import jax
    from jax._src import distributed

    if "--xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    # Not jax.process_count(): that would start the backends before the update below.
    processes = distributed.global_state.num_processes or 1
    try:
        jax.config.update("jax_num_cpu_devices", max(1, n // processes))
    except RuntimeError:
        pass  # backends already up (e.g. called from a test): use what is there.


def check_device_count(mesh_config) -> None:
    """The mesh must use every device jax sees (train and eval check it first)."""
    import jax

    if mesh_config.num_devices != jax.device_count():
        raise ValueError(
            f"The mesh {mesh_config.global_shape} needs {mesh_config.num_devices} devices but "
            f"jax sees {jax.device_count()} ({jax.devices()[0].platform}). Pick a mesh gin file "
            "that matches (gin_configs/meshes/), or on CPU set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={mesh_config.num_devices} before starting.")


def _gin_imported_modules() -> list[str]:
    """Modules that gin files imported (user task modules), for prepare's workers."""
    names = []
    for statement in getattr(gin.config, "_IMPORTS", ()):
        name = getattr(statement, "module", None)
        if name and not name.startswith(("t5x_like", "__gin__")):
            names.append(name)
    return sorted(set(names))


def prepare_data(data: DataConfig, converter: str, train_steps: int, model_dir: str):
    """Prepares (or checks) the ArrayRecord store for this run; returns its directory.

    In a multi-process run process 0 prepares while the others wait; they then find
    the store complete and only check its manifest."""
    import jax

    from t5x_like import prepare

    store_dir = data.store_dir or os.path.join(model_dir, "data")
    num_examples = data.num_examples or train_steps * data.batch_size
    task_modules = tuple(dict.fromkeys(("tasks", *_gin_imported_modules())))
    # A store made on a machine with another core count is still this run's store.
    existing = prepare.read_manifest(store_dir)
    shards = data.prepare_shards or (existing or {}).get("num_shards") or os.cpu_count() or 1
    start = time.perf_counter()

    def run():
        try:
            return prepare.prepare(
                data.mixture_or_task_name, dict(data.task_feature_lengths), converter,
                num_examples, data.seed, store_dir, num_shards=shards, workers=shards,
                task_modules=task_modules)
        except prepare.ManifestMismatchError as e:
            raise prepare.ManifestMismatchError(
                f"{e} In a training run the store is train.DataConfig.store_dir (default "
                "MODEL_DIR/data), holds TRAIN_STEPS x BATCH_SIZE rows unless "
                "train.DataConfig.num_examples says otherwise, in "
                "train.DataConfig.prepare_shards shards: point store_dir elsewhere "
                "or use a new MODEL_DIR.") from None

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            run()
        multihost_utils.sync_global_devices("t5x_like.train: data prepared")
    manifest = run()
    log.info("data: %s (%d examples, %.1f%% padding) ready in %.1fs", store_dir,
             manifest["num_examples"], 100 * manifest["padding_fraction"],
             time.perf_counter() - start)
    return store_dir


def init_or_restore(model, tx, mesh, rules, seed: int, ckpt=None, data_iterator=None):
    """(graphdef, state, restored step or None) of model + optimizer.

    With a checkpoint in `ckpt`, the newest one is read straight into this mesh's
    shards (and `data_iterator` set to where it was); otherwise the state is
    initialised in its shards. Never both: a restored run holds one copy of the state.
    """
    from flax import nnx

    from t5x_like import partitioning, trainer

    def factory():
        return trainer.TrainState(model.make_module(nnx.Rngs(seed)), tx)

    step = ckpt.latest_step() if ckpt is not None else None
    if step is not None:
        graphdef, target = partitioning.abstract_sharded(factory, mesh, rules)
        restored = ckpt.restore(step, target, data_iterator=data_iterator)
        return graphdef, restored.state, step
    graphdef, state = nnx.split(partitioning.create_sharded(factory, mesh, rules))
    return graphdef, state, None


# ---------------------------------------------------------------------------
# The entry point


def train(
    *,
    model,
    mesh_config,
    data: DataConfig,
    optimizer,
    train_steps: int,
    model_dir: str,
    checkpoint: CheckpointConfig = CheckpointConfig(),
    evaluation: EvalConfig = EvalConfig(),
    log_every_steps: int = 10,
    num_microbatches: int = 1,
    seed: int = 0,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Trains `model` on `data` for `train_steps` steps; returns a summary dict.

    model: a models.py model (DecoderOnlyModel / EncoderDecoderModel).
    mesh_config: partitioning.MeshConfig (mesh shape and rule preset).
    optimizer: trainer.Optimizer (tx + schedule), e.g. trainer.adamw_llama2(...).
    stop_at_step: stop (with a checkpoint) at this step although the run is longer:
      for preemption drills and exact-resume tests; the schedule still spans
      `train_steps`.
    """
    _use_cpu_devices(mesh_config.num_devices)
    import jax
    import numpy as np

    from t5x_like import checkpoints, eval as eval_lib, flops, loader, metrics, partitioning, trainer

    if train_steps < 1:
        raise ValueError(f"train_steps={train_steps} must be ≥ 1 (set TRAIN_STEPS).")
    if log_every_steps < 1 or evaluation.every_steps < 1:
        raise ValueError(
            f"log_every_steps={log_every_steps} and EvalConfig.every_steps="
            f"{evaluation.every_steps} must be ≥ 1 (to turn evaluation off: "
            "train.EvalConfig.enabled = False).")
    os.makedirs(model_dir, exist_ok=True)
    # Operative: the bindings this run used (all of them are evaluated by now, as the
    # arguments of this call), with the macros and imports that produced them.
    config_text = gin.operative_config_str()
    if jax.process_index() == 0:
        with open(os.path.join(model_dir, "config.gin"), "w") as f:
            f.write(config_text)
    log.info("gin config (also in %s/config.gin):\n%s", model_dir, config_text)

    # Mesh and sharding rules: validated before anything is compiled.
    check_device_count(mesh_config)
    mesh = mesh_config.make_mesh()
    rules = mesh_config.rule_set()
    if num_microbatches < 1 or data.batch_size % num_microbatches:
        raise ValueError(
            f"BATCH_SIZE={data.batch_size} must split into NUM_MICROBATCHES="
            f"{num_microbatches} equal microbatches; pick a divisor of the batch size.")
    # Each microbatch is sharded over the batch axes like a whole batch.
    partitioning.validate_for_mesh(model.cfg, mesh, rules,
                                   batch_size=data.batch_size // num_microbatches)

    # Data: SeqIO → prepared store → grain loader.
    converter = converter_for(model, data.task_feature_lengths)
    store_dir = prepare_data(data, converter, train_steps, model_dir)
    data_loader = loader.Loader(store_dir, data.batch_size, seed=data.seed)
    data_loader.check_steps(train_steps)
    data_iter = data_loader.iterator()

    # Train state, restored from the newest checkpoint when there is one.
    ckpt = checkpoints.CheckpointManager(
        os.path.join(model_dir, "checkpoints"), save_interval_steps=checkpoint.save_every_steps,
        max_to_keep=checkpoint.keep, async_save=checkpoint.async_save)
    graphdef, state, restored_step = init_or_restore(
        model, optimizer.tx, mesh, rules, seed, ckpt, data_iterator=data_iter)
    if restored_step is not None:
        log.info("resumed from %s at step %d", ckpt.directory, restored_step)
    start_step = restored_step or 0

    state_sharding = trainer.state_shardings(state)
    batch_sharding = loader.batch_sharding(mesh)
    train_step = trainer.make_train_step(
        graphdef, model.loss_fn, optimizer.schedule, num_microbatches=num_microbatches,
        state_sharding=state_sharding, batch_sharding=batch_sharding, rules=rules)
    evaluator = eval_lib.Evaluator.create(
        model, graphdef, state_sharding, mesh, rules, evaluation, converter,
    ) if evaluation.enabled else None

    # Metrics: FLOPs in both conventions, peak measured (CPU) or from the datasheet (GPU).
    lengths = dict(data.task_feature_lengths)
    step_flops = flops.train_flops_per_step(model.cfg, data.batch_size, lengths)
    peak = flops.peak_flops_per_device()
    tokens_per_step = data.batch_size * sum(data_loader.feature_lengths[k] for k in (
        ("encoder_input_tokens", "decoder_target_tokens") if converter == "encdec"
        else ("decoder_target_tokens",)))
    writer = metrics.create_writer(model_dir, enabled=jax.process_index() == 0)
    log.info("model: %s parameters; %s per step: %.3e FLOPs (PaLM), %.3e (MaxText); "
             "peak %.3e FLOP/s per device", f"{partitioning.count_params(model):,}",
             converter, step_flops.palm, step_flops.maxtext, peak)

    summary: dict[str, Any] = {"model_dir": model_dir, "start_step": start_step}
    if start_step >= train_steps:
        log.info("%s is already trained to step %d of TRAIN_STEPS=%d: evaluating only. "
                 "Use a new MODEL_DIR (or delete this one) to train again.", model_dir,
                 start_step, train_steps)
    key = jax.random.key(seed)
    last_step = min(train_steps, stop_at_step or train_steps)
    losses: list[float] = []
    step = start_step
    with jax.set_mesh(mesh), ckpt, contextlib.closing(writer):
        if evaluator is not None:
            summary["eval_start"] = evaluator.run(state, start_step, writer)
        progress = metrics.Progress(last_step, start_step)
        t_start = time.perf_counter()
        window: list[dict[str, Any]] = []
        timed = 0  # steps of the window that count towards step time
        while step < last_step:
            batch = loader.to_global_batch(next(data_iter), mesh)
            state, step_metrics = train_step(state, batch, key)
            step += 1
            window.append(step_metrics)
            if step == start_step + 1:
                # The first step compiles: step times start after it.
                jax.block_until_ready(step_metrics)
                log.info("first step (compilation included) took %.1fs",
                         time.perf_counter() - t_start)
                t_last = time.perf_counter()
            else:
                timed += 1
            if step % log_every_steps == 0 or step == last_step:
                fetched = jax.device_get(window)
                now = time.perf_counter()
                losses.extend(float(m["loss"]) for m in fetched)
                # Means over the window; the *_sum counters are for accumulation only.
                scalars = {k: float(np.mean([m[k] for m in fetched]))
                           for k in fetched[-1] if not k.endswith("_sum")}
                if timed:
                    step_time = (now - t_last) / timed
                    tflops, mfu = flops.mfu(step_flops, step_time, jax.device_count(), peak)
                    scalars.update({
                        "step_time_s": step_time,
                        "tokens_per_s": tokens_per_step / step_time,
                        "tflops_per_device/palm": tflops.palm,
                        "tflops_per_device/maxtext": tflops.maxtext,
                        "mfu/palm": mfu.palm,
                        "mfu/maxtext": mfu.maxtext,
                    })
                t_last, timed = now, 0
                writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                progress.log(step, metrics.format_line(step, train_steps, scalars))
                window = []
            if evaluator is not None and step % evaluation.every_steps == 0 and step < last_step:
                evaluator.run(state, step, writer)
                t_last += evaluator.last_seconds  # step time excludes evaluation
            ckpt.save(step, state, data_iterator=data_iter, config_text=config_text,
                      force=step == last_step)
            progress.update(step)
        progress.close()
        if evaluator is not None and step > start_step:
            summary["eval_end"] = evaluator.run(state, step, writer)
    summary.update(end_step=step, train_losses=losses, state=state, graphdef=graphdef)
    if jax.process_index() == 0:
        _print_summary(summary, model_dir)
    return summary


def _print_summary(summary: Mapping[str, Any], model_dir: str) -> None:
    losses = summary["train_losses"]
    lines = ["", "=" * 72, f"run summary ({model_dir})"]
    if losses:
        k = max(1, min(10, len(losses) // 10))
        lines.append(f"train loss: first {k} steps {statistics.fmean(losses[:k]):.4f} -> "
                     f"last {k} steps {statistics.fmean(losses[-k:]):.4f}  "
                     f"(steps {summary['start_step']}..{summary['end_step']})")
    if "eval_start" in summary and "eval_end" not in summary:
        lines.append(f"{'domain':<14}{'BPC':>10}{'loss':>10}{'acc':>9}   (step "
                     f"{summary['start_step']}, nothing left to train)")
        for domain, r in summary["eval_start"].items():
            lines.append(f"{domain:<14}{r['bpc']:>10.3f}{r['loss']:>10.4f}{r['accuracy']:>9.3f}")
    if "eval_start" in summary and "eval_end" in summary:
        lines.append(f"{'domain':<14}{'BPC start':>10}{'BPC end':>10}{'loss start':>12}"
                     f"{'loss end':>10}{'acc end':>9}")
        for domain, end in summary["eval_end"].items():
            start = summary["eval_start"][domain]
            lines.append(f"{domain:<14}{start['bpc']:>10.3f}{end['bpc']:>10.3f}"
                         f"{start['loss']:>12.4f}{end['loss']:>10.4f}{end['accuracy']:>9.3f}")
    lines += [f"checkpoints: {os.path.join(model_dir, 'checkpoints')}",
              f"TensorBoard: tensorboard --logdir {model_dir}   metrics: "
              f"{os.path.join(model_dir, 'metrics.jsonl')}",
              "=" * 72]
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------
# CLI


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    """T5X-style flags: --gin_file (repeatable), --gin.NAME=VALUE, --gin_search_paths."""
    parser = argparse.ArgumentParser(
        prog="python -m t5x_like.train",
        description="Train a model configured by gin files and bindings.")
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin file to parse (repeatable), found on the search paths.")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="a gin binding such as \"TRAIN_STEPS=100\" (repeatable).")
    parser.add_argument("--gin_search_paths", default="",
                        help="comma-separated directories searched for gin files and includes.")
    multi = parser.add_argument_group(
        "multi-process (one process per host or GPU node, all with the same flags)")
    multi.add_argument("--multiprocess", action="store_true",
                       help="join a multi-process run, detecting the cluster (SLURM, MPI).")
    multi.add_argument("--coordinator_address", default=None,
                       help="host:port of process 0 (then also --process_count/--process_index).")
    multi.add_argument("--process_count", type=int, default=None)
    multi.add_argument("--process_index", type=int, default=None)
    args, rest = parser.parse_known_args(argv)
    for item in rest:
        if item.startswith("--gin."):
            name, sep, value = item[len("--gin."):].partition("=")
            if not sep:
                parser.error(f"{item!r}: expected --gin.NAME=VALUE, e.g. --gin.TRAIN_STEPS=100")
            args.gin_bindings.append(f"{name} = {value}")
        else:
            parser.error(f"unrecognised argument {item!r}")
    if not args.gin_file:
        parser.error("at least one --gin_file is required, e.g. "
                     "--gin_file=gin_configs/experiments/demo_encdec_ul2.gin")
    return args


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
    """Parses gin files and bindings, with our search paths and the cwd on sys.path."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a user's task module beside their gin file
    for path in (*search_paths, *DEFAULT_GIN_SEARCH_PATHS):
        if path:
            gin.add_config_file_search_path(path)
    # gin also looks an include up as a file inside a Python package ("runs/x.gin" →
    # package `runs`); a plain directory such as ./runs then crashes its lookup. Files
    # here are found on the search paths, so keep only the plain file reader.
    gin.config._FILE_READERS[:] = [  # noqa: SLF001 - gin has no public way to drop one
        (reader, exists) for reader, exists in gin.config._FILE_READERS  # noqa: SLF001
        if getattr(exists, "__module__", "") != "gin.resource_reader"]
    gin.parse_config_files_and_bindings(gin_files, bindings, finalize_config=False)


def setup_process(args: argparse.Namespace) -> None:
    """Logging, multi-process start-up and gin parsing, shared by train and eval."""
    setup_logging()
    if args.multiprocess or args.coordinator_address is not None:
        initialize_distributed(args.coordinator_address, args.process_count,
                               args.process_index)
    parse_gin(args.gin_file, args.gin_bindings,
              [p for p in args.gin_search_paths.split(",") if p])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    setup_process(parse_flags(sys.argv[1:] if argv is None else argv))
    # Through the imported module, not this function's globals: run as `python -m`,
    # this file is `__main__`, a different module object from the one gin registered.
    from t5x_like import train as train_lib

    return gin.get_configurable(train_lib.train)()


def setup_logging() -> None:
    """Our loggers at INFO on the console; libraries (gin, absl, orbax) at WARNING."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("t5x_like", "tasks"):
        logging.getLogger(name).setLevel(logging.INFO)


if __name__ == "__main__":
    main()
