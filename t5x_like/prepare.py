"""Materialise model-ready examples of a SeqIO Task/Mixture as ArrayRecord shards.

SeqIO defines *what* an example is (source → tokenize → UL2 denoiser → feature
converter with packing); this module runs that pipeline once, offline, and writes the
packed rows to an ArrayRecord store that `t5x_like.loader` reads with grain (random
access, per-host sharding, an iterator state of a few integers). Reka trained a single
epoch, so denoising once at prepare time loses nothing (../shared/DESIGN.md).

Store layout (`out_dir/`):
  manifest.json                                what was asked for and what was written
  train-00003-of-00008.array_record            one ArrayRecord file per SeqIO shard
  train-00003-of-00008.done.json               per-shard done record (counts), written last

Record format: one record per packed row; the int32 arrays of the model features,
in the fixed order of `manifest["features"]`, concatenated as raw `np.ndarray.tobytes()`
(little-endian). Raw bytes parse at 100-200k rows/s, far faster than tf.train.Example.

Per-task counts: seqio mixtures do not label their examples and the feature converters
drop extra features. So this module does the mixing itself, in tf.data: a numpy RNG
seeded by (seed, shard) draws the leaf task of every example slot with the mixture's
(flattened) rates, `tf.data.Dataset.choose_from_datasets` takes that task's next example,
and the draws are kept. The stream goes through the seqio feature converter, whose
packing is greedy and in order and never drops an example; the number of examples in the
written rows is the sum over rows of the largest segment id, so the per-task counts are
the label counts of that prefix of the draws: real counts, not rate estimates.

Parallelism: one process per SeqIO shard (`seqio.ShardInfo(index, num_shards)`), spawned
(TensorFlow does not survive fork), each writing one shard atomically (tmp name, fsync,
rename) and then its done record. A re-run skips shards that have a done record, so a
killed run resumes where it stopped; leftover tmp files are ignored and replaced.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import difflib
import hashlib
import importlib
import json
import logging
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_TASK_MODULES = ("tasks",)

# Model features written per converter, in record order. Fixed here (not taken from dict
# order) so that the byte layout of a record never depends on tf.data internals.
CONVERTER_FEATURES = {
    "encdec": (
        "encoder_input_tokens",
        "encoder_segment_ids",
        "encoder_positions",
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_loss_weights",
        "decoder_segment_ids",
        "decoder_positions",
    ),
    "prefix_lm": (
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_loss_weights",
        "decoder_segment_ids",
        "decoder_positions",
        "decoder_causal_attention",
    ),
    "lm": (
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_loss_weights",
        "decoder_segment_ids",
        "decoder_positions",
    ),
}
# Task features each converter consumes (seqio's TASK_FEATURES).
CONVERTER_TASK_FEATURES = {
    "encdec": ("inputs", "targets"),
    "prefix_lm": ("inputs", "targets"),
    "lm": ("targets",),
}
# Segment-id features whose non-zero entries are the non-padding token positions.
_TOKEN_SEGMENTS = {
    "encoder_input_tokens": "encoder_segment_ids",
    "decoder_target_tokens": "decoder_segment_ids",
}
# Fields of the manifest that define the store's content; any difference is an error.
_SPEC_FIELDS = (
    "mixture",
    "split",
    "seed",
    "converter",
    "task_feature_lengths",
    "num_examples",
    "num_shards",
    "shuffle_buffer_size",
    "vocabulary_checksum",
)


class ManifestMismatchError(ValueError):
    """The store at out_dir was prepared with other settings than the ones requested."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What a store contains; pickled to the worker processes."""

    mixture: str
    split: str
    seed: int
    converter: str
    task_feature_lengths: dict[str, int]
    num_examples: int
    num_shards: int
    task_modules: tuple[str, ...]
    shuffle_buffer_size: int = 128


# ----------------------------------------------------------------------------- helpers


def shard_file_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.array_record"


def _done_file_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.done.json"


def examples_per_shard(num_examples: int, num_shards: int) -> list[int]:
    """Splits N rows over K shards as evenly as possible (the first N % K get one more)."""
    base, extra = divmod(num_examples, num_shards)
    return [base + (1 if i < extra else 0) for i in range(num_shards)]


