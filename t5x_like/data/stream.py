"""Streaming data: a mixture's SeqIO shards made on the fly by grain worker processes.

The default way rows reach training (a prepared store, `loader.py`, is the other). No
rows are made ahead of the run, so the first step does not wait for TRAIN_STEPS ×
BATCH_SIZE of them, and nothing of a multi-process run waits on another process.

Layout. The data is cut into `num_shards` SeqIO shards (`pipeline.shard_rows`: shard k
reads `seqio.ShardInfo(k, num_shards)` of every source, seeded by (seed, k)); each is an
endless, deterministic stream of packed rows. Global step s holds rows
[s·r, (s+1)·r) of every shard, shard after shard, where r = global batch / num_shards.
So a batch is a function of (spec, seed, s) alone:
  - a process makes only the shards of its rows of every global batch (`row_ranges`:
    the batch slices its devices hold, `partitioning.process_rows`), exactly what
    `jax.make_array_from_process_local_data` expects, and never waits for another
    process. Processes whose devices are replicas of each other (tensor parallelism over
    processes, one process per GPU) read the same rows, so they make the same shards;
    one of them counts the rows in the data metrics;
  - the iterator state is global (`next_index`, the next step, plus the settings the
    rows depend on): a run resumes bitwise under another process count or another
    number of data workers.

Workers. grain's `mp_prefetch` runs the process's shards in `workers` spawned processes:
it gives worker i the shards [i::workers] (`_ShardSet.set_slice`) and reads the workers
round-robin, and each worker reads its shards round-robin, so the blocks arrive in
shard order whatever the worker count (which must divide the shards per process).
Processes rather than threads, and grain rather than tf.data alone: a SeqIO pipeline
of 35 tasks keeps a core busy with Python and TensorFlow work that would contend with
the training loop's own host work; separate processes isolate it, grain gives the
deterministic round-robin over them, shared-memory transfer and clean shutdown.

Resuming in constant time: the shards' tf.data iterator states, as T5X checkpoints its
tf.data iterators (a shard's rows are a sequential pipeline: sources, shuffle buffers,
tokenizer, UL2 denoisers, mixture draws, pool packing; no position can be computed
without running there, so the pipeline's own state is saved). The iterator state proper
stays global and a few integers (`get_state`); beside it, `shard_states()` gives per
shard (t, the state at step t ≤ next step), saved with each checkpoint keyed by shard
(training/checkpoints.py), and on resume each worker restores its shards' states and
makes only steps t..s-1 again. A shard without a state (a checkpoint of an older run, a
pipeline tf.data cannot save) is rebuilt and fast-forwarded s steps, with a log line.

When states are taken: not after every block. Serializing the demo's shard
(reka_mix_ul2, 128/128: 35 shuffle buffers of raw documents) takes about 1 s and 35 MB,
while a block takes milliseconds (233 steps of 8 rows per second in one process here):
a state per step would cost the workers most of their time. Instead a worker saves a
shard's state after a block once the time it spent making that shard's blocks since the
last save reaches SNAPSHOT_RATIO (4) times what the last save took, and after the first
block. So saving costs at most a fifth of a worker's making time (none of its waiting
time: workers mostly wait on the trainer), and a resume replays at most about 4 saves'
time of making (≈4 s here) plus one block, whatever the step. The time rule rather
than a step count: a save's cost and a block's both scale with the rows' length and
the mixture, and their ratio is what bounds both costs. Restoring takes about 4 s for
the demo's shard, less than building and filling it from scratch (about 15 s).

Each block carries what its rows hold (examples per task, tokens, padding), summed by
`StreamIterator.scalars()` into the run's data metrics as it goes.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import grain
import grain.multiprocessing
import jax
import numpy as np
from absl import flags as absl_flags
from etils import epath
from jax.experimental import multihost_utils

from t5x_like import process
from t5x_like.data import forms, mixtures, pipeline, store

log = logging.getLogger("t5x_like.data.stream")

STREAM_FORMAT = 1  # bump when the rows of a stream change for the same settings
_STATE_FIELDS = ("global_batch_size", "seed", "stream")
# Blocks reach the parent in shared memory that the workers create under names of their
# own, "t5x_like_<parent pid>_<opening>_<shard>_<step>_<array>", and do not register
# with Python's resource tracker: the parent registers a block when it opens it and
# unregisters it when grain unlinks it, so only blocks the parent read are tracked.
# grain unlinks the blocks that are read and those still in its queues, but not one its
# reader thread had taken off a worker's queue when the run ended; the tracker then
# warned of leaked shared_memory objects at the end of every run. `close()` unlinks
# whatever of the opening is left, and a stream opened after a SIGKILL removes the
# blocks of owners that no longer run.
_SHM_PREFIX = "t5x_like_"
# A worker saves a shard's tf.data state after a block once the time it spent making the
# shard's blocks since the last save is this many times what that save took (module
# docstring, "Resuming"); 0: after every block.
SNAPSHOT_RATIO = 4.0
_NO_STATE = np.zeros(0, np.uint8)
_SHM_DIR = "/dev/shm"  # where POSIX shared memory shows on Linux (elsewhere: no sweep)


def _to_shared_memory(block: dict[str, Any], tag: str) -> dict[str, Any]:
    """`block` with its arrays copied into named shared memory (in a worker)."""
    count = 0

    def copy(array: np.ndarray) -> np.ndarray:
        nonlocal count
        name = f"{_SHM_PREFIX}{tag}_{block['shard']}_{block['step']}_{count}"
        count += 1
        shm = shared_memory.SharedMemory(name, create=True, size=max(array.nbytes, 1))
        resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001 - see above
        out = grain.multiprocessing.SharedMemoryArray.from_shared_memory(
            shm, array.shape, array.dtype)
        out[...] = array
        return out

    return {**block, "rows": {k: copy(v) for k, v in block["rows"].items()},
            "task_counts": copy(block["task_counts"]), "tokens": copy(block["tokens"]),
            "state": copy(block["state"])}


def _unlink_blocks(prefix: str) -> None:
    """Removes the shared memory whose names start with `prefix`."""
    if not os.path.isdir(_SHM_DIR):
        return
    for name in os.listdir(_SHM_DIR):
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(_SHM_DIR, name))
            except FileNotFoundError:
                pass


def _unlink_orphaned_blocks() -> None:
    """Removes the blocks of stream owners that no longer run (killed with SIGKILL)."""
    if not os.path.isdir(_SHM_DIR):
        return
    owners = {n[len(_SHM_PREFIX):].split("_", 1)[0] for n in os.listdir(_SHM_DIR)
              if n.startswith(_SHM_PREFIX)}
    for owner in owners:
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            _unlink_blocks(f"{_SHM_PREFIX}{owner}_")


def _finish_grain_unlinks() -> None:
    """Waits for the unlinks grain hands to its deletion thread (the blocks it had
    buffered), so that none of them finds its block already removed."""
    pool = getattr(grain.multiprocessing.SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        pool.apply(int)  # one thread, first in first out: the earlier unlinks are done


# ----------------------------------------------------------------------------- workers


def _init_worker(parent_pid: int, task_modules: Sequence[str],
                 init: Callable[[], None] | None, worker_index: int, worker_count: int) -> None:
    """In each worker process, before anything else: die with the parent (even by
    kill -9), the caller's `init` (the trainer keeps TensorFlow off the GPUs), then the
    task modules the gin files imported, so the worker sees the same SeqIO registry."""
    del worker_index, worker_count
    process.start_worker(parent_pid, init)
    # A shard's 35 task pipelines (the demo's) start with about 200 tf.data functions to
    # instantiate, and Grappler's graph rewrites of each were about a fifth of a worker's
    # time to its first block (docs/PERFORMANCE.md, "Time to the first step"); the rows
    # are the same without them, and the workers make rows far faster than steps use them.
    import tensorflow as tf  # noqa: PLC0415 - workers only

    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    mixtures.import_task_modules(task_modules)


class _ShardStream:
    """One shard's rows, step by step, from `first_step` on (in a worker process).

    `saved` is (t, state): the shard's tf.data iterator state at step t ≤ `first_step`
    (bytes, or the path of a file holding them; None at t = 0, a fresh pipeline); the
    stream restores it and makes steps t..first_step-1 again (`replayed` of them). Every
    so often (`snapshot_ratio`, see the module docstring) a block carries the state after
    it (`state_step`, `state`); otherwise `state_step` is -1 and `state` empty.
    """

    def __init__(self, spec: store.ShardSpec, shard_index: int, rows_per_step: int,
                 first_step: int, domain_ids: bool = False,
                 saved: tuple[int, bytes | str | None] = (0, None),
                 snapshot_ratio: float = SNAPSHOT_RATIO):
        import tensorflow as tf  # noqa: PLC0415 - workers only: the parent needs no TF here

        def split_counts(rows):  # the step's rows and their examples per task
            rows = dict(rows)
            counts = tf.cast(tf.reduce_sum(rows.pop(pipeline.TASK_COUNTS), axis=0), tf.int64)
            return rows, counts

        steps = pipeline.shard_rows(spec, shard_index).batch(rows_per_step, drop_remainder=True)
        options = tf.data.Options()  # a state that cannot be saved is an error, not a guess
        self._fail = tf.data.experimental.ExternalStatePolicy.FAIL
        options.experimental_external_state_policy = self._fail
        self._tf = tf
        # One graph for every start (no `.skip`), so that any start restores any state.
        self._steps = iter(steps.map(split_counts).with_options(options))
        self._domains = mixtures.leaf_components(spec.mixture) if domain_ids else None
        self.shard_index = shard_index
        at, state = saved
        if not 0 <= at <= first_step:
            raise ValueError(f"shard {shard_index}: a state of step {at} cannot start step "
                             f"{first_step}.")
        if state is not None:
            if isinstance(state, str):  # a checkpoint's file, read as the run reads its
                state = epath.Path(state).read_bytes()  # files (training/rundir.py's env)
            tf.raw_ops.DeserializeIterator(resource_handle=self._iterator_resource(),
                                           serialized=tf.io.parse_tensor(state, tf.variant))
        self.step = at
        self.advance(first_step - at)
        self.replayed = first_step - at  # steps made again after the state (or step 0)
        self._ratio, self._made_s, self._snapshot_s = snapshot_ratio, 0.0, 0.0

    def advance(self, steps: int) -> None:
        """Makes `steps` steps without handing them out: they stay TensorFlow tensors."""
        for _ in range(steps):
            next(self._steps)
        self.step += steps

    def _iterator_resource(self):
        # TensorFlow's own iterator checkpointing (tf.train.Checkpoint) serializes this
        # resource; the raw ops give the state as bytes without a checkpoint file.
        return self._steps._iterator_resource  # noqa: SLF001

    def snapshot(self) -> bytes | None:
        """The tf.data iterator's state now (None if the pipeline holds state tf.data
        cannot save, e.g. a stateful op in a task: its shard then resumes by replay)."""
        tf = self._tf
        try:
            variant = tf.raw_ops.SerializeIterator(
                resource_handle=self._iterator_resource(),
                external_state_policy=self._fail.value)
            return tf.io.serialize_tensor(variant).numpy()
        except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError) as e:
            log.warning("shard %d: tf.data cannot save this pipeline's state (%s); a run "
                        "resumed from it replays the shard from step 0.", self.shard_index,
                        str(e).splitlines()[0][:300])
            self._ratio = float("inf")
            return None

    def next_block(self) -> dict[str, Any]:
        start = time.perf_counter()
        rows, task_counts = next(self._steps)
        rows, task_counts = {k: v.numpy() for k, v in rows.items()}, task_counts.numpy()
        task_ids = rows.pop(pipeline.TASK_IDS, None)  # each decoder position's leaf task
        stats = pipeline.row_stats(rows)
        if self._domains is not None:
            rows[pipeline.DOMAIN_IDS] = pipeline.domain_ids(task_ids, self._domains)
        block = {
            "shard": self.shard_index,
            "step": self.step,
            "rows": rows,
            "task_counts": task_counts.astype(np.int64),
            "tokens": np.array([stats["tokens"][f] for f in sorted(stats["tokens"])]),
            "loss_tokens": stats["loss_tokens"],
            "replayed": self.replayed,
            "state_step": -1,
            "state": _NO_STATE,
        }
        self.step += 1
        self._made_s += time.perf_counter() - start
        if self._made_s >= self._ratio * self._snapshot_s:
            start = time.perf_counter()
            state = self.snapshot()
            self._snapshot_s, self._made_s = time.perf_counter() - start, 0.0
            if state is not None:
                block["state_step"], block["state"] = self.step, np.frombuffer(state, np.uint8)
        return block


class _ShardSetIterator(grain.DatasetIterator):
    """A worker's shards, read round-robin one step-block at a time; with `shm_tag`,
    each block's arrays in shared memory named after it (`_to_shared_memory`). `saved`
    maps a shard to its (step, tf.data state) to start from (`_ShardStream`)."""

    def __init__(self, spec: store.ShardSpec, shards: Sequence[int], rows_per_step: int,
                 first_step: int, domain_ids: bool = False, shm_tag: str | None = None,
                 saved: Mapping[int, tuple[int, bytes | str | None]] | None = None,
                 snapshot_ratio: float = SNAPSHOT_RATIO):
        super().__init__()
        self._args = (spec, list(shards), rows_per_step, first_step, domain_ids)
        self._saved, self._ratio = dict(saved or {}), snapshot_ratio
        self._shm_tag = shm_tag
        self._streams: list[_ShardStream] | None = None
        self._turn = 0

    def __next__(self) -> dict[str, Any]:
        if self._streams is None:  # built on first use, in the worker process
            spec, shards, rows_per_step, first_step, domain_ids = self._args
            self._streams = [_ShardStream(spec, k, rows_per_step, first_step, domain_ids,
                                          self._saved.get(k, (0, None)), self._ratio)
                             for k in shards]
        block = self._streams[self._turn].next_block()
        self._turn = (self._turn + 1) % len(self._streams)
        return block if self._shm_tag is None else _to_shared_memory(block, self._shm_tag)

    def get_state(self) -> dict[str, Any]:
        # grain asks after every element; the run's state is StreamIterator's.
        return {"turn": self._turn}

    def set_state(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError("StreamIterator.set_state rebuilds the workers instead.")


class _ShardSet(grain.IterDataset):
    """The shards of this process as one grain dataset; `mp_prefetch` slices the list of
    shards among its workers (grain's in-place slicing protocol). `saved`: the shards'
    (step, state) to start from, states as file paths (each worker reads its own) or
    bytes."""

    def __init__(self, spec: store.ShardSpec, shards: Sequence[int], rows_per_step: int,
                 first_step: int, domain_ids: bool, shm_tag: str,
                 saved: Mapping[int, tuple[int, bytes | str | None]] | None = None,
                 snapshot_ratio: float = SNAPSHOT_RATIO):
        super().__init__()
        self._spec, self._shards = spec, list(shards)
        self._rows_per_step, self._first_step = rows_per_step, first_step
        self._domain_ids, self._shm_tag = domain_ids, shm_tag
        self._saved, self._ratio = dict(saved or {}), snapshot_ratio

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice
        self._shards = self._shards[sl]

    def __iter__(self) -> _ShardSetIterator:
        return _ShardSetIterator(self._spec, self._shards, self._rows_per_step,
                                 self._first_step, self._domain_ids, self._shm_tag,
                                 {k: self._saved[k] for k in self._shards if k in self._saved},
                                 self._ratio)


# ----------------------------------------------------------------------------- parent


def default_workers(local_shards: int) -> int:
    """The most worker processes up to the core count that divide the local shards."""
    cores = os.cpu_count() or 1
    return max(w for w in range(1, local_shards + 1) if local_shards % w == 0 and w <= cores)


def shard_count(setting: int | None, global_batch_size: int, row_groups: int) -> int:
    """The stream's shard count: `setting` (train.DataConfig.stream_shards), or when it
    is None one per group of processes reading different rows (`row_groups`), so that
    every group makes a whole shard of its own; 2 when every process reads every row
    (two worker processes), as the demos run."""
    if setting is not None:
        return setting
    if row_groups == 1 and global_batch_size % 2 == 0:
        return 2
    return row_groups


def shards_for_rows(num_shards: int, global_batch_size: int,
                    row_ranges: Sequence[tuple[int, int]]) -> list[int]:
    """The shards that hold `row_ranges` of every step (shard k holds rows [k·r, (k+1)·r),
    r = global batch / shards); an error unless the shards split the batch at the ranges'
    boundaries, so that a process makes whole shards and only those."""
    bounds = sorted({b for r in row_ranges for b in r} | {global_batch_size})
    # The fewest shards that cut the batch at every boundary of this process's rows.
    fewest = global_batch_size // math.gcd(*bounds)
    if (global_batch_size % num_shards or num_shards % fewest
            or any(not 0 <= a < b <= global_batch_size for a, b in row_ranges)):
        raise ValueError(
            f"train.DataConfig.stream_shards={num_shards} must divide BATCH_SIZE="
            f"{global_batch_size} (each shard gives the same number of rows to every step) "
            f"and be a multiple of {fewest}: this process reads rows "
            f"{', '.join(f'[{a}, {b})' for a, b in row_ranges)} of every batch (the batch "
            f"slices its devices hold), and each process makes whole shards of its own. "
            f"Pick a divisor of {global_batch_size} that is a multiple of {fewest}, or leave "
            "stream_shards unset to derive it from the mesh and processes; the shard count "
            "is part of the data's identity.")
    rows = global_batch_size // num_shards
    return [k for a, b in row_ranges for k in range(a // rows, b // rows)]


class Stream:
    """What this process streams: the shards that hold its rows of `spec`, in batches of
    its rows.

    Args:
      spec: the shards (pipeline.shard_spec); `spec.num_shards` must divide the global
        batch, and split it at the boundaries of `row_ranges`.
      global_batch_size: rows per step over all processes.
      row_ranges: the rows [start, stop) of every global batch that this process reads,
        sorted (the batch slices its devices hold: `partitioning.process_rows`); default
        all of them. Processes that hold replicas of the same rows pass the same ranges
        and stream the same shards.
      count_rows: whether this process's rows count in `scalars()`'s totals over
        processes (one process per set of row ranges counts them).
      workers: data worker processes of this process (must divide its shards); default
        `default_workers`.
      task_modules: modules registering the tasks, imported in every worker.
      worker_init: a picklable function each worker runs first (the trainer passes
        `launch.hide_gpus_from_tensorflow`).
      prefetch: step-blocks each worker makes ahead.
      domain_ids: add `pipeline.DOMAIN_IDS` to every batch: each decoder position's
        1 + index of its example's part of the mixture (`mixtures.components`), 0 on
        padding (for a per-domain loss, DoReMi's). The rows themselves do not change.
    """

    def __init__(self, spec: store.ShardSpec, global_batch_size: int, *,
                 row_ranges: Sequence[tuple[int, int]] | None = None, count_rows: bool = True,
                 workers: int | None = None, task_modules: Sequence[str] = (),
                 worker_init: Callable[[], None] | None = None, prefetch: int = 4,
                 domain_ids: bool = False):
        self.row_ranges = tuple((int(a), int(b)) for a, b in
                                (row_ranges or [(0, global_batch_size)]))
        self.shards = shards_for_rows(spec.num_shards, global_batch_size, self.row_ranges)
        self.count_rows = count_rows
        local = len(self.shards)
        self.workers = workers or default_workers(local)
        if local % self.workers:
            raise ValueError(
                f"train.DataConfig.data_workers={self.workers} must divide the {local} "
                f"stream shards of each process (so that the blocks arrive in shard order "
                f"whatever the worker count); use one of "
                f"{[w for w in range(1, local + 1) if local % w == 0]}.")
        self.spec, self.global_batch_size = spec, global_batch_size
        self.rows_per_step = global_batch_size // spec.num_shards
        self.task_modules, self.prefetch = tuple(task_modules), prefetch
        self.worker_init = worker_init
        self.leaves = mixtures.leaf_tasks_and_rates(spec.mixture)
        self.layout = pipeline.record_layout(spec)
        self.domain_ids = domain_ids
        if domain_ids and "decoder_segment_ids" not in self.layout.names:
            raise ValueError(f"Domain ids label packed decoder rows; the {spec.converter!r} "
                             "rows have no decoder_segment_ids.")
        self.names = (*self.layout.names, *([pipeline.DOMAIN_IDS] if domain_ids else []))
        # Every batch feature's row length (int32 rows; domain ids label decoder rows).
        self.feature_lengths = dict(zip(self.layout.names, self.layout.lengths))
        if domain_ids:
            self.feature_lengths[pipeline.DOMAIN_IDS] = self.feature_lengths[
                "decoder_segment_ids"]
        # A field added later is left out at the value every earlier stream had, so that
        # runs saved before it resume (store.LEGACY_SPEC_FIELDS).
        fields = ",".join(f"{k}={v}" for k, v in sorted(spec.as_dict().items())
                          if k not in store.LEGACY_SPEC_FIELDS
                          or store.LEGACY_SPEC_FIELDS[k] != v)
        self.state_info = {
            "global_batch_size": global_batch_size,
            "seed": spec.seed,
            "stream": f"format={STREAM_FORMAT}|{fields}|sources="
                      f"{pipeline.source_fingerprint(spec.mixture, spec.split)}",
        }

    # How often workers save their shards' tf.data states (SNAPSHOT_RATIO); tests set 0.
    snapshot_ratio = SNAPSHOT_RATIO

    def open(self, first_step: int, shm_tag: str,
             saved: Mapping[int, tuple[int, bytes | str | None]] | None = None
             ) -> grain.DatasetIterator:
        """The grain iterator over this process's step-blocks from `first_step` on; its
        blocks' shared memory is named after `shm_tag`. `saved`: per shard, (t, its
        tf.data state at step t ≤ first_step) to restore; a shard without one starts
        from step 0 and makes `first_step` steps again."""
        _unlink_orphaned_blocks()
        saved = {k: v for k, v in (saved or {}).items() if v[1] is not None}
        replayed = [k for k in self.shards if k not in saved]
        if first_step and replayed:
            log.info("data: no tf.data state saved for shard(s) %s (a checkpoint written "
                     "before they were saved, or a pipeline tf.data cannot save): their "
                     "workers fast-forward %d steps (%d rows each)", replayed, first_step,
                     first_step * self.rows_per_step)
        ds = _ShardSet(self.spec, self.shards, self.rows_per_step, first_step,
                       self.domain_ids, shm_tag, saved, self.snapshot_ratio)
        # grain reads its absl flags while starting workers; outside absl.app (our entry
        # points parse argparse flags) they must be marked parsed, keeping their defaults.
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=self.workers,
                                         per_worker_buffer_size=self.prefetch),
            worker_init_fn=functools.partial(_init_worker, os.getpid(), self.task_modules,
                                             self.worker_init))
        return iter(ds)

    def iterator(self, state: Mapping[str, Any] | None = None) -> StreamIterator:
        it = StreamIterator(self)
        if state is not None:
            it.set_state(state)
        return it


class StreamIterator:
    """This process's batches of a `Stream`, with a global, JSON-ready state.

    The same contract as the store's `loader.LoaderIterator`: `next()` gives this
    process's rows of the next global step as numpy arrays, `get_state()` is
    {"next_index": next step, ...the settings the rows depend on}, `set_state` resumes
    there (workers start again at that step), `scalars()` says what the rows held.
    Workers start on `start()` or the first `next()`; `close()` stops them.

    Besides, per shard, the newest tf.data state the workers sent at a step ≤ the next
    one: `shard_states()` gives those a checkpoint saves (of the shards this process
    counts: one process per shard), `set_shard_states` takes them back on resume, after
    `set_state`, so that the workers restore them instead of replaying the shards.
    """

    def __init__(self, stream: Stream):
        self._stream = stream
        self._step = 0
        self._it: grain.DatasetIterator | None = None
        self._openings = 0  # names the shared memory of each opening's blocks
        # shard -> (t, its tf.data state at step t ≤ self._step): bytes, a file's path,
        # or None at t = 0 (a fresh pipeline).
        self._states: dict[int, tuple[int, bytes | str | None]] = {
            k: (0, None) for k in stream.shards}
        self.replayed: dict[int, int] = {}  # shard -> steps its worker made again on start
        self._totals = {"examples": np.zeros(len(stream.leaves), np.int64),
                        "tokens": np.zeros(len(pipeline.TOKEN_SEGMENTS), np.int64),
                        "rows": 0, "loss_tokens": 0}

    def start(self) -> None:
        if self._it is None:
            self._openings += 1
            self._it = self._stream.open(self._step, self._shm_tag(), self._states)

    def __iter__(self) -> StreamIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self.start()
        blocks = [next(self._it) for _ in self._stream.shards]
        for shard, block in zip(self._stream.shards, blocks):
            if (block["shard"], block["step"]) != (shard, self._step):
                raise RuntimeError(
                    f"data worker sent shard {block['shard']} step {block['step']}, expected "
                    f"shard {shard} step {self._step}: the workers' order broke (grain "
                    f"{grain.__version__}); report this with the data_workers setting.")
            self._add(block)
        self._step += 1
        # The shards are those of this process's row ranges, in order: their blocks,
        # joined, are its rows of the step.
        return {name: np.concatenate([b["rows"][name] for b in blocks])
                for name in self._stream.names}

    def _add(self, block: Mapping[str, Any]) -> None:
        totals = self._totals
        totals["examples"] += block["task_counts"]
        totals["tokens"][:len(block["tokens"])] += block["tokens"]
        totals["rows"] += len(block["rows"][self._stream.layout.names[0]])
        totals["loss_tokens"] += block["loss_tokens"]
        self.replayed.setdefault(block["shard"], block["replayed"])
        if block["state_step"] >= 0:  # the shard's state after this block (a copy)
            self._states[block["shard"]] = (block["state_step"], bytes(block["state"]))

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self._step, **self._stream.state_info}

    def shard_states(self) -> dict[int, tuple[int, bytes]]:
        """shard -> (t, its tf.data state at step t ≤ next_index) for a checkpoint: the
        shards this process counts (one process per shard saves it), b"" for t = 0. A
        state restored from a file is read now, so the checkpoint holds its own copy."""
        if not self._stream.count_rows:
            return {}
        out = {}
        for k, (t, state) in self._states.items():
            if isinstance(state, str):
                state = epath.Path(state).read_bytes()
                self._states[k] = (t, state)
            out[k] = (t, state or b"")
        return out

    def set_shard_states(self, states: Mapping[int, tuple[int, bytes | str]]) -> None:
        """Takes saved tf.data states (shard -> (t, bytes or a file's path)), any shards:
        this process's with t ≤ next_index are restored by its workers when they start;
        a shard without one replays its steps from 0 (logged when the workers start)."""
        for k in self._stream.shards:
            if k in states and 0 <= int(states[k][0]) <= self._step:
                t, state = states[k]
                self._states[k] = (int(t), state if t and len(state) else None)

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resumes at `state["next_index"]`; refuses a state of other data."""
        mismatched = {k: (state.get(k), v) for k, v in self._stream.state_info.items()
                      if k in _STATE_FIELDS and state.get(k) != v}
        if mismatched:
            details = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in
                                mismatched.items())
            legacy = {k: v for k, v in store.LEGACY_SPEC_FIELDS.items()
                      if f"{k}=" not in str(state.get("stream"))
                      and f"{k}=" in self._stream.state_info["stream"]}
            hint = (f" It was saved before {', '.join(legacy)} existed: resume it with "
                    + " ".join(f"--gin.train.DataConfig.{k}={v}" for k, v in legacy.items())
                    + "." if legacy else "")
            raise ValueError(
                "Cannot resume the data iterator: it was saved with other settings "
                f"({details}). The stream's rows depend on the mixture, lengths, seed, shard "
                "count, packing, vocabulary and source files: resume with those, or start "
                f"a new run (a new MODEL_DIR).{hint}")
        next_index = int(state["next_index"])
        if next_index < 0:
            raise ValueError(f"Saved next_index {next_index} must be ≥ 0.")
        if next_index != self._step or self._it is None:
            self.close()
            self._step = next_index
            # A state of a later step cannot start this one: that shard starts at 0.
            self._states = {k: (t, v) if t <= next_index else (0, None)
                            for k, (t, v) in self._states.items()}

    def _shm_tag(self) -> str:
        return f"{os.getpid()}_{self._openings}"

    def close(self) -> None:
        """Stops the workers and frees the shared memory of every block not read."""
        if self._it is not None:
            self._it.close()
            self._it = None
            _finish_grain_unlinks()
            _unlink_blocks(f"{_SHM_PREFIX}{self._shm_tag()}_")

    def scalars(self) -> dict[str, float]:
        """What the rows read so far held (all processes' rows in a multi-process run):
        examples per task and their shares, padding, loss tokens."""
        totals = np.concatenate([self._totals["examples"], self._totals["tokens"],
                                 [self._totals["rows"], self._totals["loss_tokens"]]])
        if not self._stream.count_rows:  # another process reads (and counts) these rows
            totals = np.zeros_like(totals)
        if jax.process_count() > 1:
            totals = np.asarray(multihost_utils.process_allgather(totals)).sum(axis=0)
        n = len(self._stream.leaves)
        examples, tokens, (rows, loss_tokens) = totals[:n], totals[n:-2], totals[-2:]
        lengths = dict(zip(self._stream.layout.names, self._stream.layout.lengths))
        positions = rows * sum(lengths.get(f, 0) for f in pipeline.TOKEN_SEGMENTS)
        return store.data_scalars(self._stream.leaves, examples, int(tokens.sum()),
                                  positions, int(loss_tokens))


def stream_for(mixture: str, task_feature_lengths: Mapping[str, int], form: forms.DataForm,
               seed: int, global_batch_size: int, num_shards: int, *,
               pack_pool: int = pipeline.DEFAULT_PACK_POOL, **options: Any) -> Stream:
    """The `Stream` of a run's data settings (the tasks must be registered); `options`
    are `Stream`'s (workers, task_modules, worker_init, ...)."""
    spec = pipeline.shard_spec(mixture, task_feature_lengths, form, seed, num_shards,
                               pack_pool=pack_pool)
    return Stream(spec, global_batch_size, **options)

