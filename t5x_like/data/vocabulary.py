"""The shipped SentencePiece vocabulary, its reserved ids, and checks on them.

One place defines the vocabulary every task, model and script uses:
- `data/vocab/reka_demo.model`: 7,680 SentencePiece pieces (scripts/train_tokenizer.py)
  plus `NUM_EXTRA_IDS` = 512 SeqIO sentinels on top, 8,192 ids in all. 512 because
  UL2's x1 denoiser cuts up to 511 noise spans at 2,048-token inputs, one sentinel each
  (`ul2.sentinel_budget`); with fewer, the last spans would reuse ordinary pieces.
- T5 ids: pad 0, eos 1, unk 2, no bos. Sentinel k (`<extra_id_k>`) is
  `vocab_size - 1 - k`, counting down from the top as T5 and UL2 expect.
- UL2 mode tokens `[NLU] [NLG] [S2S]` are the single reserved ids 3, 4, 5
  (user-defined symbols of the SentencePiece model), never split into text pieces.

Trap: `vocab.encode("[NLU] text")` yields a lone '▁' piece before the id (the
dummy-prefix space). Code that adds a mode token should prepend `MODE_TOKENS[...]`
to the encoded ids instead of encoding the token as text.

Other tokenizers: `HfTokenizerVocabulary` reads a Hugging Face `tokenizer.json` (e.g.
Llama 3's 128K BPE) as a SeqIO vocabulary; `check_model_covers` checks, before a run,
that a model has an embedding row for every id a vocabulary produces.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import seqio
import tensorflow as tf
import tokenizers

_REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB_PATH = str(_REPO_ROOT / "data" / "vocab" / "reka_demo.model")
NUM_EXTRA_IDS = 512
MODE_TOKENS = {"[NLU]": 3, "[NLG]": 4, "[S2S]": 5}
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# Models commonly pad their vocabulary up to a multiple of this many rows (T5: 32,100 ->
# 32,128; ours: to a multiple of 1024); unused rows beyond it are worth a warning.
VOCAB_PADDING_MULTIPLE = 1024

log = logging.getLogger("t5x_like.data.vocabulary")


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
    """The vocabulary at `path` with NUM_EXTRA_IDS sentinels; one object per path (cached).

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


_SPECIAL = re.compile(r"(\[NLU\]|\[NLG\]|\[S2S\]|<extra_id_\d+>)")