def _import_task_modules(task_modules: Sequence[str]) -> None:
    for name in task_modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(
                f"Could not import task module {name!r} ({e}). Task modules register the "
                "SeqIO tasks/mixtures at import; pass importable module names "
                "(e.g. --task_module tasks) and make sure their directory is on sys.path."
            ) from e


def resolve_mixture_or_task(name: str):
    """Returns the registered seqio Task or Mixture `name`, or an error naming close ones."""
    import seqio

    mixtures = seqio.MixtureRegistry.names()
    tasks = seqio.TaskRegistry.names()
    if name in mixtures:
        return seqio.MixtureRegistry.get(name)
    if name in tasks:
        return seqio.TaskRegistry.get(name)
    close = difflib.get_close_matches(name, list(mixtures) + list(tasks), n=5, cutoff=0.5)
    raise ValueError(
        f"No SeqIO Task or Mixture named {name!r}. Closest registered names: {close or 'none'} "
        f"({len(mixtures)} mixtures, {len(tasks)} tasks registered). Fix the name, or import "
        "the module that registers it (--task_module)."
    )


def leaf_tasks_and_rates(name: str) -> list[tuple[str, float]]:
    """Flattens a Task/Mixture into (leaf task name, normalised rate), sorted by name.

    seqio multiplies rates through sub-mixtures (`Mixture.get_rate`); sorting makes the
    label numbering independent of registration order.
    """
    import seqio

    provider = resolve_mixture_or_task(name)
    if isinstance(provider, seqio.Mixture):
        pairs = [(t.name, float(provider.get_rate(t))) for t in provider.tasks]
    else:
        pairs = [(provider.name, 1.0)]
    pairs = sorted((n, r) for n, r in pairs if r > 0)
    total = sum(r for _, r in pairs)
    if not pairs or total <= 0:
        raise ValueError(f"Mixture {name!r} has no task with a positive rate: {pairs}.")
    return [(n, r / total) for n, r in pairs]


def vocabulary_checksum(vocab) -> str:
    """A short hash identifying a vocabulary, so a store is never read with another one.

    Uses `t5x_like.vocabulary.vocabulary_checksum` when that module provides it; otherwise
    hashes the class, size and (for SentencePiece) the serialised model.
    """
    try:
        from t5x_like import vocabulary as _vocabulary  # pylint: disable=g-import-not-at-top

        return str(_vocabulary.vocabulary_checksum(vocab))
    except (ImportError, AttributeError, TypeError):
        pass
    digest = hashlib.sha256()
    digest.update(type(vocab).__name__.encode())
    digest.update(str(vocab.vocab_size).encode())
    digest.update(str(getattr(vocab, "extra_ids", 0)).encode())
    sp_model = getattr(vocab, "sp_model", None)
    if sp_model:
        digest.update(sp_model)
    return digest.hexdigest()[:16]


def _mixture_vocabulary_checksum(leaves: Sequence[tuple[str, float]]) -> str:
    import seqio

    checksums = {}
    for task_name, _ in leaves:
        task = seqio.TaskRegistry.get(task_name)
        checksums[task_name] = vocabulary_checksum(task.output_features["targets"].vocabulary)
    distinct = sorted(set(checksums.values()))
    if len(distinct) != 1:
        raise ValueError(
            f"The tasks of one store must share one vocabulary; got checksums {checksums}. "
            "Prepare tasks with different vocabularies into different stores."
        )
    return distinct[0]


def _check_converter_and_lengths(converter: str, task_feature_lengths: Mapping[str, int]):
    if converter not in CONVERTER_FEATURES:
        raise ValueError(
            f"Unknown converter {converter!r}; expected one of {sorted(CONVERTER_FEATURES)}."
        )
    expected = set(CONVERTER_TASK_FEATURES[converter])
    if set(task_feature_lengths) != expected:
        raise ValueError(
            f"Converter {converter!r} takes task feature lengths for {sorted(expected)}, got "
            f"{dict(task_feature_lengths)}. Fix --feature_lengths (e.g. "
            f"{','.join(f'{k}=512' for k in sorted(expected))})."
        )
    bad = {k: v for k, v in task_feature_lengths.items() if int(v) <= 0}
    if bad:
        raise ValueError(f"Feature lengths must be positive, got {bad}.")


