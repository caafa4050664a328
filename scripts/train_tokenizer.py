"""Train the shipped SentencePiece tokenizer `data/vocab/reka_demo.model`.

Trained on a balanced sample of the *train* split of the demo corpus (the same number
of characters from each of the five domains, so that code and multilingual text are
not crowded out), never on validation, so bits-per-character on validation stays
honest.

Settings follow PaLM's tokenizer where they matter and T5's ids so that SeqIO works:
- 7,680 pieces; `t5x_like.data.vocabulary.get_vocabulary()` (seqio's
  `SentencePieceVocabulary(path, extra_ids=512)`) adds 512 sentinels on top, for 8,192
  ids in all: the tiny models' `vocab_size`, a multiple of 1024 (good for sharding V).
  512 sentinels because UL2's x1 denoiser (mean span 3, half the tokens noise) cuts up
  to 511 spans at inputs of 2,048 tokens, each span its own sentinel; with fewer, the
  last spans would reuse ordinary pieces (`t5x_like.data.ul2.sentinel_budget` checks it).
- pad=0, eos=1, unk=2, no bos (T5 convention); `[NLU] [NLG] [S2S]` as user-defined
  symbols, so they are the single ids 3, 4, 5 (UL2 mode tokens).
- Lossless: identity normalisation, whitespace kept (no collapsing of spaces,
  whitespace-only pieces allowed, so code indentation tokenises well), UTF-8 byte
  fallback for characters outside the vocabulary, digits split into single tokens.
- Deterministic: fixed sample, fixed random seed, one training thread, no build path
  recorded in the model, so a rebuild gives a byte-identical `.model`.

Usage (from the repository root, after scripts/build_corpus.py):
  python scripts/train_tokenizer.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from t5x_like.data.vocabulary import NUM_EXTRA_IDS  # noqa: E402 - sentinels on top of the pieces

DOMAINS = ("code", "stem", "web", "math", "multilingual")
TOTAL_IDS = 8192  # the tiny models' vocab_size (gin_configs/models/tiny_*.gin)
VOCAB_SIZE = TOTAL_IDS - NUM_EXTRA_IDS  # SentencePiece pieces: 7,680
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")  # ids 3, 4, 5
CHARS_PER_DOMAIN = 1_500_000
SEED = 20240417


def read_docs(corpus_dir: Path, domain: str, split: str = "train") -> list[str]:
    """All documents of one domain and split, in file order (deterministic)."""
    import tensorflow as tf  # late: TensorFlow takes seconds to import

    files = sorted((corpus_dir / domain).glob(f"{split}-*.tfrecord.gz"))
    if not files:
        raise FileNotFoundError(
            f"no {split} shards for domain {domain!r} under {corpus_dir / domain}; "
            "build the corpus first with `python scripts/build_corpus.py`"
        )
    texts = []
    for record in tf.data.TFRecordDataset([str(f) for f in files], compression_type="GZIP"):
        example = tf.train.Example.FromString(record.numpy())
        texts.append(example.features.feature["text"].bytes_list.value[0].decode("utf-8"))
    return texts


def sample_lines(corpus_dir: Path, chars_per_domain: int) -> list[str]:
    """Non-empty lines of whole documents, up to `chars_per_domain` per domain.

    SentencePiece trains on "sentences"; a line is the natural unit for code, man pages
    and fortunes alike. Lines keep their leading whitespace (indentation is data).
    """
    lines = []
    for domain in DOMAINS:
        used = 0
        for text in read_docs(corpus_dir, domain):
            if used >= chars_per_domain:
                break
            for line in text.split("\n"):
                if line.strip():
                    lines.append(line)
            used += len(text)
        print(f"{domain:13s} {used:10,} chars sampled", flush=True)
    return lines


def train(lines: list[str], model_prefix: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Train and write PREFIX.model and PREFIX.vocab."""
    import shutil
    import tempfile

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    spm.set_random_generator_seed(SEED)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="train_tokenizer_"))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp / model_prefix.name),
        model_type="unigram",
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        user_defined_symbols=list(MODE_TOKENS),
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        max_sentence_length=16384,
        shuffle_input_sentence=True,
        input_sentence_size=0,  # use every sampled line
        num_threads=1,
        minloglevel=1,
    )
    # The model records its training prefix; keep only the base name so the shipped
    # file does not depend on where it was built (a rebuild is then byte-identical).
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tmp / f"{model_prefix.name}.model").read_bytes())
    proto.trainer_spec.model_prefix = model_prefix.name
    model_prefix.with_suffix(".model").write_bytes(proto.SerializeToString())
    shutil.copyfile(tmp / f"{model_prefix.name}.vocab", model_prefix.with_suffix(".vocab"))
    shutil.rmtree(tmp)


def report(model_path: Path, corpus_dir: Path) -> None:
    """Characters per token on each domain's validation split (higher = denser)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    for domain in DOMAINS:
        docs = read_docs(corpus_dir, domain, "validation")
        chars = sum(len(d) for d in docs)
        tokens = sum(len(ids) for ids in sp.encode(docs))
        lossless = all(sp.decode(sp.encode(d)) == d for d in docs)
        print(
            f"{domain:13s} validation: {chars:9,} chars {tokens:9,} tokens "
            f"{chars / tokens:5.2f} chars/token lossless={lossless}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=REPO_ROOT / "data" / "corpus")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "data" / "vocab" / "reka_demo",
        help="model prefix; writes PREFIX.model and PREFIX.vocab",
    )
    parser.add_argument("--chars_per_domain", type=int, default=CHARS_PER_DOMAIN)
    args = parser.parse_args(argv)
    lines = sample_lines(args.corpus, args.chars_per_domain)
    train(lines, args.out)
    report(args.out.with_suffix(".model"), args.corpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
