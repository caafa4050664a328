"""Per-domain evaluation: loss, token accuracy and bits per character.

`Evaluator` runs inside training (before the first step, every N steps, after the last);
`python -m t5x_like.eval --gin_file=...` runs `evaluate` alone on the newest checkpoint
of MODEL_DIR, or on every one of them (`RestoreCheckpointConfig`, as T5X selects
checkpoints): compression as a benchmark, BPC per domain against training step and
training FLOPs, written as JSON and a chart. Windows over each domain's validation
stream come from bpc.py; every token of the stream is scored exactly once, so

  BPC = Σ nll (nats) / (characters · ln 2)        (docs/FORMULAS.md, "Bits per character")

and loss / accuracy are the token-weighted means over the same scored tokens. The
z-loss is a training regulariser and is left out of BPC.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import seqio
from flax import nnx

from t5x_like import launch
from t5x_like.data import forms, mixtures, vocabulary
from t5x_like.evaluation import bpc
from t5x_like.evaluation import predict
from t5x_like.model import partitioning
from t5x_like.model.decoding import DecodeConfig
from t5x_like.objectives import preference
from t5x_like.training import checkpoints, loader, metrics, rundir, train_state

DEFAULT_EVAL_ROWS = 16  # eval rows per step when EvalConfig.batch_size is unset
log = logging.getLogger("t5x_like.eval")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate (gin: evaluate.EvalConfig); in training before the first step,
    every `every_steps` and after the last step.

    tasks: SeqIO tasks or mixtures evaluated on `split` (at most `max_examples` each):
      the loss of their targets, bits per character where the examples carry their text
      (`targets_pretokenized`), and each task's own metric_fns (predict metrics decode
      with `decode`). None: the run's own MIXTURE_OR_TASK_NAME; () none.
    bpc_tasks: text streams (one example per document, `targets` and `num_chars`, as the
      shipped `{domain}_validation` tasks) scored in windows of `window` tokens moved
      by `stride`, every token once: the reference BPC (1900 / 512; the demos use
      less). A list of task names, or {label: task name} to report them under shorter
      names (the demos: {'code': 'code_validation', ...}). `max_documents` /
      `max_tokens` cap each stream at whole documents.
    batch_size: rows (examples or windows) per eval step, a multiple of the mesh's
      batch shards. Default (None): the smallest such multiple of at least 16
      (`rows_per_batch`), so every mesh preset evaluates as set.
    """

    every_steps: int = 100
    tasks: Sequence[str] | None = None
    split: str = "validation"
    max_examples: int | None = None
    bpc_tasks: Sequence[str] | Mapping[str, str] = ()
    window: int = 1900
    stride: int = 512
    max_documents: int | None = None
    max_tokens: int | None = None
    batch_size: int | None = None
    decode: DecodeConfig = DecodeConfig()
    enabled: bool = True

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError(
                f"EvalConfig.every_steps={self.every_steps} must be ≥ 1 (to turn evaluation "
                "off: evaluate.EvalConfig.enabled = False).")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"EvalConfig.batch_size={self.batch_size} must be ≥ 1.")
        if not 0 < self.stride <= self.window:
            raise ValueError(
                f"EvalConfig: need 0 < stride <= window so that windows leave no gap; got "
                f"window={self.window}, stride={self.stride} (EVAL_WINDOW, EVAL_STRIDE).")

    def check(self, mesh) -> None:
        """Before a training run writes anything: the eval batch splits over `mesh`."""
        if self.enabled:
            self.rows_per_batch(partitioning.num_batch_shards(mesh))

    def rows_per_batch(self, batch_shards: int) -> int:
        """`batch_size`, or when unset the smallest multiple of the mesh's batch shards
        of at least 16; an error if the batch does not split over them."""
        if self.batch_size is None:
            return batch_shards * math.ceil(DEFAULT_EVAL_ROWS / batch_shards)
        if self.batch_size % batch_shards:
            raise ValueError(
                f"evaluate.EvalConfig.batch_size={self.batch_size} is not a multiple of "
                f"{batch_shards}, the mesh's batch shards; set "
                f"--gin.evaluate.EvalConfig.batch_size="
                f"{batch_shards * max(1, self.batch_size // batch_shards)}, or leave it unset.")
        return self.batch_size

    def evaluator(self, model, graphdef, state_sharding, mesh, rules,
                  mixture_or_task_name: str, task_feature_lengths: Mapping[str, int]
                  ) -> Evaluator | None:
        """The evaluator a training run calls every `every_steps` (None when disabled)."""
        if not self.enabled:
            return None
        return Evaluator.create(model, graphdef, state_sharding, mesh, rules, self,
                                mixture_or_task_name, task_feature_lengths)


