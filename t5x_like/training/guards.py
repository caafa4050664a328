"""What keeps a long run honest: a lock on its directory, preemption signals, the
non-finite streak, the loss-spike guard, and the check that a resumed run is the run
that was saved.

All host-side and cheap: the training loop feeds them each step's fetched metrics (one
step late, so the device never waits) and asks what to do. Nothing here imports jax's
compiled parts or gin.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import json
import logging
import math
import os
import signal
import socket
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.experimental import multihost_utils

from t5x_like import launch
from t5x_like.training import rundir

log = logging.getLogger("t5x_like.training.guards")


RunStopped = launch.RunStopped  # raised by the guards, reported by launch.run


class RunLockedError(RunStopped):
    """Another trainer holds the run's directory."""


# ---------------------------------------------------------------------------
# One trainer per MODEL_DIR


class RunLock:
    """An exclusive lock on MODEL_DIR/.lock (fcntl), held while a trainer runs; on an
    object store (gs://) a lease object instead (rundir.ObjectLock: a generation-matched
    create, renewed while the run lives).

    A second trainer on the same directory fails at once with a message naming the
    process that holds it. The kernel releases the lock when its process dies, even by
    kill -9, so a stale file never blocks a restart. Only process 0 of a multi-process
    run locks (the others share its directory).
    """

    def __init__(self, model_dir: str):
        self.path = rundir.join(model_dir, ".lock")
        self._file = None
        self._object: rundir.ObjectLock | None = None

    def __enter__(self) -> RunLock:
        if jax.process_index() != 0:
            return self
        if rundir.is_remote(self.path):
            return self._lock_object()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            self._file = None
            raise RunLockedError(
                f"{os.path.dirname(self.path)} is in use by {holder}. Two trainers writing "
                "one MODEL_DIR would overwrite each other's checkpoints: wait for it, stop "
                "it, or use another MODEL_DIR.") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"process {os.getpid()} on {socket.gethostname()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._file.flush()
        return self

    def _lock_object(self) -> RunLock:
        """On an object store: a lease object (rundir.ObjectLock), not a file lock."""
        lock = rundir.ObjectLock(self.path)
        try:
            lock.acquire()
        except rundir.LockHeldError as e:
            raise RunLockedError(
                f"{self.path.removesuffix('/.lock')} is in use by {e.holder}, which renewed "
                f"its lock {e.age_s:.0f} s ago. Two trainers writing one MODEL_DIR would "
                "overwrite each other's checkpoints: wait for it, stop it, or use another "
                f"MODEL_DIR. If that trainer is gone (killed), the lock passes to the next "
                f"run {max(0.0, e.lease_s - e.age_s):.0f} s from now (its lease, "
                f"{rundir.LEASE_ENV}={e.lease_s:.0f}), or at once if you delete "
                f"{self.path}.") from None
        self._object = lock
        return self

    def __exit__(self, *exc_info) -> None:
        if self._object is not None:
            self._object.release()
            self._object = None
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------
# Preemption


class PreemptionWatcher:
    """SIGTERM / SIGINT ask the run to stop after the current step, with a checkpoint.

    A second SIGINT (Ctrl-C) stops at once. In a multi-process run the processes agree
    on the step to stop at through jax's preemption sync point (jax's coordination
    service catches a SIGTERM that reaches any of them), so all save the same step;
    Ctrl-C there keeps Python's meaning (stop at once: one process cannot name a step
    for the others). Handlers are installed only in the main thread, restored on exit.
    """

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        self._multi = jax.process_count() > 1

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.requested = signal.Signals(signum).name
        log.warning("%s received: stopping after this step with a checkpoint (press Ctrl-C "
                    "again to stop at once, without one).", self.requested)

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread() and not self._multi:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """Whether to stop after `step` (call once per step, on every process)."""
        if self._multi and multihost_utils.reached_preemption_sync_point(step):
            self.requested = self.requested or "preemption notice"
            return True
        return self.requested is not None and not self._multi


# ---------------------------------------------------------------------------
# Guards on the step metrics


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """Guards on the training loss (gin: train.GuardConfig).

    max_nonfinite_steps: stop the run after this many steps in a row whose loss or
      gradient norm was NaN or Inf (each one left the state unchanged).
    spike_factor: the loss-spike guard (PaLM, arXiv 2204.02311 §5.1: restart from a
      checkpoint before the spike and skip the batches around it); off when None. A
      step whose loss exceeds spike_factor × the median of the previous
      `spike_window` losses is a spike.
    spike_rewind_steps: restart from the newest checkpoint at least this many steps
      before the spike (PaLM: about 100).
    spike_skip_batches: then skip this many batches from that checkpoint's data
      position (PaLM: 200 to 500), and at least up to the batch that spiked.
    max_rewinds: stop instead of rewinding once this many rewinds were made.
    """

    max_nonfinite_steps: int = 10
    spike_factor: float | None = None
    spike_window: int = 100
    spike_rewind_steps: int = 100
    spike_skip_batches: int = 200
    max_rewinds: int = 5

    def __post_init__(self):
        if self.max_nonfinite_steps < 1 or self.spike_window < 2 or self.max_rewinds < 0:
            raise ValueError(
                f"GuardConfig: max_nonfinite_steps={self.max_nonfinite_steps} must be ≥ 1, "
                f"spike_window={self.spike_window} ≥ 2, max_rewinds={self.max_rewinds} ≥ 0.")
        if self.spike_factor is not None and self.spike_factor <= 1:
            raise ValueError(f"GuardConfig.spike_factor={self.spike_factor} must be > 1 (or "
                             "None to turn the spike guard off).")
        if self.spike_rewind_steps < 1 or self.spike_skip_batches < 1:
            raise ValueError("GuardConfig: spike_rewind_steps and spike_skip_batches must be "
                             "≥ 1.")

    def reserve_batches(self, save_every_steps: int) -> int:
        """Batches the spike guard may skip over a whole run: per rewind, at most the
        skip plus the distance from the spike back to a checkpoint before it."""
        if not self.spike_factor:
            return 0
        per_rewind = self.spike_skip_batches + self.spike_rewind_steps + save_every_steps
        return self.max_rewinds * per_rewind


