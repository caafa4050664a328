"""Metric output: TensorBoard events + a JSONL file, a one-line console log, a progress bar.

- `create_writer(logdir)`: clu's TensorBoard `SummaryWriter` (asynchronous, so writing
  events never stalls a step) and `JsonlWriter` (`logdir/metrics.jsonl`, one JSON object
  per write: easy to `grep`, `jq` or `pandas.read_json(lines=True)` without TensorFlow),
  joined by clu's `MultiWriter`. We do not use `create_default_writer`: it adds a
  LoggingWriter that would repeat every scalar the console line already shows.
- `format_line`: one line per log period: step, loss, lr, gradient norm, step time,
  tokens/s, TFLOP/s per device and MFU, each in both FLOP conventions, labelled.
- `Progress`: a one-line progress bar with rate and ETA (a TTY gets it redrawn in place,
  a log file a line every 10%). In-house rather than clu's `ReportProgress`, which
  only logs "x steps/s, ETA" through absl and sets work-unit notes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np
from clu import metric_writers
from clu.metric_writers import interface

JSONL_NAME = "metrics.jsonl"


def _to_json_number(value: Any) -> Any:
    value = np.asarray(value)
    if value.size != 1:
        return value.tolist()
    value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; keep them visible rather than dropping
    return value


class JsonlWriter(interface.MetricWriter):
    """Appends `{"step": s, name: value, ...}` lines to a file (scalars, texts, hparams).

    Images, audio, video, histograms and raw summaries are TensorBoard's business and
    are ignored here.
    """

    def __init__(self, path: str | os.PathLike):
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        self.path = os.fspath(path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def _write(self, record: Mapping[str, Any]) -> None:
        with self._lock:
            self._file.write(json.dumps(record, sort_keys=False) + "\n")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._write({"step": int(step), **{k: _to_json_number(v) for k, v in scalars.items()}})

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._write({"step": int(step), **{k: str(v) for k, v in texts.items()}})

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._write({"hparams": {k: (v if isinstance(v, (int, float, str, bool)) or v is None
                                     else str(v)) for k, v in hparams.items()}})

    def write_summaries(self, step, values, metadata=None) -> None:
        pass

    def write_images(self, step, images) -> None:
        pass

    def write_videos(self, step, videos) -> None:
        pass

    def write_audios(self, step, audios, *, sample_rate) -> None:
        pass

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        pass

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()


def create_writer(logdir: str | os.PathLike, *, enabled: bool = True,
                  asynchronous: bool = True) -> metric_writers.MultiWriter:
    """TensorBoard events in `logdir` + `logdir/metrics.jsonl`; a no-op if not `enabled`.

    Pass `enabled=jax.process_index() == 0` so that only one host of a multi-host run
    writes.
    """
    if not enabled:
        return metric_writers.MultiWriter([])
    logdir = os.fspath(logdir)
    tensorboard: interface.MetricWriter = metric_writers.SummaryWriter(logdir)
    if asynchronous:
        tensorboard = metric_writers.AsyncWriter(tensorboard)
    return metric_writers.MultiWriter([tensorboard, JsonlWriter(os.path.join(logdir, JSONL_NAME))])


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------
# Console


def _si(value: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f}{suffix}"
    return f"{value:.0f}"


def format_line(step: int, total_steps: int, scalars: Mapping[str, float]) -> str:
    """One console line per log period from the train scalars (missing keys skipped).

    Keys read: loss, learning_rate, grad_norm, step_time_s, tokens_per_s,
    tflops_per_device/{palm,maxtext}, mfu/{palm,maxtext}.
    """
    width = len(str(total_steps))
    parts = [f"step {step:>{width}}/{total_steps}"]
    fields = (("loss", "loss {:.4f}"), ("learning_rate", "lr {:.2e}"),
              ("grad_norm", "gnorm {:.3f}"), ("step_time_s", "{:.3f} s/step"))
    parts += [fmt.format(float(scalars[key])) for key, fmt in fields if key in scalars]
    if "tokens_per_s" in scalars:
        parts.append(f"{_si(float(scalars['tokens_per_s']))} tok/s")
    if "tflops_per_device/palm" in scalars:
        parts.append("TFLOP/s/dev palm {:.3g} maxtext {:.3g}".format(
            scalars["tflops_per_device/palm"], scalars["tflops_per_device/maxtext"]))
    if "mfu/palm" in scalars:
        parts.append("MFU palm {:.1%} maxtext {:.1%}".format(
            scalars["mfu/palm"], scalars["mfu/maxtext"]))
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """A progress bar over steps `start_step..total_steps` with steps/s and ETA.

    The rate is measured from the first `update` on, so the first step's compile time
    does not inflate the ETA. On a TTY the bar is redrawn in place (`log` prints its line
    above it); otherwise a bar line is printed every 10% of the run.
    """

    def __init__(self, total_steps: int, start_step: int = 0, *, stream: TextIO | None = None,
                 width: int = 30, clock=time.perf_counter):
        self.total_steps, self.start_step = total_steps, start_step
        self.stream = stream or sys.stderr
        self.width, self._clock = width, clock
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._first: tuple[int, float] | None = None  # (step, time) of the first update
        self._step = start_step
        self._next_tenth = 1  # the next 10% mark to print a line at
        self._drawn = False

    def rate(self) -> float:
        """Steps per second since the first update (nan before two updates)."""
        if self._first is None or self._step <= self._first[0]:
            return float("nan")
        return (self._step - self._first[0]) / max(self._clock() - self._first[1], 1e-9)

    def bar(self) -> str:
        span = max(self.total_steps - self.start_step, 1)
        done = min(max((self._step - self.start_step) / span, 0.0), 1.0)
        filled = int(done * self.width)
        rate = self.rate()
        eta = (self.total_steps - self._step) / rate if rate > 0 else float("nan")
        rate_text = f"{rate:.2f} steps/s" if math.isfinite(rate) else "- steps/s"
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {self._step}/{self.total_steps} "
                f"{done:4.0%} {rate_text} ETA {_duration(eta)}")

    def update(self, step: int) -> None:
        self._step = step
        if self._first is None:
            self._first = (step, self._clock())
        if self._tty:
            self.stream.write("\r" + self.bar())
            self.stream.flush()
            self._drawn = True
            return
        span = max(self.total_steps - self.start_step, 1)
        tenths = 10 * (step - self.start_step) // span  # integers: no 0.1-sum drift
        if tenths >= self._next_tenth or step >= self.total_steps:
            self._next_tenth = tenths + 1
            self.stream.write(self.bar() + "\n")
            self.stream.flush()

    def log(self, step: int, line: str) -> None:
        """Prints `line` (e.g. `format_line(...)`) without garbling the bar."""
        if self._tty and self._drawn:
            self.stream.write("\r\033[K")
        self.stream.write(line + "\n")
        if self._tty and self._drawn:
            self.stream.write(self.bar())
        self.stream.flush()

    def close(self) -> None:
        if self._tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False
