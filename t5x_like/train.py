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
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
from jax.experimental import multihost_utils

from t5x_like import (checkpoints, flops, guards, launch, loader, metrics, mixtures,
                      partitioning, prepare, store, trainer, ul2, vocabulary)
from t5x_like import loop as loop_lib
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
    state is in the checkpoint of `end_step`).

    stopped_by: None when the run reached TRAIN_STEPS, else what stopped it first
      ("SIGTERM", "SIGINT", "preemption notice", "stop_at_step").
    """

    model_dir: str
    start_step: int
    end_step: int
    train_losses: tuple[float, ...]
    eval_start: Mapping[str, Mapping[str, float]] | None = None
    eval_end: Mapping[str, Mapping[str, float]] | None = None
    stopped_by: str | None = None
    nonfinite_steps: int = 0
    rewinds: int = 0


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


def _check_data(data: DataConfig, converter: str, vocab_size: int) -> None:
    """Before anything is written: the mixture exists, its tasks have the features the
    model's converter needs and a vocabulary the model covers, and every UL2 denoiser
    fits the lengths."""
    needed = store.CONVERTER_TASK_FEATURES[converter]
    if set(data.task_feature_lengths) != set(needed):
        raise ValueError(
            f"TASK_FEATURE_LENGTHS={dict(data.task_feature_lengths)} does not fit the model's "
            f"{converter!r} form, which takes lengths for {list(needed)}.")
    tasks = mixtures.leaf_tasks(data.mixture_or_task_name)
    # Token features only: a preference pair's `rating` is a number, not a token.
    vocabularies = {id(f.vocabulary): f.vocabulary for t in tasks
                    for name, f in t.output_features.items() if name != "rating"}
    for vocab in vocabularies.values():  # a model too small for the tokenizer must not train
        vocabulary.check_model_covers(vocab, vocab_size)
    for task in tasks:
        missing = [f for f in needed if f not in task.output_features]
        if missing:
            raise ValueError(
                f"Task {task.name!r} of {data.mixture_or_task_name!r} has no {missing} "
                f"feature, which the model's {converter!r} form needs (it has "
                f"{sorted(task.output_features)}). A causal LM takes targets only.")
    ul2.validate_mixture_lengths(data.mixture_or_task_name, data.task_feature_lengths)


def _run_identity(model, data: DataConfig, optimizer, train_steps: int,
                  num_microbatches: int, seed: int) -> dict[str, dict[str, Any]]:
    """What makes this run this run: a resumed run must match it field by field."""
    cfg = dataclasses.asdict(model.cfg)
    for numerically_neutral in ("scan_layers", "remat_policy"):
        cfg.pop(numerically_neutral)
    return {
        "model": {"class": type(model).__name__, **cfg},
        "data": {"mixture_or_task_name": data.mixture_or_task_name,
                 "task_feature_lengths": dict(data.task_feature_lengths),
                 "batch_size": data.batch_size, "seed": data.seed},
        "optimizer": dict(optimizer.description),
        "schedule": {"train_steps": train_steps, "num_microbatches": num_microbatches,
                     "seed": seed},
    }


# ---------------------------------------------------------------------------
# Pieces of `train`, in data-flow order


def store_for(data: DataConfig, converter: str, train_steps: int, model_dir: str):
    """(directory, store.StoreSpec) of this run's prepared store, checked against a store
    already there (a ManifestMismatchError that writes nothing)."""
    store_dir = data.store_dir or os.path.join(model_dir, "data")
    # A store made on a machine with another core count is still this run's store.
    existing = store.read_manifest(store_dir)
    shards = data.prepare_shards or (existing or {}).get("num_shards") or os.cpu_count() or 1
    spec = prepare.make_spec(data.mixture_or_task_name, data.task_feature_lengths, converter,
                             data.num_examples or train_steps * data.batch_size, data.seed,
                             num_shards=shards)
    try:
        prepare.check_store(store_dir, spec)
    except prepare.ManifestMismatchError as e:
        raise prepare.ManifestMismatchError(
            f"{e} In a training run the store is train.DataConfig.store_dir (default "
            "MODEL_DIR/data), holds TRAIN_STEPS x BATCH_SIZE rows unless "
            "train.DataConfig.num_examples says otherwise, in "
            "train.DataConfig.prepare_shards shards: point store_dir elsewhere "
            "or use a new MODEL_DIR.") from None
    return store_dir, spec


def prepare_data(store_dir: str, spec) -> dict:
    """Prepares (or reuses) the run's store; returns its manifest.

    In a multi-process run process 0 prepares while the others wait; they then find
    the store complete and only check its manifest. Worker processes import the task
    modules the gin files imported (`launch.gin_imports()`).
    """
    start = time.perf_counter()

    def run():
        return prepare.prepare_spec(spec, store_dir, workers=spec.num_shards,
                                    task_modules=launch.gin_imports())

    if jax.process_count() > 1:
        if jax.process_index() == 0:
            run()
        multihost_utils.sync_global_devices("t5x_like.train: data prepared")
    manifest = run()
    log.info("data: %s (%d examples, %.1f%% padding) ready in %.1fs", store_dir,
             manifest["num_examples"], 100 * manifest["padding_fraction"],
             time.perf_counter() - start)
    for label, counts in (manifest.get("unusable_documents") or {}).items():
        unusable = counts["empty"] + counts["non_utf8"]
        if unusable:
            log.warning(
                "%s: %d of %d source documents are empty or blank (%d) or not valid UTF-8 "
                "(%d); %s", label, unusable, counts["documents"], counts["empty"],
                counts["non_utf8"], "they are dropped." if counts["dropped"] else
                "they are trained on: add t5x_like.documents.filter_documents to the task's "
                "preprocessors, or fix the source.")
    return manifest


def data_scalars(manifest: Mapping[str, Any]) -> dict[str, float]:
    """What the run's data holds, for the metrics: padding, examples per task, and the
    unusable documents per source."""
    out = {"data/padding_fraction": manifest["padding_fraction"]}
    total = max(1, sum(manifest["task_counts"].values()))
    out.update({f"data/task_share/{name}": count / total
                for name, count in manifest["task_counts"].items()})
    for label, counts in (manifest.get("unusable_documents") or {}).items():
        out.update({f"data/unusable/{label}/{k}": counts[k] for k in ("empty", "non_utf8")})
    return out


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
    if summary.nonfinite_steps or summary.rewinds:
        lines.append(f"guards: {summary.nonfinite_steps} non-finite steps skipped, "
                     f"{summary.rewinds} loss-spike rewinds")
    if summary.stopped_by not in (None, "stop_at_step"):
        lines.append(f"stopped by {summary.stopped_by} at step {summary.end_step}: checkpoint "
                     f"saved in {os.path.join(summary.model_dir, 'checkpoints')}; run the same "
                     "command to resume.")
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
    guard: guards.GuardConfig = guards.GuardConfig(),
    log_every_steps: int = 10,
    num_microbatches: int = 1,
    seed: int = 0,
    stop_at_step: int | None = None,
    allow_resume_changes: Sequence[str] = (),
    drills: guards.FaultDrills = guards.FaultDrills(),
    peak_flops_per_device: float | None = None,
    initial_checkpoint: str | None = None,
) -> RunSummary:
    """Trains `model` (a models.py model) on `data` for `train_steps` steps on the mesh of
    `mesh_config` with `optimizer` (a trainer.Optimizer); returns the run's summary.

    Everything is checked before anything in `model_dir` is written; a second trainer on
    the same `model_dir` is refused. `stop_at_step`: stop with a checkpoint there (the
    schedule still spans `train_steps`). `allow_resume_changes`: identity fields
    ("schedule.train_steps", "optimizer", ...) that may differ from the checkpoint's.
    `peak_flops_per_device`: MFU's peak for a device hardware.DEVICE_SPECS lacks.
    `initial_checkpoint`: a new run starts from these parameters (fine-tuning).
    """
    _check_run(train_steps, log_every_steps, num_microbatches, data.batch_size)
    launch.start_devices(mesh_config)
    mesh, rules = launch.mesh_for(mesh_config)
    # Each microbatch is sharded over the batch axes like a whole batch.
    partitioning.validate_for_mesh(model.make_module, mesh, rules,
                                   batch_size=data.batch_size // num_microbatches)
    converter = model.converter_name(data.task_feature_lengths)
    _check_data(data, converter, model.cfg.vocab_size)
    if evaluation.enabled:
        Evaluator.check_batch_size(evaluation.batch_size, mesh)
    identity = _run_identity(model, data, optimizer, train_steps, num_microbatches, seed)
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    if os.path.isdir(ckpt_dir):
        with checkpoints.CheckpointManager(ckpt_dir, create=False) as existing:
            guards.check_resume((existing.newest_run_item() or {}).get("identity"), identity,
                                allow_resume_changes)
    data_steps = train_steps + guard.reserve_batches(checkpoint.save_every_steps)
    store_dir, spec = store_for(data, converter, data_steps, model_dir)

    with guards.RunLock(model_dir), guards.PreemptionWatcher() as watcher:
        config_text = _write_operative_config(model_dir)
        data_iter, manifest = _data_iterator(data, store_dir, spec, data_steps)
        with checkpoints.CheckpointManager(
                ckpt_dir, save_interval_steps=checkpoint.save_every_steps,
                max_to_keep=checkpoint.keep, async_save=checkpoint.async_save) as ckpt:
            graphdef, state, restored = trainer.init_or_restore(
                model, optimizer.tx, mesh, rules, seed, ckpt, data_iterator=data_iter,
                initial_checkpoint=initial_checkpoint)
            run = (restored.run or {}) if restored else {}
            guards.check_resume(run.get("identity"), identity, allow_resume_changes)
            start_step = _resumed_at(restored, train_steps, model_dir)
            train_step, evaluator = _compile(model, optimizer, mesh, rules, graphdef, state,
                                             num_microbatches, evaluation, data)
            loop = loop_lib.TrainLoop(
                train_step=train_step, state=state, data_iter=data_iter, mesh=mesh,
                key=jax.random.key(seed), ckpt=ckpt,
                writer=metrics.create_writer(model_dir, enabled=jax.process_index() == 0),
                meter=_make_meter(model, data, mesh, peak_flops_per_device),
                guards=guards.LossGuards(guard, run.get("guards")), drills=drills,
                evaluator=evaluator, run_item={"identity": identity}, config_text=config_text,
                train_steps=train_steps, log_every=log_every_steps,
                eval_every=evaluation.every_steps, step=start_step)
            with jax.set_mesh(mesh), contextlib.closing(loop.writer):
                loop.writer.write_scalars(start_step, data_scalars(manifest))
                eval_start = loop.evaluate()
                stopped_by = loop.run(min(train_steps, stop_at_step or train_steps), watcher)
                # A signal asks for a quick exit: no final evaluation then.
                preempted = stopped_by not in (None, "stop_at_step")
                eval_end = loop.evaluate() if loop.step > start_step and not preempted else None
    summary = RunSummary(model_dir, start_step, loop.step,
                         tuple(v for s, v in sorted(loop.losses.items()) if s > start_step),
                         eval_start, eval_end, stopped_by, loop.guards.nonfinite_total,
                         loop.guards.rewinds)
    if jax.process_index() == 0:
        _print_summary(summary)
    return summary


def _compile(model, optimizer, mesh, rules, graphdef, state, num_microbatches: int,
             evaluation: EvalConfig, data: DataConfig):
    """The jitted train step and the evaluator (None when evaluation is off)."""
    state_sharding = trainer.state_shardings(state)
    train_step = trainer.make_train_step(
        graphdef, model.loss_fn, optimizer.schedule, num_microbatches=num_microbatches,
        state_sharding=state_sharding, batch_sharding=partitioning.batch_sharding(mesh),
        rules=rules)
    evaluator = Evaluator.create(
        model, graphdef, state_sharding, mesh, rules, evaluation, data.mixture_or_task_name,
        data.task_feature_lengths) if evaluation.enabled else None
    return train_step, evaluator


def _data_iterator(data: DataConfig, store_dir: str, spec, train_steps: int):
    """The run's data: prepared store → grain iterator (at step 0; a restored checkpoint
    moves it), and the store's manifest."""
    prepare_data(store_dir, spec)
    data_loader = loader.Loader(store_dir, data.batch_size, seed=data.seed)
    data_loader.check_steps(train_steps)
    return data_loader.iterator(), data_loader.manifest


def _resumed_at(restored, train_steps: int, model_dir: str) -> int:
    if restored is None:
        return 0
    log.info("resumed from %s at step %d", model_dir, restored.step)
    if restored.step >= train_steps:
        log.info("%s is already trained to step %d of TRAIN_STEPS=%d: evaluating only. "
                 "Use a new MODEL_DIR (or delete this one) to train again.", model_dir,
                 restored.step, train_steps)
    return restored.step


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
