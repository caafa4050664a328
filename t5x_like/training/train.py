"""The training entry point: `python -m t5x_like.train --gin_file=... --gin.NAME=VALUE`.

`train(...)` joins the parts in the order data flows:

  gin → tasks (SeqIO registry) → stream (SeqIO shards in grain workers; or a prepared
      ArrayRecord store through loader) → sharded train state (partitioning, trainer) → jitted train step (trainer)
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
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import gin
import jax
from jax.experimental import multihost_utils

from t5x_like import launch
from t5x_like.data import (documents, forms, mixtures, pipeline, store, stream, ul2,
                           vocabulary)
from t5x_like.model import flops, partitioning
from t5x_like.training import (
    checkpoints,
    guards,
    loader,
    metrics,
    rundir,
    train_state,
)
from t5x_like.training import loop as loop_lib

log = logging.getLogger("t5x_like.training.train")

# ---------------------------------------------------------------------------
# Configuration groups (bound by gin, plain frozen dataclasses, checked on creation)



class Evaluation(Protocol):
    """What a training run needs of its evaluation (evaluation.evaluate.EvalConfig is
    one, bound in runs/pretrain.gin): how often, a check against the mesh before
    anything is written, and the evaluator the loop runs (None: no evaluation)."""

    every_steps: int

    def check(self, mesh) -> None: ...

    def evaluator(self, model, graphdef, state_sharding, mesh, rules,
                  mixture_or_task_name: str, task_feature_lengths: Mapping[str, int]): ...


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to train on and where its rows come from.

    mixture_or_task_name: a registered SeqIO Mixture or Task (tasks/ or a user module
      brought in by an `import` line in the gin file).
    task_feature_lengths: e.g. {"inputs": 128, "targets": 128}; a decoder-only model
      with "inputs" trains as a prefix LM, without as a causal LM.
    batch_size: global batch (rows per step over all processes).
    seed: seed of the data (task sampling, seqio shuffling, denoising; for a store also
      of its read order): part of the run's identity.
    store_dir: a store written by `python -m t5x_like.prepare` to read instead of
      streaming; it must have been prepared with this mixture, lengths, seed and the
      model's converter, with at least TRAIN_STEPS x BATCH_SIZE rows. Never written.
    stream_shards: SeqIO shards the stream is made of (`t5x_like/data/stream.py`): each an
      endless stream of rows in a worker process, batch_size / stream_shards rows of
      every step. Part of the data's identity; must divide the batch size and be a
      multiple of the data-parallel process groups (processes holding different rows).
      Default (None): one per group, 2 when every process reads every row
      (`stream_shards`); it depends on the process layout, so set it to resume a run
      under a layout with another number of groups.
    data_workers: worker processes per training process; must divide the process's
      shards. Default: as many as its shards, up to the core count. Not part of the
      data's identity: a run may resume with another number.
    task_modules: modules that register the tasks, imported by the data workers besides
      those the gin files import (`import tasks`); for runs started from Python.
    domain_ids: label every batch's decoder positions with their example's part of the
      mixture (`pipeline.DOMAIN_IDS`, `mixtures.components`), for a model whose loss
      weights domains (DoReMi's proxy, `group_dro.DoReMiModel`). Streams only.
    pack_pool: examples of a stream shard packed together, best-fit over the row's
      lengths (`t5x_like/data/packing.py`); 1 packs greedily in order (seqio's packing).
      Part of the data's identity. A store keeps the pool it was prepared with.
    """

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    batch_size: int
    seed: int = 0
    store_dir: str | None = None
    stream_shards: int | None = None
    data_workers: int | None = None
    task_modules: Sequence[str] = ()
    domain_ids: bool = False
    pack_pool: int = pipeline.DEFAULT_PACK_POOL

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"BATCH_SIZE={self.batch_size} must be ≥ 1.")
        if self.stream_shards is not None and self.stream_shards < 1:
            raise ValueError(f"train.DataConfig.stream_shards={self.stream_shards} must be ≥ 1.")
        if self.domain_ids and self.store_dir:
            raise ValueError("train.DataConfig.domain_ids labels streamed rows; a prepared "
                             "store's rows carry no labels: unset store_dir.")
        if self.pack_pool < 1:
            raise ValueError(f"train.DataConfig.pack_pool={self.pack_pool} must be ≥ 1 "
                             "(1: greedy packing in order).")
        if self.data_workers is not None and self.data_workers < 1:
            raise ValueError(f"train.DataConfig.data_workers={self.data_workers} must be ≥ 1 "
                             "(or None: one per shard of the process, up to the core count).")


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


