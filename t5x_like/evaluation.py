"""Per-domain evaluation: loss, token accuracy and bits per character.

`Evaluator` runs inside training (before the first step, every N steps, after the last);
`python -m t5x_like.eval --gin_file=...` runs `evaluate` alone on the newest checkpoint
of MODEL_DIR. Windows over each domain's validation stream come from bpc.py; every token
of the stream is scored exactly once, so

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


def evaluate(*, model, mesh_config, optimizer, model_dir: str, evaluation: EvalConfig,
             seed: int = 0) -> dict[str, Any]:
    """Evaluates the newest checkpoint in `model_dir` on every domain; prints a table."""
    launch.start_devices(mesh_config)
    mesh, rules = launch.mesh_for(mesh_config)
    directory = os.path.join(model_dir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No checkpoints at {directory}; train first or set MODEL_DIR to a directory a "
            "training run wrote.")
    with checkpoints.CheckpointManager(directory) as ckpt:
        graphdef, state, restored = trainer.init_or_restore(
            model, optimizer.tx, mesh, rules, seed, ckpt)
    if restored is None:
        raise FileNotFoundError(
            f"{directory} holds no finished checkpoint; train first or set MODEL_DIR to a "
            "directory a training run wrote.")
    evaluator = Evaluator.create(model, graphdef, trainer.state_shardings(state), mesh, rules,
                                 evaluation)
    with jax.set_mesh(mesh):
        results = evaluator.run(state, restored.step)
    print(f"step {restored.step} of {model_dir}")
    print(metrics.format_eval_table({"": results}))
    return {"step": restored.step, "results": results}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return launch.run("t5x_like.evaluation.evaluate", argv, prog="python -m t5x_like.eval")
