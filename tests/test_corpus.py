"""The shipped demo corpus (data/corpus): layout, content and metadata.

The corpus is built by scripts/build_corpus.py and consumed by tasks/ through the
contract in docs/ARCHITECTURE.md; these tests pin that contract and the properties the
rest of the stack relies on (real text, valid UTF-8, disjoint splits, a validation
split big enough for bits-per-character, at least six languages).
"""

import functools
import hashlib
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "corpus"
DOMAINS = ("code", "stem", "web", "math", "multilingual")
SHARDS = {"train": 4, "validation": 1}
# Unicode category Cc (C0, DEL, C1) except newline and tab
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def shard_paths(domain: str, split: str) -> list[Path]:
    n = SHARDS[split]
    return [CORPUS / domain / f"{split}-{i:05d}-of-{n:05d}.tfrecord.gz" for i in range(n)]


@functools.lru_cache(maxsize=None)
def read_split(domain: str, split: str) -> tuple[str, ...]:
    """Every document of one domain and split, checking the record format on the way."""
    import tensorflow as tf

    texts = []
    paths = [str(p) for p in shard_paths(domain, split)]
    for record in tf.data.TFRecordDataset(paths, compression_type="GZIP"):
        example = tf.train.Example.FromString(record.numpy())
        features = example.features.feature
        assert list(features) == ["text"], f"{domain}/{split}: features {list(features)}"
        values = features["text"].bytes_list.value
        assert len(values) == 1, f"{domain}/{split}: {len(values)} values in `text`"
        texts.append(values[0].decode("utf-8"))  # strict: raises on invalid UTF-8
    return tuple(texts)


@functools.lru_cache(maxsize=None)
def stats() -> dict:
    return json.loads((CORPUS / "stats.json").read_text())


def test_shard_files_follow_the_contract():
    expected = {p for d in DOMAINS for s in SHARDS for p in shard_paths(d, s)}
    present = set(CORPUS.glob("*/*.tfrecord.gz"))
    assert present == expected, (
        f"unexpected {present - expected}, missing {expected - present}"
    )
    total = sum(p.stat().st_size for p in (REPO / "data").rglob("*") if p.is_file())
    assert total < 20 * 2**20, f"data/ is {total:,} bytes; the repo allows 20 MiB"


@pytest.mark.parametrize("domain", DOMAINS)
def test_documents_are_clean_unique_text(domain):
    seen = {}
    for split in SHARDS:
        for text in read_split(domain, split):
            assert len(text.strip()) >= 200, f"{domain}/{split}: short doc {text[:80]!r}"
            # no control characters (other than newline and tab) survive the cleaning
            bad = CONTROL_RE.search(text)
            assert not bad, f"{domain}/{split}: control character {bad.group()!r}"
            key = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
            assert key not in seen, (
                f"{domain}: document in {split} duplicates one in {seen[key]}"
            )
            seen[key] = split


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_sizes_and_stats_agree(domain):
    entry = stats()["domains"][domain]
    for split in SHARDS:
        docs = read_split(domain, split)
        assert entry[split]["docs"] == len(docs)
        assert entry[split]["chars"] == sum(len(t) for t in docs)
    # validation is big enough for a stable bits-per-character estimate
    assert entry["validation"]["docs"] >= 50
    assert entry["validation"]["chars"] >= 100_000
    assert entry["train"]["chars"] >= 1_000_000
    # ... and every train shard holds data (prepare parallelises over them)
    import tensorflow as tf

    for path in shard_paths(domain, "train"):
        ds = tf.data.TFRecordDataset(str(path), compression_type="GZIP")
        assert next(iter(ds), None) is not None, f"{path} is empty"


def test_multilingual_has_at_least_six_languages():
    langs = stats()["domains"]["multilingual"]["languages"]
    big = {k for k, v in langs.items() if v["docs"] >= 20 and v["validation"] >= 1}
    assert len(big) >= 6, f"languages with >= 20 docs and validation coverage: {big}"
    # the labels are backed by the text itself: count documents per writing system
    scripts = {
        "cyrillic": r"[\u0400-\u04ff]",
        "han": r"[\u4e00-\u9fff]",
        "kana": r"[\u3040-\u30ff]",
        "latin-diacritics": r"[äöüßéèàñçąęłšřžő]",
    }
    docs = read_split("multilingual", "train")
    for name, pattern in scripts.items():
        n = sum(1 for t in docs if len(re.findall(pattern, t)) > 50)
        assert n >= 20, f"only {n} multilingual documents are written in {name}"


def test_code_documents_are_python_that_compiles():
    for split in SHARDS:
        for text in read_split("code", split):
            compile(text, "<corpus>", "exec")  # chunks cut at top-level statements


def test_provenance_names_every_domain_and_the_rebuild():
    text = (REPO / "data" / "PROVENANCE.md").read_text()
    for domain in DOMAINS:
        assert f"## {domain}" in text
    assert "python scripts/build_corpus.py" in text
    assert "python scripts/train_tokenizer.py" in text
