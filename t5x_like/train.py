"""The training entry point: `python -m t5x_like.train --gin_file=... --gin.NAME=VALUE`.

`train(...)` joins the parts in the order data flows:

  gin → tasks (SeqIO registry) → prepare (ArrayRecord store) → loader (grain)
      → sharded train state (partitioning, trainer) → jitted train step (trainer)
      → orbax checkpoints (checkpoints) and clu metrics with MFU (metrics, flops)
      → per-domain evaluation with bits per character (evaluation)

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
import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from t5x_like import (checkpoints, flops, launch, loader, metrics, partitioning, prepare,
                      store, trainer)
from t5x_like.evaluation import EvalConfig, Evaluator

log = logging.getLogger("t5x_like.train")


# ---------------------------------------------------------------------------
# Configuration groups (bound by gin, plain frozen dataclasses, checked on creation)


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

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"BATCH_SIZE={self.batch_size} must be ≥ 1.")
        for name in ("num_examples", "prepare_shards"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"train.DataConfig.{name}={value} must be ≥ 1 (or None).")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing: every `save_every_steps`, keep the newest `keep`, async."""

    save_every_steps: int = 100
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.save_every_steps < 1 or self.keep < 1:
            raise ValueError(
                f"train.CheckpointConfig: save_every_steps={self.save_every_steps} and "
                f"keep={self.keep} must be ≥ 1.")


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What `train` returns: where the run is and what it measured (not its state; the
    state is in the checkpoint of `end_step`)."""

    model_dir: str
    start_step: int
    end_step: int
    train_losses: tuple[float, ...]
    eval_start: Mapping[str, Mapping[str, float]] | None = None
    eval_end: Mapping[str, Mapping[str, float]] | None = None


def _check_run(train_steps: int, log_every_steps: int, num_microbatches: int,
               batch_size: int) -> None:
    if train_steps < 1:
        raise ValueError(f"train_steps={train_steps} must be ≥ 1 (set TRAIN_STEPS).")
    if log_every_steps < 1:
        raise ValueError(f"log_every_steps={log_every_steps} must be ≥ 1.")
    if num_microbatches < 1 or batch_size % num_microbatches:
        raise ValueError(
            f"BATCH_SIZE={batch_size} must split into NUM_MICROBATCHES={num_microbatches} "
            "equal microbatches; pick a divisor of the batch size.")


# ---------------------------------------------------------------------------
# Pieces of `train`, in data-flow order


def prepare_data(data: DataConfig, converter: str, train_steps: int, model_dir: str) -> str:
    """Prepares (or checks) the ArrayRecord store for this run; returns its directory.

    In a multi-process run process 0 prepares while the others wait; they then find
    the store complete and only check its manifest. Worker processes import the task
    modules the gin files imported (`launch.gin_imports()`).
    """
    store_dir = data.store_dir or os.path.join(model_dir, "data")
    num_examples = data.num_examples or train_steps * data.batch_size
    # A store made on a machine with another core count is still this run's store.
    existing = store.read_manifest(store_dir)
    shards = data.prepare_shards or (existing or {}).get("num_shards") or os.cpu_count() or 1
    start = time.perf_counter()

    def run():
        try:
            return prepare.prepare(
                data.mixture_or_task_name, dict(data.task_feature_lengths), converter,
                num_examples, data.seed, store_dir, num_shards=shards, workers=shards,
                task_modules=launch.gin_imports())
        except prepare.ManifestMismatchError as e:
            raise prepare.ManifestMismatchError(
                f"{e} In a training run the store is train.DataConfig.store_dir (default "
                "MODEL_DIR/data), holds TRAIN_STEPS x BATCH_SIZE rows unless "
                "train.DataConfig.num_examples says otherwise, in "
                "train.DataConfig.prepare_shards shards: point store_dir elsewhere "
                "or use a new MODEL_DIR.") from None

    if jax.process_count() > 1:
        if jax.process_index() == 0:
            run()
        multihost_utils.sync_global_devices("t5x_like.train: data prepared")
    manifest = run()
    log.info("data: %s (%d examples, %.1f%% padding) ready in %.1fs", store_dir,
             manifest["num_examples"], 100 * manifest["padding_fraction"],
             time.perf_counter() - start)
    return store_dir


def _write_operative_config(model_dir: str) -> str:
    """The bindings this run used (all evaluated by now, as the arguments of `train`),
    with the macros and imports that produced them: logged and written to config.gin."""
    config_text = gin.operative_config_str()
    os.makedirs(model_dir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(model_dir, "config.gin"), "w") as f:
            f.write(config_text)
    log.info("gin config (also in %s/config.gin):\n%s", model_dir, config_text)
    return config_text


def _mean_scalars(fetched: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means over a log window; the *_sum counters are for accumulation only."""
    return {k: float(np.mean([m[k] for m in fetched]))
            for k in fetched[-1] if not k.endswith("_sum")}


