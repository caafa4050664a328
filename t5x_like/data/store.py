"""The prepared-example store: an ArrayRecord file per shard plus a JSON manifest.

`prepare.py` writes stores and `loader.py` reads them; this module is the format
between them, defined once: file names, the manifest, what identifies a store, and the
byte layout of a record.

Layout of a store directory:
  manifest.json                                what was asked for and what was written
  train-00003-of-00008.array_record            one ArrayRecord file per SeqIO shard
  train-00003-of-00008.done.json               per-shard done record (counts), written last

Record: one packed row; the int32 arrays of the model features in the fixed order of
`forms.get(converter).model_features` (also listed in `manifest["features"]`), concatenated as
raw little-endian bytes. Raw bytes parse at 100-200k rows/s, far faster than
tf.train.Example.

Identity: the fields of `StoreSpec` define what a store contains: `ShardSpec`, what
defines the rows of every SeqIO shard (shared with streamed data, stream.py), and the
number of rows. A store is reused only when every one of them matches; any difference
is a `ManifestMismatchError` that names it, and nothing is overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from t5x_like.data import forms

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Model features written per feature converter (seqio's EncDec / PrefixLM / LM packed
# converters), in record order. Fixed here, not taken from dict order, so that the byte
# layout of a record never depends on tf.data internals.
class ManifestMismatchError(ValueError):
    """The store at a directory was prepared with other settings than the ones requested."""


# Spec fields added later, with the value every store written before them had.
LEGACY_SPEC_FIELDS = {"pack_pool": 1}


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """What defines the packed rows of every SeqIO shard of a mixture (pipeline.py makes
    them): a prepared store's shards and a stream's shards alike. Every field changes
    the rows, so every field is part of a store's and a stream's identity."""

    mixture: str
    split: str
    seed: int
    converter: str
    task_feature_lengths: dict[str, int]
    num_shards: int
    shuffle_buffer_size: int
    # Examples packed together, best-fit (packing.py); 1: seqio's greedy packing.
    pack_pool: int
    vocabulary_checksum: str

    def __post_init__(self):
        lengths = forms.get(self.converter).check_lengths(self.task_feature_lengths)
        if self.num_shards <= 0:
            raise ValueError(f"num_shards must be positive, got {self.num_shards}.")
        if self.pack_pool <= 0:
            raise ValueError(f"pack_pool must be positive (1: greedy packing), got "
                             f"{self.pack_pool}.")
        # Normalised so that a spec compares equal to its manifest copy.
        object.__setattr__(self, "task_feature_lengths", lengths)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def form(self) -> forms.DataForm:
        """The data form of the rows (`converter` is its name, as manifests record it)."""
        return forms.get(self.converter)


@dataclasses.dataclass(frozen=True)
class StoreSpec(ShardSpec):
    """What a store contains: the shards' spec and how many rows they hold in all."""

    num_examples: int

    def __post_init__(self):
        super().__post_init__()
        if self.num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {self.num_examples}.")
        if self.num_shards > self.num_examples:
            raise ValueError(
                f"num_shards={self.num_shards} exceeds num_examples={self.num_examples}; "
                "every shard needs at least one row. Lower --num_shards.")

    def check_against(self, store_dir: str, manifest: Mapping[str, Any]) -> None:
        """Raises ManifestMismatchError naming every field the stored manifest differs in."""
        requested = self.as_dict()
        manifest = {**LEGACY_SPEC_FIELDS, **manifest}
        mismatched = {k: (manifest.get(k), v) for k, v in requested.items()
                      if manifest.get(k) != v}
        if mismatched:
            details = "; ".join(f"{k}: store has {a!r}, requested {b!r}"
                                for k, (a, b) in mismatched.items())
            raise ManifestMismatchError(
                f"The store {store_dir} was prepared with other settings ({details}). "
                f"Nothing was changed. Fix: pass a new --out directory, or delete "
                f"{store_dir} to rebuild it with the requested settings.")

    def shard_files(self) -> list[str]:
        return [shard_file_name(self.split, i, self.num_shards) for i in range(self.num_shards)]

    def examples_per_shard(self) -> list[int]:
        return examples_per_shard(self.num_examples, self.num_shards)


# ----------------------------------------------------------------------------- names


def shard_file_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.array_record"


def done_file_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.done.json"


