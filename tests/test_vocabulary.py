"""The shipped tokenizer and t5x_like.vocabulary: reserved ids, losslessness, checks."""

import functools
import io
from pathlib import Path

import pytest
import seqio

from t5x_like import vocabulary

REPO = Path(__file__).resolve().parent.parent
DOMAINS = ("code", "stem", "web", "math", "multilingual")


@functools.lru_cache(maxsize=None)
def validation_docs(domain: str, n: int = 25) -> tuple[str, ...]:
    import tensorflow as tf

    path = REPO / "data" / "corpus" / domain / "validation-00000-of-00001.tfrecord.gz"
    ds = tf.data.TFRecordDataset(str(path), compression_type="GZIP").take(n)
    return tuple(
        tf.train.Example.FromString(r.numpy())
        .features.feature["text"]
        .bytes_list.value[0]
        .decode("utf-8")
        for r in ds
    )


@pytest.fixture(scope="module")
def vocab():
    return vocabulary.get_vocabulary()


def pieces(vocab, text):
    return [vocab.tokenizer.id_to_piece(i) for i in vocab.encode(text)]


def test_sizes_reserved_ids_and_cache(vocab):
    assert vocab.vocab_size == 8192
    assert vocab.extra_ids == vocabulary.NUM_EXTRA_IDS == 100
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert vocabulary.get_vocabulary() is vocab
    vocabulary.check_vocabulary(vocab)


def test_mode_tokens_are_single_reserved_ids(vocab):
    assert vocabulary.MODE_TOKENS == {"[NLU]": 3, "[NLG]": 4, "[S2S]": 5}
    for name, token_id in vocabulary.MODE_TOKENS.items():
        assert vocab.decode([token_id]) == name
        # the trap the module docstring warns about: a lone '▁' precedes the id
        assert pieces(vocab, f"{name} text")[:2] == ["▁", name]
        # prepending the id instead gives the intended "[NLU] text"
        assert vocab.decode([token_id, *vocab.encode("text")]) == f"{name} text"


def test_sentinels_count_down_from_the_top(vocab):
    assert vocabulary.sentinel_id(vocab, 0) == 8191
    assert vocab.decode([vocabulary.sentinel_id(vocab, 0)]) == "<extra_id_0>"
    assert vocab.decode([vocabulary.sentinel_id(vocab, 99)]) == "<extra_id_99>"
    assert vocab.tokenizer.get_piece_size() - vocab.extra_ids == 8092
    with pytest.raises(ValueError, match="sentinel index 100"):
        vocabulary.sentinel_id(vocab, 100)


@pytest.mark.parametrize("domain", DOMAINS)
def test_round_trip_is_lossless_and_dense(vocab, domain):
    docs = validation_docs(domain)
    assert docs
    tokens = 0
    for text in docs:
        ids = vocab.encode(text)
        assert vocab.decode(ids) == text
        assert vocabulary.PAD_ID not in ids and vocabulary.UNK_ID not in ids
        tokens += len(ids)
    # measured 2.2 (multilingual) to 3.3 (web) characters per token
    assert sum(map(len, docs)) / tokens > 2.0


def test_whitespace_is_kept(vocab):
    for text in ("a  b", "def f():\n\treturn 1\n", "    indented\n\n\nend", " leading"):
        assert vocab.decode(vocab.encode(text)) == text


def test_digits_are_split(vocab):
    for piece in pieces(vocab, "In 2024, pi was 3.14159265 and 1000000 > 999."):
        if any(c.isdigit() for c in piece):
            assert len(piece.lstrip("▁")) == 1, piece


def test_byte_fallback_for_unseen_characters(vocab):
    for text in ("emoji 😀!", "rare CJK 𠀋 龘", "Cherokee ᏣᎳᎩ"):
        ids = vocab.encode(text)
        assert vocab.decode(ids) == text
        assert vocabulary.UNK_ID not in ids
    assert all(p.startswith("<0x") for p in pieces(vocab, "😀")[1:])


def test_check_vocabulary_rejects_missing_sentinels():
    bare = seqio.SentencePieceVocabulary(vocabulary.VOCAB_PATH, extra_ids=0)
    with pytest.raises(ValueError, match="0 extra ids.*expected at least 100"):
        vocabulary.check_vocabulary(bare)


def test_check_vocabulary_rejects_missing_mode_tokens(tmp_path):
    import sentencepiece as spm

    text = "\n".join(validation_docs("web", 5)).split("\n")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(line for line in text if line.strip()),
        model_writer=model,
        vocab_size=300,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path = tmp_path / "no_modes.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(ValueError, match=r"mode token \[NLU\].*user_defined_symbols"):
        vocabulary.check_vocabulary(vocabulary.get_vocabulary(path))


def test_checksum_identifies_model_and_extra_ids(vocab):
    same = seqio.SentencePieceVocabulary(vocabulary.VOCAB_PATH, extra_ids=100)
    bare = seqio.SentencePieceVocabulary(vocabulary.VOCAB_PATH, extra_ids=0)
    assert vocabulary.vocabulary_checksum(same) == vocabulary.vocabulary_checksum(vocab)
    assert vocabulary.vocabulary_checksum(bare) != vocabulary.vocabulary_checksum(vocab)
    assert len(vocabulary.vocabulary_checksum(vocab)) == 64


def test_missing_model_file_says_how_to_rebuild(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tokenizer.py"):
        vocabulary.get_vocabulary(tmp_path / "absent.model")


def test_one_tf_tokenizer_serves_every_tf_data_graph_and_keeps_equality():
    import pickle

    import tensorflow as tf

    vocab = vocabulary.get_vocabulary()
    text = "def f(x):\n    return x + 1  # ünïcode"
    expected = vocab.encode(text)
    for _ in range(2):  # two separately traced pipelines share the cached tokenizer
        ds = tf.data.Dataset.from_tensors(text).map(vocab.encode_tf)
        assert next(iter(ds)).numpy().tolist() == expected
    assert vocab.tf_tokenizer is vocab.tf_tokenizer
    fresh = pickle.loads(pickle.dumps(vocab))
    assert fresh == vocab and "_tf_tokenizer" not in fresh.__dict__
