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

from t5x_like import bpc, checkpoints, launch, loader, metrics, partitioning, trainer

log = logging.getLogger("t5x_like.eval")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Per-domain evaluation (loss, token accuracy, bits per character).

    Runs before the first step, every `every_steps` and after the last step, over the
    `{domain}_validation` tasks, in windows of `window` tokens moved by `stride`
    (the reference setting is 1900/512; the demos use less). `max_documents` and
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

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError(
                f"EvalConfig.every_steps={self.every_steps} must be ≥ 1 (to turn evaluation "
                "off: evaluation.EvalConfig.enabled = False).")
        if self.batch_size < 1:
            raise ValueError(f"EvalConfig.batch_size={self.batch_size} must be ≥ 1.")
        if not 0 < self.stride <= self.window:
            raise ValueError(
                f"EvalConfig: need 0 < stride <= window so that windows leave no gap; got "
                f"window={self.window}, stride={self.stride} (EVAL_WINDOW, EVAL_STRIDE).")


@dataclasses.dataclass
class Evaluator:
    """Jitted eval step + the fixed BPC windows of each domain."""

    streams: Mapping[str, bpc.BpcEval]
    eval_step: Any
    form: str  # the model's bpc_form
    batch_size: int
    mesh: Any
    last_seconds: float = 0.0  # wall time of the latest run

    @staticmethod
    def check_batch_size(batch_size: int, mesh) -> None:
        """Every process takes an equal slice of each eval batch, sharded over the batch
        axes: the batch must divide both ways."""
        ways = math.lcm(partitioning.num_batch_shards(mesh), jax.process_count())
        if batch_size % ways:
            raise ValueError(
                f"evaluation.EvalConfig.batch_size={batch_size} is not a multiple of {ways} "
                f"(the mesh's batch shards and {jax.process_count()} processes split it); "
                f"set --gin.evaluation.EvalConfig.batch_size={ways * max(1, batch_size // ways)}.")

    @classmethod
    def create(cls, model, graphdef, state_sharding, mesh, rules, cfg: EvalConfig) -> Evaluator:
        """Reads and tokenizes the `{domain}_validation` tasks once (their module must be
        imported: the shipped gin files import `tasks`)."""
        cls.check_batch_size(cfg.batch_size, mesh)
        streams = {
            domain: bpc.load_bpc_eval(f"{domain}_validation", window=cfg.window,
                                      stride=cfg.stride, max_documents=cfg.max_documents,
                                      max_tokens=cfg.max_tokens)
            for domain in cfg.domains}
        step = trainer.make_eval_step(graphdef, model.loss_fn, state_sharding=state_sharding,
                                      batch_sharding=partitioning.batch_sharding(mesh),
                                      rules=rules)
        return cls(streams, step, model.bpc_form, cfg.batch_size, mesh)

    def run(self, state, step: int, writer=None) -> dict[str, dict[str, float]]:
        """{domain: {loss, accuracy, bpc, tokens, chars}}; also written to `writer`."""
        start = time.perf_counter()
        results = {}
        process, count = jax.process_index(), jax.process_count()
        rows = self.batch_size // count
        for domain, stream in self.streams.items():
            totals = None
            for batch in stream.batches(self.batch_size, self.form):
                local = {k: v[process * rows:(process + 1) * rows] for k, v in batch.items()}
                sums = self.eval_step(state, loader.to_global_batch(local, self.mesh))
                totals = trainer.accumulate(totals, sums)
            summary = trainer.summarize_eval(jax.device_get(totals))
            results[domain] = {
                "loss": summary["nll"],
                "accuracy": summary["accuracy"],
                "bpc": bpc.bits_per_character(summary["nll_sum"], stream.total_chars),
                "tokens": int(summary["weight_sum"]),
                "chars": stream.total_chars,
            }
        if writer is not None:
            writer.write_scalars(step, {f"eval/{d}/{k}": v for d, r in results.items()
                                        for k, v in r.items() if k in ("loss", "accuracy", "bpc")})
        self.last_seconds = time.perf_counter() - start
        log.info("eval at step %d (%.1fs): %s", step, self.last_seconds,
                 "  ".join(f"{d} bpc {r['bpc']:.3f} loss {r['loss']:.3f}"
                           for d, r in results.items()))
        return results


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
                "'specific' (--gin.evaluation.RestoreCheckpointConfig.mode=\"'all'\").")
        if (self.mode == "specific") != bool(self.steps):
            raise ValueError(
                f"RestoreCheckpointConfig: mode={self.mode!r} with steps={self.steps}; "
                "steps go with mode 'specific' and only with it (e.g. "
                "--gin.evaluation.RestoreCheckpointConfig.steps=[50,300]).")

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
             seed: int = 0, restore: RestoreCheckpointConfig = RestoreCheckpointConfig(),
             batch_size: int | None = None,
             task_feature_lengths: Mapping[str, int] | None = None,
             output_dir: str | None = None) -> dict[str, Any]:
    """Evaluates checkpoints of `model_dir` on every domain (the newest one, or those
    `restore` selects); prints the tables and writes the BPC of every evaluated step
    as JSON and a PNG chart to `output_dir` (default `model_dir/eval`).

    `batch_size` and `task_feature_lengths` are the training run's (gin binds them to
    BATCH_SIZE and TASK_FEATURE_LENGTHS): with them each step also gets its training
    FLOPs, step x `model.train_flops_per_step`, and the chart a FLOPs axis.
    """
    launch.start_devices(mesh_config)
    mesh, rules = launch.mesh_for(mesh_config)
    directory = os.path.join(model_dir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No checkpoints at {directory}; train first or set MODEL_DIR to a directory a "
            "training run wrote.")
    step_flops = (model.train_flops_per_step(batch_size, task_feature_lengths)
                  if batch_size and task_feature_lengths else None)
    points = []
    with checkpoints.CheckpointManager(directory) as ckpt:
        steps = restore.select(ckpt.all_steps(), directory)
        graphdef, target = trainer.abstract_train_state(model, optimizer.tx, mesh, rules)
        evaluator = Evaluator.create(model, graphdef, trainer.state_shardings(target), mesh,
                                     rules, evaluation)
        if restore.include_init:
            _, initial, _ = trainer.init_or_restore(model, optimizer.tx, mesh, rules, seed)
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
            points, output_dir or os.path.join(model_dir, "eval"),
            title=(f"{os.path.basename(os.path.normpath(model_dir))}: {type(model).__name__}, "
                   f"{model.num_params:,} parameters; BPC per domain"),
            about={"model_dir": model_dir, "model": type(model).__name__,
                   "num_params": model.num_params, "eval": _describe(evaluation),
                   "batch_size": batch_size,
                   "task_feature_lengths": dict(task_feature_lengths or {})})
        if len(points) > 1:
            print(metrics.format_bpc_by_step(points))
        print(f"BPC by checkpoint: {curve['json']}  chart: {curve['png']}")
    return {"step": points[-1]["step"], "results": points[-1]["domains"],
            "checkpoints": points, "files": curve}


def _evaluate_state(evaluator: Evaluator, mesh, state, step: int, model_dir: str,
                    step_flops) -> dict[str, Any]:
    with jax.set_mesh(mesh):
        results = evaluator.run(state, step)
    print(f"step {step} of {model_dir}")
    print(metrics.format_eval_table({"": results}))
    return metrics.eval_point(step, results, step_flops)


def _describe(cfg: EvalConfig) -> dict[str, Any]:
    return {"window": cfg.window, "stride": cfg.stride, "max_documents": cfg.max_documents,
            "max_tokens": cfg.max_tokens, "domains": list(cfg.domains)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return launch.run("t5x_like.evaluation.evaluate", argv, prog="python -m t5x_like.eval")
