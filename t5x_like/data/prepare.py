"""Prepared stores: the first N packed rows of a SeqIO Task/Mixture, written once.

What a row is (source → tokenize → UL2 denoiser → packed feature converter, mixed with
real per-task counts) is `pipeline.py`'s; this module writes the first rows of every
SeqIO shard to an ArrayRecord store (format: `store.py`) that `loader.py` reads with
grain, for repeated experiments on one corpus. Training does not need a store: by
default it streams the same shards on the fly (`stream.py`); `train.DataConfig.store_dir`
names a store to read instead.

Two ways to run the same shards, giving byte-identical shard files:
- locally (default): one spawned process per shard (TensorFlow does not survive fork),
  each writing its shard atomically (tmp name, fsync, rename) and then its done record;
- `--runner=DirectRunner` (or `FlinkRunner`, `SparkRunner`, `DataflowRunner`, ... with
  their own Beam options after it): an Apache Beam pipeline whose elements are the shard
  indices and whose one transform is the same shard writer, as SeqIO's own
  `cache_tasks_main` runs on Beam. The store directory must then be a path every Beam
  worker writes to (a shared file system).
A re-run skips shards that have a done record, so a killed run resumes where it stopped;
leftover tmp files are ignored and replaced.

Command line (the task modules that register the mixture are named explicitly):

    python -m t5x_like.prepare --task_module tasks --mixture reka_mix_ul2 \
        --feature_lengths inputs=128,targets=128 --converter encdec \
        --num_examples 4800 --num_shards 2 --out runs/demo_encdec_ul2/data \
        [--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence

from array_record.python import array_record_module

from t5x_like import launch, process
from t5x_like.data import documents, forms, mixtures, pipeline, store
from t5x_like.data.store import ManifestMismatchError  # noqa: F401 - raised from prepare()


def _parse_task_feature_lengths(task_feature_lengths: Mapping[str, int] | str) -> dict[str, int]:
    if isinstance(task_feature_lengths, str):
        pairs = {}
        for item in filter(None, task_feature_lengths.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not value.strip().isdigit():
                raise ValueError(
                    f"Bad feature length {item!r} in {task_feature_lengths!r}; expected "
                    "name=int pairs such as inputs=512,targets=512.")
            pairs[key.strip()] = int(value)
        return pairs
    return {str(k): int(v) for k, v in task_feature_lengths.items()}


def _fsync_dir(path: str) -> None:
    # Makes the rename itself durable; a crash after it must not lose the shard.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- worker


@dataclasses.dataclass(frozen=True)
class _Job:
    """What a worker process needs: the store's spec and the modules registering tasks."""

    spec: store.StoreSpec
    task_modules: tuple[str, ...]


def _write_rows(ds, num_rows: int, layout: store.RecordLayout,
                tmp_path: str) -> pipeline.RowCounts:
    counts = pipeline.RowCounts({f: 0 for f in pipeline.TOKEN_SEGMENTS if f in layout.names})
    ds = ds.map(lambda row: ({k: v for k, v in row.items()
                              if k not in (pipeline.TASK_COUNTS, pipeline.TASK_IDS)},
                             row[pipeline.TASK_COUNTS]))
    # group_size:1 keeps every record individually addressable: the loader's shuffled
    # reads then decode one record, not a group of them.
    writer = array_record_module.ArrayRecordWriter(tmp_path, "group_size:1")
    try:
        for row, task_counts in ds.take(num_rows).as_numpy_iterator():
            record = layout.encode(row)
            writer.write(record)
            counts.add(row, record, task_counts)
    finally:
        writer.close()
    return counts


