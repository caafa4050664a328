"""Tests for guards.py: the directory lock, the non-finite streak, the spike detector, the
resume identity check and the drills."""

import math
import multiprocessing
import os

import pytest

from t5x_like.training import guards


def _hold_lock(model_dir, ready, release):
    with guards.RunLock(model_dir):
        ready.set()
        release.wait(60)


def test_a_second_trainer_on_one_directory_is_refused_naming_the_first(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(120)
        before = (tmp_path / ".lock").read_bytes()
        with pytest.raises(guards.RunLockedError, match=rf"in use by process {holder.pid} on"):
            with guards.RunLock(str(tmp_path)):
                pass
        assert (tmp_path / ".lock").read_bytes() == before  # the refused one wrote nothing
    finally:
        release.set()
        holder.join(60)
    with guards.RunLock(str(tmp_path)):  # free again once its holder is gone
        assert f"process {os.getpid()}" in (tmp_path / ".lock").read_text()


def test_a_killed_holder_releases_the_lock(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    assert ready.wait(120)
    holder.kill()  # SIGKILL: no clean-up runs
    holder.join(60)
    with guards.RunLock(str(tmp_path)):
        pass


def test_nonfinite_streak_stops_after_k_in_a_row():
    g = guards.LossGuards(guards.GuardConfig(max_nonfinite_steps=3))
    nan = {"loss": math.nan, "grad_norm": math.nan, "nonfinite": 1.0}
    ok = {"loss": 2.0, "grad_norm": 1.0, "nonfinite": 0.0}
    for step, metrics in enumerate([nan, nan, ok, nan, nan], start=1):
        assert g.observe(step, metrics) is None
    with pytest.raises(guards.RunStopped, match=r"3 steps in a row \(up to step 6\)"):
        g.observe(6, nan)
    assert g.nonfinite_total == 5


def test_spike_detector_compares_with_the_median_of_the_window():
    config = guards.GuardConfig(spike_factor=2.0, spike_window=4)
    g = guards.LossGuards(config)
    for step, loss in enumerate([5.0, 4.0, 3.0, 100.0], start=1):  # window not full yet
        assert g.observe(step, {"loss": loss}) is None
    assert g.observe(5, {"loss": 9.0}) is None  # median(5,4,3,100) = 4.5; 9 = 2 × 4.5
    spike = g.observe(6, {"loss": 9.5})  # median(4,3,100,9) = 6.5 → 13; no
    assert spike is None
    spike = g.observe(7, {"loss": 30.0})  # median(3,100,9,9.5) = 9.25 → 18.5 < 30
    assert (spike.step, spike.loss, spike.median) == (7, 30.0, 9.25)
    assert list(g.losses) == [3.0, 100.0, 9.0, 9.5]  # a spike is not added to the history
    # The state survives a checkpoint: a resumed guard decides the same.
    again = guards.LossGuards(config, g.state())
    assert again.observe(7, {"loss": 30.0}).median == 9.25


def test_guard_config_checks_and_reserve():
    assert guards.GuardConfig().reserve_batches(100) == 0
    assert guards.GuardConfig(spike_factor=3.0, spike_skip_batches=10, spike_rewind_steps=5,
                              max_rewinds=2).reserve_batches(4) == 2 * (10 + 5 + 4)
    with pytest.raises(ValueError, match="spike_factor=1.0 must be > 1"):
        guards.GuardConfig(spike_factor=1.0)


def test_resume_check_names_each_changed_field_and_honours_allowed_changes():
    saved = {"model": {"rope_theta": 10000.0, "emb_dim": 64}, "schedule": {"train_steps": 6}}
    same = {"model": {"rope_theta": 10000.0, "emb_dim": 64}, "schedule": {"train_steps": 6}}
    guards.check_resume(saved, same)
    guards.check_resume(None, same)  # a checkpoint from before identities: nothing to check
    changed = {"model": {"rope_theta": 500000.0, "emb_dim": 64}, "schedule": {"train_steps": 9}}
    with pytest.raises(ValueError) as e:
        guards.check_resume(saved, changed)
    assert "model.rope_theta: checkpoint 10000.0, now 500000.0" in str(e.value)
    assert "schedule.train_steps: checkpoint 6, now 9" in str(e.value)
    guards.check_resume(saved, changed, allowed=["model.rope_theta", "schedule"])


def test_drills_poison_data_positions():
    drills = guards.FaultDrills(nan_at_batches=(3,), spike_at_batches=(5,), spike_factor=50.0)
    assert math.isnan(drills.loss_scale(3))
    assert drills.loss_scale(5) == 50.0 and drills.loss_scale(4) == 1.0