def encode_prompt(vocab: seqio.Vocabulary, text: str) -> list[int]:
    """Token ids of a prompt written as text, with the UL2 mode tokens ([NLU] [NLG]
    [S2S]) and sentinels (<extra_id_k>) as their single reserved ids, as the denoisers
    put them in training (encoding them as text would split them; see the module
    docstring): e.g. "[S2S] The cat" or "[NLU] The <extra_id_0> sat on <extra_id_1>."."""
    ids = []
    for piece in _SPECIAL.split(text):  # text, special, text, special, ...
        if piece in MODE_TOKENS:
            ids.append(MODE_TOKENS[piece])
        elif _SPECIAL.fullmatch(piece):
            ids.append(sentinel_id(vocab, int(piece[len("<extra_id_"):-1])))
        elif piece.strip():
            ids.extend(vocab.encode(piece.strip()))
    return ids


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
            "or use t5x_like.data.vocabulary.get_vocabulary()."
        )
    top = vocab.vocab_size - 1
    decoded = vocab.decode([top])
    if decoded != "<extra_id_0>":
        raise ValueError(
            f"id {top} (vocab_size-1) should be the sentinel <extra_id_0> but decodes to "
            f"{decoded!r}: the SentencePiece model's pieces must lie below the extra ids. "
            f"Use seqio.SentencePieceVocabulary(path, extra_ids={NUM_EXTRA_IDS})."
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


class HfTokenizerVocabulary(seqio.Vocabulary):
    """A Hugging Face `tokenizer.json` (the `tokenizers` library: Llama 3's 128K BPE,
    SmolLM's, ...) as a SeqIO vocabulary, in Python and in tf.data graphs.

    Ids are the tokenizer's own, i.e. the rows of the model's embedding: no extra ids,
    nothing reserved. SeqIO reads id 0 as padding (its feature converters give a 0
    target no loss weight), while in Llama 3's tokenizer 0 is "!": `zero_is_padding`
    says so, and rows of such a vocabulary are made through data/token_zero.py.
    - encode adds no special tokens (SeqIO appends EOS itself with `append_eos`; a
      model trained with BOS gets `bos_id` prepended by a preprocessor);
    - decode stops after the first EOS and drops special tokens.
    eos/bos/unk are named by their token strings (Llama 3: eos_token="<|end_of_text|>",
    bos_token="<|begin_of_text|>"), as the tokenizer's tokenizer_config.json names them.
    """

    def __init__(self, path: str | os.PathLike, *, eos_token: str | None = None,
                 bos_token: str | None = None, unk_token: str | None = None):
        super().__init__(extra_ids=0)
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"tokenizer file {self.path!r} does not exist; pass the "
                                    "path of a Hugging Face tokenizer.json.")
        with open(self.path, "rb") as f:
            self._json = f.read()
        self.tokenizer = tokenizers.Tokenizer.from_str(self._json.decode("utf-8"))
        self._ids = {name: self._token_id(name, token) for name, token in
                     (("eos_token", eos_token), ("bos_token", bos_token),
                      ("unk_token", unk_token))}

    def _token_id(self, name: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{name}={token!r} is not a token of {self.path}; pass the "
                             "token string its tokenizer_config.json gives for it.")
        return token_id

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos_token"]

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos_token"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk_token"]

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def checksum(self) -> str:
        """SHA-256 over the tokenizer file and the special ids: the vocabulary's identity,
        and so part of every store's and stream's. The marker: rows made from this
        vocabulary give id 0 its loss weight and attention (data/token_zero.py) since
        that change, so stores and streams made before it (where id 0 was padding) no
        longer match and are refused instead of read with the old rows."""
        h = hashlib.sha256(self._json)
        h.update(repr(sorted(self._ids.items())).encode())
        h.update(b"|id 0 is a token")
        return h.hexdigest()

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_np(self, s: bytes) -> np.ndarray:
        return np.asarray(self._encode(s.decode("utf-8")), np.int32)

    def _decode_np(self, ids: np.ndarray) -> np.ndarray:
        rows = ids.reshape(-1, ids.shape[-1])
        texts = [self.decode(row.tolist()).encode("utf-8") for row in rows]
        return np.array(texts, dtype=object).reshape(ids.shape[:-1])

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """A scalar string -> int32 [length] (SeqIO tokenizes one example at a time)."""
        if s.shape.rank != 0:
            raise ValueError(f"HfTokenizerVocabulary.encode_tf takes one string (a scalar), "
                             f"got shape {s.shape}; map it over the examples.")
        ids = tf.numpy_function(self._encode_np, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """int ids [..., length] -> strings [...], each through its first EOS."""
        text = tf.numpy_function(self._decode_np, [ids], tf.string, stateful=False)
        text.set_shape(ids.shape[:-1])
        return text

    def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        # seqio's decode_tf overwrites the ids after EOS with pad id 0, a real token here
        # ("!" in Llama 3); _decode_tf stops at EOS instead.
        if ids.shape == (0,):
            return tf.constant(b"", dtype=tf.string)
        return self._decode_tf(ids)

    def __eq__(self, other) -> bool:
        return isinstance(other, HfTokenizerVocabulary) and other.checksum == self.checksum

    def __hash__(self) -> int:
        return hash(self.checksum)

    def __str__(self) -> str:
        return f"HfTokenizerVocabulary(path={self.path!r}, vocab_size={self.vocab_size})"


def zero_is_padding(vocab: seqio.Vocabulary) -> bool:
    """Whether id 0 is padding, SeqIO's convention, so that padding may be read from the
    tokens: true of SentencePiece and SeqIO's own vocabularies (id 0 is <pad>), false of
    a tokenizer.json, whose id 0 is a real token (Llama 3's "!"). Where it is false,
    padding travels as lengths or segment ids (docs/INFERENCE.md)."""
    return not isinstance(vocab, HfTokenizerVocabulary)


def start_id(vocab: seqio.Vocabulary) -> int | None:
    """The token a decoder-only prompt starts from: the vocabulary's BOS where it has one
    (a tokenizer.json's bos_token; a SentencePiece model with a BOS piece, e.g. Llama 2's
    1), else 0 for SeqIO vocabularies (their shifted targets start with 0), None for a
    tokenizer.json without BOS."""
    bos = getattr(vocab, "bos_id", None)
    if bos is not None and bos >= 0:
        return int(bos)
    return None if isinstance(vocab, HfTokenizerVocabulary) else 0


def resolve_decode(decode, vocab: seqio.Vocabulary):
    """`decode` (decoding.DecodeConfig) with the vocabulary's EOS and start token; a
    ValueError naming both values where a set id contradicts them (DecodeConfig.resolved)."""
    eos = vocab.eos_id
    name = getattr(vocab, "sentencepiece_model_file", None) or str(vocab)
    return decode.resolved(None if eos is None or eos < 0 else int(eos), start_id(vocab), name)


def check_model_covers(vocab: seqio.Vocabulary, model_vocab_size: int) -> None:
    """Raises ValueError when a model with `model_vocab_size` embedding rows is too small
    for `vocab` (an id at or past the table has no embedding and no logit); logs a
    warning when the model has rows beyond the vocabulary's padded size, which no token
    uses (e.g. llama3_8b's 128,256 with the shipped 8,192-id tokenizer). Call before
    training or decoding."""
    if model_vocab_size < vocab.vocab_size:
        raise ValueError(
            f"the model's vocab_size={model_vocab_size} is smaller than the vocabulary's "
            f"{vocab.vocab_size} ids ({vocab}): ids {model_vocab_size} and up would have no "
            "embedding row. Set layers.TransformerConfig.vocab_size to at least "
            f"{vocab.vocab_size}, or use the tokenizer the model was made for.")
    padded = -(-vocab.vocab_size // VOCAB_PADDING_MULTIPLE) * VOCAB_PADDING_MULTIPLE
    if model_vocab_size > padded:
        log.warning(
            "the model's vocab_size=%d is larger than the vocabulary's %d ids (%s): %d "
            "embedding rows are never used. Fine for a smoke test; for real training use "
            "the model's own tokenizer or set layers.TransformerConfig.vocab_size = %d.",
            model_vocab_size, vocab.vocab_size, vocab, model_vocab_size - vocab.vocab_size,
            padded)


def vocabulary_checksum(vocab: seqio.Vocabulary) -> str:
    """A hash identifying a vocabulary, so that prepared data is never read with another.

    SentencePiece: SHA-256 over the model file's bytes and the number of extra ids.
    HfTokenizerVocabulary: SHA-256 over tokenizer.json and its special ids.
    Other vocabularies (e.g. seqio.ByteVocabulary in tests): 16 hex digits over the
    class, size and extra ids, which is all that defines them.
    """
    sp_model = getattr(vocab, "sp_model", None)
    if sp_model:
        h = hashlib.sha256(sp_model)
        h.update(f"extra_ids={vocab.extra_ids}".encode())
        return h.hexdigest()
    if isinstance(vocab, HfTokenizerVocabulary):
        return vocab.checksum
    h = hashlib.sha256()
    for part in (type(vocab).__name__, vocab.vocab_size, getattr(vocab, "extra_ids", 0)):
        h.update(str(part).encode())
    return h.hexdigest()[:16]
