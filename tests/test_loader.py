"""Tests for t5x_like/training/loader.py: exact resume, process sharding, global jax batches."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec
from test_prepare import ENCDEC_STORE_ARGS, encdec_store, read_rows, test_tasks  # noqa: F401  (fixtures)

from t5x_like.model import partitioning
from t5x_like.training import loader as loader_lib


def _row_ids(batch):
    # Rows are identified by their full content (rows of the store are distinct).
    return [tuple(r) for r in np.concatenate([batch[k] for k in sorted(batch)], axis=1)]


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_batches_are_store_rows_shuffled(encdec_store):
    _, rows = read_rows(encdec_store)
    loader = loader_lib.Loader(str(encdec_store), 8, seed=1)
    assert loader.num_batches == 40 // 8
    batches = list(loader.iterator())
    assert len(batches) == 5
    assert batches[0]["encoder_input_tokens"].shape == (8, 64)
    assert batches[0]["encoder_input_tokens"].dtype == np.int32
    seen = sorted(r for b in batches for r in _row_ids(b))
    assert seen == sorted(_row_ids(rows))  # one epoch: every row exactly once
    unshuffled = list(loader_lib.Loader(str(encdec_store), 8, shuffle=False))
    _assert_batches_equal(unshuffled[0], {k: v[:8] for k, v in rows.items()})
    assert _row_ids(unshuffled[0]) != _row_ids(batches[0])


def test_exact_resume_in_a_new_iterator(encdec_store):
    loader = loader_lib.Loader(str(encdec_store), 4, seed=7)
    it = loader.iterator()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip
    assert state["next_index"] == 3
    expected = [next(it) for _ in range(4)]
    fresh = loader_lib.Loader(str(encdec_store), 4, seed=7)
    restored = fresh.iterator(state)
    for want in expected:
        _assert_batches_equal(next(restored), want)


def test_processes_split_disjoint_cover_and_resume_across_process_count(encdec_store):
    single = list(loader_lib.Loader(str(encdec_store), 8, seed=2))
    parts = [
        list(loader_lib.Loader(str(encdec_store), 8, seed=2, row_ranges=[(4 * p, 4 * p + 4)]))
        for p in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == len(single) == 5
    for step, global_batch in enumerate(single):
        a, b = parts[0][step], parts[1][step]
        assert a["decoder_target_tokens"].shape == (4, 64)
        assert not set(_row_ids(a)) & set(_row_ids(b))  # disjoint
        # Process p holds rows [p*B, (p+1)*B) of the global batch: same global batch,
        # row for row, whatever the process count.
        _assert_batches_equal({k: np.concatenate([a[k], b[k]]) for k in a}, global_batch)

    # A state saved by a 1-process run restores in a 2-process run at the same step.
    it = loader_lib.Loader(str(encdec_store), 8, seed=2).iterator()
    next(it), next(it)
    state = it.get_state()
    for p in range(2):
        resumed = loader_lib.Loader(
            str(encdec_store), 8, seed=2, row_ranges=[(4 * p, 4 * p + 4)]
        ).iterator(state)
        _assert_batches_equal(next(resumed), parts[p][2])


def test_resume_with_other_settings_is_an_error(encdec_store):
    it = loader_lib.Loader(str(encdec_store), 8, seed=2).iterator()
    next(it)
    state = it.get_state()
    other = loader_lib.Loader(str(encdec_store), 4, seed=3)
    with pytest.raises(ValueError, match="global_batch_size: saved 8, loader 4.*seed: saved 2, loader 3"):
        other.iterator(state)


def test_epochs_and_step_check(encdec_store):
    loader = loader_lib.Loader(str(encdec_store), 8)
    with pytest.raises(ValueError, match="has 40 examples = 5 steps.*asked for 6|6 steps were asked"):
        loader.check_steps(6)
    loader.check_steps(5)
    it = loader.iterator()
    for _ in range(5):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    two = loader_lib.Loader(str(encdec_store), 8, num_epochs=2)
    batches = list(two)
    assert len(batches) == 10
    first = sorted(r for b in batches[:5] for r in _row_ids(b))
    second = sorted(r for b in batches[5:] for r in _row_ids(b))
    assert first == second  # each epoch is a full pass
    assert _row_ids(batches[0]) != _row_ids(batches[5])  # reshuffled per epoch
    forever = loader_lib.Loader(str(encdec_store), 8, num_epochs=None)
    forever.check_steps(10**6)


def test_rows_that_are_not_one_block_of_the_batch_are_an_error(encdec_store):
    for rows in ([(0, 3)], [(0, 2), (4, 6)], [(2, 6)]):
        with pytest.raises(ValueError, match="one block of the global batch of 8 rows"):
            loader_lib.Loader(str(encdec_store), 8, row_ranges=rows)


def test_global_jax_batch_on_8_device_mesh(encdec_store):
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    loader = loader_lib.Loader(str(encdec_store), 8, seed=0)  # this process: index 0 of 1
    local = next(loader.iterator())
    rows = partitioning.process_rows(mesh, 8)
    assert (rows.ranges, rows.group, rows.groups, rows.counts) == (((0, 8),), 0, 1, True)
    batch = loader_lib.to_global_batch(local, mesh, rows)
    for name, arr in batch.items():
        assert isinstance(arr, jax.Array)
        assert arr.shape == (8, loader.feature_lengths[name])
        assert arr.sharding.spec == PartitionSpec(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(arr), local[name])
        # 4 batch shards of 2 rows, each replicated over the 2 "tensor" devices.
        assert {s.data.shape for s in arr.addressable_shards} == {(2, loader.feature_lengths[name])}
    with pytest.raises(ValueError, match="has 2 rows in this process but its devices hold 8"):
        loader_lib.to_global_batch({k: v[:2] for k, v in local.items()}, mesh, rows)
    with pytest.raises(ValueError, match="does not split over the 4 batch shards"):
        partitioning.process_rows(mesh, 6)


def test_iterator_state_saves_with_orbax_beside_other_items(encdec_store, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    loader = loader_lib.Loader(str(encdec_store), 8, seed=5)
    it = loader.iterator()
    next(it)
    expected = next(loader.iterator(it.get_state()))
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.save(1, args=ocp.args.Composite(
            data_json=ocp.args.JsonSave(it.get_state()),       # any process count
            data_grain=grain.checkpoint.CheckpointSave(it),    # same process count
        ))
        manager.wait_until_finished()
        restored = manager.restore(1, args=ocp.args.Composite(
            data_json=ocp.args.JsonRestore(),
            data_grain=grain.checkpoint.CheckpointRestore(loader.iterator()),
        ))
    _assert_batches_equal(next(loader.iterator(restored["data_json"])), expected)
    _assert_batches_equal(next(restored["data_grain"]), expected)