@dataclasses.dataclass
class Spike:
    step: int
    loss: float
    median: float


class LossGuards:
    """Host-side state of the guards, fed one step's metrics at a time.

    Its state (the recent losses, the rewinds made) rides in each checkpoint's `run`
    item, so a resumed run sees the same history and takes the same decisions.
    """

    def __init__(self, config: GuardConfig, state: Mapping[str, Any] | None = None):
        self.config = config
        state = state or {}
        self.losses = collections.deque(state.get("losses", ()), maxlen=config.spike_window)
        self.rewinds = int(state.get("rewinds", 0))
        self.skipped_batches = int(state.get("skipped_batches", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_streak = 0

    def state(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "rewinds": self.rewinds,
                "skipped_batches": self.skipped_batches,
                "nonfinite_total": self.nonfinite_total}

    def observe(self, step: int, metrics: Mapping[str, float]) -> Spike | None:
        """Feeds one step; raises RunStopped after too many non-finite steps in a row;
        returns a Spike when the spike guard fires."""
        if metrics.get("nonfinite", 0.0) > 0:
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
            log.warning("step %d: loss %s, gradient norm %s: not finite, the update was "
                        "skipped (%d in a row).", step, metrics.get("loss"),
                        metrics.get("grad_norm"), self.nonfinite_streak)
            if self.nonfinite_streak >= self.config.max_nonfinite_steps:
                raise RunStopped(
                    f"{self.nonfinite_streak} steps in a row (up to step {step}) had a NaN or "
                    "Inf loss or gradient norm; their updates were skipped and the run "
                    "stops (train.GuardConfig.max_nonfinite_steps). Lower the learning "
                    "rate or check the data; the newest checkpoint holds finite values.",
                    save_state=True)
            return None
        self.nonfinite_streak = 0
        if not math.isfinite(float(metrics.get("param_norm", 0.0))):
            # The step's own guard decides on the loss and gradient norm (it fuses into
            # the update, train_state._keep_if_not_finite); an update that overflowed
            # from finite gradients leaves non-finite parameters, which are never saved.
            raise RunStopped(
                f"step {step}: the loss ({metrics.get('loss')}) and gradient norm "
                f"({metrics.get('grad_norm')}) were finite but the updated parameters are "
                f"not (param_norm {metrics['param_norm']}): the optimizer's update "
                "overflowed. The run stops without saving them; the newest checkpoint "
                "holds finite values. Lower the learning rate or raise the optimizer's "
                "eps, and restart from it.", save_state=False)
        loss = float(metrics["loss"])
        spike = None
        if self.config.spike_factor and len(self.losses) == self.losses.maxlen:
            median = statistics.median(self.losses)
            if loss > self.config.spike_factor * median:
                spike = Spike(step, loss, median)
        if spike is None:
            self.losses.append(loss)
        return spike


# ---------------------------------------------------------------------------
# Resume checks


def check_resume(saved: Mapping[str, Any] | None, current: Mapping[str, Any],
                 allowed: Sequence[str] = ()) -> None:
    """Refuses to resume a run whose identity differs from the saved one.

    `current` is {section: {field: value}} (model, data, optimizer, schedule); each
    differing field not in `allowed` ("section.field" or "section") is named.
    """
    if not saved:
        return
    current = json.loads(json.dumps(current))  # as the checkpoint stored it
    changed = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section, {}), current.get(section, {})
        for field in sorted(set(old) | set(new)):
            name = f"{section}.{field}"
            if old.get(field) != new.get(field) and not {section, name} & set(allowed):
                changed.append(f"  {name}: checkpoint {old.get(field)!r}, now "
                               f"{new.get(field)!r}")
    if changed:
        raise ValueError(
            "The checkpoint was written by a run with other settings, so continuing "
            "would not be the run it saved:\n" + "\n".join(changed) + "\nUse the settings "
            "it was started with, or a new MODEL_DIR; to change them on purpose, list the "
            "names in train.train.allow_resume_changes (e.g. ['schedule.train_steps']).")


# ---------------------------------------------------------------------------
# Drills


@dataclasses.dataclass(frozen=True)
class FaultDrills:
    """Deliberate faults, to rehearse the guards (gin: train.FaultDrills; off by default).

    The batches are data positions (the loader's index of the global batch), not
    steps, as real bad data would be: a rewind that skips them never sees them again.
    nan_at_batches: those steps get NaN gradients.
    spike_at_batches: those steps get their loss and gradients multiplied by
      `spike_factor`, a loss spike that really moves the parameters.
    """

    nan_at_batches: Sequence[int] = ()
    spike_at_batches: Sequence[int] = ()
    spike_factor: float = 1000.0

    def loss_scale(self, batch_index: int) -> float:
        if batch_index in self.nan_at_batches:
            return float("nan")
        if batch_index in self.spike_at_batches:
            return self.spike_factor
        return 1.0