def _check_data(data: DataConfig, form: forms.DataForm, vocab_size: int) -> None:
    """Before anything is written: the lengths fit the model's data form, the mixture
    exists, its tasks have the features the form needs and a vocabulary the model
    covers, and every UL2 denoiser fits the lengths."""
    form.check_lengths(data.task_feature_lengths)
    needed = form.task_features
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
                f"feature, which the model's {form.name!r} form needs (it has "
                f"{sorted(task.output_features)}). A causal LM takes targets only.")
    ul2.validate_mixture_lengths(data.mixture_or_task_name, data.task_feature_lengths)


def _run_identity(model, data: DataConfig, optimizer, train_steps: int,
                  num_microbatches: int, seed: int) -> dict[str, dict[str, Any]]:
    """What makes this run this run: a resumed run must match it field by field."""
    cfg = dataclasses.asdict(model.cfg)
    # How the same function is computed (layer stacking, rematerialisation, the attention
    # kernel and its packed layout, the embedding's lookup form, the loss fused or in
    # chunks) may change on resume: a run saved before a choice existed resumes too.
    for numerically_neutral in ("scan_layers", "remat_policy", "attention_impl",
                                "max_segments_per_row", "embed_lookup", "fused_loss",
                                "loss_chunk_length"):
        cfg.pop(numerically_neutral, None)
    # Where the rows come from changes them: a store's rows are shuffled, a stream's are
    # its shards' in order (the store's own identity is checked by its iterator state).
    source = ({"source": "store"} if data.store_dir else
              {"source": "stream", "stream_shards": data.stream_shards})
    return {
        "model": {"class": type(model).__name__, **cfg},
        "data": {"mixture_or_task_name": data.mixture_or_task_name,
                 "task_feature_lengths": dict(data.task_feature_lengths),
                 "batch_size": data.batch_size, "seed": data.seed, **source},
        "optimizer": dict(optimizer.description),
        "schedule": {"train_steps": train_steps, "num_microbatches": num_microbatches,
                     "seed": seed},
    }


# ---------------------------------------------------------------------------
# Pieces of `train`, in data-flow order


def stream_shards(data: DataConfig, rows: partitioning.ProcessRows) -> int:
    """`data.stream_shards`, or when unset the default of this mesh and process layout
    (`stream.shard_count`)."""
    return stream.shard_count(data.stream_shards, data.batch_size, rows.groups)


def data_source(data: DataConfig, form: forms.DataForm, train_steps: int,
                rows: partitioning.ProcessRows):
    """The run's data, checked before anything is written: a `stream.Stream` by default,
    or a `loader.Loader` over `data.store_dir` (which must serve this run and is never
    written). Both give iterators with the same contract (`.iterator()`), of this
    process's `rows` of every batch."""
    if data.store_dir:
        return _store_loader(data, form, train_steps, rows)
    source = stream.stream_for(
        data.mixture_or_task_name, data.task_feature_lengths, form, data.seed,
        data.batch_size, stream_shards(data, rows), pack_pool=data.pack_pool,
        row_ranges=rows.ranges, count_rows=rows.counts, workers=data.data_workers,
        task_modules=(*launch.gin_imports(), *data.task_modules),
        worker_init=launch.hide_gpus_from_tensorflow, domain_ids=data.domain_ids)
    log.info("data: streaming %s, %d shards (%d rows of each per step), %d in this "
             "process's %d worker process(es)", data.mixture_or_task_name,
             source.spec.num_shards, source.rows_per_step, len(source.shards), source.workers)
    for task in mixtures.leaf_tasks(data.mixture_or_task_name):
        if documents.filter_documents not in task.preprocessors:
            log.warning("%s does not drop empty or non-UTF-8 documents: any are trained on. "
                        "Add t5x_like.data.documents.filter_documents to its preprocessors.",
                        task.name)
    return source