def _prepare_shard(job: _Job, shard_index: int, out_dir: str) -> dict:
    """Writes shard `shard_index` of the store and its done record; returns the record."""
    spec = job.spec
    mixtures.import_task_modules(job.task_modules)
    start = time.time()
    num_rows = spec.examples_per_shard()[shard_index]
    name = store.shard_file_name(spec.split, shard_index, spec.num_shards)
    tmp_path = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        counts = _write_rows(pipeline.shard_rows(spec, shard_index), num_rows,
                             pipeline.record_layout(spec), tmp_path)
        if counts.rows != num_rows:
            raise RuntimeError(
                f"Shard {shard_index} of {spec.num_shards}: the stream ended after "
                f"{counts.rows} of {num_rows} rows. A task of {spec.mixture!r} has no examples "
                f"for split {spec.split!r} in this shard (a shard must hold at least one "
                "document of every task): use fewer --num_shards, or check the tasks' sources.")
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, os.path.join(out_dir, name))
    _fsync_dir(out_dir)

    leaves = mixtures.leaf_tasks_and_rates(spec.mixture)
    record = {
        "shard_index": shard_index,
        "file": name,
        "num_examples": counts.rows,
        "num_task_examples": counts.segments,
        "task_counts": {name: int(c) for (name, _), c in zip(leaves, counts.task_counts)},
        "tokens": counts.tokens,
        "loss_tokens": counts.loss_tokens,
        "sha256": counts.digest.hexdigest(),
        "seconds": round(time.time() - start, 3),
    }
    store.write_json(os.path.join(
        out_dir, store.done_file_name(spec.split, shard_index, spec.num_shards)), record)
    return record


# ----------------------------------------------------------------------------- driver


def _run_shards(job: _Job, todo: Sequence[int], out_dir: str, workers: int) -> None:
    if workers == 1 or len(todo) == 1:
        for i in todo:
            _prepare_shard(job, i, out_dir)
        return
    # spawn, not fork: TensorFlow's threads do not survive fork. Workers get sys.path,
    # die with this process, even by kill -9 (process.start_worker), and keep
    # TensorFlow off the GPUs the training process holds.
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        min(workers, len(todo)), mp_context=context,
        initializer=process.start_worker,
        initargs=(os.getpid(), launch.hide_gpus_from_tensorflow))
    try:
        futures = [pool.submit(_prepare_shard, job, i, out_dir) for i in todo]
        for future in concurrent.futures.as_completed(futures):
            future.result()
    except BaseException:
        # A failed shard or Ctrl-C: stop the others now rather than after their shards.
        for worker in list(getattr(pool, "_processes", {}).values()):
            worker.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _beam_prepare_shard(shard_index: int, job: _Job, out_dir: str) -> dict:
    """The Beam transform: one shard, in whichever worker the runner picked."""
    return _prepare_shard(job, shard_index, out_dir)


def _run_beam(job: _Job, todo: Sequence[int], out_dir: str,
              beam_args: Sequence[str]) -> None:
    """The shards as an Apache Beam pipeline: shard indices → the same shard writer.

    `beam_args` are Beam's pipeline options (`--runner=...` and the runner's own). The
    driver waits for the pipeline; the manifest is completed from the done records the
    workers wrote, as after a local run.
    """
    import apache_beam as beam  # noqa: PLC0415 - only the --runner path needs Beam
    from apache_beam.options.pipeline_options import PipelineOptions  # noqa: PLC0415

    options = PipelineOptions(list(beam_args), save_main_session=False)
    with beam.Pipeline(options=options) as p:
        _ = (p | "shards" >> beam.Create(list(todo))
             # One shard per bundle: a runner may then spread the shards over workers.
             | "spread" >> beam.Reshuffle()
             | "write shard" >> beam.Map(_beam_prepare_shard, job, out_dir))


def _usable_existing(out_dir: str, spec: store.StoreSpec) -> dict | None:
    """The manifest of a store already at `out_dir` that serves `spec`, or None.

    A complete store serves a request for fewer rows with otherwise the same settings
    (a shorter run reads a prefix of its batches' order). An incomplete store of other
    settings (a preparation that failed or was killed) is moved aside to
    `<out_dir>.incomplete-<time>`, so the corrected command can start; a complete store
    of other settings is an error that changes nothing.
    """
    existing = store.read_manifest(out_dir)
    if existing is None:
        return None
    if existing.get("complete") and existing.get("num_examples", 0) >= spec.num_examples:
        spec = dataclasses.replace(spec, num_examples=existing["num_examples"])
    try:
        spec.check_against(out_dir, existing)
    except store.ManifestMismatchError:
        if existing.get("complete"):
            raise
        aside = f"{out_dir.rstrip(os.sep)}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(out_dir, aside)
        logging.warning("%s held an unfinished store of other settings; moved it to %s.",
                        out_dir, aside)
        return None
    return existing


