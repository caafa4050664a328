"""The training loop: steps, metrics, evaluation, checkpoints and the guards, in order.

`train.train` builds a `TrainLoop` from the run's parts and calls `run()`. Each
iteration dispatches one jitted step and then fetches the metrics of the step before
it, so the host never makes the device wait, yet every step's loss reaches the guards
(non-finite streak, loss spikes) one step later. Before anything that must see
finished steps (a log line, an evaluation, a checkpoint, a stop) the loop drains: it
fetches what is pending, so the metric lines of every step a checkpoint covers are
written (and flushed) before that checkpoint.

A stop request (SIGTERM, Ctrl-C, the multi-host preemption notice, or
`stop_at_step`) ends the loop after the current step with a checkpoint of the state and
the data iterator. A loss spike rewinds to the newest checkpoint at least
`spike_rewind_steps` before it and skips `spike_skip_batches` batches from there;
checkpoints of the abandoned steps are moved to `<checkpoints>/abandoned/`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from t5x_like import launch
from t5x_like.model import partitioning
from t5x_like.training import checkpoints, guards, loader, metrics

log = logging.getLogger("t5x_like.training.train")
ABANDONED_DIR = "abandoned"


def _mean_scalars(fetched: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means over a log window; the *_sum counters are for accumulation only; the
    rejected (non-finite) steps are counted, not averaged."""
    out = {k: float(np.mean([m[k] for m in fetched]))
           for k in fetched[-1] if not k.endswith("_sum") and k != "nonfinite"}
    out["nonfinite_steps"] = float(sum(m.get("nonfinite", 0.0) for m in fetched))
    return out


