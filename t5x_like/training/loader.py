"""Grain loader over a prepared ArrayRecord store, and global jax.Array batches.

Pipeline (per process):
  ArrayRecordDataSource(shards) → shuffle(seed) → repeat(num_epochs)
    → batch(per-process batch, drop_remainder, parse) → [g::G]
    → iterator whose state is {"next_index": step, ...}

Sharding by process: the per-process batches are cut from the globally shuffled order and
a process of row block g of G takes every G-th one. So global step s always holds the
shuffled examples [s·N, (s+1)·N) with block g holding rows [g·B, (g+1)·B) of it (N = global
batch, B = N/G): `jax.make_array_from_process_local_data` then assembles the same global
batch, row for row, whatever the process count. A process's block is the batch slice its
devices hold (`partitioning.process_rows`): processes that are replicas of each other
(tensor parallelism over processes) read the same block, so G is the number of
data-parallel process groups, the process count when the batch axes span every process.
Consequences:
  - every process reads only its own rows, without coordination;
  - the iterator state is global: the next step (plus the settings it depends on), equal
    on every process, a few integers in JSON;
  - exact resume works across a *different process count* as long as the global batch
    size, seed and store are the same (checked on restore).

Parsing happens per batch (`batch_fn`): the records of a batch are joined and read as one
int32 array [B, sum of feature lengths], then split into features. Same bytes as a
per-record parse, fewer Python calls.

Epochs: Reka trained one epoch, so `num_epochs=1` is the default and the iterator stops
(StopIteration) after `num_batches`; call `Loader.check_steps(train_steps)` at start-up to
get a clear error before training instead. `num_epochs=k` (or None: forever) repeats the
store, reshuffled each epoch (grain folds the epoch into the shuffle seed).

Checkpointing the iterator (for t5x_like/training/checkpoints.py):
  - preferred, any process count: save `it.get_state()` (a JSON-serialisable dict, equal
    on all processes) with `ocp.args.JsonSave(state)` and after restore call
    `it.set_state(state)`;
  - also works, same process count only: `LoaderIterator` is a `grain.DatasetIterator`, so
    `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` in an orbax Composite
    (grain writes one file per process, named by the process count).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from t5x_like.data import store
from t5x_like.model import partitioning

_STATE_FIELDS = ("global_batch_size", "seed", "shuffle", "num_epochs", "store")


class LoaderIterator(grain.DatasetIterator):
    """Per-process iterator of numpy batches with a global, JSON-serialisable state.

    A `grain.DatasetIterator`, so grain's orbax handler can save it too.
    """

    def __init__(self, inner: grain.DatasetIterator, state_info: Mapping[str, Any],
                 num_batches: int, scalars: Mapping[str, float]):
        super().__init__(inner)
        self._inner = inner
        self._state_info = dict(state_info)
        self._num_batches = num_batches
        self._scalars = dict(scalars)

    def start(self) -> None:
        """Nothing to start: grain's read threads start on the first batch (the same
        contract as stream.StreamIterator, whose workers start here)."""

    def close(self) -> None:
        """Nothing to stop: read threads end with the iterator."""

    def scalars(self) -> dict[str, float]:
        """What the store's rows hold (from its manifest), as data metrics."""
        return dict(self._scalars)

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._inner)

    def get_state(self) -> dict[str, Any]:
        """{"next_index": next global step, ...settings the step depends on}."""
        return {"next_index": int(self._inner.get_state()["next_index"]), **self._state_info}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a state from `get_state`, possibly saved under another process count."""
        mismatched = {
            k: (state.get(k), self._state_info[k])
            for k in _STATE_FIELDS
            if k in state and state.get(k) != self._state_info[k]
        }
        if mismatched:
            details = "; ".join(f"{k}: saved {a!r}, loader {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(
                f"Cannot resume the data iterator: it was saved with other settings ({details}). "
                "Exact resume needs the same store, seed and global batch size; restore with "
                "those, or start the data from step 0 deliberately (a new run)."
            )
        next_index = int(state["next_index"])
        if not 0 <= next_index <= self._num_batches:
            raise ValueError(
                f"Saved next_index {next_index} is outside this loader's 0..{self._num_batches} "
                "batches."
            )
        self._inner.set_state({"next_index": next_index})


def _row_block(global_batch_size: int, row_ranges: Sequence[tuple[int, int]] | None
               ) -> tuple[int, int]:
    """(g, G): `row_ranges` are block g of G equal blocks of the global batch."""
    ranges = list(row_ranges or [(0, global_batch_size)])
    size = ranges[0][1] - ranges[0][0] if len(ranges) == 1 else 0
    if global_batch_size <= 0 or size <= 0 or global_batch_size % size or ranges[0][0] % size:
        raise ValueError(
            f"A prepared store feeds each process one block of the global batch of "
            f"{global_batch_size} rows, the same size for every process; this process's "
            f"rows are {ranges} (the batch slices its devices hold). Pick a batch size that "
            "is a positive multiple of the process count, and a mesh whose batch axes give "
            "each process one contiguous slice, or stream the data (unset store_dir).")
    return ranges[0][0] // size, global_batch_size // size


class Loader:
    """Reads a prepared store (t5x_like.data.prepare) as per-process batches with grain.

    Args:
      store_dir: the prepared store (its manifest.json must say complete).
      global_batch_size: G, rows per step over all processes.
      seed: shuffle seed (independent of the prepare seed).
      shuffle: shuffle the rows (False reads them in store order).
      num_epochs: 1 (default, Reka: single epoch), k, or None (repeat forever).
      row_ranges: the rows [start, stop) of every global batch that this process reads
        (`partitioning.process_rows(mesh, global_batch_size).ranges`); default all. One
        block, the same size for every process: the g-th of G/size (processes that are
        replicas of each other read the same block).
      num_threads, prefetch_buffer_size: grain read threads and batches read ahead.
    """

    def __init__(
        self,
        store_dir: str,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = 1,
        row_ranges: Sequence[tuple[int, int]] | None = None,
        num_threads: int = 4,
        prefetch_buffer_size: int = 4,
    ):
        group, groups = _row_block(global_batch_size, row_ranges)
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None (forever), got {num_epochs}.")
        self.manifest = store.load_manifest(store_dir)
        self.store_dir = store_dir
        self.global_batch_size = global_batch_size
        self.per_process_batch_size = global_batch_size // groups
        self.num_epochs = num_epochs
        self._layout = store.RecordLayout.from_manifest(self.manifest)
        self.feature_lengths = dict(zip(self._layout.names, self._layout.lengths))

        paths = [os.path.join(store_dir, name) for name in self.manifest["shards"]]
        ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
        if len(ds) != self.manifest["num_examples"]:
            raise ValueError(
                f"Store {store_dir} holds {len(ds)} records but its manifest says "
                f"{self.manifest['num_examples']}; the store is damaged. Re-prepare it."
            )
        if shuffle:
            ds = ds.shuffle(seed=seed)
        if num_epochs != 1:
            ds = ds.repeat(num_epochs)
        ds = ds.batch(self.per_process_batch_size, drop_remainder=True, batch_fn=self._layout.parse_batch)
        # Whole global steps only, so every process has the same number of batches.
        num_steps = len(ds) // groups
        ds = ds[: num_steps * groups][group::groups]
        self.num_batches = len(ds)
        self._dataset = ds
        self._read_options = grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size
        )
        self._state_info = {
            "global_batch_size": global_batch_size,
            "seed": int(seed),
            "shuffle": bool(shuffle),
            "num_epochs": num_epochs,
            "store": store.fingerprint(self.manifest),
        }

    def scalars(self) -> dict[str, float]:
        """The data metrics of the whole store (its manifest's counts), and its unusable
        source documents."""
        m = self.manifest
        leaves = list(m["task_rates"].items())
        positions = m["num_examples"] * sum(
            m["model_feature_lengths"].get(f, 0) for f in m.get("tokens_per_feature", {}))
        out = store.data_scalars(leaves, [m["task_counts"].get(n, 0) for n, _ in leaves],
                                 m["tokens"], positions, m.get("loss_tokens", 0))
        for label, counts in (m.get("unusable_documents") or {}).items():
            out.update({f"data/unusable/{label}/{k}": counts[k] for k in ("empty", "non_utf8")})
        return out

    def check_steps(self, num_steps: int) -> None:
        """Raises before training if the store cannot feed `num_steps` steps."""
        if num_steps > self.num_batches:
            n, g = self.manifest["num_examples"], self.global_batch_size
            raise ValueError(
                f"The store {self.store_dir} has {n} examples = {self.num_batches} steps of "
                f"global batch {g} over {self.num_epochs} epoch(s), but {num_steps} steps were "
                f"asked for. Prepare at least {num_steps * g} examples (--num_examples), or "
                "train fewer steps, or set num_epochs (Reka trained a single epoch)."
            )

    def __iter__(self) -> LoaderIterator:
        return self.iterator()

    def iterator(self, state: Mapping[str, Any] | None = None) -> LoaderIterator:
        """A fresh iterator at step 0, or at `state` (from `LoaderIterator.get_state`)."""
        inner = self._dataset.to_iter_dataset(self._read_options).__iter__()
        it = LoaderIterator(inner, self._state_info, self.num_batches, self.scalars())
        if state is not None:
            it.set_state(state)
        return it


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh,
                    rows: partitioning.ProcessRows | None = None) -> dict[str, Any]:
    """Turns this process's numpy rows of a batch into global jax.Arrays on `mesh`.

    `rows` says which rows of the global batch they are (`partitioning.process_rows`):
    rows are split over the mesh's ("data", "fsdp") axes and replicated over the others
    ("tensor"); processes holding replicas pass the same rows. In one process it may be
    left out (the batch is all of it).
    """
    if rows is None:
        if jax.process_count() > 1:
            raise ValueError(
                "to_global_batch needs `rows` in a multi-process run: which rows of the "
                "global batch this process holds, partitioning.process_rows(mesh, "
                "global_batch_size) (processes that are replicas hold the same rows).")
        rows = partitioning.process_rows(mesh, len(next(iter(local_batch.values()))))
    sharding = partitioning.batch_sharding(mesh)
    out = {}
    for name, local_BL in local_batch.items():
        if local_BL.shape[0] != rows.num_rows:
            raise ValueError(
                f"Feature {name} has {local_BL.shape[0]} rows in this process but its "
                f"devices hold {rows.num_rows} rows ({rows.ranges}) of the global batch of "
                f"{rows.global_rows} on mesh {dict(mesh.shape)}.")
        global_shape = (rows.global_rows, *local_BL.shape[1:])
        out[name] = jax.make_array_from_process_local_data(sharding, local_BL, global_shape)
    return out
