"""Tests for metrics.py: JSONL + TensorBoard events written, console line, progress bar."""

import glob
import os

import numpy as np
import pytest

from t5x_like.model import flops
from t5x_like.training import metrics


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


def test_step_meter_leaves_out_compilation_and_evaluation():
    clock = _Clock()
    meter = metrics.StepMeter(flops.Flops(8e12, 4e12), tokens_per_step=1000, num_devices=4,
                              peak_per_device=2e12, clock=clock)
    clock.now = 50.0  # first step: compile time, not counted in step times
    assert meter.step_done() == 50.0
    assert meter.window() == {}  # nothing timed yet
    for _ in range(10):
        clock.now += 0.5
        assert meter.step_done() is None
    meter.exclude(3.0)  # an evaluation between two steps
    clock.now += 3.0
    scalars = meter.window()
    assert scalars["step_time_s"] == pytest.approx(0.5)
    assert scalars["tokens_per_s"] == pytest.approx(2000.0)
    assert scalars["tflops_per_device/palm"] == pytest.approx(4.0)
    assert (scalars["mfu/palm"], scalars["mfu/maxtext"]) == pytest.approx((2.0, 1.0))
    assert meter.eta_s(50) == pytest.approx(25.0)
    line = metrics.format_line(50, 100, {"loss": 1.0}, meter.eta_s(50))
    assert line == "step  50/100 | loss 1.0000 | ETA 0m25s"


def test_eval_table_has_one_column_per_evaluation():
    result = {"bpc": 2.5, "loss": 5.25, "accuracy": 0.125, "tokens": 100, "chars": 400}
    table = metrics.format_eval_table({"start": {"code": {**result, "bpc": 4.0}},
                                       "end": {"code": result}})
    header, row = table.splitlines()
    assert header.split() == ["name", "BPC", "start", "BPC", "end", "loss", "start",
                              "loss", "end", "acc", "end", "tokens", "chars"]
    assert row.split() == ["code", "4.000", "2.500", "5.2500", "5.2500", "0.125", "100",
                           "400"]
    assert metrics.format_eval_table({"": {"code": result}}).splitlines()[0].split() == [
        "name", "BPC", "loss", "acc", "tokens", "chars"]
    # A task's own metrics follow; what a row lacks is "-".
    task_row = metrics.format_eval_table({"": {"my_qa": {"loss": 2.0, "tokens": 40,
                                                        "exact_match": 12.5}}}).splitlines()[1]
    assert task_row.split() == ["my_qa", "-", "2.0000", "-", "40", "-", "exact_match", "12.5"]