@dataclasses.dataclass
class _TaskEval:
    """One task evaluated on its examples: loss and BPC by our scoring, its metric_fns
    by SeqIO's Evaluator (None when it has none)."""

    task: seqio.Task
    form: forms.DataForm
    seqio_evaluator: seqio.Evaluator | None


@dataclasses.dataclass
class Evaluator:
    """Jitted eval step + BPC windows of each stream, and the tasks' example evaluation."""

    streams: Mapping[str, bpc.BpcEval]
    eval_step: Any
    form: str  # the model's bpc_form
    batch_size: int
    mesh: Any
    rows: partitioning.ProcessRows  # this process's rows of every eval batch
    graphdef: Any  # the train state's
    inference: predict.Inference
    tasks: Sequence[_TaskEval]
    task_feature_lengths: Mapping[str, int]
    config: EvalConfig
    last_seconds: float = 0.0  # wall time of the latest run

    @classmethod
    def create(cls, model, graphdef, state_sharding, mesh, rules, cfg: EvalConfig,
               mixture_or_task_name: str, task_feature_lengths: Mapping[str, int]) -> Evaluator:
        """Reads and tokenizes the BPC streams once and sets up each task's evaluation
        (their modules must be imported: the shipped gin files import `tasks`)."""
        batch_size = cfg.rows_per_batch(partitioning.num_batch_shards(mesh))
        form = model.data_form(task_feature_lengths)
        if not form.text and cfg.bpc_tasks:
            raise ValueError(
                f"{type(model).__name__} scores preference pairs, not text: it has no BPC. "
                "Set EVAL_BPC_TASKS = [] (evaluate.EvalConfig.bpc_tasks) for this run.")
        labelled = (cfg.bpc_tasks if isinstance(cfg.bpc_tasks, Mapping)
                    else {name: name for name in cfg.bpc_tasks})
        streams = {
            label: bpc.load_bpc_eval(name, window=cfg.window, stride=cfg.stride,
                                     max_documents=cfg.max_documents, max_tokens=cfg.max_tokens)
            for label, name in labelled.items()}
        step = train_state.make_eval_step(graphdef, model.loss_fn, state_sharding=state_sharding,
                                      batch_sharding=partitioning.batch_sharding(mesh),
                                      rules=rules)
        names = [mixture_or_task_name] if cfg.tasks is None else list(cfg.tasks)
        tasks = [_TaskEval(task, form, _seqio_evaluator(task, form, cfg,
                                                             task_feature_lengths))
                 for name in names for task in mixtures.leaf_tasks(name)
                 if cfg.split in task.splits]
        module_graphdef, _ = nnx.split(nnx.eval_shape(model.make_module))
        decode = cfg.decode
        if form.text:  # the special ids of the vocabulary of the tasks that decode
            decode = predict.decode_for_tasks(
                decode, [t.task for t in tasks if t.seqio_evaluator is not None])
        inference = predict.Inference(model, mesh, rules, module_graphdef, decode,
                                      batch_size)
        return cls(streams, step, model.bpc_form, batch_size, mesh,
                   partitioning.process_rows(mesh, batch_size), graphdef, inference,
                   tasks, dict(task_feature_lengths), cfg)

    def run(self, state, step: int, writer=None) -> dict[str, dict[str, float]]:
        """{name: {loss, bpc, ..., and for streams accuracy, tokens, chars; for tasks their
        metrics}}; also written to `writer` as eval/<name>/<metric>."""
        start = time.perf_counter()
        results = {name: self._run_stream(state, stream)
                   for name, stream in self.streams.items()}
        params = train_state.params_of(self.graphdef, state)
        for task_eval in self.tasks:
            results[task_eval.task.name] = (
                self._run_pairs(state, task_eval) if not task_eval.form.text
                else self._run_task(params, task_eval, step))
        if writer is not None:
            writer.write_scalars(step, {f"eval/{name}/{k}": v for name, r in results.items()
                                        for k, v in r.items() if k not in ("tokens", "chars")})
        self.last_seconds = time.perf_counter() - start
        log.info("eval at step %d (%.1fs): %s", step, self.last_seconds,
                 "  ".join(f"{name} " + " ".join(f"{k} {v:.3f}" for k, v in r.items()
                                                 if k in ("bpc", "loss"))
                           for name, r in results.items()))
        return results

    def _run_stream(self, state, stream: bpc.BpcEval) -> dict[str, float]:
        totals = None
        for batch in stream.batches(self.batch_size, self.form):
            sums = self.eval_step(state, self._global(batch))
            totals = train_state.accumulate(totals, sums)
        summary = train_state.summarize_eval(jax.device_get(totals))
        return {"loss": summary["nll"], "accuracy": summary["accuracy"],
                "bpc": bpc.bits_per_character(summary["nll_sum"], stream.total_chars),
                "tokens": int(summary["weight_sum"]), "chars": stream.total_chars}

    def _global(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """An eval batch (the same in every process) as global arrays: each process
        places the rows its devices hold."""
        return loader.to_global_batch({k: self.rows.take(v) for k, v in batch.items()},
                                      self.mesh, self.rows)

    def _run_pairs(self, state, task_eval: _TaskEval) -> dict[str, float]:
        """A preference task: the model's own loss over its pairs and pairwise accuracy,
        overall and per rating level (preference.summarize_pairs)."""
        totals = None
        for batch, _ in predict.example_batches(
                task_eval.task, self.task_feature_lengths, self.config.split,
                task_eval.form, self.batch_size, self.config.max_examples):
            totals = train_state.accumulate(totals, self.eval_step(state, self._global(batch)))
        if totals is None:
            raise ValueError(f"Preference task {task_eval.task.name!r} has no examples in "
                             f"split {self.config.split!r}; evaluate another split or task.")
        return preference.summarize_pairs(jax.device_get(totals))

    def _run_task(self, params, task_eval: _TaskEval, step: int) -> dict[str, float]:
        """Loss (and BPC) of the targets by scoring every example; the task's metrics."""
        nll, tokens, chars = 0.0, 0, 0
        for batch, examples in predict.example_batches(
                task_eval.task, self.task_feature_lengths, self.config.split,
                task_eval.form, self.batch_size, self.config.max_examples):
            nll -= float(np.sum(self.inference.score(params, batch)[:len(examples)]))
            tokens += int(np.sum(batch["decoder_loss_weights"][:len(examples)] != 0))
            chars += sum(len(t) for t in (_target_text(e) for e in examples) if t is not None)
        out = {"loss": nll / max(tokens, 1), "tokens": tokens}
        if chars:
            out.update(bpc=bpc.bits_per_character(nll, chars), chars=chars)
        if task_eval.seqio_evaluator is not None:
            out.update(self._seqio_metrics(params, task_eval, step))
        return out

    def _seqio_metrics(self, params, task_eval: _TaskEval, step: int) -> dict[str, float]:
        """The task's metric_fns, by SeqIO's Evaluator over our predict and score."""

        def batches(ds):
            rows = list(ds.as_numpy_iterator())
            for first in range(0, len(rows), self.batch_size):
                chunk = rows[first:first + self.batch_size]
                yield [i for i, _ in chunk], predict.stack_rows(
                    [features for _, features in chunk], self.batch_size)

        def predict_fn(ds, model_feature_shapes=None):
            return [(i, tokens.tolist()) for indices, batch in batches(ds)
                    for i, tokens in zip(indices, self.inference.predict(params, batch)["tokens"])]

        def score_fn(ds, model_feature_shapes=None):
            return [(i, float(score)) for indices, batch in batches(ds)
                    for i, score in zip(indices, self.inference.score(params, batch))]

        future, _ = task_eval.seqio_evaluator.evaluate(
            compute_metrics=True, step=step, predict_fn=predict_fn, score_fn=score_fn)
        metrics_out = future.result().get(task_eval.task.name, {})
        return {k: float(getattr(v, "value", v)) for k, v in metrics_out.items()}


def _target_text(example: Mapping[str, Any]) -> str | None:
    value = example.get("targets_pretokenized")
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _seqio_evaluator(task: seqio.Task, form: forms.DataForm, cfg: EvalConfig,
                     task_feature_lengths: Mapping[str, int]) -> seqio.Evaluator | None:
    """SeqIO's Evaluator of one task with metric_fns (None without any)."""
    if not (task.predict_metric_fns or task.score_metric_fns
            or task.predict_with_aux_metric_fns):
        return None
    zero_is_token = not vocabulary.zero_is_padding(task.output_features["targets"].vocabulary)
    return seqio.Evaluator(task.name, feature_converter=form.converter(False, zero_is_token),
                           eval_split=cfg.split, sequence_length=dict(task_feature_lengths),
                           num_examples=cfg.max_examples, async_compute_metrics=False)


@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
    """Which checkpoints of MODEL_DIR `python -m t5x_like.eval` evaluates (the modes of
    T5X's `utils.RestoreCheckpointConfig`): "latest" (the newest good one; a damaged
    newest one is moved aside as in training), "all" (every step in
    `MODEL_DIR/checkpoints`, oldest first) or "specific" (the steps in `steps`).
    `include_init`: also evaluate, as step 0, the parameters training starts from
    (initialised from SEED exactly as `train` does; no checkpoint holds them).
    """

    mode: str = "latest"
    steps: Sequence[int] | None = None
    include_init: bool = False

    def __post_init__(self):
        if self.mode not in ("latest", "all", "specific"):
            raise ValueError(
                f"RestoreCheckpointConfig.mode={self.mode!r}; expected 'latest', 'all' or "
                "'specific' (--gin.evaluate.RestoreCheckpointConfig.mode=\"'all'\").")
        if (self.mode == "specific") != bool(self.steps):
            raise ValueError(
                f"RestoreCheckpointConfig: mode={self.mode!r} with steps={self.steps}; "
                "steps go with mode 'specific' and only with it (e.g. "
                "--gin.evaluate.RestoreCheckpointConfig.steps=[50,300]).")

    def select(self, available: Sequence[int], directory: str) -> list[int]:
        """The steps to evaluate, oldest first ("latest": the newest only)."""
        if not available:
            raise FileNotFoundError(
                f"{directory} holds no finished checkpoint; train first or set MODEL_DIR to "
                "a directory a training run wrote.")
        if self.mode == "all":
            return sorted(available)
        if self.mode == "latest":
            return [max(available)]
        missing = sorted(set(self.steps) - set(available))
        if missing:
            raise FileNotFoundError(
                f"RestoreCheckpointConfig.steps names {missing}, not in {directory} (it has "
                f"{sorted(available)}); pick from those or use mode 'all'.")
        return sorted(set(self.steps))


def _restore(ckpt, step: int, target, mode: str):
    """The checkpoint at `step` (a damaged one: with mode "latest" the previous one, as
    training resumes; otherwise None, reported and skipped, nothing moved)."""
    if mode == "latest":
        return ckpt.restore_latest(target)
    try:
        return ckpt.restore(step, target)
    except checkpoints.DamagedCheckpointError as e:
        log.warning("skipping checkpoint %d: %s", step, str(e).splitlines()[0][:400])
        return None


def evaluate(*, model, mesh_config, optimizer, model_dir: str, evaluation: EvalConfig,
             mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
             seed: int = 0, restore: RestoreCheckpointConfig = RestoreCheckpointConfig(),
             batch_size: int | None = None, output_dir: str | None = None,
             compilation_cache_dir: str | None = launch.COMPILATION_CACHE_DIR) -> dict[str, Any]:
    """Evaluates checkpoints of `model_dir` (the newest one, or those `restore` selects;
    EvalConfig says on what); prints the tables and writes the results of every evaluated
    step, with BPC per domain as a PNG chart, to `output_dir` (default `model_dir/eval`).

    `batch_size` is the training run's (gin binds it to BATCH_SIZE): with it each step
    also gets its training FLOPs, step x `model.train_flops_per_step`, and the chart a
    FLOPs axis. `compilation_cache_dir`: jax's persistent compilation cache, as training's
    (the run's by default: a second evaluation reads its compiled steps back).
    """
    launch.start_devices(mesh_config)
    mesh, rules = launch.mesh_for(mesh_config)
    directory = rundir.join(model_dir, "checkpoints")
    if not rundir.isdir(directory):
        raise FileNotFoundError(
            f"No checkpoints at {directory}; train first or set MODEL_DIR to a directory a "
            "training run wrote.")
    step_flops = (model.train_flops_per_step(batch_size, task_feature_lengths)
                  if batch_size and task_feature_lengths else None)
    points = []
    with checkpoints.CheckpointManager(directory) as ckpt, \
            launch.compilation_cache(compilation_cache_dir, model_dir):
        steps = restore.select(ckpt.all_steps(), directory)
        graphdef, target = train_state.abstract_train_state(model, optimizer.tx, mesh, rules)
        evaluator = Evaluator.create(model, graphdef, train_state.state_shardings(target), mesh,
                                     rules, evaluation, mixture_or_task_name,
                                     task_feature_lengths)
        if restore.include_init:
            _, initial, _ = train_state.init_or_restore(model, optimizer.tx, mesh, rules, seed)
            points.append(_evaluate_state(evaluator, mesh, initial, 0, model_dir, step_flops))
            del initial
        for step in steps:
            restored = _restore(ckpt, step, target, restore.mode)
            if restored is not None:
                points.append(_evaluate_state(evaluator, mesh, restored.state, restored.step,
                                              model_dir, step_flops))
    if not points:
        raise FileNotFoundError(f"no checkpoint of {directory} could be read (see the "
                                "warnings above); nothing was evaluated.")
    curve = None
    if jax.process_index() == 0:  # one writer in a multi-process run, as for metrics
        curve = metrics.write_bpc_curve(
            points, output_dir or rundir.join(model_dir, "eval"),
            title=(f"{os.path.basename(os.path.normpath(model_dir))}: {type(model).__name__}, "
                   f"{model.num_params:,} parameters; BPC per domain"),
            about={"model_dir": model_dir, "model": type(model).__name__,
                   "num_params": model.num_params, "eval": _describe(evaluation),
                   "batch_size": batch_size,
                   "task_feature_lengths": dict(task_feature_lengths)})
        if len(points) > 1:
            print(metrics.format_bpc_by_step(points))
        print(f"BPC by checkpoint: {curve['json']}  chart: {curve['png']}")
    return {"step": points[-1]["step"], "results": points[-1]["results"],
            "checkpoints": points, "files": curve}


def _evaluate_state(evaluator: Evaluator, mesh, state, step: int, model_dir: str,
                    step_flops) -> dict[str, Any]:
    with jax.set_mesh(mesh):
        results = evaluator.run(state, step)
    print(f"step {step} of {model_dir}")
    print(metrics.format_eval_table({"": results}))
    return metrics.eval_point(step, results, step_flops)


def _describe(cfg: EvalConfig) -> dict[str, Any]:
    return {"tasks": None if cfg.tasks is None else list(cfg.tasks), "split": cfg.split,
            "max_examples": cfg.max_examples, "bpc_tasks": _jsonable(cfg.bpc_tasks),
            "window": cfg.window, "stride": cfg.stride, "max_documents": cfg.max_documents,
            "max_tokens": cfg.max_tokens}


def _jsonable(tasks: Sequence[str] | Mapping[str, str]) -> list[str] | dict[str, str]:
    return dict(tasks) if isinstance(tasks, Mapping) else list(tasks)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return launch.run("t5x_like.evaluation.evaluate.evaluate", argv, prog="python -m t5x_like.eval")