def _print_summary(summary: RunSummary) -> None:
    lines = ["", "=" * 72, f"run summary ({summary.model_dir})"]
    losses = summary.train_losses
    if losses:
        k = max(1, min(10, len(losses) // 10))
        lines.append(f"train loss: first {k} steps {statistics.fmean(losses[:k]):.4f} -> "
                     f"last {k} steps {statistics.fmean(losses[-k:]):.4f}  "
                     f"(steps {summary.start_step}..{summary.end_step})")
    if summary.eval_end is not None:
        lines.append(metrics.format_eval_table({"start": summary.eval_start,
                                                "end": summary.eval_end}))
    elif summary.eval_start is not None:
        lines.append(f"(step {summary.start_step}, nothing left to train)")
        lines.append(metrics.format_eval_table({"": summary.eval_start}))
    lines += [f"checkpoints: {os.path.join(summary.model_dir, 'checkpoints')}",
              f"TensorBoard: tensorboard --logdir {summary.model_dir}   metrics: "
              f"{os.path.join(summary.model_dir, metrics.JSONL_NAME)}",
              "=" * 72]
    print("\n".join(lines), flush=True)


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
    peak_flops_per_device: float | None = None,
) -> RunSummary:
    """Trains `model` on `data` for `train_steps` steps; returns the run's summary.

    model: a models.py model (DecoderOnlyModel / EncoderDecoderModel).
    mesh_config: partitioning.MeshConfig (mesh shape and rule preset).
    optimizer: trainer.Optimizer (tx + schedule), e.g. trainer.adamw_llama2(...).
    stop_at_step: stop (with a checkpoint) at this step although the run is longer:
      for preemption drills and exact-resume tests; the schedule still spans
      `train_steps`.
    peak_flops_per_device: MFU's peak for a device hardware.DEVICE_SPECS lacks.
    """
    _check_run(train_steps, log_every_steps, num_microbatches, data.batch_size)
    launch.start_devices(mesh_config)
    config_text = _write_operative_config(model_dir)
    mesh, rules = launch.mesh_for(mesh_config)
    # Each microbatch is sharded over the batch axes like a whole batch.
    partitioning.validate_for_mesh(model.make_module, mesh, rules,
                                   batch_size=data.batch_size // num_microbatches)
    data_iter = _data_iterator(data, model, train_steps, model_dir)
    ckpt = checkpoints.CheckpointManager(
        os.path.join(model_dir, "checkpoints"), save_interval_steps=checkpoint.save_every_steps,
        max_to_keep=checkpoint.keep, async_save=checkpoint.async_save)
    graphdef, state, restored_step = trainer.init_or_restore(
        model, optimizer.tx, mesh, rules, seed, ckpt, data_iterator=data_iter)
    start_step = step = _resumed_at(restored_step, train_steps, model_dir)
    state_sharding = trainer.state_shardings(state)
    train_step = trainer.make_train_step(
        graphdef, model.loss_fn, optimizer.schedule, num_microbatches=num_microbatches,
        state_sharding=state_sharding, batch_sharding=partitioning.batch_sharding(mesh),
        rules=rules)
    evaluator = Evaluator.create(model, graphdef, state_sharding, mesh, rules,
                                 evaluation) if evaluation.enabled else None
    meter = _make_meter(model, data, mesh, peak_flops_per_device)
    writer = metrics.create_writer(model_dir, enabled=jax.process_index() == 0)
    key, last_step = jax.random.key(seed), min(train_steps, stop_at_step or train_steps)
    losses: list[float] = []
    window: list[dict[str, Any]] = []

    def evaluate(at_step: int):
        results = evaluator.run(state, at_step, writer) if evaluator else None
        meter.exclude(evaluator.last_seconds if evaluator else 0.0)  # not in step time
        return results

    def log_window():
        fetched = jax.device_get(window)  # waits for the steps: the meter's clock is fair
        losses.extend(float(m["loss"]) for m in fetched)
        scalars = {**_mean_scalars(fetched), **meter.window()}
        writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
        tqdm.tqdm.write(metrics.format_line(step, train_steps, scalars,
                                            meter.eta_s(last_step - step)), file=sys.stderr)
        window.clear()

    with jax.set_mesh(mesh), ckpt, contextlib.closing(writer), \
            metrics.progress_bar(last_step, start_step) as bar:
        eval_start, eval_end = evaluate(start_step), None
        while step < last_step:
            batch = loader.to_global_batch(next(data_iter), mesh)
            state, step_metrics = train_step(state, batch, key)
            step += 1
            window.append(step_metrics)
            if (compile_s := meter.step_done(step_metrics)) is not None:
                log.info("first step (compilation included) took %.1fs", compile_s)
            if step % log_every_steps == 0 or step == last_step:
                log_window()
            if step % evaluation.every_steps == 0 and step < last_step:
                evaluate(step)
            ckpt.save(step, state, data_iterator=data_iter, config_text=config_text,
                      force=step == last_step)
            bar.update(1)
        if step > start_step:
            eval_end = evaluate(step)
    summary = RunSummary(model_dir, start_step, step, tuple(losses), eval_start, eval_end)
    if jax.process_index() == 0:
        _print_summary(summary)
    return summary


def _data_iterator(data: DataConfig, model, train_steps: int, model_dir: str):
    """The run's data: SeqIO → prepared store → grain iterator (at step 0; a restored
    checkpoint moves it)."""
    store_dir = prepare_data(data, model.converter_name(data.task_feature_lengths),
                             train_steps, model_dir)
    data_loader = loader.Loader(store_dir, data.batch_size, seed=data.seed)
    data_loader.check_steps(train_steps)
    return data_loader.iterator()


def _resumed_at(restored_step: int | None, train_steps: int, model_dir: str) -> int:
    if restored_step is None:
        return 0
    log.info("resumed from %s at step %d", model_dir, restored_step)
    if restored_step >= train_steps:
        log.info("%s is already trained to step %d of TRAIN_STEPS=%d: evaluating only. "
                 "Use a new MODEL_DIR (or delete this one) to train again.", model_dir,
                 restored_step, train_steps)
    return restored_step


def _make_meter(model, data: DataConfig, mesh, peak: float | None) -> metrics.StepMeter:
    """Speed meter of this run: FLOPs in both conventions against the peak (measured on
    CPU, the datasheet's for the compute dtype on GPU and TPU, or `peak`)."""
    lengths = data.task_feature_lengths
    step_flops = model.train_flops_per_step(data.batch_size, lengths)
    peak = flops.peak_flops_per_device(dtype=model.cfg.dtype, override=peak)
    log.info("model: %s parameters; %s per step: %.3e FLOPs (PaLM), %.3e (MaxText); "
             "peak %.3e FLOP/s per device", f"{model.num_params:,}",
             model.converter_name(lengths), step_flops.palm, step_flops.maxtext, peak)
    return metrics.StepMeter(step_flops, data.batch_size * model.tokens_per_example(lengths),
                             mesh.size, peak)


def main(argv: Sequence[str] | None = None) -> RunSummary:
    return launch.run("t5x_like.train.train", argv)


if __name__ == "__main__":
    main()