@dataclasses.dataclass
class TrainLoop:
    """Everything one training loop touches, and the loop itself (`run`)."""

    train_step: Any
    state: Any
    data_iter: Any
    mesh: Any
    rows: partitioning.ProcessRows  # which rows of each global batch data_iter gives
    key: jax.Array
    ckpt: checkpoints.CheckpointManager
    writer: Any
    meter: metrics.StepMeter
    guards: guards.LossGuards
    drills: guards.FaultDrills
    evaluator: Any  # evaluation.Evaluator or None
    run_item: Mapping[str, Any]  # saved in every checkpoint, with the guards' state
    config_text: str
    train_steps: int
    log_every: int
    eval_every: int
    step: int = 0
    losses: dict[int, float] = dataclasses.field(default_factory=dict)
    _window: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    _pending: list[tuple[int, Any, int]] = dataclasses.field(default_factory=list)

    # -- the loop --

    def run(self, last_step: int, watcher: guards.PreemptionWatcher) -> str | None:
        """Trains up to `last_step`; returns what stopped it early (None: it finished).

        `last_step` below `train_steps` is itself a requested stop (`stop_at_step`).
        """
        try:
            with metrics.progress_bar(last_step, self.step) as bar:
                while self.step < last_step:
                    if not self._dispatch():  # a spike sent the run back
                        bar.n = self.step
                        continue
                    bar.update(1)
                    if watcher.should_stop(self.step):
                        if self._drain():  # (after a rewind, its checkpoint is the save)
                            self._save(force=True)
                        return watcher.requested
                    self._after_step(last_step)
        except guards.RunStopped as e:
            if e.save_state:  # the metrics of every step, then the last good state
                self._window += jax.device_get([m for _, m, _ in self._pending])
                self._pending.clear()
                self._save(force=True)
            raise
        return None if last_step == self.train_steps else "stop_at_step"

    def _dispatch(self) -> bool:
        """Runs one step; fetches the one before. False if a loss spike rewound the run."""
        batch_index = int(self.data_iter.get_state()["next_index"])
        batch = loader.to_global_batch(next(self.data_iter), self.mesh, self.rows)
        self.state, step_metrics = self.train_step(self.state, batch, self.key,
                                                   self.drills.loss_scale(batch_index))
        self.step += 1
        compile_s = self.meter.step_done(step_metrics)
        if compile_s is not None:
            log.info("first step (compilation included) took %.1fs", compile_s)
        self._pending.append((self.step, step_metrics, batch_index))
        if len(self._pending) > 1:  # the step before: finished or nearly
            return self._fetch(self._pending.pop(0))
        return True

    def _after_step(self, last_step: int) -> None:
        due_log = self.step % self.log_every == 0 or self.step == last_step
        due_eval = self.evaluator is not None and self.step % self.eval_every == 0
        due_save = self.step % self.ckpt.save_interval_steps == 0 or self.step == last_step
        if due_log or (due_eval and self.step < last_step) or due_save:
            if not self._drain():
                return  # a spike rewound the run: nothing of this step is kept
        if due_log:
            self._log_window()
        if due_eval and self.step < last_step:
            self.evaluate()
        if due_save:
            self._save(force=self.step == last_step)

    # -- metrics and guards --

    def _fetch(self, pending: tuple[int, Any, int]) -> bool:
        """Brings one step's metrics to the host and through the guards. Returns False
        if a loss spike rewound the run."""
        step, step_metrics, batch_index = pending
        fetched = jax.device_get(step_metrics)
        self._window.append(fetched)
        self.losses[step] = float(fetched["loss"])
        spike = self.guards.observe(step, fetched)  # raises RunStopped after K NaN steps
        if spike is not None:
            self._rewind(spike, batch_index)  # forgets this step's metrics too
            return False
        return True

    def _drain(self) -> bool:
        while self._pending:
            if not self._fetch(self._pending.pop(0)):
                return False
        return True

    def _log_window(self) -> None:
        if not self._window:
            return
        scalars = {**_mean_scalars(self._window), **self.meter.window()}
        self.writer.write_scalars(self.step, {**{f"train/{k}": v for k, v in scalars.items()},
                                              **self.data_iter.scalars()})
        tqdm.tqdm.write(metrics.format_line(self.step, self.train_steps, scalars,
                                            self.meter.eta_s(self.train_steps - self.step)),
                        file=sys.stderr)
        self._window.clear()

    def compile_step(self, feature_lengths: Mapping[str, int], batch_size: int) -> None:
        """Compiles the train step for global batches of these features (int32 rows of
        these lengths, as `loader.to_global_batch` makes them) before the first rows
        arrive: jit compiles on the first call, which would wait for them first."""
        sharding = partitioning.batch_sharding(self.mesh)
        batch = {name: jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=sharding)
                 for name, length in feature_lengths.items()}
        with launch.compile_timer("train step"):
            self.train_step.lower(self.state, batch, self.key).compile()

    def evaluate(self) -> dict[str, dict[str, float]] | None:
        if self.evaluator is None:
            return None
        results = self.evaluator.run(self.state, self.step, self.writer)
        self.meter.exclude(self.evaluator.last_seconds)  # step time excludes evaluation
        return results

    # -- checkpoints --

    def _save(self, force: bool) -> None:
        self._log_window()  # the metric lines of every step this checkpoint covers
        self.writer.flush()
        self.ckpt.save(self.step, self.state, data_iterator=self.data_iter,
                       config_text=self.config_text,
                       run={**self.run_item, "guards": self.guards.state()}, force=force)

    def _rewind(self, spike: guards.Spike, spike_batch: int) -> None:
        """PaLM's remedy for a loss spike: back to a checkpoint before it, skipping the
        batches around it (`spike_skip_batches` from the checkpoint's data position, and
        at least up to the batch that spiked). Deterministic, so a resumed run takes the
        same path."""
        config = self.guards.config
        if self.guards.rewinds >= config.max_rewinds:
            raise guards.RunStopped(
                f"loss spike at step {spike.step} (loss {spike.loss:.4g}, {config.spike_factor}"
                f" × the median {spike.median:.4g} exceeded) after {self.guards.rewinds} "
                "rewinds (train.GuardConfig.max_rewinds); stopping.")
        start = time.perf_counter()
        self.ckpt.wait_until_finished()
        earlier = [s for s in self.ckpt.all_steps() if s <= spike.step - config.spike_rewind_steps]
        if not earlier:
            log.warning("loss spike at step %d (%.4g > %s × median %.4g) but no checkpoint is "
                        "%d steps older; going on.", spike.step, spike.loss,
                        config.spike_factor, spike.median, config.spike_rewind_steps)
            return
        target = max(earlier)
        for later in (s for s in self.ckpt.all_steps() if s > target):
            self.ckpt.move_aside(later, ABANDONED_DIR)
        restored = self.ckpt.restore(target, checkpoints.abstract_like(self.state),
                                     data_iterator=self.data_iter)
        self.guards = guards.LossGuards(config, (restored.run or {}).get("guards"))
        position = self.data_iter.get_state()
        resume_at = max(position["next_index"] + config.spike_skip_batches, spike_batch + 1)
        self.guards.rewinds += 1
        self.guards.skipped_batches += resume_at - position["next_index"]
        self.data_iter.set_state({**position, "next_index": resume_at})
        self.state, self.step = restored.state, target
        self.losses = {s: v for s, v in self.losses.items() if s <= target}
        self._window.clear()
        self._pending.clear()
        self.meter.exclude(time.perf_counter() - start)
        log.warning("loss spike at step %d (%.4g > %s × median %.4g): back to step %d, "
                    "data from batch %d on (rewind %d of at most %d).", spike.step, spike.loss,
                    config.spike_factor, spike.median, target, resume_at, self.guards.rewinds,
                    config.max_rewinds)
