"""Builds the demo dialogue set data/chat/{train,validation}.jsonl from the shipped corpus.

Deterministic (same corpus, same bytes): documents of each domain are taken in SHA-256
order of their text, PER_DOMAIN[split] of them per domain, from the corpus split of the
same name, so held-out dialogues come from held-out documents. From each document: its
title (first line) and its first body paragraph of at least 60 characters, whitespace
collapsed and cut at a word boundary to at most MAX_PASSAGE characters. One of three
dialogue kinds per document (SHA-256 of its text mod 3), half of them with a system turn:

- repeat: the user gives the passage and asks for it back; the assistant repeats it;
- title (two turns): the user gives title and passage and asks for the first line; the
  assistant gives the title; the user asks for the passage's first sentence; the
  assistant gives it (up to the first ". " or the end);
- continue: the user gives the passage's first half; the assistant writes the rest.

Every line is {"messages": [{"role", "content"}, ...]} (data/chat.py's format).

    .venv/bin/python scripts/build_chat_data.py            # writes data/chat/
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = ("code", "stem", "web", "math", "multilingual")
PER_DOMAIN = {"train": 120, "validation": 16}
MAX_PASSAGE = 200
SYSTEM = "You are a careful assistant for {domain} documentation. Answer exactly."


def read_documents(corpus_dir: str, domain: str, split: str) -> list[str]:
    import tensorflow as tf  # only for the corpus's gzipped TFRecords

    paths = sorted(glob.glob(os.path.join(corpus_dir, domain, f"{split}-*.tfrecord.gz")))
    feature = {"text": tf.io.FixedLenFeature([], tf.string)}
    texts = []
    for record in tf.data.TFRecordDataset(paths, compression_type="GZIP"):
        text = tf.io.parse_single_example(record, feature)["text"].numpy()
        texts.append(text.decode("utf-8"))
    return texts


def _sha(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut if cut else text[:limit]


def title_and_passage(text: str) -> tuple[str, str] | None:
    """(first line, first body paragraph of >= 60 characters) or None."""
    lines = text.strip().split("\n")
    title = " ".join(lines[0].split())
    body = "\n".join(lines[1:])
    for paragraph in re.split(r"\n\s*\n", body):
        flat = " ".join(paragraph.split())
        if len(flat) >= 60 and not re.fullmatch(r"[-=*_~#. ]+", flat):
            return _cut(title, 80), _cut(flat, MAX_PASSAGE)
    return None


def dialogue(domain: str, text: str) -> list[dict[str, str]] | None:
    parts = title_and_passage(text)
    if parts is None:
        return None
    title, passage = parts
    h = _sha(text)
    turns = []
    if h % 2:
        turns.append({"role": "system", "content": SYSTEM.format(domain=domain)})
    kind = (h >> 1) % 3
    if kind == 0:
        turns += [{"role": "user", "content": f"Repeat this passage exactly:\n\n{passage}"},
                  {"role": "assistant", "content": passage}]
    elif kind == 1:
        first = passage.split(". ", 1)[0].rstrip(".") + "."
        turns += [{"role": "user",
                   "content": f"{title}\n\n{passage}\n\nWhat is the first line of this text?"},
                  {"role": "assistant", "content": title},
                  {"role": "user", "content": "And the first sentence of the paragraph?"},
                  {"role": "assistant", "content": first}]
    else:
        words = passage.split(" ")
        half = max(1, len(words) // 2)
        turns += [{"role": "user", "content": "Continue this text:\n\n" + " ".join(words[:half])},
                  {"role": "assistant", "content": " ".join(words[half:]) or passage}]
    return turns


def build(corpus_dir: str, out_dir: str) -> dict[str, int]:
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for split, per_domain in PER_DOMAIN.items():
        lines = []
        for domain in DOMAINS:
            kept = 0
            for text in sorted(read_documents(corpus_dir, domain, split), key=_sha):
                turns = dialogue(domain, text)
                if turns is None:
                    continue
                lines.append(json.dumps({"messages": turns}, ensure_ascii=False))
                kept += 1
                if kept == per_domain:
                    break
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        counts[split] = len(lines)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus_dir", default=os.path.join(ROOT, "data", "corpus"))
    parser.add_argument("--out_dir", default=os.path.join(ROOT, "data", "chat"))
    args = parser.parse_args()
    print(json.dumps(build(args.corpus_dir, args.out_dir)))


if __name__ == "__main__":
    main()
