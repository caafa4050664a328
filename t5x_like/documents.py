"""Dropping unusable source documents (empty, blank or not valid UTF-8), and counting them.

`filter_documents` is a SeqIO preprocessor for a task's preprocessor list, placed before
tokenization; `count_skipped` reads a source once with the same predicate, and
`skipped_documents` reports the counts for every source a task or mixture filters, so
that data preparation can say what it left out instead of dropping it silently.
"""

from __future__ import annotations

import os

import seqio
import tensorflow as tf

from t5x_like import mixtures

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


def count_skipped(source: seqio.DataSource, split: str) -> dict[str, int]:
    """{"documents", "kept", "empty", "non_utf8"} of one source split, read once."""
    ds = source.get_dataset(split=split, shuffle=False)
    counts = ds.map(lambda x: tf.one_hot(document_status(x[TEXT_KEY]), 3, dtype=tf.int64))
    total = counts.reduce(tf.zeros([3], tf.int64), lambda a, b: a + b).numpy()
    return {"documents": int(total.sum()), "kept": int(total[OK]),
            "empty": int(total[EMPTY]), "non_utf8": int(total[NON_UTF8])}


def skipped_documents(name: str, split: str) -> dict[str, dict[str, int]] | None:
    """`count_skipped` for every source that the leaf tasks of `name` filter.

    Keyed by the longest common prefix of the names of the tasks sharing a source (the
    domain for the shipped tasks: "code" for code_ul2_r1 ... code_ul2_s); None when no
    task of `name` uses `filter_documents`.
    """
    by_source: dict[int, tuple[seqio.DataSource, list[str]]] = {}
    for task in mixtures.leaf_tasks(name):
        if filter_documents in task.preprocessors:
            by_source.setdefault(id(task.source), (task.source, []))[1].append(task.name)
    if not by_source:
        return None
    out = {}
    for source, names in by_source.values():
        label = os.path.commonprefix(names).rstrip("_") if len(names) > 1 else names[0]
        out[label or names[0]] = count_skipped(source, split)
    return dict(sorted(out.items()))
