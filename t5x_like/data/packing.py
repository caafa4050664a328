"""Pool packing: rows filled best-fit from a pool of examples, not greedily in order.

seqio's packed converters pack greedily and in order: an example that does not fit the
open row closes it, whatever room is left. `pack_pool` instead takes the stream's
examples `pool` at a time and packs each pool on its own, best-fit decreasing over
every length the row has at once (encoder-decoder: inputs and targets; prefix LM and
LM: the one decoder length):
  - examples sorted by their largest share of a row, longest first;
  - each goes into the open row where it fits leaving the least room (the sum of the
    row's free shares after it), or opens a new row.
Rows are then ordered by their first example, and the segments of a row keep the
stream's order, so the first rows of a pool hold its first examples.

What that keeps:
  - the mixture rates: every example of a pool is in that pool's rows (nothing is
    dropped, and nothing waits beyond its pool, long examples included), so the task
    shares of any run of whole pools are exactly the drawn ones;
  - determinism and exact resume: a pool's rows are a pure function of its examples,
    with no state carried from one pool to the next (tf.data's `skip` fast-forwards);
  - the row format: the packed task features are seqio's (`<f>`, `<f>_segment_ids`,
    `<f>_positions`, segment ids from 1 in each row, positions from 0 in each segment,
    0 = padding), and seqio's converter turns them into model features.
What it costs: each pool's last rows may be part-full (about one row per feature-length
dimension per pool), and a shard's first row waits for a whole pool of examples.

Every row also carries, from the `task` feature of the examples, `TASK_COUNTS`: how
many of its examples came from each leaf task, so per-task counts stay exact; and
`TASK_IDS`: the leaf task of every `targets` position's example, so a per-domain loss
labels each position with the task its segment came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

TASK = "task"  # an example's leaf-task index (scalar int64)
TASK_COUNTS = "task_counts"  # a row's examples per leaf task, int32[num_tasks]
# Per `targets` position of a row: 1 + the leaf-task index of its example, 0 on padding.
TASK_IDS = "task_ids"


def assign_rows(lengths: np.ndarray, capacity: Sequence[int]) -> list[np.ndarray]:
    """Best-fit-decreasing rows of examples with `lengths` [n, F] in rows of `capacity`
    [F]: the example indices of each row, ascending, rows ordered by their first index."""
    lengths = np.asarray(lengths, np.int64).reshape(len(lengths), -1)
    capacity = np.asarray(capacity, np.int64)
    if np.any(lengths > capacity):
        raise ValueError(f"an example is longer than the row: {lengths.max(0)} > {capacity}")
    share = lengths / capacity
    free = np.empty((len(lengths), len(capacity)), np.int64)  # free room of open rows
    row_of = np.empty(len(lengths), np.int64)
    rows = 0
    for i in np.argsort(-share.max(axis=1), kind="stable"):
        room = free[:rows] - lengths[i]
        fits = np.flatnonzero((room >= 0).all(axis=1))
        if len(fits):
            row = fits[np.argmin((room[fits] / capacity).sum(axis=1))]  # first of ties
        else:
            row, rows = rows, rows + 1
            free[row] = capacity
        free[row] -= lengths[i]
        row_of[i] = row
    members = [np.flatnonzero(row_of == r) for r in range(rows)]
    return sorted(members, key=lambda m: m[0])


def _pack_pool_numpy(features: Sequence[str], capacity: Sequence[int], num_tasks: int,
                     tasks: np.ndarray, lengths: np.ndarray, *tokens: np.ndarray):
    """One pool: padded tokens [n, L_f] per feature → packed rows [R, L_f] per feature
    (tokens, segment ids, positions), task counts [R, num_tasks] and the task ids of
    the `targets` positions [R, L_targets]."""
    rows = assign_rows(lengths, capacity)
    out = []
    task_ids = np.zeros((len(rows), capacity[features.index("targets")]), np.int32)
    for f, (values, length) in enumerate(zip(tokens, capacity)):
        packed = np.zeros((3, len(rows), length), np.int32)  # tokens, segments, positions
        for r, members in enumerate(rows):
            at = 0
            for segment, i in enumerate(members, start=1):
                n = lengths[i, f]
                packed[0, r, at:at + n] = values[i, :n]
                packed[1, r, at:at + n] = segment
                packed[2, r, at:at + n] = np.arange(n)
                if features[f] == "targets":
                    task_ids[r, at:at + n] = tasks[i] + 1
                at += n
        out.extend(packed)
    counts = np.zeros((len(rows), num_tasks), np.int32)
    for r, members in enumerate(rows):
        counts[r] = np.bincount(tasks[members], minlength=num_tasks)
    return (*out, counts, task_ids)


def pack_pool(examples: tf.data.Dataset, feature_lengths: Mapping[str, int], pool: int,
              num_tasks: int) -> tf.data.Dataset:
    """Packs `examples` (1-D int32 features, `targets` among them, trimmed here to
    `feature_lengths`, and a scalar `TASK`) `pool` at a time into rows of seqio's packed
    format plus `TASK_COUNTS` and `TASK_IDS`. The stream's last, partial pool is packed
    too."""
    names = sorted(feature_lengths)
    capacity = [int(feature_lengths[k]) for k in names]

    @tf.autograph.experimental.do_not_convert
    def trim(ex):
        out = {k: ex[k][:feature_lengths[k]] for k in names}
        out["lengths"] = tf.stack([tf.size(out[k]) for k in names])
        out[TASK] = tf.cast(ex[TASK], tf.int32)
        return out

    @tf.autograph.experimental.do_not_convert
    def pack(batch):
        specs = [tf.int32] * (3 * len(names) + 2)
        arrays = tf.numpy_function(
            lambda tasks, lengths, *tokens: _pack_pool_numpy(
                names, capacity, num_tasks, tasks, lengths, *tokens),
            [batch[TASK], batch["lengths"], *[batch[k] for k in names]], specs,
            stateful=False)
        row = {}
        for f, (k, length) in enumerate(zip(names, capacity)):
            for j, suffix in enumerate(("", "_segment_ids", "_positions")):
                row[k + suffix] = tf.ensure_shape(arrays[3 * f + j], [None, length])
        row[TASK_COUNTS] = tf.ensure_shape(arrays[-2], [None, num_tasks])
        row[TASK_IDS] = tf.ensure_shape(arrays[-1], [None, feature_lengths["targets"]])
        return row

    padded = {k: [n] for k, n in zip(names, capacity)}
    padded.update({"lengths": [len(names)], TASK: []})
    return (examples.map(trim, num_parallel_calls=tf.data.AUTOTUNE)
            .padded_batch(pool, padded_shapes=padded)
            .map(pack).unbatch())
