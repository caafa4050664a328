"""Tests for t5x_like/data/stream.py: streamed batches are a function of (settings, step).

In-process (the shard streams without worker processes: seconds) for the layout, the
per-task counts, the equality with a prepared store's rows, resuming and the identity
checks; through grain's worker processes (slow: each start spawns TensorFlow) for the
worker-count invariance and across processes.
"""

import json
import os
from multiprocessing import shared_memory

import numpy as np
import pytest
from test_prepare import TEST_TASK_MODULE, _prepare, read_rows, test_tasks  # noqa: F401

from t5x_like.data import forms, pipeline, stream

LENGTHS = {"targets": 64}
SEED, SHARDS, BATCH = 3, 2, 8  # 4 rows of each shard per step


def _spec(seed=SEED, shards=SHARDS, **kwargs):
    return pipeline.shard_spec("tt_mix_lm", LENGTHS, forms.LM, seed, shards, **kwargs)


def _stream(row_ranges=None, workers=None, **kwargs):
    return stream.Stream(_spec(**kwargs), BATCH, workers=workers,
                         task_modules=(TEST_TASK_MODULE,), row_ranges=row_ranges)


def _blocks(shards, first_step, n):
    """n blocks of a worker reading `shards` from `first_step`, without processes."""
    it = stream._ShardSetIterator(_spec(), shards, BATCH // SHARDS, first_step)
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def blocks(test_tasks):
    """Steps 0..3 of both shards as one worker reads them: shard 0, shard 1, shard 0, ..."""
    return _blocks([0, 1], 0, 8)


def test_a_worker_reads_its_shards_round_robin_step_by_step(blocks):
    assert [(b["shard"], b["step"]) for b in blocks] == [
        (k, s) for s in range(4) for k in (0, 1)]
    rows = blocks[0]["rows"]
    assert rows["decoder_target_tokens"].shape == (BATCH // SHARDS, 64)
    assert rows["decoder_target_tokens"].dtype == np.int32


def test_stream_rows_are_the_rows_of_a_store_with_the_same_shards(blocks, tmp_path):
    """Shard k of a stream and of a store prepared with the same mixture, lengths, seed
    and shard count are one pipeline: the same rows, in the same order."""
    _prepare(tmp_path / "s", mixture="tt_mix_lm", converter="lm", lengths="targets=64",
             n=32, seed=SEED, shards=SHARDS)
    manifest, rows = read_rows(tmp_path / "s")
    for k in range(SHARDS):
        streamed = np.concatenate([b["rows"]["decoder_target_tokens"] for b in blocks
                                   if b["shard"] == k])
        np.testing.assert_array_equal(streamed, rows["decoder_target_tokens"][16 * k:16 * (k + 1)])
    # And the per-task counts of the blocks are the store's (both count real examples).
    counts = sum(b["task_counts"] for b in blocks)
    assert dict(zip(["tt_a_lm", "tt_b_lm"], counts.tolist())) == manifest["task_counts"]


def test_task_counts_are_counts_of_the_rows(blocks):
    # Each document starts with its task's marker byte (test_prepare's corpus).
    for block in blocks:
        rows = block["rows"]
        starts = (rows["decoder_segment_ids"] > 0) & (rows["decoder_positions"] == 0)
        first_bytes = rows["decoder_target_tokens"][starts] - 3
        assert set(first_bytes.tolist()) <= {ord("a"), ord("B")}
        assert block["task_counts"].tolist() == [int(np.sum(first_bytes == ord("a"))),
                                                 int(np.sum(first_bytes == ord("B")))]


def test_a_shard_started_at_a_later_step_continues_it_exactly(blocks):
    later = _blocks([1], 2, 2)
    assert [(b["shard"], b["step"]) for b in later] == [(1, 2), (1, 3)]
    for got, want in zip(later, [blocks[5], blocks[7]]):
        for name in want["rows"]:
            np.testing.assert_array_equal(got["rows"][name], want["rows"][name])
        np.testing.assert_array_equal(got["task_counts"], want["task_counts"])


@pytest.mark.usefixtures("test_tasks")
@pytest.mark.parametrize("pack_pool", [8, 1])
def test_domain_ids_are_the_task_of_each_positions_example(pack_pool):
    """Pool packing (which reorders the drawn examples) as greedy packing: every decoder
    position's domain id is the task of its segment's document, told by the document's
    marker byte, and a shard started at a later step labels its rows the same."""
    spec = _spec(pack_pool=pack_pool)
    domain = {ord("a"): 1, ord("B"): 2}  # tt_mix_lm's domains: its tasks, by name
    assert pipeline.DOMAIN_IDS in stream.Stream(spec, BATCH, domain_ids=True).names
    it = stream._ShardSetIterator(spec, [0], BATCH // SHARDS, 0, domain_ids=True)
    blocks = [next(it) for _ in range(3)]
    order = []  # the domain of every segment, in row order
    for block in blocks:
        rows = block["rows"]
        segments, ids = rows["decoder_segment_ids"], rows[pipeline.DOMAIN_IDS]
        np.testing.assert_array_equal(ids == 0, segments == 0)
        for r in range(len(segments)):
            for s in range(1, segments[r].max() + 1):
                at = segments[r] == s
                order.append(domain[int(rows["decoder_target_tokens"][r][at][0]) - 3])
                assert set(ids[r][at].tolist()) == {order[-1]}
    assert set(order) == {1, 2}
    drawn = (pipeline.TaskLabels(spec, 0).labels(0, len(order)) + 1).tolist()
    assert (order == drawn) == (pack_pool == 1)
    later = stream._ShardSetIterator(spec, [0], BATCH // SHARDS, 2, domain_ids=True)
    np.testing.assert_array_equal(next(later)["rows"][pipeline.DOMAIN_IDS],
                                  blocks[2]["rows"][pipeline.DOMAIN_IDS])


def test_each_process_makes_only_its_own_shards(test_tasks):
    assert [_stream([(4 * p, 4 * p + 4)]).shards for p in range(2)] == [[0], [1]]
    assert _stream().shards == [0, 1] and _stream().workers in (1, 2)
    assert _stream().rows_per_step == 4
    # Replicas (tensor over processes) read the same rows: they make the same shards.
    assert _stream([(0, 4)]).shards == _stream([(0, 4)]).shards == [0]
    # Slices that are not adjacent: the shards of each, in row order.
    assert _stream([(0, 2), (6, 8)], shards=4).shards == [0, 3]


def test_the_state_is_global_and_refuses_other_data(test_tasks):
    it = _stream().iterator()
    state = json.loads(json.dumps(it.get_state()))
    assert state["next_index"] == 0 and "sources=" in state["stream"]
    # Another process count or worker count reads the same state.
    _stream([(4, 8)]).iterator(state)
    for other in (dict(seed=4), dict(shards=4)):
        with pytest.raises(ValueError, match="Cannot resume the data iterator: .*stream"):
            _stream(**other).iterator(state)
    # A state saved before pool packing existed (no pack_pool in it) is greedy packing's:
    # it resumes with pack_pool=1, and the error under another pool says how.
    greedy = _stream(pack_pool=1)
    assert "pack_pool=" not in greedy.state_info["stream"]
    greedy.iterator(json.loads(json.dumps(greedy.iterator().get_state())))
    with pytest.raises(ValueError, match=r"saved before pack_pool existed: resume it with "
                                         r"--gin.train.DataConfig.pack_pool=1\."):
        _stream(pack_pool=8).iterator(greedy.iterator().get_state())


def test_the_fingerprint_changes_with_the_source_files(test_tasks, tmp_path):
    import os

    before = pipeline.source_fingerprint("tt_mix_lm", "train")
    path = os.path.join(test_tasks, "b-train-0.txt")
    original = open(path, "rb").read()
    try:
        with open(path, "wb") as f:
            f.write(original[::-1])  # same size, other content
        assert pipeline.source_fingerprint("tt_mix_lm", "train") != before
    finally:
        with open(path, "wb") as f:
            f.write(original)
    assert pipeline.source_fingerprint("tt_mix_lm", "train") == before


def test_shards_workers_and_processes_that_do_not_fit_are_clear_errors(test_tasks):
    with pytest.raises(ValueError, match=r"stream_shards=3 must divide BATCH_SIZE=8"):
        _stream(shards=3)
    with pytest.raises(ValueError, match=r"be a multiple of 4: this process reads rows \[0, 2\)"):
        _stream([(0, 2)])
    with pytest.raises(ValueError, match=r"data_workers=3 must divide the 2 stream shards"):
        _stream(workers=3)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_whatever_their_number(test_tasks, blocks):
    """grain's workers (spawned processes): 2 workers, 1 worker, and a restart at step 2,
    all give the in-process blocks, shard after shard."""
    expected = [np.concatenate([blocks[2 * s]["rows"]["decoder_target_tokens"],
                                blocks[2 * s + 1]["rows"]["decoder_target_tokens"]])
                for s in range(4)]
    for workers, first in ((2, 0), (1, 0), (2, 2)):
        it = _stream(workers=workers).iterator()
        try:
            if first:
                it.set_state({**it.get_state(), "next_index": first})
            got = [next(it)["decoder_target_tokens"] for _ in range(4 - first)]
            assert it.get_state()["next_index"] == 4
            scalars = it.scalars()
        finally:
            it.close()
        # Every block the workers made and the parent did not read is gone with them.
        assert not [n for n in os.listdir("/dev/shm")
                    if n.startswith(f"{stream._SHM_PREFIX}{os.getpid()}_")]
        for g, e in zip(got, expected[first:]):
            np.testing.assert_array_equal(g, e)
        counts = sum(b["task_counts"] for b in blocks[2 * first:])
        assert scalars["data/task_examples/tt_a_lm"] == counts[0]
        assert scalars["data/examples"] == counts.sum()


def test_blocks_of_a_stream_owner_that_no_longer_runs_are_removed():
    """A trainer killed with SIGKILL leaves its workers' blocks in shared memory; the next
    stream opened on the machine removes them, and leaves a running owner's alone."""
    dead = 2 ** 22 + 1  # above Linux's default pid_max (4,194,304): never running
    while os.path.exists(f"/proc/{dead}"):
        dead += 1
    names = [f"{stream._SHM_PREFIX}{dead}_1_0_5_0", f"{stream._SHM_PREFIX}{os.getpid()}_9_0_5_0"]
    made = [shared_memory.SharedMemory(n, create=True, size=8) for n in names]
    try:
        stream._unlink_orphaned_blocks()
        assert not os.path.exists(f"/dev/shm/{names[0]}")
        assert os.path.exists(f"/dev/shm/{names[1]}")
    finally:
        for shm in made:
            shm.close()
        made[1].unlink()
        shared_memory.resource_tracker.unregister(made[0]._name, "shared_memory")


# ----------------------------------------------------------------------------- resume
# A shard's tf.data iterator state (saved by the workers every so often) is restored on
# resume instead of replaying the shard: the same rows, at a cost that does not grow with
# the step.


def _shard_blocks(first_step, n, saved=(0, None)):
    """n blocks of shard 0 from `first_step`, a state after every one (ratio 0)."""
    shard = stream._ShardStream(_spec(), 0, BATCH // SHARDS, first_step, saved=saved,
                                snapshot_ratio=0)
    return shard, [shard.next_block() for _ in range(n)]


def _assert_same_rows(got, want):
    assert (got["shard"], got["step"]) == (want["shard"], want["step"])
    for name in want["rows"]:
        np.testing.assert_array_equal(got["rows"][name], want["rows"][name])
    np.testing.assert_array_equal(got["task_counts"], want["task_counts"])


def test_a_shard_restored_from_its_saved_state_continues_without_replaying(blocks, tmp_path):
    _, first = _shard_blocks(0, 3)
    assert [b["state_step"] for b in first] == [1, 2, 3]  # the state after each block
    at_3 = bytes(first[2]["state"])
    (tmp_path / "at_3").write_bytes(at_3)
    unbroken = [blocks[2 * s] for s in range(4)]  # shard 0's steps 0..3 (the fixture)
    # Restored at step 3 (the state's own bytes or its file): no step is made again.
    for saved in ((3, at_3), (3, str(tmp_path / "at_3"))):
        shard, (got,) = _shard_blocks(3, 1, saved)
        assert shard.replayed == 0
        _assert_same_rows(got, unbroken[3])
    # A state of an earlier step replays only the steps after it; none replays them all.
    shard, (got,) = _shard_blocks(3, 1, (2, bytes(first[1]["state"])))
    assert shard.replayed == 1
    _assert_same_rows(got, unbroken[3])
    shard, (got,) = _shard_blocks(3, 1)
    assert shard.replayed == 3
    _assert_same_rows(got, unbroken[3])
    with pytest.raises(ValueError, match="a state of step 3 cannot start step 2"):
        _shard_blocks(2, 1, (3, at_3))


def test_workers_save_states_only_every_so_often(test_tasks):
    """At the default ratio a worker spends at most a fifth of its time saving states."""
    shard = stream._ShardStream(_spec(), 0, BATCH // SHARDS, 0)
    steps = [b["state_step"] for b in (shard.next_block() for _ in range(12))]
    assert steps[0] == 1  # after the first block (the pipeline's start counts as making)
    assert sum(s >= 0 for s in steps) < 12


def test_the_states_to_save_are_one_process_per_shard_and_never_after_the_step(test_tasks):
    """Replicas (the same rows in several processes) save nothing but in the process that
    counts the rows; a state of a step after the next one is never kept."""
    def opened(count_rows=True):
        return stream.Stream(_spec(), BATCH, row_ranges=[(0, 4)],
                             count_rows=count_rows).iterator()

    assert opened(count_rows=False).shard_states() == {}
    it = opened()
    assert it.shard_states() == {0: (0, b"")}  # step 0: a fresh pipeline, nothing to read
    it.set_shard_states({0: (3, b"at 3"), 1: (3, b"another process's")})
    assert it.shard_states() == {0: (0, b"")}  # next step 0: a state of step 3 cannot start it
    it.set_state({**it.get_state(), "next_index": 5})
    it.set_shard_states({0: (3, b"at 3")})
    assert it.shard_states() == {0: (3, b"at 3")}  # restored at 3, replays steps 3 and 4
    it.set_state({**it.get_state(), "next_index": 2})
    assert it.shard_states() == {0: (0, b"")}


@pytest.mark.slow
def test_a_checkpointed_stream_resumes_from_its_states_under_another_process_count(
        test_tasks, tmp_path, caplog):
    """Through worker processes and a real checkpoint: saved at step 2 by one process,
    resumed by two (one shard each) without replay, and, with the tf.data states
    removed (a checkpoint of an older run), by fast-forward; all give the unbroken rows."""
    import jax.numpy as jnp

    from t5x_like.training import checkpoints

    def opened(row_ranges=None):
        s = _stream(row_ranges, workers=1)
        s.snapshot_ratio = 0  # a state after every block: resumes replay nothing
        return s.iterator()

    it = opened()
    state = {"x": jnp.zeros(2)}
    try:
        with checkpoints.CheckpointManager(tmp_path / "ckpt", async_save=False) as ckpt:
            [next(it) for _ in range(2)]
            assert {k: t for k, (t, _) in it.shard_states().items()} == {0: 2, 1: 2}
            ckpt.save(2, state, data_iterator=it, force=True)
            expected = [next(it)["decoder_target_tokens"] for _ in range(2)]
    finally:
        it.close()
    saved = sorted(p.name for p in (tmp_path / "ckpt" / "2" / "data").iterdir()
                   if p.suffix in (".json", ".tfdata"))
    assert saved == ["process_0-of-1.json", "shard_00000.step_2.tfdata",
                     "shard_00001.step_2.tfdata"]
    halves = []
    for p in range(2):  # two processes, 4 rows (one shard) each
        it = opened([(4 * p, 4 * p + 4)])
        try:
            with checkpoints.CheckpointManager(tmp_path / "ckpt") as ckpt:
                ckpt.restore(2, state, data_iterator=it)
            halves.append([next(it)["decoder_target_tokens"] for _ in range(2)])
            assert it.replayed == {p: 0} and it.get_state()["next_index"] == 4
        finally:
            it.close()
    for s in range(2):
        np.testing.assert_array_equal(np.concatenate([halves[0][s], halves[1][s]]),
                                      expected[s])
    for path in (tmp_path / "ckpt" / "2" / "data").glob("*.tfdata"):
        path.unlink()
    it = opened()
    try:
        with checkpoints.CheckpointManager(tmp_path / "ckpt") as ckpt, \
                caplog.at_level("INFO", logger="t5x_like.data.stream"):
            ckpt.restore(2, state, data_iterator=it)
            got = [next(it)["decoder_target_tokens"] for _ in range(2)]
        assert it.replayed == {0: 2, 1: 2}
        assert "no tf.data state saved for shard(s) [0, 1]" in caplog.text
        assert "fast-forward 2 steps" in caplog.text
    finally:
        it.close()
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
