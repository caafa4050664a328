"""Per-domain evaluation: loss, token accuracy and bits per character.

`Evaluator` runs inside training (before the first step, every N steps, after the last);
`python -m t5x_like.eval --gin_file=...` runs it alone on the newest checkpoint of
MODEL_DIR. Windows over each domain's validation stream come from bpc.py; every token
of the stream is scored exactly once, so

  BPC = Σ nll (nats) / (characters · ln 2)        (SPEC section 4)

and loss / accuracy are the token-weighted means over the same scored tokens. The
z-loss is a training regulariser and is left out of BPC.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("t5x_like.eval")


@dataclasses.dataclass
class Evaluator:
    """Jitted eval step + the fixed BPC windows of each domain."""

    streams: Mapping[str, Any]  # domain -> bpc.BpcEval
    eval_step: Any
    form: str  # "encdec" or "decoder"
    batch_size: int
    mesh: Any
    last_seconds: float = 0.0  # wall time of the latest run

    @classmethod
    def create(cls, model, graphdef, state_sharding, mesh, rules, cfg,
               converter: str) -> Evaluator:
        """cfg: train.EvalConfig. Reads and tokenizes the validation tasks once."""
        import math

        import jax

        import tasks  # noqa: F401 - registers the {domain}_validation tasks
        from t5x_like import bpc, loader, trainer

        # Every process takes an equal slice of each batch, sharded over the batch axes.
        ways = math.lcm(loader.num_batch_shards(mesh), jax.process_count())
        if cfg.batch_size % ways:
            raise ValueError(
                f"train.EvalConfig.batch_size={cfg.batch_size} is not a multiple of {ways} "
                f"(the mesh's batch shards and {jax.process_count()} processes split it); "
                f"set --gin.train.EvalConfig.batch_size={ways * max(1, cfg.batch_size // ways)}.")

        streams = {}
        for domain in cfg.domains:
            streams[domain] = bpc.load_bpc_eval(
                f"{domain}_validation", window=cfg.window, stride=cfg.stride,
                max_documents=cfg.max_documents, max_tokens=cfg.max_tokens)
        step = trainer.make_eval_step(graphdef, model.loss_fn, state_sharding=state_sharding,
                                      batch_sharding=loader.batch_sharding(mesh), rules=rules)
        form = "encdec" if converter == "encdec" else "decoder"
        return cls(streams, step, form, cfg.batch_size, mesh)

    def run(self, state, step: int, writer=None) -> dict[str, dict[str, float]]:
        """{domain: {loss, accuracy, bpc, tokens, chars}}; also written to `writer`."""
        import jax

        from t5x_like import bpc, loader, trainer

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


def evaluate(*, model, mesh_config, optimizer, model_dir: str, evaluation,
             task_feature_lengths: Mapping[str, int], seed: int = 0) -> dict[str, Any]:
    """Evaluates the newest checkpoint in `model_dir` on every domain; prints a table."""
    import jax

    from t5x_like import checkpoints, train as train_lib, trainer

    train_lib._use_cpu_devices(mesh_config.num_devices)  # noqa: SLF001 - same process set-up
    train_lib.check_device_count(mesh_config)
    directory = os.path.join(model_dir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No checkpoints at {directory}; train first or set MODEL_DIR to a directory a "
            "training run wrote.")
    mesh = mesh_config.make_mesh()
    rules = mesh_config.rule_set()
    with checkpoints.CheckpointManager(directory) as ckpt:
        graphdef, state, step = train_lib.init_or_restore(
            model, optimizer.tx, mesh, rules, seed, ckpt)
    if step is None:
        raise FileNotFoundError(
            f"{directory} holds no finished checkpoint; train first or set MODEL_DIR to a "
            "directory a training run wrote.")
    converter = train_lib.converter_for(model, task_feature_lengths)
    evaluator = Evaluator.create(model, graphdef, trainer.state_shardings(state),
                                 mesh, rules, evaluation, converter)
    with jax.set_mesh(mesh):
        results = evaluator.run(state, step)
    print(f"step {step} of {model_dir}")
    print(f"{'domain':<14}{'BPC':>8}{'loss':>9}{'acc':>8}{'tokens':>9}{'chars':>10}")
    for domain, r in results.items():
        print(f"{domain:<14}{r['bpc']:>8.3f}{r['loss']:>9.4f}{r['accuracy']:>8.3f}"
              f"{r['tokens']:>9}{r['chars']:>10}")
    return {"step": step, "results": results}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import gin

    from t5x_like import train as train_lib

    train_lib.setup_process(train_lib.parse_flags(sys.argv[1:] if argv is None else argv))
    from t5x_like import eval as eval_lib  # the registered module, not __main__

    return gin.get_configurable(eval_lib.evaluate)()


if __name__ == "__main__":
    main()
