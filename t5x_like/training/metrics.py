"""What a run reports: metric files, speed (step time, tokens/s, MFU), console lines.

- `create_writer(logdir)`: clu's TensorBoard `SummaryWriter` (asynchronous, so writing
  events never stalls a step) and `JsonlWriter` (`logdir/metrics.jsonl`, one JSON object
  per write: easy to `grep`, `jq` or `pandas.read_json(lines=True)` without TensorFlow),
  joined by clu's `MultiWriter`. We do not use `create_default_writer`: it adds a
  LoggingWriter that would repeat every scalar the console line already shows.
- `StepMeter`: step time, tokens/s, TFLOP/s per device and MFU over each log window,
  in both FLOP conventions, with the first step (compilation) and evaluation time left
  out; also the ETA.
- `format_line`: one console line per log period; `progress_bar`: tqdm's bar on a
  terminal (nothing in a log file, where the lines carry the ETA);
  `format_eval_table`: the per-domain evaluation table of train and eval.
- `write_bpc_curve`: BPC per domain over a run's checkpoints (`python -m t5x_like.eval`
  with RestoreCheckpointConfig mode "all") as JSON and a PNG chart against training
  step and training FLOPs.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from clu import metric_writers
from clu.metric_writers import interface

from t5x_like.model import flops
from t5x_like.training import rundir

JSONL_NAME = "metrics.jsonl"


def _to_json_number(value: Any) -> Any:
    value = np.asarray(value)
    if value.size != 1:
        return value.tolist()
    value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; keep them visible rather than dropping
    return value


class _ScalarsAndTexts(interface.MetricWriter):
    """A clu writer of scalars and texts only: the other kinds are dropped."""

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


class JsonlWriter(_ScalarsAndTexts):
    """Appends `{"step": s, name: value, ...}` lines to a file (scalars, texts, hparams).

    Images, audio, video, histograms and raw summaries are TensorBoard's business and
    are ignored here.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._file = rundir.open_append(self.path)  # a local file, or an object (gs://)
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
    writes. On an object store (gs://) the events go through the run directory's path
    layer too (`ObjectStoreEventWriter`), not through TensorFlow's own file system.
    """
    if not enabled:
        return metric_writers.MultiWriter([])
    logdir = os.fspath(logdir)
    tensorboard: interface.MetricWriter = (
        ObjectStoreEventWriter(logdir) if rundir.is_remote(logdir)
        else metric_writers.SummaryWriter(logdir))
    if asynchronous:
        tensorboard = metric_writers.AsyncWriter(tensorboard)
    return metric_writers.MultiWriter([tensorboard,
                                       JsonlWriter(rundir.join(logdir, JSONL_NAME))])


class ObjectStoreEventWriter(_ScalarsAndTexts):
    """TensorBoard event files (scalars and texts) written through `rundir`, for a
    logdir on an object store: clu's SummaryWriter writes with tf.summary, that is with
    TensorFlow's GCS file system, which cannot be pointed at an emulator (rundir.py says
    why). The file is TensorFlow's format (tensorboard's RecordWriter and protos), named
    as tf.summary names its files; hparams, images and the like are left to
    metrics.jsonl or to a local logdir."""

    def __init__(self, logdir: str):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event_pb2 = event_pb2
        name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                f"{os.getpid()}.v2")
        self._records = RecordWriter(rundir.open_append(rundir.join(logdir, name),
                                                        binary=True))
        self._lock = threading.Lock()
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        with self._lock:
            self._records.write(event.SerializeToString())

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        from tensorboard.compat.proto import summary_pb2

        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(np.asarray(v).item()))
                  for k, v in scalars.items() if np.asarray(v).size == 1]
        self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                          summary=summary_pb2.Summary(value=values)))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        from tensorboard.plugins.text import summary_v2

        for tag, text in texts.items():
            self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                              summary=summary_v2.text_pb(tag, str(text))))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        pass  # in metrics.jsonl

    def flush(self) -> None:
        with self._lock:
            self._records.flush()

    def close(self) -> None:
        with self._lock:
            if not self._records.closed:
                self._records.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (local or on an object store), in order."""
    return [json.loads(line) for line in rundir.read_text(path).splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# Speed


class StepMeter:
    """Speed of the training steps between two log lines, with an ETA.

    Call `step_done` after dispatching each step, `exclude` with the seconds spent on
    anything else (evaluation), and `window` after the window's metrics were fetched
    (fetching waits for the steps, so the clock then covers their whole run). The first
    step of a run compiles: `step_done` waits for it, reports its time and starts the
    clock after it, so step times and MFU are those of the compiled step.
    """

    def __init__(self, step_flops: flops.Flops, tokens_per_step: int, num_devices: int,
                 peak_per_device: float, clock=time.perf_counter):
        self.step_flops, self.tokens_per_step = step_flops, tokens_per_step
        self.num_devices, self.peak = num_devices, peak_per_device
        self._clock = clock
        self._created = clock()
        self._window_start: float | None = None
        self._timed = 0  # steps of this window that count
        self.step_time_s = math.nan  # of the latest window

    def step_done(self, step_metrics: Any = None) -> float | None:
        """Counts one dispatched step; for the first, waits and returns its seconds."""
        if self._window_start is None:
            jax.block_until_ready(step_metrics)
            self._window_start = self._clock()
            return self._window_start - self._created
        self._timed += 1
        return None

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` of non-training work out of the current window (or, before
        the first step, out of its reported time)."""
        if self._window_start is None:
            self._created += seconds
        else:
            self._window_start += seconds

    def window(self) -> dict[str, float]:
        """Speed scalars of the steps since the last call ({} if none was timed)."""
        now = self._clock()
        timed, start = self._timed, self._window_start
        self._window_start, self._timed = now, 0
        if not timed or start is None:
            return {}
        self.step_time_s = (now - start) / timed
        tflops, mfu = flops.mfu(self.step_flops, self.step_time_s, self.num_devices, self.peak)
        return {
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_step / self.step_time_s,
            "tflops_per_device/palm": tflops.palm,
            "tflops_per_device/maxtext": tflops.maxtext,
            "mfu/palm": mfu.palm,
            "mfu/maxtext": mfu.maxtext,
        }

    def eta_s(self, steps_left: int) -> float:
        """Seconds to go at the latest window's step time (nan before one was timed)."""
        return steps_left * self.step_time_s


# ---------------------------------------------------------------------------
# Console


def _si(value: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f}{suffix}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_line(step: int, total_steps: int, scalars: Mapping[str, float],
                eta_s: float | None = None) -> str:
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
    if eta_s is not None and math.isfinite(eta_s):
        parts.append(f"ETA {_duration(eta_s)}")
    return " | ".join(parts)


def progress_bar(total_steps: int, start_step: int) -> tqdm.tqdm:
    """tqdm's bar (rate, ETA) over the steps, drawn only on a terminal. Print lines
    with `tqdm.tqdm.write` while it is open, so they do not garble it."""
    return tqdm.tqdm(total=total_steps, initial=start_step, unit="step", disable=None,
                     file=sys.stderr, dynamic_ncols=True, leave=False)


def format_eval_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """The evaluation table: BPC and loss of every labelled evaluation (e.g.
    {"start": ..., "end": ...}, or one unlabelled {"": ...}), then accuracy, scored tokens
    and characters of the last one, and any other metric of it (a task's metric_fns);
    "-" where a row has no such value.

    results: {label: {name: {"bpc", "loss", "accuracy", "tokens", "chars", ...}}}.
    """
    labels = list(results)
    last = results[labels[-1]]
    width = max([14] + [len(name) + 2 for name in last])

    def head(name: str, label: str) -> str:
        return f"{name} {label}".strip()

    def cell(row, key, spec, size):
        value = row.get(key)
        return f"{'-':>{size}}" if value is None else f"{value:>{size}{spec}}"

    header = [f"{'name':<{width}}"]
    header += [f"{head('BPC', label):>11}" for label in labels]
    header += [f"{head('loss', label):>12}" for label in labels]
    header += [f"{head('acc', labels[-1]):>9}", f"{'tokens':>9}", f"{'chars':>10}"]
    lines = ["".join(header)]
    known = {"bpc", "loss", "accuracy", "tokens", "chars"}
    for name, end in last.items():
        row = [f"{name:<{width}}"]
        row += [cell(results[label].get(name, {}), "bpc", ".3f", 11) for label in labels]
        row += [cell(results[label].get(name, {}), "loss", ".4f", 12) for label in labels]
        row += [cell(end, "accuracy", ".3f", 9), cell(end, "tokens", "", 9),
                cell(end, "chars", "", 10)]
        row += [f"  {k} {v:.4g}" for k, v in end.items() if k not in known]
        lines.append("".join(row))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Compression as a benchmark: BPC per domain over a run's checkpoints

BPC_CURVE_NAME = "bpc_by_checkpoint"  # .json and .png in the evaluation's output dir


def eval_point(step: int, results: Mapping[str, Mapping[str, float]],
               step_flops: flops.Flops | None) -> dict[str, Any]:
    """One checkpoint's evaluation: {"step", "train_flops" (step x FLOPs per step in
    both conventions, or None), "results": {name: {"bpc", "loss", ...}}} for every BPC
    stream (domain) and task evaluated."""
    train_flops = None
    if step_flops is not None:
        total = step_flops * step
        train_flops = {"palm": total.palm, "maxtext": total.maxtext}
    return {"step": int(step), "train_flops": train_flops,
            "results": {d: {k: _to_json_number(v) for k, v in r.items()}
                        for d, r in results.items()}}


def bpc_names(points: list[Mapping[str, Any]]) -> list[str]:
    """The evaluations with a BPC at every point (the domains' streams, and tasks whose
    examples carry their text), in the order evaluated."""
    return [name for name in points[0]["results"]
            if all("bpc" in p["results"].get(name, {}) for p in points)]


def format_bpc_by_step(points: list[Mapping[str, Any]]) -> str:
    """BPC per domain (columns) at each evaluated step (rows)."""
    domains = bpc_names(points)
    lines = [f"{'step':>8}{'train FLOPs':>14}" + "".join(f"{d:>14}" for d in domains)]
    for p in points:
        flops_text = f"{p['train_flops']['palm']:.3e}" if p["train_flops"] else "-"
        lines.append(f"{p['step']:>8}{flops_text:>14}"
                     + "".join(f"{p['results'][d]['bpc']:>14.3f}" for d in domains))
    return "\n".join(lines)


def _plot_bpc(points: list[Mapping[str, Any]], path: str, title: str) -> None:
    import matplotlib  # imported here: only this chart needs it

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    with_flops = all(p["train_flops"] for p in points)
    fig, axes = plt.subplots(1, 2 if with_flops else 1, figsize=(12 if with_flops else 6.5, 4.5),
                             squeeze=False)
    axes = axes[0]
    for domain in bpc_names(points):
        bpc = [p["results"][domain]["bpc"] for p in points]
        axes[0].plot([p["step"] for p in points], bpc, marker="o", label=domain)
        if with_flops:
            axes[1].plot([p["train_flops"]["palm"] for p in points], bpc, marker="o",
                         label=domain)
    axes[0].set_xlabel("training step")
    if with_flops:
        axes[1].set_xlabel("training FLOPs (PaLM convention, docs/FORMULAS.md)")
    for ax in axes:
        ax.set_ylabel("bits per character (validation)")
        ax.grid(True, alpha=0.3)
    axes[-1].legend(title="domain")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    rundir.write_bytes(path, png.getvalue())


def write_bpc_curve(points: list[Mapping[str, Any]], out_dir: str, *, title: str,
                    about: Mapping[str, Any]) -> dict[str, str]:
    """Writes `out_dir/bpc_by_checkpoint.json` (`about` + the points) and `.png` (BPC per
    domain against step and, when known, training FLOPs); returns both paths."""
    rundir.makedirs(out_dir)
    paths = {ext: rundir.join(out_dir, f"{BPC_CURVE_NAME}.{ext}") for ext in ("json", "png")}
    rundir.write_text(paths["json"],
                      json.dumps({**about, "checkpoints": list(points)}, indent=1) + "\n")
    _plot_bpc(list(points), paths["png"], title)
    return paths