def _make_converter(converter: str):
    import seqio

    if converter == "encdec":
        return seqio.EncDecFeatureConverter(pack=True)
    if converter == "prefix_lm":
        return seqio.PrefixLMFeatureConverter(pack=True, loss_on_targets_only=True)
    return seqio.LMFeatureConverter(pack=True)


def model_feature_lengths(converter: str, task_feature_lengths: Mapping[str, int]) -> dict:
    """The packed row length of every model feature (seqio's get_model_feature_lengths)."""
    lengths = _make_converter(converter).get_model_feature_lengths(dict(task_feature_lengths))
    return {name: int(lengths[name]) for name in CONVERTER_FEATURES[converter]}


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _fsync_dir(path: str) -> None:
    # Makes the rename itself durable; a crash after it must not lose the shard.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- worker


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


_CHOICE_CHUNK = 4096


def _task_dataset(spec: _Spec, shard_index: int, task_index: int, task_name: str):
    """One leaf task's examples for this shard: task features only, int32, non-empty."""
    import seqio
    import tensorflow as tf

    task = seqio.TaskRegistry.get(task_name)
    task_features = CONVERTER_TASK_FEATURES[spec.converter]
    missing = [k for k in task_features if k not in task.output_features]
    if missing:
        raise ValueError(
            f"Task {task_name!r} lacks features {missing} that converter {spec.converter!r} "
            f"needs (it has {sorted(task.output_features)}). Pick the converter that matches "
            "the task (causal tasks: --converter lm)."
        )
    ds = task.get_dataset(
        sequence_length=dict(spec.task_feature_lengths),
        split=spec.split,
        shuffle=True,
        seed=_derived_seed(spec.seed, shard_index, task_index),
        shard_info=seqio.ShardInfo(shard_index, spec.num_shards),
        # Repeated, as seqio's Mixture.get_dataset does, so the draw is exact for any N.
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


def _mixed_dataset(spec: _Spec, shard_index: int, leaves: Sequence[tuple[str, float]], drawn: list):
    """The shard's example stream: leaf tasks drawn with the mixture's rates.

    The draws come from a numpy RNG seeded by (seed, shard) in chunks; every chunk is
    appended to `drawn` as it is made, so `np.concatenate(drawn)[:k]` labels the first k
    examples. `choose_from_datasets` takes the next example of the drawn task, in order.
    All in tf.data: pulling task examples from Python inside a generator ran ~40x slower.
    """
    import tensorflow as tf

    rates = np.array([r for _, r in leaves])
    rates = rates / rates.sum()

    def choice_chunks():
        rng = np.random.default_rng([spec.seed, shard_index])
        while True:
            chunk = rng.choice(len(leaves), size=_CHOICE_CHUNK, p=rates).astype(np.int64)
            drawn.append(chunk)
            yield chunk

    choices = tf.data.Dataset.from_generator(
        choice_chunks, output_signature=tf.TensorSpec([_CHOICE_CHUNK], tf.int64)
    ).unbatch()
    datasets = [_task_dataset(spec, shard_index, i, name) for i, (name, _) in enumerate(leaves)]
    return tf.data.Dataset.choose_from_datasets(datasets, choices, stop_on_empty_dataset=True)


def _prepare_shard(spec: _Spec, shard_index: int, out_dir: str) -> dict:
    """Writes shard `shard_index` of the store and its done record; returns the record."""
    from array_record.python import array_record_module

    _import_task_modules(spec.task_modules)
    start = time.time()
    leaves = leaf_tasks_and_rates(spec.mixture)
    num_rows = examples_per_shard(spec.num_examples, spec.num_shards)[shard_index]
    feature_names = CONVERTER_FEATURES[spec.converter]
    lengths = model_feature_lengths(spec.converter, spec.task_feature_lengths)

    drawn: list[np.ndarray] = []
    ds = _mixed_dataset(spec, shard_index, leaves, drawn)
    ds = _make_converter(spec.converter)(ds, dict(spec.task_feature_lengths))

    name = shard_file_name(spec.split, shard_index, spec.num_shards)
    final_path = os.path.join(out_dir, name)
    tmp_path = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tokens = {f: 0 for f in _TOKEN_SEGMENTS if f in feature_names}
    loss_tokens = 0
    segments = 0
    rows = 0
    # group_size:1 keeps every record individually addressable: the loader's shuffled
    # reads then decode one record, not a group of them.
    writer = array_record_module.ArrayRecordWriter(tmp_path, "group_size:1")
    try:
        for row in ds.take(num_rows).as_numpy_iterator():
            arrays = [np.asarray(row[f], dtype="<i4") for f in feature_names]
            for f, a in zip(feature_names, arrays):
                if a.shape != (lengths[f],):
                    raise ValueError(f"Feature {f} has shape {a.shape}, expected ({lengths[f]},).")
            writer.write(b"".join(a.tobytes() for a in arrays))
            for f in tokens:
                tokens[f] += int(np.count_nonzero(row[_TOKEN_SEGMENTS[f]]))
            loss_tokens += int(np.count_nonzero(row["decoder_loss_weights"]))
            segments += max(int(np.max(row[s])) for s in _TOKEN_SEGMENTS.values() if s in row)
            rows += 1
    finally:
        writer.close()
        if rows != num_rows:
            os.remove(tmp_path)
    if rows != num_rows:
        raise RuntimeError(
            f"Shard {shard_index} of {spec.num_shards}: the stream ended after {rows} of "
            f"{num_rows} rows. A task of {spec.mixture!r} has no examples for split "
            f"{spec.split!r} in this shard (a shard must hold at least one document of every "
            "task): use fewer --num_shards, or check the tasks' sources."
        )
    labels = np.concatenate(drawn) if drawn else np.zeros([0], np.int64)
    if segments > len(labels):
        os.remove(tmp_path)
        raise RuntimeError(
            f"Shard {shard_index}: rows hold {segments} examples but only {len(labels)} were "
            "drawn; the feature converter no longer packs in order, so per-task counts "
            "cannot be derived. Report this with the seqio version."
        )
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, final_path)
    _fsync_dir(out_dir)

    counts = np.bincount(labels[:segments], minlength=len(leaves))
    record = {
        "shard_index": shard_index,
        "file": name,
        "num_examples": rows,
        "num_task_examples": segments,
        "task_counts": {leaves[i][0]: int(c) for i, c in enumerate(counts)},
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "seconds": round(time.time() - start, 3),
    }
    _write_json(os.path.join(out_dir, _done_file_name(spec.split, shard_index, spec.num_shards)), record)
    return record


