"""Exact and near-duplicate removal of a corpus before it becomes a SeqIO source.

`python -m t5x_like.dedup --input_dir=data/corpus --output_dir=runs/corpus_dedup` reads
a corpus laid out as `{input_dir}/{domain}/{split}-*.tfrecord.gz` (gzipped TFRecord of
`tf.train.Example` with one bytes feature `text`, the repository's format) or
`{domain}/{split}*.txt` (one document per line), and writes the documents it keeps to
`output_dir` in the same layout, file for file (each kept document stays in its shard,
in its order), plus `dedup_report.json`: what was removed per domain and split, and
every cluster of duplicates with its members, the one kept and the pairs' exact and
estimated Jaccard similarities. It never writes into the input.

Two stages, each over the documents of one domain (or of the whole corpus with
`--across_domains`); the formulas are in docs/FORMULAS.md, "Deduplication":
1. exact: documents whose normalised text (Unicode NFKC, lower case, whitespace runs
   collapsed to one space, stripped) has the same SHA-256 are one cluster;
2. near: on what stage 1 kept, MinHash signatures (bands x rows permutations) of each
   document's shingle set (word or character n-grams of the normalised text), LSH
   buckets per band; documents sharing a bucket are candidate pairs, and a pair is a
   duplicate only if the exact Jaccard similarity of their shingle sets is at least the
   threshold. Duplicate pairs are joined into clusters (connected components).
Each cluster keeps one member: the one from the earliest split in `split_priority`
(validation before train, so a held-out document is never the one dropped and its
train copies go), then the first in file order.

Two engines run the same functions: an Apache Beam pipeline (`--engine=beam`, the
default; in-process FnApiRunner unless `--runner` says otherwise: Beam's own flags pass
through, e.g.
`--runner=DataflowRunner --project=... --region=... --temp_location=gs://...`, untested
here) and a single-process path (`--engine=local`) that checks it: both give the same
files and the same report (tests/test_dedup.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import time
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from t5x_like.data.documents import TEXT_KEY

log = logging.getLogger("t5x_like.data.dedup")

# MinHash permutations are h(x) = (a·x + b) mod P over shingle hashes reduced mod P.
# With the Mersenne prime 2^31 - 1, a·x + b < 2^63: exact in uint64, no overflow.
PRIME = (1 << 31) - 1
# Shingle hashes: a polynomial over the tokens' 64-bit ids (wrapping uint64 arithmetic,
# so the same in every process and machine), finished by splitmix64's mixer.
_POLY = np.uint64(0x9E3779B97F4A7C15)
_CHUNK = 4096  # shingles per step of the signature (bounds memory at 4096 x num_perm)
TFRECORD, TEXT = "tfrecord", "text"
FORMATS = {".tfrecord.gz": TFRECORD, ".txt": TEXT}
REPORT_NAME = "dedup_report.json"
ALL_DOMAINS = "*"  # the group of every document with --across_domains
PREVIEW_CHARS = 100
DEFAULT_RUNNER = "FnApiRunner"


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """How duplicates are found (defaults: word 5-grams, 20 bands x 5 rows, Jaccard 0.8).

    With b bands of r rows, a pair of Jaccard similarity s becomes a candidate with
    probability 1 - (1 - s^r)^b (`candidate_probability`): 0.9996 at s = 0.8 for the
    defaults, 0.47 at s = 0.5. Candidates below the threshold are then dropped by the
    exact check, so the defaults trade a little verification work for recall.
    """

    shingle: str = "word"  # "word" or "char" n-grams of the normalised text
    ngram: int = 5
    bands: int = 20
    rows: int = 5
    threshold: float = 0.8
    seed: int = 0
    across_domains: bool = False
    split_priority: Sequence[str] = ("validation", "test", "train")

    def __post_init__(self):
        if self.shingle not in ("word", "char"):
            raise ValueError(f"DedupConfig.shingle={self.shingle!r}; expected 'word' or 'char' "
                             "(--shingle).")
        for name in ("ngram", "bands", "rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"DedupConfig.{name}={getattr(self, name)} must be ≥ 1 "
                                 f"(--{name}).")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"DedupConfig.threshold={self.threshold} must be in (0, 1] "
                             "(--threshold, a Jaccard similarity).")

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    def candidate_probability(self, similarity: float) -> float:
        """Probability that a pair of this Jaccard similarity shares an LSH bucket."""
        return 1.0 - (1.0 - similarity ** self.rows) ** self.bands


# ---------------------------------------------------------------------------
# Documents, their ids and files


class Doc(NamedTuple):
    """One document: where it is and its text exactly as stored (written back as is)."""

    domain: str
    split: str
    file: str  # file name inside the domain directory
    index: int  # record (or line) number in the file
    text: bytes

    @property
    def id(self) -> str:
        return doc_id(self.domain, self.file, self.index)


class CorpusFile(NamedTuple):
    domain: str
    split: str
    file: str
    path: str
    format: str


def doc_id(domain: str, file: str, index: int) -> str:
    return f"{domain}/{file}:{index}"


def split_of(file: str) -> str:
    """`train-00001-of-00004.tfrecord.gz` and `train.txt` are split `train`."""
    return re.split(r"[-.]", file, maxsplit=1)[0]


def rank(identifier: str, cfg: DedupConfig) -> tuple:
    """Sort key of a document id: the cluster member ranked first is the one kept."""
    domain, rest = identifier.split("/", 1)
    file, index = rest.rsplit(":", 1)
    split = split_of(file)
    priority = (list(cfg.split_priority).index(split) if split in cfg.split_priority
                else len(cfg.split_priority))
    return priority, domain, file, int(index)


def group_of(domain: str, cfg: DedupConfig) -> str:
    return ALL_DOMAINS if cfg.across_domains else domain


def _format_of(name: str) -> str | None:
    return next((fmt for suffix, fmt in FORMATS.items() if name.endswith(suffix)), None)


def list_corpus(input_dir: str, domains: Sequence[str] | None = None) -> list[CorpusFile]:
    """Every corpus file under `input_dir/{domain}/`, sorted (any file system TensorFlow
    reads, e.g. gs:// for a runner in the cloud)."""
    import tensorflow as tf  # imported late: `--help` needs no TensorFlow

    if not tf.io.gfile.isdir(input_dir):
        raise FileNotFoundError(f"--input_dir={input_dir!r} is not a directory; expected a "
                                "corpus such as data/corpus ({domain}/{split}-*.tfrecord.gz).")
    names = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(input_dir)
                   if tf.io.gfile.isdir(os.path.join(input_dir, d)))
    unknown = sorted(set(domains or ()) - set(names))
    if unknown:
        raise ValueError(f"--domains names {unknown}, not directories of {input_dir} "
                         f"(it has {names}).")
    files = []
    for domain in (d for d in names if not domains or d in domains):
        for name in sorted(tf.io.gfile.listdir(os.path.join(input_dir, domain))):
            fmt = _format_of(name)
            if fmt is not None:
                files.append(CorpusFile(domain, split_of(name), name,
                                        os.path.join(input_dir, domain, name), fmt))
    if not files:
        raise FileNotFoundError(
            f"{input_dir} holds no corpus files: expected {{domain}}/{{split}}-*.tfrecord.gz "
            "(a bytes feature 'text') or {domain}/{split}*.txt (one document per line).")
    return files


