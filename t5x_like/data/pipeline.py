"""One SeqIO shard of a task or mixture as an endless stream of packed rows (tf.data).

What a training row is, defined once for the two ways rows reach training:
`prepare.py` writes the first rows of every shard to an ArrayRecord store (in local
processes or as an Apache Beam pipeline) and `stream.py` hands endless shards to the
trainer from worker processes. Both call `shard_rows(spec, k)`, so shard k of a stream
holds the same rows, in the same order, as shard k of a store prepared with the same
mixture, lengths, seed and shard count.

A shard reads `seqio.ShardInfo(k, num_shards)` of every leaf task's source, repeated
(as seqio's `Mixture.get_dataset` does), with seeds derived from (seed, k, task):
SeqIO defines the examples (source → tokenize → UL2 denoiser → EOS); they are packed
`spec.pack_pool` at a time, best-fit (`packing.py`), or with `pack_pool` 1 greedily in
order by seqio's own packing; seqio's feature converter makes the model features.

Mixing, and why it is not seqio's: mixtures do not label their examples and the feature
converters drop extra features, so per-task counts would be lost. The leaf task of
every example slot is drawn here instead: `task_draws(spec, k, j)` gives the draws of
slot chunk j, a pure function of (seed, shard, j), and `choose_from_datasets` takes the
drawn task's next example. Every row then carries `TASK_COUNTS`, its examples per leaf
task (real counts, not rate estimates), and `TASK_IDS`, the leaf task of each decoder
position's example: the pool packer takes both from the `task` feature of the examples
it packs; seqio's greedy packing keeps the order and never drops an example, so the
examples of its first rows are the first draws (`TaskLabels`), and a row's segment s is
its s-th example. The consumers (stream, prepare) take both off the row before it is
stored or batched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from t5x_like.data import forms, mixtures, packing, store, vocabulary
from t5x_like.data.packing import TASK_COUNTS, TASK_IDS  # noqa: F401 - consumers take them off

# Segment-id features whose non-zero entries are the non-padding token positions.
TOKEN_SEGMENTS = {
    "encoder_input_tokens": "encoder_segment_ids",
    "decoder_target_tokens": "decoder_segment_ids",
    # Preference rows (unpacked, right-padded; data/pairs.py marks their tokens).
    "chosen_tokens": "chosen_segment_ids",
    "rejected_tokens": "rejected_segment_ids",
}
# Examples packed together (packing.py); 1: seqio's greedy in-order packing, as before.
DEFAULT_PACK_POOL = 256
DRAW_CHUNK = 4096  # task draws per numpy call: one call per 4,096 examples
# Source files hashed whole up to this size; bigger ones by their size, first and last
# MiB, so a fingerprint of a large corpus costs milliseconds, not a read of it.
_FULL_HASH_BYTES = 8 << 20
_PARTIAL_HASH_BYTES = 1 << 20


def record_layout(spec: store.ShardSpec) -> store.RecordLayout:
    return store.RecordLayout.of(spec.form, spec.task_feature_lengths)


def mixture_vocabulary_checksum(leaves: Sequence[tuple[str, float]]) -> str:
    """The one vocabulary checksum of a mixture's leaf tasks (an error if they differ)."""
    checksums = {}
    for task_name, _ in leaves:
        vocab = seqio.TaskRegistry.get(task_name).output_features["targets"].vocabulary
        checksums[task_name] = vocabulary.vocabulary_checksum(vocab)
    distinct = sorted(set(checksums.values()))
    if len(distinct) != 1:
        raise ValueError(
            f"The tasks of one mixture must share one vocabulary; got checksums {checksums}. "
            "Train or prepare tasks with different vocabularies separately.")
    return distinct[0]