# ----------------------------------------------------------------------------- manifest


def read_manifest(out_dir: str) -> dict | None:
    """The manifest of a store, complete or not; None where there is none."""
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _check_spec(out_dir: str, manifest: Mapping, requested: Mapping) -> None:
    mismatched = {
        k: (manifest.get(k), requested[k]) for k in _SPEC_FIELDS if manifest.get(k) != requested[k]
    }
    if mismatched:
        details = "; ".join(f"{k}: store has {a!r}, requested {b!r}" for k, (a, b) in mismatched.items())
        raise ManifestMismatchError(
            f"The store {out_dir} was prepared with other settings ({details}). Nothing was "
            f"changed. Fix: pass a new --out directory, or delete {out_dir} to rebuild it "
            "with the requested settings."
        )


def load_manifest(out_dir: str) -> dict:
    """Returns the manifest of a complete store, or an error saying how to make one."""
    manifest = read_manifest(out_dir)
    if manifest is None or not manifest.get("complete"):
        raise FileNotFoundError(
            f"No complete prepared store at {out_dir} (manifest.json "
            f"{'missing' if manifest is None else 'marks it incomplete'}). Run "
            f"`python -m t5x_like.prepare ... --out {out_dir}` (it resumes a partial store)."
        )
    return manifest


def _parse_task_feature_lengths(task_feature_lengths: Mapping[str, int] | str) -> dict[str, int]:
    if isinstance(task_feature_lengths, str):
        pairs = {}
        for item in filter(None, task_feature_lengths.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not value.strip().isdigit():
                raise ValueError(
                    f"Bad feature length {item!r} in {task_feature_lengths!r}; expected "
                    "name=int pairs such as inputs=512,targets=512."
                )
            pairs[key.strip()] = int(value)
        return pairs
    return {str(k): int(v) for k, v in task_feature_lengths.items()}


def _skipped_documents(mixture: str, split: str) -> dict | None:
    """Documents the tasks drop (empty / non-UTF-8), per domain, over the whole source
    split, from `tasks.reka_mix.skipped_documents`; None for tasks that do not count."""
    try:
        from tasks import reka_mix  # pylint: disable=g-import-not-at-top

        counts = reka_mix.skipped_documents(mixture, split)
    except Exception as e:  # pylint: disable=broad-except
        # Any other task module (tests, users') has no such counter; not an error.
        logging.info("No skipped-document counts for %s: %s", mixture, e)
        return None
    return counts or None


def prepare(
    mixture: str,
    task_feature_lengths: Mapping[str, int] | str,
    converter: str,
    num_examples: int,
    seed: int,
    out_dir: str,
    num_shards: int = 8,
    workers: int | None = None,
    *,
    split: str = "train",
    task_modules: Sequence[str] = DEFAULT_TASK_MODULES,
    shuffle_buffer_size: int = 128,
) -> dict:
    """Materialises `num_examples` packed rows of `mixture` into an ArrayRecord store.

    Args:
      mixture: a registered seqio Mixture or Task name.
      task_feature_lengths: e.g. {"inputs": 512, "targets": 512} or "inputs=512,targets=512".
      converter: "encdec" | "prefix_lm" | "lm" (seqio's EncDec/PrefixLM/LM converters, packed).
      num_examples: number of packed rows N (model-ready examples) to write.
      seed: drives task selection, seqio shuffling and the denoisers.
      out_dir: the store directory (created if missing).
      num_shards: K; one SeqIO shard (`seqio.ShardInfo(i, K)`) per ArrayRecord file.
      workers: processes (spawned); 1 runs in this process. Default min(K, cpu count).
      split: the SeqIO split to read.
      task_modules: modules to import (in every worker) so the tasks are registered.
      shuffle_buffer_size: per-task seqio shuffle buffer. Small by default: every shard
        fills one buffer per leaf task (35 for reka_mix_ul2) before its first row, and
        the loader shuffles the rows globally anyway (seqio's default 1000 made a
        128-row shard spend most of its time filling buffers).

    Returns:
      The manifest dict (also in `out_dir/manifest.json`).

    Raises:
      ManifestMismatchError: the store exists with other settings (nothing is deleted).
    """
    task_feature_lengths = _parse_task_feature_lengths(task_feature_lengths)
    _check_converter_and_lengths(converter, task_feature_lengths)
    if num_examples <= 0 or num_shards <= 0:
        raise ValueError(f"num_examples and num_shards must be positive, got {num_examples}, {num_shards}.")
    if num_shards > num_examples:
        raise ValueError(
            f"num_shards={num_shards} exceeds num_examples={num_examples}; every shard needs "
            "at least one row. Lower --num_shards."
        )
    task_modules = tuple(task_modules)
    _import_task_modules(task_modules)
    leaves = leaf_tasks_and_rates(mixture)
    spec = _Spec(
        mixture=mixture,
        split=split,
        seed=int(seed),
        converter=converter,
        task_feature_lengths=dict(sorted(task_feature_lengths.items())),
        num_examples=int(num_examples),
        num_shards=int(num_shards),
        task_modules=task_modules,
        shuffle_buffer_size=int(shuffle_buffer_size),
    )
    requested = {
        "mixture": mixture,
        "split": split,
        "seed": spec.seed,
        "converter": converter,
        "task_feature_lengths": spec.task_feature_lengths,
        "num_examples": spec.num_examples,
        "num_shards": spec.num_shards,
        "shuffle_buffer_size": spec.shuffle_buffer_size,
        "vocabulary_checksum": _mixture_vocabulary_checksum(leaves),
    }

    os.makedirs(out_dir, exist_ok=True)
    existing = read_manifest(out_dir)
    if existing is not None:
        _check_spec(out_dir, existing, requested)
        if existing.get("complete"):
            return existing
    lengths = model_feature_lengths(converter, task_feature_lengths)
    manifest = {
        **requested,
        "format_version": _FORMAT_VERSION,
        "complete": False,
        "model_feature_lengths": lengths,
        "features": [
            {"name": f, "dtype": "int32", "shape": [lengths[f]]} for f in CONVERTER_FEATURES[converter]
        ],
        "record_bytes": 4 * sum(lengths.values()),
        "task_rates": dict(leaves),
        "shards": [shard_file_name(split, i, num_shards) for i in range(num_shards)],
        "examples_per_shard": examples_per_shard(num_examples, num_shards),
    }
    # Written before any shard so that a killed run still leaves the spec to check against.
    if existing is None:
        _write_json(os.path.join(out_dir, MANIFEST_NAME), manifest)

    todo = [
        i
        for i in range(num_shards)
        if not os.path.exists(os.path.join(out_dir, _done_file_name(split, i, num_shards)))
    ]
    logging.info("prepare %s: %d of %d shards to write into %s", mixture, len(todo), num_shards, out_dir)
    start = time.time()
    workers = workers or min(num_shards, os.cpu_count() or 1)
    if todo and (workers == 1 or len(todo) == 1):
        for i in todo:
            _prepare_shard(spec, i, out_dir)
    elif todo:
        # spawn, not fork: TensorFlow's threads do not survive fork. Workers get sys.path.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
            futures = {pool.submit(_prepare_shard, spec, i, out_dir): i for i in todo}
            for future in concurrent.futures.as_completed(futures):
                future.result()
    write_seconds = time.time() - start

    records = []
    for i in range(num_shards):
        with open(os.path.join(out_dir, _done_file_name(split, i, num_shards))) as f:
            records.append(json.load(f))
    task_counts = {name: sum(r["task_counts"].get(name, 0) for r in records) for name, _ in leaves}
    tokens = {f: sum(r["tokens"][f] for r in records) for f in records[0]["tokens"]}
    token_positions = {f: num_examples * lengths[f] for f in tokens}
    total_tokens = sum(tokens.values())
    manifest.update(
        complete=True,
        task_counts=task_counts,
        num_task_examples=sum(r["num_task_examples"] for r in records),
        tokens=total_tokens,
        tokens_per_feature=tokens,
        loss_tokens=sum(r["loss_tokens"] for r in records),
        padding_fraction=1.0 - total_tokens / sum(token_positions.values()),
        padding_fraction_per_feature={f: 1.0 - tokens[f] / token_positions[f] for f in tokens},
        skipped_documents=_skipped_documents(mixture, split),
        shard_seconds=[r["seconds"] for r in records],
        prepare_seconds_this_run=round(write_seconds, 3),
    )
    _write_json(os.path.join(out_dir, MANIFEST_NAME), manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixture", required=True, help="seqio Mixture or Task name")
    parser.add_argument("--feature_lengths", required=True, help="e.g. inputs=512,targets=512")
    parser.add_argument("--converter", required=True, choices=sorted(CONVERTER_FEATURES))
    parser.add_argument("--num_examples", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num_shards", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--shuffle_buffer_size", type=int, default=128, help="per-task seqio shuffle buffer")
    parser.add_argument(
        "--task_module", action="append", default=None,
        help="module registering the tasks (repeatable); default: tasks",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    manifest = prepare(
        args.mixture,
        args.feature_lengths,
        args.converter,
        args.num_examples,
        args.seed,
        args.out,
        args.num_shards,
        args.workers,
        split=args.split,
        task_modules=tuple(args.task_module or DEFAULT_TASK_MODULES),
        shuffle_buffer_size=args.shuffle_buffer_size,
    )
    summary = {k: manifest[k] for k in ("mixture", "num_examples", "tokens", "padding_fraction", "task_counts")}
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