def _store_loader(data: DataConfig, form: forms.DataForm, train_steps: int,
                  rows: partitioning.ProcessRows) -> loader.Loader:
    store_dir = data.store_dir
    manifest = store.read_manifest(store_dir)
    if manifest is None or not manifest.get("complete"):
        lengths = ",".join(f"{k}={v}" for k, v in data.task_feature_lengths.items())
        modules = " ".join(f"--task_module {m}" for m in launch.gin_imports()) or "--task_module ..."
        raise FileNotFoundError(
            f"train.DataConfig.store_dir={store_dir!r} holds no complete prepared store. "
            f"Training reads a store but never writes one: prepare it first with `python "
            f"-m t5x_like.prepare {modules} --mixture {data.mixture_or_task_name} "
            f"--feature_lengths {lengths} --converter {form.name} --seed {data.seed} "
            f"--num_examples {train_steps * data.batch_size} --out {store_dir}`, or unset "
            "store_dir to stream the data.")
    shards = pipeline.shard_spec(data.mixture_or_task_name, data.task_feature_lengths,
                                 form, data.seed, manifest["num_shards"],
                                 shuffle_buffer_size=manifest["shuffle_buffer_size"],
                                 pack_pool=manifest.get("pack_pool",
                                                        store.LEGACY_SPEC_FIELDS["pack_pool"]))
    try:
        store.StoreSpec(**shards.as_dict(), num_examples=manifest["num_examples"]
                        ).check_against(store_dir, manifest)
    except store.ManifestMismatchError as e:
        raise store.ManifestMismatchError(
            f"{e} The store of a training run (train.DataConfig.store_dir) must be prepared "
            "with the run's mixture, lengths, seed (DATA_SEED) and model form: point "
            "store_dir at one that is, or unset it to stream.") from None
    data_loader = loader.Loader(store_dir, data.batch_size, seed=data.seed,
                                row_ranges=rows.ranges)
    data_loader.check_steps(train_steps)
    log.info("data: store %s (%d rows, %.1f%% padding)", store_dir,
             manifest["num_examples"], 100 * manifest["padding_fraction"])
    for label, counts in (manifest.get("unusable_documents") or {}).items():
        unusable = counts["empty"] + counts["non_utf8"]
        if unusable:
            log.warning(
                "%s: %d of %d source documents are empty or blank (%d) or not valid UTF-8 "
                "(%d); %s", label, unusable, counts["documents"], counts["empty"],
                counts["non_utf8"], "they are dropped." if counts["dropped"] else
                "they are trained on: add t5x_like.data.documents.filter_documents to the task's "
                "preprocessors, or fix the source.")
    return data_loader


def _write_operative_config(model_dir: str) -> str:
    """The bindings this run used (all evaluated by now, as the arguments of `train`),
    with the macros and imports that produced them: logged and written to config.gin."""
    config_text = gin.operative_config_str()
    rundir.makedirs(model_dir)
    if jax.process_index() == 0:
        rundir.write_text(rundir.join(model_dir, "config.gin"), config_text)
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