def shard_spec(mixture: str, task_feature_lengths: Mapping[str, int], form: forms.DataForm,
               seed: int, num_shards: int, *, split: str = "train",
               shuffle_buffer_size: int = 128,
               pack_pool: int = DEFAULT_PACK_POOL) -> store.ShardSpec:
    """The spec of a mixture's shards (the tasks must be registered)."""
    leaves = mixtures.leaf_tasks_and_rates(mixture)
    return store.ShardSpec(
        mixture=mixture, split=split, seed=int(seed), converter=form.name,
        task_feature_lengths=dict(task_feature_lengths), num_shards=int(num_shards),
        shuffle_buffer_size=int(shuffle_buffer_size),
        pack_pool=int(pack_pool),
        vocabulary_checksum=mixture_vocabulary_checksum(leaves))


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _rates(leaves: Sequence[tuple[str, float]]) -> np.ndarray:
    rates = np.array([r for _, r in leaves], np.float64)
    return rates / rates.sum()


def task_draws(spec: store.ShardSpec, shard_index: int, chunk_index: int,
               leaves: Sequence[tuple[str, float]]) -> np.ndarray:
    """Leaf-task indices of example slots [j·DRAW_CHUNK, (j+1)·DRAW_CHUNK) of a shard."""
    rng = np.random.default_rng([spec.seed, shard_index, chunk_index])
    return rng.choice(len(leaves), size=DRAW_CHUNK, p=_rates(leaves)).astype(np.int64)


