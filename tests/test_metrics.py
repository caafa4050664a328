"""Tests for metrics.py: JSONL + TensorBoard events written, console line, progress bar."""

import glob
import io
import os

import numpy as np
import pytest

from t5x_like import metrics


def test_writer_writes_jsonl_and_tensorboard_events(tmp_path):
    writer = metrics.create_writer(tmp_path)
    writer.write_scalars(10, {"train/loss": np.float32(3.5), "train/learning_rate": 1e-2})
    writer.write_scalars(20, {"train/loss": 2.25, "train/mfu/palm": float("nan")})
    writer.write_texts(20, {"config": "TRAIN_STEPS = 20"})
    writer.write_hparams({"batch_size": 8, "optimizer": "adamw"})
    writer.flush()
    writer.close()

    records = metrics.read_jsonl(tmp_path / metrics.JSONL_NAME)
    assert records[0] == {"step": 10, "train/loss": 3.5, "train/learning_rate": 0.01}
    assert records[1] == {"step": 20, "train/loss": 2.25, "train/mfu/palm": "nan"}
    assert records[2] == {"step": 20, "config": "TRAIN_STEPS = 20"}
    assert records[3]["hparams"]["batch_size"] == 8

    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    events = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
    assert events, os.listdir(tmp_path)
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    loss = acc.Tensors("train/loss")
    assert [e.step for e in loss] == [10, 20]
    values = [float(np.asarray(tensor_util.make_ndarray(e.tensor_proto)))
              for e in loss]
    assert values == [3.5, 2.25]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = metrics.create_writer(tmp_path / "off", enabled=False)
    writer.write_scalars(1, {"x": 1.0})
    writer.close()
    assert not (tmp_path / "off").exists()


def test_jsonl_appends_across_writers(tmp_path):
    for step in (1, 2):
        w = metrics.JsonlWriter(tmp_path / "m.jsonl")
        w.write_scalars(step, {"loss": step})
        w.close()
    assert [r["step"] for r in metrics.read_jsonl(tmp_path / "m.jsonl")] == [1, 2]


def test_format_line_labels_both_conventions():
    line = metrics.format_line(120, 1000, {
        "loss": 3.21, "learning_rate": 1e-2, "grad_norm": 0.5, "step_time_s": 0.25,
        "tokens_per_s": 32768.0, "tflops_per_device/palm": 1.234,
        "tflops_per_device/maxtext": 1.01, "mfu/palm": 0.412, "mfu/maxtext": 0.337})
    assert line == ("step  120/1000 | loss 3.2100 | lr 1.00e-02 | gnorm 0.500 | 0.250 s/step"
                    " | 32.8k tok/s | TFLOP/s/dev palm 1.23 maxtext 1.01"
                    " | MFU palm 41.2% maxtext 33.7%")
    assert metrics.format_line(1, 10, {"loss": 1.0}) == "step  1/10 | loss 1.0000"


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_rate_eta_and_milestones():
    clock, out = _Clock(), io.StringIO()
    progress = metrics.Progress(100, start_step=0, stream=out, clock=clock, width=10)
    clock.now = 50.0  # first step: compile time, not counted in the rate
    progress.update(1)
    for step in range(2, 51):
        clock.now += 0.5
        progress.update(step)
    assert progress.rate() == pytest.approx(2.0)
    assert progress.bar() == "[#####.....] 50/100  50% 2.00 steps/s ETA 0m25s"
    progress.log(50, "step 50/100 | loss 1.0")
    progress.close()
    lines = out.getvalue().splitlines()
    assert len([l for l in lines if l.startswith("[")]) == 5  # every 10% on a non-TTY
    assert "step 50/100 | loss 1.0" in lines


def test_progress_on_a_tty_redraws_in_place():
    class _Tty(io.StringIO):
        def isatty(self):
            return True

    out, clock = _Tty(), _Clock()
    progress = metrics.Progress(4, start_step=2, stream=out, clock=clock)
    progress.update(3)
    progress.log(3, "hello")
    progress.update(4)
    progress.close()
    text = out.getvalue()
    assert text.count("\r") >= 2 and "hello\n" in text and text.endswith("\n")