def examples_per_shard(num_examples: int, num_shards: int) -> list[int]:
    """Splits N rows over K shards as evenly as possible (the first N % K get one more)."""
    base, extra = divmod(num_examples, num_shards)
    return [base + (1 if i < extra else 0) for i in range(num_shards)]


# ----------------------------------------------------------------------------- manifest


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `path` whole or not at all (tmp name, fsync, rename)."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def read_manifest(store_dir: str) -> dict | None:
    """The manifest of a store, complete or not; None where there is none."""
    path = os.path.join(store_dir, MANIFEST_NAME)
    return read_json(path) if os.path.exists(path) else None


def load_manifest(store_dir: str) -> dict:
    """The manifest of a complete store, or an error saying how to make one."""
    manifest = read_manifest(store_dir)
    if manifest is None or not manifest.get("complete"):
        raise FileNotFoundError(
            f"No complete prepared store at {store_dir} (manifest.json "
            f"{'missing' if manifest is None else 'marks it incomplete'}). Run "
            f"`python -m t5x_like.prepare ... --out {store_dir}` (it resumes a partial store).")
    return manifest


def fingerprint(manifest: Mapping[str, Any]) -> str:
    """A short text that changes whenever the store's rows would: for iterator states."""
    keys = ("mixture", "split", "seed", "converter", "num_examples", "vocabulary_checksum")
    text = ("|".join(f"{k}={manifest[k]}" for k in keys)
            + f"|lengths={manifest['model_feature_lengths']}")
    if "shard_sha256" in manifest:  # stores written before the hashes keep their text
        text += "|sha256=" + ",".join(h[:16] for h in manifest["shard_sha256"])
    return text


def data_scalars(leaves: Sequence[tuple[str, float]], examples: Sequence[int], tokens: int,
                 positions: int, loss_tokens: int) -> dict[str, float]:
    """The data metrics of rows holding `examples` per leaf task (leaves: (task, rate)):
    shares, counts, the configured rates, padding of the token features' positions, and
    tokens with a loss weight. For a store from its manifest, for a stream as it goes."""
    total = max(1, int(np.sum(examples)))
    out = {"data/padding_fraction": 1.0 - float(tokens) / max(1, int(positions)),
           "data/examples": float(np.sum(examples)), "data/loss_tokens": float(loss_tokens)}
    for (name, rate), count in zip(leaves, examples):
        out[f"data/task_share/{name}"] = int(count) / total
        out[f"data/task_examples/{name}"] = float(count)
        out[f"data/task_rate/{name}"] = rate
    return out


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class RecordLayout:
    """How a record's bytes split into model features."""

    names: tuple[str, ...]
    lengths: tuple[int, ...]

    @classmethod
    def of(cls, form: forms.DataForm, task_feature_lengths: Mapping[str, int]) -> RecordLayout:
        lengths = form.model_feature_lengths(task_feature_lengths)
        return cls(tuple(lengths), tuple(lengths.values()))

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> RecordLayout:
        return cls(tuple(f["name"] for f in manifest["features"]),
                   tuple(int(f["shape"][0]) for f in manifest["features"]))

    @property
    def row_width(self) -> int:
        return sum(self.lengths)

    def manifest_features(self) -> list[dict[str, Any]]:
        return [{"name": n, "dtype": "int32", "shape": [k]}
                for n, k in zip(self.names, self.lengths)]

    def encode(self, row: Mapping[str, np.ndarray]) -> bytes:
        """One packed row (a dict of 1-D int arrays) as record bytes."""
        parts = []
        for name, length in zip(self.names, self.lengths):
            array = np.asarray(row[name], dtype="<i4")
            if array.shape != (length,):
                raise ValueError(f"Feature {name} has shape {array.shape}, expected ({length},).")
            parts.append(array.tobytes())
        return b"".join(parts)

    def parse_batch(self, records: Sequence[bytes]) -> dict[str, np.ndarray]:
        """Records → {feature: int32 [len(records), length]} (one parse per batch)."""
        flat_BW = np.frombuffer(b"".join(records), dtype="<i4").reshape(
            len(records), self.row_width)
        out, offset = {}, 0
        for name, length in zip(self.names, self.lengths):
            # Contiguous copies: jax transfers them without another copy.
            out[name] = np.ascontiguousarray(flat_BW[:, offset:offset + length], dtype=np.int32)
            offset += length
        return out