def task_dataset(spec: store.ShardSpec, shard_index: int, task_index: int, task_name: str):
    """One leaf task's examples for this shard: task features only, int32, non-empty."""
    task = seqio.TaskRegistry.get(task_name)
    task_features = spec.form.task_features
    missing = [k for k in task_features if k not in task.output_features]
    if missing:
        raise ValueError(
            f"Task {task_name!r} lacks features {missing} that converter {spec.converter!r} "
            f"needs (it has {sorted(task.output_features)}). Pick the converter that matches "
            "the task (causal tasks: --converter lm).")
    ds = task.get_dataset(
        sequence_length=dict(spec.task_feature_lengths),
        split=spec.split,
        shuffle=True,
        seed=derived_seed(spec.seed, shard_index, task_index),
        shard_info=seqio.ShardInfo(shard_index, spec.num_shards),
        # Repeated, as seqio's Mixture.get_dataset does, so that a shard never ends.
        num_epochs=None,
        use_cached=False,
        shuffle_buffer_size=spec.shuffle_buffer_size,
    )
    ds = ds.map(
        lambda ex: {k: tf.cast(tf.reshape(ex[k], [-1]), tf.int32) for k in task_features},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    # An empty example occupies no position, so packing would not show it; filtering it
    # per task (before the draw) keeps every drawn label equal to one packed segment.
    return ds.filter(lambda ex: tf.add_n([tf.size(ex[k]) for k in task_features]) > 0)


def shard_rows(spec: store.ShardSpec, shard_index: int) -> tf.data.Dataset:
    """Shard `shard_index` of `spec` as an endless tf.data stream of packed rows.

    Deterministic: the same spec and shard give the same rows in every process and run
    (stateless draws, seeded seqio pipelines, tf.data's deterministic ordering).
    """
    if not 0 <= shard_index < spec.num_shards:
        raise ValueError(f"shard_index {shard_index} not in [0, {spec.num_shards}).")
    leaves = mixtures.leaf_tasks_and_rates(spec.mixture)

    def draws(chunk_index):
        return task_draws(spec, shard_index, int(chunk_index), leaves)

    # All in tf.data: pulling task examples from Python inside a generator ran ~40x
    # slower. One numpy call per chunk of draws, stateless, so tf.data may checkpoint it.
    choices = tf.data.Dataset.counter().map(
        lambda j: tf.ensure_shape(tf.numpy_function(draws, [j], tf.int64, stateful=False),
                                  [DRAW_CHUNK])).unbatch()
    datasets = [task_dataset(spec, shard_index, i, name)
                .map(lambda ex, i=i: {**ex, packing.TASK: tf.constant(i, tf.int32)})
                for i, (name, _) in enumerate(leaves)]
    mixed = tf.data.Dataset.choose_from_datasets(datasets, choices, stop_on_empty_dataset=True)
    zero_is_token = not vocabulary.zero_is_padding(  # one vocabulary: shard_spec checks
        seqio.TaskRegistry.get(leaves[0][0]).output_features["targets"].vocabulary)
    if spec.pack_pool > 1 and spec.form.packs:
        return pool_packed_rows(spec.form, mixed, spec.task_feature_lengths,
                                spec.pack_pool, len(leaves), zero_is_token)
    mixed = mixed.map(lambda ex: {k: v for k, v in ex.items() if k != packing.TASK})
    rows = spec.form.converter(zero_is_token=zero_is_token)(
        mixed, dict(spec.task_feature_lengths))
    return _with_drawn_tasks(rows, TaskLabels(spec, shard_index))


def pool_packed_rows(form: forms.DataForm, examples: tf.data.Dataset,
                     task_feature_lengths: Mapping[str, int], pool: int,
                     num_tasks: int, zero_is_token: bool = False) -> tf.data.Dataset:
    """Examples (task features and `packing.TASK`) packed `pool` at a time by
    `packing.pack_pool`, turned into model features by seqio's converter: its per-row
    conversion, after the packing that its `__call__` would do greedily. Rows carry
    `TASK_COUNTS` and `TASK_IDS` (the decoder positions': seqio's `targets`).
    `zero_is_token`: the vocabulary's id 0 is a real token (forms.DataForm.converter)."""
    converter = form.converter(zero_is_token=zero_is_token)
    examples, lengths = form.before_packing(examples, task_feature_lengths)
    rows = packing.pack_pool(examples, lengths, pool, num_tasks)

    def convert(row):
        tasks = {k: row.pop(k) for k in (TASK_COUNTS, TASK_IDS)}
        return {**converter._convert_example(row), **tasks}

    return rows.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def _with_drawn_tasks(rows: tf.data.Dataset, labels: TaskLabels) -> tf.data.Dataset:
    """In-order rows with the tasks of their examples, which are the next draws:
    `TASK_COUNTS`, and `TASK_IDS` on rows with decoder segments (segment s of a row is
    its s-th example)."""
    segment_ids = [s for s in ("encoder_segment_ids", "decoder_segment_ids")
                   if s in rows.element_spec]
    num_tasks = len(labels.leaves)

    def drawn(start, stop, segments):
        tasks = labels.labels(int(start), int(stop))
        ids = np.where(segments > 0, tasks[np.maximum(segments, 1) - 1] + 1, 0)
        return np.bincount(tasks, minlength=num_tasks).astype(np.int32), ids.astype(np.int32)

    def count(before, row):
        if segment_ids:
            n = tf.cast(tf.reduce_max([tf.reduce_max(row[s]) for s in segment_ids]), tf.int64)
        else:  # unpacked rows: one example each
            n = tf.constant(1, tf.int64)
        segments = row.get("decoder_segment_ids", tf.zeros([0], tf.int32))
        counts, ids = tf.numpy_function(drawn, [before, before + n, segments],
                                        [tf.int32, tf.int32], stateful=False)
        out = {**row, TASK_COUNTS: tf.ensure_shape(counts, [num_tasks])}
        if "decoder_segment_ids" in row:
            out[TASK_IDS] = tf.ensure_shape(ids, segments.shape)
        return before + n, out

    return rows.scan(tf.constant(0, tf.int64), count)


class TaskLabels:
    """Which leaf task each example of a shard came from, by its position in the shard
    (the order of the draws, which greedy packing keeps)."""

    def __init__(self, spec: store.ShardSpec, shard_index: int):
        self._spec, self._shard = spec, shard_index
        self.leaves = mixtures.leaf_tasks_and_rates(spec.mixture)
        self._chunk_index, self._chunk = -1, None

    def _draws(self, chunk_index: int) -> np.ndarray:
        if chunk_index != self._chunk_index:
            self._chunk = task_draws(self._spec, self._shard, chunk_index, self.leaves)
            self._chunk_index = chunk_index
        return self._chunk

    def labels(self, start: int, stop: int) -> np.ndarray:
        """The leaf-task index of each of examples [start, stop) of the shard."""
        out = []
        while start < stop:
            chunk, offset = divmod(start, DRAW_CHUNK)
            end = min(stop - start, DRAW_CHUNK - offset)
            out.append(self._draws(chunk)[offset:offset + end])
            start += end
        return np.concatenate(out) if out else np.zeros(0, np.int64)


DOMAIN_IDS = "decoder_domain_ids"


def domain_ids(task_ids: np.ndarray, label_domains: Sequence[int]) -> np.ndarray:
    """int32 of `task_ids`' shape: for every decoder position of packed rows, 1 + the
    domain of its example, 0 on padding. `task_ids` are the rows' `TASK_IDS` (1 + the
    leaf-task index of each position's example, 0 on padding) and `label_domains` maps
    a leaf-task index to its domain (`mixtures.leaf_components`)."""
    table = np.concatenate([[0], np.asarray(label_domains, np.int64) + 1]).astype(np.int32)
    return table[np.asarray(task_ids, np.int64)]


def row_stats(rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """What packed rows [R, L] hold: examples (segments) per row, non-padding tokens per
    token feature, and tokens with a loss weight (of a preference pair: one example,
    both responses scored)."""
    tokens = {f: int(np.count_nonzero(rows[s if s in rows else f]))  # rows made before
              for f, s in TOKEN_SEGMENTS.items() if f in rows}  # pairs had segment ids
    if "rating" in rows:
        return {"segments": np.ones(len(rows["rating"]), np.int64), "tokens": tokens,
                "loss_tokens": int(np.count_nonzero(rows["chosen_response"])
                                   + np.count_nonzero(rows["rejected_response"]))}
    segments = [rows[s] for s in TOKEN_SEGMENTS.values() if s in rows]
    return {
        "segments": np.max(np.stack([s.max(axis=1) for s in segments]), axis=0),
        "tokens": tokens,
        "loss_tokens": int(np.count_nonzero(rows["decoder_loss_weights"])),
    }


@dataclasses.dataclass
class RowCounts:
    """Running totals of `row_stats` over rows as they are written, and their SHA-256."""

    tokens: dict[str, int]
    task_counts: np.ndarray | int = 0  # examples per leaf task
    loss_tokens: int = 0
    segments: int = 0
    rows: int = 0
    digest: Any = dataclasses.field(default_factory=hashlib.sha256)

    def add(self, row: Mapping[str, np.ndarray], record: bytes,
            task_counts: np.ndarray) -> None:
        self.digest.update(record)
        self.task_counts = self.task_counts + np.asarray(task_counts, np.int64)
        stats = row_stats({k: np.asarray(v)[None] for k, v in row.items()})
        for f, n in stats["tokens"].items():
            self.tokens[f] += n
        self.loss_tokens += stats["loss_tokens"]
        self.segments += int(stats["segments"].sum())
        self.rows += 1


def _file_digest(path: str) -> str:
    size = tf.io.gfile.stat(path).length
    h = hashlib.sha256(f"{os.path.basename(path)}:{size}".encode())
    with tf.io.gfile.GFile(path, "rb") as f:
        if size <= _FULL_HASH_BYTES:
            h.update(f.read())
        else:
            h.update(f.read(_PARTIAL_HASH_BYTES))
            f.seek(size - _PARTIAL_HASH_BYTES)
            h.update(f.read(_PARTIAL_HASH_BYTES))
    return h.hexdigest()


def source_fingerprint(mixture: str, split: str) -> str:
    """A short hash that changes when the files a mixture's sources read for `split`
    change: every file's name, size and content (whole up to 8 MiB, else the first and
    last MiB). Sources without files (a function, TFDS) count by their class name only:
    a change in them is not seen."""
    h = hashlib.sha256()
    sources = {id(t.source): t.source for t in mixtures.leaf_tasks(mixture)}
    for source in sources.values():
        h.update(type(source).__name__.encode())
        if isinstance(source, seqio.FileDataSource):
            for path in sorted(source.list_shards(split)):
                h.update(_file_digest(path).encode())
    return h.hexdigest()[:16]
