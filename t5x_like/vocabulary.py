"""The shipped SentencePiece vocabulary, its reserved ids, and checks on them.

One place defines the vocabulary every task, model and script uses:
- `data/vocab/reka_demo.model`: 8,092 SentencePiece pieces (scripts/train_tokenizer.py)
  plus `NUM_EXTRA_IDS` = 100 SeqIO sentinels on top, 8,192 ids in all.
- T5 ids: pad 0, eos 1, unk 2, no bos. Sentinel k (`<extra_id_k>`) is
  `vocab_size - 1 - k`, counting down from the top as T5 and UL2 expect.
- UL2 mode tokens `[NLU] [NLG] [S2S]` are the single reserved ids 3, 4, 5
  (user-defined symbols of the SentencePiece model), never split into text pieces.

Trap: `vocab.encode("[NLU] text")` yields a lone '▁' piece before the id (the
dummy-prefix space). Code that adds a mode token should prepend `MODE_TOKENS[...]`
to the encoded ids instead of encoding the token as text.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import seqio
import tensorflow as tf

_REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB_PATH = str(_REPO_ROOT / "data" / "vocab" / "reka_demo.model")
NUM_EXTRA_IDS = 100
MODE_TOKENS = {"[NLU]": 3, "[NLG]": 4, "[S2S]": 5}
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class SentencePieceVocabulary(seqio.SentencePieceVocabulary):
    """seqio's SentencePiece vocabulary with one TF tokenizer per object.

    seqio builds a new tf_text tokenizer, reloading the model, at every use: once per
    task pipeline, 35 times per prepare shard of reka_mix_ul2, each load logging
    "precompiled_charsmap is empty" from C++. Here one tokenizer, created eagerly
    (`tf.init_scope`), serves every tf.data graph of the process. It is left out of
    the pickled state, which seqio also uses for equality.
    """

    @property
    def tf_tokenizer(self):
        tokenizer = self.__dict__.get("_tf_tokenizer")
        if tokenizer is None:
            with tf.init_scope():
                tokenizer = super().tf_tokenizer
            self.__dict__["_tf_tokenizer"] = tokenizer
        return tokenizer

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_tf_tokenizer", None)
        return state


@functools.lru_cache(maxsize=None)
def _load(path: str, extra_ids: int) -> seqio.SentencePieceVocabulary:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"SentencePiece model {path!r} does not exist. The repository ships it at "
            f"{VOCAB_PATH}; rebuild it with `python scripts/build_corpus.py && "
            "python scripts/train_tokenizer.py`, or pass the path of your own model."
        )
    return SentencePieceVocabulary(path, extra_ids=extra_ids)


def get_vocabulary(path: str | os.PathLike = VOCAB_PATH) -> seqio.SentencePieceVocabulary:
    """The vocabulary at `path` with 100 sentinels; one object per path (cached).

    Caching matters beyond speed: seqio compares vocabularies of output features, and
    every task built from this function then shares the same object.
    """
    return _load(os.fspath(path), NUM_EXTRA_IDS)


def sentinel_id(vocab: seqio.Vocabulary, k: int) -> int:
    """Id of `<extra_id_k>`: the T5 convention counts down from the top of the vocabulary."""
    if not 0 <= k < NUM_EXTRA_IDS:
        raise ValueError(
            f"sentinel index {k} is outside [0, {NUM_EXTRA_IDS}); the "
            f"vocabulary has {NUM_EXTRA_IDS} sentinels (extra ids)"
        )
    return vocab.vocab_size - 1 - k


def check_vocabulary(vocab: seqio.Vocabulary) -> None:
    """Raise ValueError unless `vocab` has the sentinels and mode tokens UL2 needs.

    Checks: at least NUM_EXTRA_IDS extra ids with `<extra_id_0>` at `vocab_size - 1`;
    `[NLU] [NLG] [S2S]` each a single id (3, 4, 5) that decodes back to its name.
    """
    extra_ids = getattr(vocab, "extra_ids", 0)
    if extra_ids < NUM_EXTRA_IDS:
        raise ValueError(
            f"vocabulary has {extra_ids} extra ids (sentinels), expected at least "
            f"{NUM_EXTRA_IDS}: the UL2 denoisers put <extra_id_k> at vocab_size-1-k. "
            f"Build it with seqio.SentencePieceVocabulary(path, extra_ids={NUM_EXTRA_IDS}) "
            "or use t5x_like.vocabulary.get_vocabulary()."
        )
    top = vocab.vocab_size - 1
    decoded = vocab.decode([top])
    if decoded != "<extra_id_0>":
        raise ValueError(
            f"id {top} (vocab_size-1) should be the sentinel <extra_id_0> but decodes to "
            f"{decoded!r}: the SentencePiece model's pieces must lie below the extra ids. "
            "Use seqio.SentencePieceVocabulary(path, extra_ids=100)."
        )
    for name, expected in MODE_TOKENS.items():
        ids = [i for i in vocab.encode(name) if i != _lone_space_id(vocab)]
        if ids != [expected]:
            raise ValueError(
                f"mode token {name} encodes to {ids}, expected the single reserved id "
                f"{expected}. Train the SentencePiece model with "
                f"user_defined_symbols={list(MODE_TOKENS)} (first after pad/eos/unk), as "
                "scripts/train_tokenizer.py does."
            )
        decoded = vocab.decode([expected])
        if decoded != name:
            raise ValueError(
                f"id {expected} decodes to {decoded!r}, expected the mode token {name}. "
                f"Train the SentencePiece model with user_defined_symbols={list(MODE_TOKENS)}."
            )


def _lone_space_id(vocab: seqio.Vocabulary) -> int | None:
    """Id of the bare '▁' piece that the dummy prefix puts before a leading symbol."""
    if isinstance(vocab, seqio.SentencePieceVocabulary):
        pid = vocab.tokenizer.piece_to_id("▁")
        return None if pid == vocab.tokenizer.unk_id() else pid
    return None


def vocabulary_checksum(vocab: seqio.Vocabulary) -> str:
    """A hash identifying a vocabulary, so that prepared data is never read with another.

    SentencePiece: SHA-256 over the model file's bytes and the number of extra ids.
    Other vocabularies (e.g. seqio.ByteVocabulary in tests): 16 hex digits over the
    class, size and extra ids, which is all that defines them.
    """
    sp_model = getattr(vocab, "sp_model", None)
    if sp_model:
        h = hashlib.sha256(sp_model)
        h.update(f"extra_ids={vocab.extra_ids}".encode())
        return h.hexdigest()
    h = hashlib.sha256()
    for part in (type(vocab).__name__, vocab.vocab_size, getattr(vocab, "extra_ids", 0)):
        h.update(str(part).encode())
    return h.hexdigest()[:16]