def _initial_manifest(spec: store.StoreSpec, leaves: Sequence[tuple[str, float]]) -> dict:
    """What is asked for and how rows are laid out; written before any shard."""
    layout = pipeline.record_layout(spec)
    return {
        **spec.as_dict(),
        "format_version": store.FORMAT_VERSION,
        "complete": False,
        "model_feature_lengths": dict(zip(layout.names, layout.lengths)),
        "features": layout.manifest_features(),
        "record_bytes": 4 * layout.row_width,
        "task_rates": dict(leaves),
        "shards": spec.shard_files(),
        "examples_per_shard": spec.examples_per_shard(),
    }


def _completed_manifest(manifest: dict, spec: store.StoreSpec, out_dir: str,
                        leaves: Sequence[tuple[str, float]]) -> dict:
    """The manifest with the totals of every shard's done record."""
    records = [store.read_json(os.path.join(out_dir, store.done_file_name(
        spec.split, i, spec.num_shards))) for i in range(spec.num_shards)]
    lengths = manifest["model_feature_lengths"]
    tokens = {f: sum(r["tokens"][f] for r in records) for f in records[0]["tokens"]}
    positions = {f: spec.num_examples * lengths[f] for f in tokens}
    return {
        **manifest,
        "complete": True,
        "task_counts": {name: sum(r["task_counts"].get(name, 0) for r in records)
                        for name, _ in leaves},
        "num_task_examples": sum(r["num_task_examples"] for r in records),
        "tokens": sum(tokens.values()),
        "tokens_per_feature": tokens,
        "loss_tokens": sum(r["loss_tokens"] for r in records),
        "padding_fraction": 1.0 - sum(tokens.values()) / sum(positions.values()),
        "padding_fraction_per_feature": {f: 1.0 - tokens[f] / positions[f] for f in tokens},
        "unusable_documents": documents.unusable_documents(spec.mixture, spec.split),
        "shard_sha256": [r["sha256"] for r in records],
        "shard_seconds": [r["seconds"] for r in records],
    }


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
    task_modules: Sequence[str] = (),
    shuffle_buffer_size: int = 128,
    pack_pool: int = pipeline.DEFAULT_PACK_POOL,
    beam_args: Sequence[str] = (),
) -> dict:
    """Materialises `num_examples` packed rows of `mixture` into an ArrayRecord store.

    Args:
      mixture: a registered seqio Mixture or Task name.
      task_feature_lengths: e.g. {"inputs": 512, "targets": 512} or "inputs=512,targets=512".
      converter: the data form's name, "encdec" | "prefix_lm" | "lm" | "preference"
        (forms.py; a model's is `model.data_form(lengths).name`).
      num_examples: number of packed rows N (model-ready examples) to write.
      seed: drives task selection, seqio shuffling and the denoisers.
      out_dir: the store directory (created if missing).
      num_shards: K; one SeqIO shard (`seqio.ShardInfo(i, K)`) per ArrayRecord file.
      workers: processes (spawned); 1 runs in this process. Default min(K, cpu count).
      split: the SeqIO split to read.
      task_modules: modules that register the tasks, imported here and in every worker.
      shuffle_buffer_size: per-task seqio shuffle buffer. Small by default: every shard
        fills one buffer per leaf task (35 for reka_mix_ul2) before its first row
        (seqio's default 1000 made a 128-row shard spend most of its time filling them).
      pack_pool: examples packed together, best-fit (`packing.py`); 1 packs greedily.
      beam_args: Apache Beam pipeline options, e.g. ["--runner=DirectRunner"]: the
        shards then run as a Beam pipeline (same rows); empty: local processes.

    Returns:
      The manifest dict (also in `out_dir/manifest.json`).

    Raises:
      ManifestMismatchError: the store exists with other settings (nothing is deleted).
    """
    mixtures.import_task_modules(task_modules)
    spec = make_spec(mixture, task_feature_lengths, converter, num_examples, seed,
                     num_shards=num_shards, split=split,
                     shuffle_buffer_size=shuffle_buffer_size, pack_pool=pack_pool)
    return prepare_spec(spec, out_dir, workers, task_modules=task_modules,
                        beam_args=beam_args)