def read_docs(f: CorpusFile) -> Iterator[Doc]:
    """The documents of one corpus file, in order."""
    import tensorflow as tf

    if f.format == TEXT:
        with tf.io.gfile.GFile(f.path, "rb") as lines:
            for i, line in enumerate(lines):
                yield Doc(f.domain, f.split, f.file, i, line.rstrip(b"\n"))
        return
    for i, raw in enumerate(tf.data.TFRecordDataset(f.path, compression_type="GZIP")):
        values = tf.train.Example.FromString(raw.numpy()).features.feature[TEXT_KEY].bytes_list.value
        if len(values) != 1:
            raise ValueError(f"{f.path} record {i} has {len(values)} values of feature "
                             f"{TEXT_KEY!r}; expected exactly one document text.")
        yield Doc(f.domain, f.split, f.file, i, values[0])


def write_file(path: str, fmt: str, texts: Sequence[bytes]) -> None:
    """Writes documents in the input's format (an empty list gives an empty file)."""
    import tensorflow as tf

    if fmt == TEXT:
        with tf.io.gfile.GFile(path, "wb") as out:
            out.write(b"".join(t + b"\n" for t in texts))
        return
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for text in texts:
            feature = {TEXT_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[text]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                         .SerializeToString())


# ---------------------------------------------------------------------------
# Normalisation, shingles, MinHash (the functions both engines share)


