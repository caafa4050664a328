"""Grain loader over a prepared ArrayRecord store, and global jax.Array batches.

Pipeline (per process):
  ArrayRecordDataSource(shards) → shuffle(seed) → repeat(num_epochs)
    → batch(per-process batch, drop_remainder, parse) → [process_index::process_count]
    → iterator whose state is {"next_index": step, ...}

Sharding by process: the per-process batches are cut from the globally shuffled order and
process p takes every P-th one. So global step s always holds the shuffled examples
[s·G, (s+1)·G) with process p holding rows [p·B, (p+1)·B) of it (G = global batch, B = G/P):
`jax.make_array_from_process_local_data` then assembles the same global batch, row for
row, whatever the process count. Consequences:
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
from collections.abc import Mapping
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


class Loader:
    """Reads a prepared store (t5x_like.data.prepare) as per-process batches with grain.

    Args:
      store_dir: the prepared store (its manifest.json must say complete).
      global_batch_size: G, rows per step over all processes.
      seed: shuffle seed (independent of the prepare seed).
      shuffle: shuffle the rows (False reads them in store order).
      num_epochs: 1 (default, Reka: single epoch), k, or None (repeat forever).
      process_index, process_count: default `jax.process_index()/process_count()`.
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
        process_index: int | None = None,
        process_count: int | None = None,
        num_threads: int = 4,
        prefetch_buffer_size: int = 4,
    ):
        if process_index is None or process_count is None:
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of the "
                f"process count {process_count}, so every process reads the same number of rows."
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None (forever), got {num_epochs}.")
        self.manifest = store.load_manifest(store_dir)
        self.store_dir = store_dir
        self.global_batch_size = global_batch_size
        self.per_process_batch_size = global_batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
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
        num_steps = len(ds) // process_count
        ds = ds[: num_steps * process_count][process_index::process_count]
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


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh) -> dict[str, Any]:
    """Turns this process's numpy batch [B, L] into global jax.Arrays [G, L] on `mesh`.

    Rows are split over the mesh's ("data", "fsdp") axes and replicated over the others
    ("tensor"); each process contributes the rows of its addressable devices.
    """
    sharding = partitioning.batch_sharding(mesh)
    shards = partitioning.num_batch_shards(mesh)
    out = {}
    for name, local_BL in local_batch.items():
        global_rows = local_BL.shape[0] * jax.process_count()
        if global_rows % shards:
            raise ValueError(
                f"Global batch {global_rows} (feature {name}) is not divisible by the "
                f"{shards} batch shards of mesh axes {partitioning.BATCH_MESH_AXES} "
                f"{dict(mesh.shape)}; pick a batch size that is a multiple of {shards}."
            )
        out[name] = jax.make_array_from_process_local_data(sharding, local_BL)
    return out
