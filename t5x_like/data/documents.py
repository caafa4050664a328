"""Unusable source documents (empty, blank or not valid UTF-8): dropping and counting them.

`filter_documents` is a SeqIO preprocessor for a task's preprocessor list, placed before
tokenization; `count_skipped` reads a source once with the same predicate, and
`unusable_documents` reports the counts for every source of a task or mixture: dropped
by `filter_documents`, or (a user's task without it) kept and trained on, which data
preparation then reports as a warning instead of passing over it in silence.
"""

from __future__ import annotations

import os
from typing import Any

import seqio
import tensorflow as tf

from t5x_like.data import mixtures

OK, EMPTY, NON_UTF8 = 0, 1, 2
TEXT_KEY = "text"


def document_status(text: tf.Tensor) -> tf.Tensor:
    """0 for a usable document, 1 if empty (only whitespace), 2 if not valid UTF-8.

    UTF-8 validity: transcoding with errors="ignore" drops invalid bytes and changes
    nothing else, so the text is valid iff it comes back unchanged (checked against
    Python's bytes.decode in tests/test_tasks.py).
    """
    valid = tf.equal(
        tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="ignore",
                                     replace_control_characters=False), text)
    empty = tf.equal(tf.strings.strip(text), "")
    return tf.where(tf.logical_not(valid), NON_UTF8, tf.where(empty, EMPTY, OK))


def filter_documents(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """SeqIO preprocessor: drops empty and non-UTF-8 documents (feature "text")."""
    return dataset.filter(lambda x: tf.equal(document_status(x[TEXT_KEY]), OK))


def _status_of_element(spec):
    """A tf function: the status of one source element (a string, or a dict whose string
    features are the text: blank when all of them are, invalid when any is)."""
    if isinstance(spec, dict):
        keys = [k for k, v in spec.items() if v.dtype == tf.string and v.shape.rank == 0]
        if not keys:
            return None
        if TEXT_KEY in keys:
            return lambda x: document_status(x[TEXT_KEY])

        def status(x):
            each = tf.stack([document_status(x[k]) for k in keys])
            invalid = tf.reduce_any(tf.equal(each, NON_UTF8))
            blank = tf.reduce_all(tf.equal(each, EMPTY))
            return tf.where(invalid, NON_UTF8, tf.where(blank, EMPTY, OK))
        return status
    if spec.dtype == tf.string and spec.shape.rank == 0:
        return document_status
    return None


def count_skipped(source: seqio.DataSource, split: str) -> dict[str, int] | None:
    """{"documents", "kept", "empty", "non_utf8"} of one source split, read once (None
    for a source whose elements hold no text)."""
    ds = source.get_dataset(split=split, shuffle=False)
    status = _status_of_element(ds.element_spec)
    if status is None:
        return None
    counts = ds.map(lambda x: tf.one_hot(status(x), 3, dtype=tf.int64))
    total = counts.reduce(tf.zeros([3], tf.int64), lambda a, b: a + b).numpy()
    return {"documents": int(total.sum()), "kept": int(total[OK]),
            "empty": int(total[EMPTY]), "non_utf8": int(total[NON_UTF8])}


def unusable_documents(name: str, split: str) -> dict[str, dict[str, Any]]:
    """`count_skipped` for every source the leaf tasks of `name` read, with `dropped`:
    True when the tasks apply `filter_documents`, False when the unusable documents go
    on into training (a user's task without the filter).

    Keyed by the longest common prefix of the names of the tasks sharing a source (the
    domain for the shipped tasks: "code" for code_ul2_r1 ... code_ul2_s).
    """
    by_source: dict[int, tuple[seqio.DataSource, list[str], bool]] = {}
    for task in mixtures.leaf_tasks(name):
        dropped = filter_documents in task.preprocessors
        by_source.setdefault(id(task.source), (task.source, [], dropped))[1].append(task.name)
    out = {}
    for source, names, dropped in by_source.values():
        counts = count_skipped(source, split)
        if counts is not None:
            label = os.path.commonprefix(names).rstrip("_") if len(names) > 1 else names[0]
            out[label or names[0]] = {**counts, "dropped": dropped}
    return dict(sorted(out.items()))
