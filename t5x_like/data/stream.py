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
deterministic round-robin over them, shared-memory transfer and clean shutdown, and the
state is ours (a few integers) rather than tf.data's (tens of MB per shard).

Resuming at step s: each shard's stream is rebuilt and fast-forwarded s·r rows inside
tf.data (no rows reach Python). The cost grows with s (about a second per thousand rows
per shard here); docs/DATA.md says what it means for long runs.

Each block carries what its rows hold (examples per task, tokens, padding), summed by
`StreamIterator.scalars()` into the run's data metrics as it goes.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import grain
import grain.multiprocessing
import jax
import numpy as np
from absl import flags as absl_flags
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
            "task_counts": copy(block["task_counts"]), "tokens": copy(block["tokens"])}


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
    """One shard's rows, step by step, from `first_step` on (in a worker process)."""

    def __init__(self, spec: store.ShardSpec, shard_index: int, rows_per_step: int,
                 first_step: int, domain_ids: bool = False):
        import tensorflow as tf  # noqa: PLC0415 - workers only: the parent needs no TF here

        def split_counts(rows):  # the step's rows and their examples per task
            rows = dict(rows)
            counts = tf.cast(tf.reduce_sum(rows.pop(pipeline.TASK_COUNTS), axis=0), tf.int64)
            return rows, counts

        steps = pipeline.shard_rows(spec, shard_index).batch(rows_per_step, drop_remainder=True)
        # Fast-forward inside tf.data: the skipped rows are made but never leave C++.
        self._steps = steps.map(split_counts).skip(first_step).as_numpy_iterator()
        self._domains = mixtures.leaf_components(spec.mixture) if domain_ids else None
        self.shard_index, self.step = shard_index, first_step

    def next_block(self) -> dict[str, Any]:
        rows, task_counts = next(self._steps)
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
        }
        self.step += 1
        return block


class _ShardSetIterator(grain.DatasetIterator):
    """A worker's shards, read round-robin one step-block at a time; with `shm_tag`,
    each block's arrays in shared memory named after it (`_to_shared_memory`)."""

    def __init__(self, spec: store.ShardSpec, shards: Sequence[int], rows_per_step: int,
                 first_step: int, domain_ids: bool = False, shm_tag: str | None = None):
        super().__init__()
        self._args = (spec, list(shards), rows_per_step, first_step, domain_ids)
        self._shm_tag = shm_tag
        self._streams: list[_ShardStream] | None = None
        self._turn = 0

    def __next__(self) -> dict[str, Any]:
        if self._streams is None:  # built on first use, in the worker process
            spec, shards, rows_per_step, first_step, domain_ids = self._args
            self._streams = [_ShardStream(spec, k, rows_per_step, first_step, domain_ids)
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
    shards among its workers (grain's in-place slicing protocol)."""

    def __init__(self, spec: store.ShardSpec, shards: Sequence[int], rows_per_step: int,
                 first_step: int, domain_ids: bool, shm_tag: str):
        super().__init__()
        self._spec, self._shards = spec, list(shards)
        self._rows_per_step, self._first_step = rows_per_step, first_step
        self._domain_ids, self._shm_tag = domain_ids, shm_tag

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice
        self._shards = self._shards[sl]

    def __iter__(self) -> _ShardSetIterator:
        return _ShardSetIterator(self._spec, self._shards, self._rows_per_step,
                                 self._first_step, self._domain_ids, self._shm_tag)


# ----------------------------------------------------------------------------- parent


def default_workers(local_shards: int) -> int:
    """The most worker processes up to the core count that divide the local shards."""
    cores = os.cpu_count() or 1
    return max(w for w in range(1, local_shards + 1) if local_shards % w == 0 and w <= cores)


def default_shards(global_batch_size: int, row_groups: int) -> int:
    """The shard count when none is set: one per group of processes reading different
    rows (`row_groups`), so that every group makes a whole shard of its own; 2 when
    every process reads every row (two worker processes), as the demos run."""
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

    def open(self, first_step: int, shm_tag: str) -> grain.DatasetIterator:
        """The grain iterator over this process's step-blocks from `first_step` on; its
        blocks' shared memory is named after `shm_tag`."""
        _unlink_orphaned_blocks()
        ds = _ShardSet(self.spec, self.shards, self.rows_per_step, first_step,
                       self.domain_ids, shm_tag)
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
    """

    def __init__(self, stream: Stream):
        self._stream = stream
        self._step = 0
        self._it: grain.DatasetIterator | None = None
        self._openings = 0  # names the shared memory of each opening's blocks
        self._totals = {"examples": np.zeros(len(stream.leaves), np.int64),
                        "tokens": np.zeros(len(pipeline.TOKEN_SEGMENTS), np.int64),
                        "rows": 0, "loss_tokens": 0}

    def start(self) -> None:
        if self._it is None:
            self._openings += 1
            self._it = self._stream.open(self._step, self._shm_tag())

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

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self._step, **self._stream.state_info}

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