def _check_setup(model, data: DataConfig, mesh, rules, num_microbatches: int,
                 evaluation: Evaluation | None):
    """Before anything is written: the model fits the mesh, the data the model, the
    evaluation the mesh. Returns the model's data form, `data` with its stream shard
    count set, and this process's rows of every batch."""
    # Each microbatch is sharded over the batch axes like a whole batch.
    partitioning.validate_for_mesh(model.make_module, mesh, rules,
                                   batch_size=data.batch_size // num_microbatches)
    form = model.data_form(data.task_feature_lengths)
    _check_data(data, form, model.cfg.vocab_size)
    if evaluation is not None:
        evaluation.check(mesh)
    rows = partitioning.process_rows(mesh, data.batch_size)
    return form, dataclasses.replace(data, stream_shards=stream_shards(data, rows)), rows


def _check_checkpoints(ckpt_dir: str, identity, allow_resume_changes, initial_checkpoint,
                       abstract_params) -> bool:
    """Before anything is written: a resumed run must match its checkpoints' identity, and
    a new run's `initial_checkpoint` must hold this model's parameter shapes. Returns
    whether the run resumes (it has a checkpoint)."""
    rundir.check_writable(os.path.dirname(ckpt_dir))  # MODEL_DIR: its bucket exists
    resuming = False
    if rundir.isdir(ckpt_dir):
        with checkpoints.CheckpointManager(ckpt_dir, create=False) as existing:
            guards.check_resume((existing.newest_run_item() or {}).get("identity"), identity,
                                allow_resume_changes)
            resuming = existing.latest_step() is not None
    if initial_checkpoint is not None and not resuming:
        checkpoints.check_params(initial_checkpoint, abstract_params())
    if jax.process_count() > 1:
        # Orbax's manager makes the directory on process 0 before its own barrier: a
        # process still checking would then see a directory the others did not, and open
        # it as a resume (out of step with their barrier). All check, then any writes.
        multihost_utils.sync_global_devices("t5x_like.training.train: checkpoints checked")
    return resuming


def train(
    *,
    model,
    mesh_config,
    data: DataConfig,
    optimizer,
    train_steps: int,
    model_dir: str,
    checkpoint: CheckpointConfig = CheckpointConfig(),
    evaluation: Evaluation | None = None,
    guard: guards.GuardConfig = guards.GuardConfig(),
    log_every_steps: int = 10,
    num_microbatches: int = 1,
    seed: int = 0,
    stop_at_step: int | None = None,
    allow_resume_changes: Sequence[str] = (),
    drills: guards.FaultDrills = guards.FaultDrills(),
    peak_flops_per_device: float | None = None,
    initial_checkpoint: str | None = None,
    reference_checkpoint: str | None = None,
    compilation_cache_dir: str | None = launch.COMPILATION_CACHE_DIR,
) -> RunSummary:
    """Trains `model` (a model/families.py model) on `data` for `train_steps` steps on the mesh of
    `mesh_config` with `optimizer` (a optimizers.Optimizer); returns the run's summary.

    Everything is checked before anything in `model_dir` is written; a second trainer on
    the same `model_dir` is refused. `stop_at_step`: stop with a checkpoint there (the
    schedule still spans `train_steps`). `allow_resume_changes`: identity fields
    ("schedule.train_steps", "optimizer", ...) that may differ from the checkpoint's.
    `peak_flops_per_device`: MFU's peak for a device hardware.DEVICE_SPECS lacks.
    `initial_checkpoint`: a new run starts from these parameters (fine-tuning).
    `reference_checkpoint`: a model with a frozen reference (DoReMi's proxy) reads the
    reference's parameters from this checkpoint (another run's) when the run starts.
    `compilation_cache_dir`: jax's persistent compilation cache ({model_dir}: this run's
    directory; None: off), read back when the run restarts (launch.compilation_cache).
    """
    _check_run(train_steps, log_every_steps, num_microbatches, data.batch_size)
    launch.start_devices(mesh_config)
    mesh, rules = launch.mesh_for(mesh_config)
    form, data, rows = _check_setup(model, data, mesh, rules, num_microbatches, evaluation)
    identity = _run_identity(model, data, optimizer, train_steps, num_microbatches, seed)
    ckpt_dir = rundir.join(model_dir, "checkpoints")
    resuming = _check_checkpoints(ckpt_dir, identity, allow_resume_changes, initial_checkpoint,
                                  lambda: partitioning.abstract_sharded(model.make_module,
                                                                        mesh, rules)[1])
    source = data_source(data, form,
                         train_steps + guard.reserve_batches(checkpoint.save_every_steps), rows)

    with guards.RunLock(model_dir), guards.PreemptionWatcher() as watcher, \
            launch.compilation_cache(compilation_cache_dir, model_dir):
        config_text = _write_operative_config(model_dir)
        data_iter = _open_data(source, resuming)
        with contextlib.closing(data_iter), checkpoints.CheckpointManager(
                ckpt_dir, save_interval_steps=checkpoint.save_every_steps,
                max_to_keep=checkpoint.keep, async_save=checkpoint.async_save) as ckpt:
            graphdef, state, restored = train_state.init_or_restore(
                model, optimizer.tx, mesh, rules, seed, ckpt, data_iterator=data_iter,
                initial_checkpoint=initial_checkpoint,
                reference_checkpoint=reference_checkpoint)
            run = (restored.run or {}) if restored else {}
            guards.check_resume(run.get("identity"), identity, allow_resume_changes)
            start_step = _resumed_at(restored, train_steps, model_dir)
            data_iter.start()  # resumed: from the restored step, while the step compiles
            train_step, evaluator = _compile(model, optimizer, mesh, rules, graphdef, state,
                                             num_microbatches, evaluation, data)
            loop = loop_lib.TrainLoop(
                train_step=train_step, state=state, data_iter=data_iter, mesh=mesh,
                rows=rows, key=jax.random.key(seed), ckpt=ckpt,
                writer=metrics.create_writer(model_dir, enabled=jax.process_index() == 0),
                meter=_make_meter(model, data, mesh, peak_flops_per_device),
                guards=guards.LossGuards(guard, run.get("guards")), drills=drills,
                evaluator=evaluator, run_item={"identity": identity}, config_text=config_text,
                train_steps=train_steps, log_every=log_every_steps,
                eval_every=evaluation.every_steps if evaluation else 1, step=start_step)
            with jax.set_mesh(mesh), contextlib.closing(loop.writer):
                loop.compile_step(source.feature_lengths, data.batch_size)
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


def _open_data(source, resuming: bool):
    """The run's data iterator. A new run's data workers start at once, at step 0, while
    the model initialises; a resumed run's start once the restore has set their step."""
    data_iter = source.iterator()
    if not resuming:
        data_iter.start()
    return data_iter


def _compile(model, optimizer, mesh, rules, graphdef, state, num_microbatches: int,
             evaluation: Evaluation | None, data: DataConfig):
    """The jitted train step and the evaluator (None when evaluation is off)."""
    state_sharding = train_state.state_shardings(state)
    train_step = train_state.make_train_step(
        graphdef, model.loss_fn, optimizer.schedule, num_microbatches=num_microbatches,
        state_sharding=state_sharding, batch_sharding=partitioning.batch_sharding(mesh),
        rules=rules, after_update=model.after_update if model.updates_state else None)
    evaluator = None if evaluation is None else evaluation.evaluator(
        model, graphdef, state_sharding, mesh, rules, data.mixture_or_task_name,
        data.task_feature_lengths)
    return train_step, evaluator


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
             model.data_form(lengths).name, step_flops.palm, step_flops.maxtext, peak)
    return metrics.StepMeter(step_flops, data.batch_size * model.tokens_per_example(lengths),
                             mesh.size, peak)


def main(argv: Sequence[str] | None = None) -> RunSummary:
    return launch.run("t5x_like.training.train.train", argv)