def make_spec(mixture: str, task_feature_lengths: Mapping[str, int] | str, converter: str,
              num_examples: int, seed: int, *, num_shards: int = 8, split: str = "train",
              shuffle_buffer_size: int = 128,
              pack_pool: int = pipeline.DEFAULT_PACK_POOL) -> store.StoreSpec:
    """The identity of the store `prepare` would write (the tasks must be registered)."""
    shards = pipeline.shard_spec(mixture, _parse_task_feature_lengths(task_feature_lengths),
                                 forms.get(converter), seed, num_shards, split=split,
                                 shuffle_buffer_size=shuffle_buffer_size,
                                 pack_pool=pack_pool)
    return store.StoreSpec(**shards.as_dict(), num_examples=int(num_examples))


def check_store(out_dir: str, spec: store.StoreSpec) -> None:
    """Raises ManifestMismatchError, writing nothing, when a complete store of other
    settings is at `out_dir` (an unfinished one would be moved aside by prepare)."""
    existing = store.read_manifest(out_dir)
    if existing is not None and existing.get("complete"):
        _usable_existing(out_dir, spec)


def prepare_spec(spec: store.StoreSpec, out_dir: str, workers: int | None = None, *,
                 task_modules: Sequence[str] = (), beam_args: Sequence[str] = ()) -> dict:
    """`prepare` for a spec from `make_spec`: writes (or resumes, or reuses) the store."""
    existing = _usable_existing(out_dir, spec)
    if existing is not None and existing.get("complete"):
        return existing
    os.makedirs(out_dir, exist_ok=True)
    leaves = mixtures.leaf_tasks_and_rates(spec.mixture)
    manifest = _initial_manifest(spec, leaves)
    # Written before any shard so that a killed run still leaves the spec to check against.
    if existing is None:
        store.write_json(os.path.join(out_dir, store.MANIFEST_NAME), manifest)
    todo = [i for i in range(spec.num_shards) if not os.path.exists(
        os.path.join(out_dir, store.done_file_name(spec.split, i, spec.num_shards)))]
    logging.info("prepare %s: %d of %d shards to write into %s", spec.mixture, len(todo),
                 spec.num_shards, out_dir)
    start = time.time()
    job = _Job(spec, tuple(task_modules))
    if beam_args and todo:
        _run_beam(job, todo, out_dir, beam_args)
    else:
        _run_shards(job, todo, out_dir, workers or min(spec.num_shards, os.cpu_count() or 1))
    manifest = _completed_manifest(manifest, spec, out_dir, leaves)
    manifest["prepare_seconds_this_run"] = round(time.time() - start, 3)
    store.write_json(os.path.join(out_dir, store.MANIFEST_NAME), manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m t5x_like.prepare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--task_module", action="append", required=True,
                        help="module registering the tasks (repeatable), e.g. tasks")
    parser.add_argument("--mixture", required=True, help="seqio Mixture or Task name")
    parser.add_argument("--feature_lengths", required=True, help="e.g. inputs=512,targets=512")
    parser.add_argument("--converter", required=True, choices=sorted(forms.FORMS))
    parser.add_argument("--num_examples", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num_shards", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--shuffle_buffer_size", type=int, default=128,
                        help="per-task seqio shuffle buffer")
    parser.add_argument("--pack_pool", type=int, default=pipeline.DEFAULT_PACK_POOL,
                        help="examples packed together, best-fit; 1: greedy in order")
    parser.add_argument("--runner", default=None,
                        help="run the shards as an Apache Beam pipeline on this runner "
                             "(DirectRunner, FlinkRunner, SparkRunner, DataflowRunner, ...); "
                             "the runner's own options follow, e.g. --direct_num_workers=2")
    args, beam_args = parser.parse_known_args(argv)
    if beam_args and not args.runner:
        parser.error(f"unrecognised arguments {beam_args}; Beam options need --runner=...")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    launch.hide_gpus_from_tensorflow()
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a task module beside the command
    manifest = prepare(
        args.mixture, args.feature_lengths, args.converter, args.num_examples, args.seed,
        args.out, args.num_shards, args.workers, split=args.split,
        task_modules=tuple(args.task_module), shuffle_buffer_size=args.shuffle_buffer_size,
        pack_pool=args.pack_pool,
        beam_args=[f"--runner={args.runner}", *beam_args] if args.runner else ())
    summary = {k: manifest[k] for k in ("mixture", "num_examples", "tokens",
                                        "padding_fraction", "task_counts")}
    json.dump(summary, sys.stdout, indent=2)
    print()