_SPACES = re.compile(r"\s+")


def normalize(text: bytes | str) -> str:
    """NFKC, lower case, whitespace runs collapsed to one space, stripped (bytes that
    are not UTF-8 are read as U+FFFD)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def exact_key(text: bytes | str) -> str:
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the polynomial's bits over all 64."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _token_ids(normalized: str, kind: str) -> np.ndarray:
    if not normalized:
        return np.zeros([0], np.uint64)
    if kind == "char":
        return np.frombuffer(normalized.encode("utf-32-le"), np.uint32).astype(np.uint64)
    words = normalized.split(" ")
    return np.array([int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(),
                                    "little") for w in words], np.uint64)


def shingle_hashes(text: bytes | str, cfg: DedupConfig) -> np.ndarray:
    """The document's shingle set as sorted unique 64-bit hashes: every run of
    `cfg.ngram` consecutive words (or characters) of the normalised text; a document
    shorter than that is one shingle."""
    tokens = _token_ids(normalize(text), cfg.shingle)
    if not len(tokens):
        return tokens
    n = min(cfg.ngram, len(tokens))
    count = len(tokens) - n + 1
    h = np.zeros(count, np.uint64)
    for j in range(n):
        h = h * _POLY + tokens[j:j + count]  # wraps modulo 2^64 by design
    return np.unique(_mix64(h))


@functools.lru_cache(maxsize=8)
def _permutations(seed: int, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(1, PRIME, num_perm, dtype=np.uint64),
            rng.integers(0, PRIME, num_perm, dtype=np.uint64))


def minhash(hashes: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """uint32[num_perm]: for each permutation (a·x + b) mod P, its minimum over the
    shingles. Two sets agree in a position with probability = their Jaccard similarity."""
    a, b = _permutations(cfg.seed, cfg.num_perm)
    x = (hashes % np.uint64(PRIME))[:, None]
    signature = np.full(cfg.num_perm, PRIME, np.uint64)
    for start in range(0, len(x), _CHUNK):
        values = (x[start:start + _CHUNK] * a + b) % np.uint64(PRIME)
        signature = np.minimum(signature, values.min(axis=0))
    return signature.astype(np.uint32)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two sorted unique hash arrays."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


class Sketch(NamedTuple):
    """What the near-duplicate stage needs of a document."""

    id: str
    group: str
    shingles: np.ndarray  # uint64, sorted unique
    signature: np.ndarray  # uint32 [num_perm]
    preview: str


def sketch(doc: Doc, cfg: DedupConfig) -> list[Sketch]:
    """[the document's sketch], or [] for a document without a shingle (empty text)."""
    shingles = shingle_hashes(doc.text, cfg)
    if not len(shingles):
        return []
    return [Sketch(doc.id, group_of(doc.domain, cfg), shingles, minhash(shingles, cfg),
                   _preview(doc.text))]


def band_keys(s: Sketch, cfg: DedupConfig) -> list[tuple[str, int, bytes]]:
    """The LSH buckets of a document: (group, band, that band's rows as bytes)."""
    rows = s.signature.astype("<u4").reshape(cfg.bands, cfg.rows)
    return [(s.group, band, rows[band].tobytes()) for band in range(cfg.bands)]


def bucket_pairs(group: str, ids: Iterable[str], cfg: DedupConfig) -> list[tuple[str, str, str]]:
    """Every pair of a bucket as (group, a, b) with a ranked before b."""
    members = sorted(set(ids), key=lambda i: rank(i, cfg))
    return [(group, a, b) for k, a in enumerate(members) for b in members[k + 1:]]


def verify(a: Sketch, b: Sketch) -> dict[str, Any]:
    """A candidate pair with its exact and estimated Jaccard similarity."""
    return {"group": a.group, "a": a.id, "b": b.id,
            "jaccard": round(jaccard(a.shingles, b.shingles), 6),
            "estimated": round(estimated_jaccard(a.signature, b.signature), 6)}


def _preview(text: bytes) -> str:
    return normalize(text[:4 * PREVIEW_CHARS])[:PREVIEW_CHARS]


# ---------------------------------------------------------------------------
# Clusters and the report


def exact_cluster(group: str, members: Iterable[Doc], cfg: DedupConfig
                  ) -> tuple[Doc, list[dict[str, Any]]]:
    """(the document kept, [the cluster's report entry] if it has duplicates, else [])."""
    docs = sorted(members, key=lambda d: rank(d.id, cfg))
    if len(docs) == 1:
        return docs[0], []
    return docs[0], [{"group": group, "kept": docs[0].id, "members": [d.id for d in docs],
                      "preview": _preview(docs[0].text)}]


def near_clusters(group: str, pairs: Iterable[dict[str, Any]], previews: dict[str, str],
                  cfg: DedupConfig) -> list[dict[str, Any]]:
    """Connected components of the duplicate pairs of one group, each with its members
    (kept first) and its pairs. `previews`: {id: preview} of the kept documents."""
    pairs = sorted(pairs, key=lambda p: (rank(p["a"], cfg), rank(p["b"], cfg)))
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for p in pairs:
        ra, rb = root(p["a"]), root(p["b"])
        if ra != rb:
            parent[max(ra, rb, key=lambda i: rank(i, cfg))] = min(ra, rb, key=lambda i: rank(i, cfg))
    clusters: dict[str, list] = defaultdict(list)
    for p in pairs:
        clusters[root(p["a"])].append(p)
    out = []
    for kept, members in clusters.items():
        ids = sorted({i for p in members for i in (p["a"], p["b"])}, key=lambda i: rank(i, cfg))
        out.append({"group": group, "kept": kept, "members": ids,
                    "preview": previews.get(kept, ""),
                    "pairs": [{k: p[k] for k in ("a", "b", "jaccard", "estimated")}
                              for p in members]})
    return out


def removed_ids(clusters: Iterable[dict[str, Any]]) -> list[str]:
    return [m for c in clusters for m in c["members"] if m != c["kept"]]


def _split_counts(counts: Iterable[tuple[tuple[str, str], tuple[int, int]]]) -> dict:
    table: dict[str, dict[str, dict[str, int]]] = defaultdict(dict)
    for (domain, split), (docs, chars) in counts:
        table[domain][split] = {"documents": docs, "chars": chars}
    return table


def build_report(cfg: DedupConfig, counts_in, counts_out, exact: Sequence[dict],
                 near: Sequence[dict], candidates: Iterable[tuple[str, int]]) -> dict[str, Any]:
    """The JSON report: per domain and split what came in, what each stage removed and
    what was written; every cluster. `counts_in` / `counts_out`: ((domain, split),
    (documents, chars)) pairs; `candidates`: (group, candidate pairs)."""
    ins, outs = _split_counts(counts_in), _split_counts(counts_out)
    domains: dict[str, Any] = {}
    for domain in sorted(ins):
        splits = {}
        for split, c in sorted(ins[domain].items()):
            out = outs.get(domain, {}).get(split, {"documents": 0, "chars": 0})
            splits[split] = {"documents": c["documents"], "chars": c["chars"],
                             "exact_removed": 0, "near_removed": 0,
                             "kept": out["documents"], "kept_chars": out["chars"]}
        domains[domain] = {"splits": splits}
    for stage, clusters in (("exact_removed", exact), ("near_removed", near)):
        for identifier in removed_ids(clusters):
            domain, file = identifier.split("/", 1)
            domains[domain]["splits"][split_of(file)][stage] += 1
    for domain, entry in domains.items():
        total = {k: sum(s[k] for s in entry["splits"].values())
                 for k in ("documents", "chars", "exact_removed", "near_removed", "kept",
                           "kept_chars")}
        if total["documents"] != total["kept"] + total["exact_removed"] + total["near_removed"]:
            raise AssertionError(f"dedup lost count of documents in {domain}: {total}")
        entry.update(total)
    def key(cluster):
        return rank(cluster["kept"], cfg)

    return {
        "settings": {**dataclasses.asdict(cfg), "split_priority": list(cfg.split_priority),
                     "num_perm": cfg.num_perm,
                     "candidate_probability_at_threshold": round(
                         cfg.candidate_probability(cfg.threshold), 6)},
        "domains": domains,
        "candidate_pairs": dict(sorted(candidates)),
        "exact_clusters": sorted(exact, key=key),
        "near_clusters": sorted(near, key=key),
    }


# ---------------------------------------------------------------------------
# The single-process engine


def _count(docs: Iterable[Doc]) -> list[tuple[tuple[str, str], tuple[int, int]]]:
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for d in docs:
        totals[(d.domain, d.split)][0] += 1
        totals[(d.domain, d.split)][1] += _chars(d.text)
    return [(k, tuple(v)) for k, v in totals.items()]


def _chars(text: bytes) -> int:
    return len(text.decode("utf-8", errors="replace"))


def run_local(files: Sequence[CorpusFile], output_dir: str, cfg: DedupConfig) -> dict[str, Any]:
    """Deduplicates `files` into `output_dir` in this process; returns the report."""
    docs = [d for f in files for d in read_docs(f)]
    by_text: dict[tuple[str, str], list[Doc]] = defaultdict(list)
    for d in docs:
        by_text[(group_of(d.domain, cfg), exact_key(d.text))].append(d)
    unique, exact = [], []
    for (group, _), members in by_text.items():
        kept, cluster = exact_cluster(group, members, cfg)
        unique.append(kept)
        exact += cluster
    sketches = {s.id: s for d in unique for s in sketch(d, cfg)}
    buckets: dict[tuple, list[str]] = defaultdict(list)
    for s in sketches.values():
        for key in band_keys(s, cfg):
            buckets[key].append(s.id)
    candidates = {p for key, ids in buckets.items() if len(ids) > 1
                  for p in bucket_pairs(key[0], ids, cfg)}
    duplicates = defaultdict(list)
    for group, a, b in candidates:
        pair = verify(sketches[a], sketches[b])
        if pair["jaccard"] >= cfg.threshold:
            duplicates[group].append(pair)
    previews = {i: s.preview for i, s in sketches.items()}
    near = [c for group, pairs in duplicates.items()
            for c in near_clusters(group, pairs, previews, cfg)]
    removed = set(removed_ids(near))
    kept_by_file: dict[tuple[str, str], list[Doc]] = defaultdict(list)
    for d in unique:
        if d.id not in removed:
            kept_by_file[(d.domain, d.file)].append(d)
    counts_out = []
    for f in files:
        counts_out += _write_kept(f, kept_by_file.get((f.domain, f.file), []), output_dir)
    per_group = defaultdict(int)
    for group, _, _ in candidates:
        per_group[group] += 1
    return build_report(cfg, _count(docs), _sum_counts(counts_out), exact, near,
                        per_group.items())


def _write_kept(f: CorpusFile, kept: Iterable[Doc], output_dir: str
                ) -> list[tuple[tuple[str, str], tuple[int, int]]]:
    """Writes one output file (the input's name, its kept documents in input order)."""
    docs = sorted(kept, key=lambda d: d.index)
    write_file(os.path.join(output_dir, f.domain, f.file), f.format, [d.text for d in docs])
    return [((f.domain, f.split), (len(docs), sum(_chars(d.text) for d in docs)))]


def _sum_counts(counts):
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for key, (docs, chars) in counts:
        totals[key][0] += docs
        totals[key][1] += chars
    return [(k, tuple(v)) for k, v in totals.items()]


# ---------------------------------------------------------------------------
# The Beam engine


def _sum_pairs(values: Iterable[tuple[int, int]]) -> tuple[int, int]:
    docs = chars = 0
    for d, c in values:
        docs, chars = docs + d, chars + c
    return docs, chars


def _near_stage(beam, unique, cfg: DedupConfig):
    """(near clusters, candidate counts per group) of the exact stage's survivors.

    Pairs meet their two sketches in two joins (keyed by the first id, then the
    second), so no worker holds more than a bucket and a pair's sketches."""
    sketches = unique | "sketch" >> beam.FlatMap(sketch, cfg)
    keyed = sketches | "key sketches" >> beam.Map(lambda s: (s.id, s))
    pairs = (sketches
             | "bands" >> beam.FlatMap(lambda s: [(k, s.id) for k in band_keys(s, cfg)])
             | "buckets" >> beam.GroupByKey()
             | "pairs" >> beam.FlatMap(lambda kv: bucket_pairs(kv[0][0], kv[1], cfg))
             | "distinct pairs" >> beam.Distinct())
    candidates = (pairs | "pair group" >> beam.Map(lambda p: (p[0], 1))
                  | "count pairs" >> beam.CombinePerKey(sum))
    halves = (({"pair": pairs | "by a" >> beam.Map(lambda p: (p[1], p)), "sketch": keyed})
              | "join a" >> beam.CoGroupByKey()
              | "with a" >> beam.FlatMap(lambda kv: [(p[2], kv[1]["sketch"][0])
                                                     for p in kv[1]["pair"]]))
    verified = (({"half": halves, "sketch": keyed})
                | "join b" >> beam.CoGroupByKey()
                | "verify" >> beam.FlatMap(lambda kv: [verify(a, kv[1]["sketch"][0])
                                                       for a in kv[1]["half"]])
                | "threshold" >> beam.Filter(lambda p: p["jaccard"] >= cfg.threshold))
    previews = beam.pvalue.AsDict(sketches | "previews" >> beam.Map(lambda s: (s.id, s.preview)))
    clusters = (verified | "pair by group" >> beam.Map(lambda p: (p["group"], p))
                | "group pairs" >> beam.GroupByKey()
                | "components" >> beam.FlatMap(
                    lambda kv, pv: near_clusters(kv[0], kv[1], pv, cfg), previews))
    return clusters, candidates


def _write_stage(beam, files, unique, near, output_dir: str):
    """Writes every output file from the documents kept; returns the per-file counts."""
    removed = near | "removed" >> beam.FlatMap(lambda c: [(m, None) for m in removed_ids([c])])
    survivors = (({"doc": unique | "doc by id" >> beam.Map(lambda d: (d.id, d)),
                   "removed": removed})
                 | "join removed" >> beam.CoGroupByKey()
                 | "survivors" >> beam.FlatMap(lambda kv: [] if kv[1]["removed"]
                                               else kv[1]["doc"]))
    return (({"file": files | "file key" >> beam.Map(lambda f: ((f.domain, f.file), f)),
              "doc": survivors | "doc key" >> beam.Map(lambda d: ((d.domain, d.file), d))})
            | "by file" >> beam.CoGroupByKey()
            | "write" >> beam.FlatMap(lambda kv: _write_kept(kv[1]["file"][0], kv[1]["doc"],
                                                             output_dir)))


def run_beam(files: Sequence[CorpusFile], output_dir: str, cfg: DedupConfig,
             pipeline_args: Sequence[str] = ()) -> dict[str, Any]:
    """Deduplicates `files` into `output_dir` with an Apache Beam pipeline (runner and
    its options from `pipeline_args`, DirectRunner by default); returns the report,
    which the pipeline writes to `output_dir/dedup_report.json`."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    report_path = os.path.join(output_dir, REPORT_NAME)
    args = list(pipeline_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        # Beam's DirectRunner first tries Prism, whose binary it downloads at run time;
        # FnApiRunner is the in-process runner it falls back to, without the download.
        args.insert(0, f"--runner={DEFAULT_RUNNER}")
    with beam.Pipeline(options=PipelineOptions(args)) as p:
        files_pc = p | "files" >> beam.Create(list(files))
        docs = files_pc | "read" >> beam.FlatMap(read_docs)
        counts_in = (docs | "count in" >> beam.Map(lambda d: ((d.domain, d.split),
                                                              (1, _chars(d.text))))
                     | "sum in" >> beam.CombinePerKey(_sum_pairs))
        exact = (docs | "exact key" >> beam.Map(
                     lambda d: ((group_of(d.domain, cfg), exact_key(d.text)), d))
                 | "same text" >> beam.GroupByKey()
                 | "exact clusters" >> beam.Map(lambda kv: exact_cluster(kv[0][0], kv[1], cfg)))
        unique = exact | "unique" >> beam.Map(lambda x: x[0])
        exact_clusters = exact | "exact entries" >> beam.FlatMap(lambda x: x[1])
        near, candidates = _near_stage(beam, unique, cfg)
        counts_out = (_write_stage(beam, files_pc, unique, near, output_dir)
                      | "sum out" >> beam.CombinePerKey(_sum_pairs))
        as_list = beam.pvalue.AsList
        _ = (p | "one" >> beam.Create([None])
             | "report" >> beam.Map(
                 lambda _, *parts: build_report(cfg, *parts),
                 as_list(counts_in), as_list(counts_out), as_list(exact_clusters),
                 as_list(near), as_list(candidates))
             | "write report" >> beam.Map(_write_json, report_path))
    return read_report(report_path)


# ---------------------------------------------------------------------------
# Entry point


def _write_json(report: dict[str, Any], path: str) -> None:
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "w") as out:
        out.write(json.dumps(report, indent=1, ensure_ascii=False) + "\n")


def read_report(path: str) -> dict[str, Any]:
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "r") as f:
        return json.load(f)


def prepare_output(input_dir: str, output_dir: str, files: Sequence[CorpusFile]) -> None:
    """Creates `output_dir/{domain}`; refuses the input itself, a directory inside it,
    and a directory that already holds anything (nothing is ever overwritten)."""
    import tensorflow as tf

    inside = os.path.abspath(output_dir) + os.sep
    if "://" not in output_dir and inside.startswith(os.path.abspath(input_dir) + os.sep):
        raise ValueError(f"--output_dir={output_dir!r} is inside --input_dir={input_dir!r}; "
                         "the input is never written to: choose a directory outside it.")
    if tf.io.gfile.exists(output_dir) and tf.io.gfile.listdir(output_dir):
        raise FileExistsError(f"--output_dir={output_dir!r} already holds files; dedup never "
                              "overwrites: choose a new directory or remove that one.")
    for domain in sorted({f.domain for f in files}):
        tf.io.gfile.makedirs(os.path.join(output_dir, domain))


def dedup(input_dir: str, output_dir: str, cfg: DedupConfig = DedupConfig(), *,
          engine: str = "beam", domains: Sequence[str] | None = None,
          pipeline_args: Sequence[str] = ()) -> dict[str, Any]:
    """Deduplicates a corpus directory into `output_dir` (see the module docstring);
    returns the report, also written to `output_dir/dedup_report.json`."""
    if engine not in ("beam", "local"):
        raise ValueError(f"engine={engine!r}; expected 'beam' or 'local' (--engine).")
    if engine == "local" and pipeline_args:
        raise ValueError(f"Beam options {list(pipeline_args)} were given with --engine=local; "
                         "drop them or use --engine=beam.")
    files = list_corpus(input_dir, domains)
    prepare_output(input_dir, output_dir, files)
    start = time.perf_counter()
    if engine == "beam":
        report = run_beam(files, output_dir, cfg, pipeline_args)
    else:
        report = run_local(files, output_dir, cfg)
        _write_json(report, os.path.join(output_dir, REPORT_NAME))
    log.info("dedup (%s) of %s into %s: %.1f s", engine, input_dir, output_dir,
             time.perf_counter() - start)
    return report


def format_summary(report: dict[str, Any]) -> str:
    """The per-domain table the CLI prints."""
    lines = [f"{'domain':<14}{'documents':>10}{'exact':>8}{'near':>8}{'kept':>8}"
             f"{'chars kept':>14}{'clusters':>10}"]
    for domain, d in report["domains"].items():
        clusters = sum(1 for c in report["near_clusters"] if c["kept"].startswith(domain + "/"))
        lines.append(f"{domain:<14}{d['documents']:>10,}{d['exact_removed']:>8,}"
                     f"{d['near_removed']:>8,}{d['kept']:>8,}"
                     f"{d['kept_chars'] / max(d['chars'], 1):>13.2%} {clusters:>9,}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m t5x_like.dedup", description=__doc__.split("\n\n")[0],
        epilog="Other flags go to Apache Beam's PipelineOptions (e.g. --runner, "
               "--direct_num_workers=2 --direct_running_mode=multi_processing).")
    parser.add_argument("--input_dir", required=True)
    parser.add_argument("--output_dir", required=True, help="a new or empty directory")
    parser.add_argument("--engine", default="beam", choices=("beam", "local"))
    parser.add_argument("--domains", default=None, help="comma-separated (default: all)")
    defaults = DedupConfig()
    for field in ("shingle", "ngram", "bands", "rows", "threshold", "seed"):
        parser.add_argument(f"--{field}", type=type(getattr(defaults, field)),
                            default=getattr(defaults, field))
    parser.add_argument("--across_domains", action="store_true",
                        help="one group for the whole corpus instead of one per domain")
    parser.add_argument("--split_priority", default=",".join(defaults.split_priority),
                        help="splits whose copy is kept first")
    args, pipeline_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)  # its type-hint chatter
    cfg = DedupConfig(shingle=args.shingle, ngram=args.ngram, bands=args.bands, rows=args.rows,
                      threshold=args.threshold, seed=args.seed,
                      across_domains=args.across_domains,
                      split_priority=tuple(args.split_priority.split(",")))
    try:
        report = dedup(args.input_dir, args.output_dir, cfg, engine=args.engine,
                       domains=args.domains.split(",") if args.domains else None,
                       pipeline_args=pipeline_args)
    except (ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    print(format_summary(report))
    print(f"report: {os.path.join(args.output_dir, REPORT_NAME)}")
    return report
