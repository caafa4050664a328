"""The shipped tokenizer and t5x_like.data.vocabulary: reserved ids, losslessness, checks."""

import functools
import io
from pathlib import Path

import pytest
import seqio

from t5x_like.data import vocabulary

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
    # 512 sentinels: UL2's x1 cuts up to 511 spans at 2,048-token inputs (test_ul2.py).
    assert vocab.extra_ids == vocabulary.NUM_EXTRA_IDS == 512
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
    assert vocab.decode([vocabulary.sentinel_id(vocab, 511)]) == "<extra_id_511>"
    assert vocabulary.sentinel_id(vocab, 511) == 7680  # the first id above the pieces
    assert vocab.tokenizer.get_piece_size() - vocab.extra_ids == 7680
    assert vocab.decode([7679]) != "<extra_id_512>"  # the last piece is text
    with pytest.raises(ValueError, match="sentinel index 512"):
        vocabulary.sentinel_id(vocab, 512)


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
    with pytest.raises(ValueError, match="0 extra ids.*expected at least 512"):
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
    same = seqio.SentencePieceVocabulary(vocabulary.VOCAB_PATH, extra_ids=512)
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


# ------------------------------------------------------------------------------ tokenizer.json


def _byte_level_bpe(path, vocab_size=400):
    """A tiny byte-level BPE built like Llama 3's: no special tokens while training, so
    id 0 is a real token ("!", the first byte of the alphabet), specials appended last."""
    import tokenizers
    from tokenizers import decoders, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    docs = [d for domain in DOMAINS for d in validation_docs(domain, 5)]
    tok.train_from_iterator(docs, trainer)
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    tok.save(str(path))
    return tok, docs


@pytest.fixture(scope="module")
def hf_vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok, docs = _byte_level_bpe(path)
    vocab = vocabulary.HfTokenizerVocabulary(path, eos_token="<|end_of_text|>",
                                             bos_token="<|begin_of_text|>")
    return vocab, tok, docs


def test_hf_tokenizer_vocabulary_encodes_like_the_tokenizer_and_round_trips(hf_vocab):
    vocab, tok, docs = hf_vocab
    assert vocab.vocab_size == tok.get_vocab_size() == 402 and vocab.extra_ids == 0
    assert (vocab.bos_id, vocab.eos_id, vocab.unk_id) == (400, 401, None)
    assert vocab.decode([0]) == "!"  # SeqIO's pad id is a real token here, as in Llama 3
    for text in docs:
        ids = vocab.encode(text)
        assert ids == tok.encode(text, add_special_tokens=False).ids
        assert vocab.decode(ids) == text
        assert vocab.decode([*ids, vocab.eos_id, 0, 0, 17]) == text  # through the first EOS


def test_hf_tokenizer_vocabulary_in_tf_graphs_and_a_seqio_task(hf_vocab):
    import tensorflow as tf

    vocab, _, docs = hf_vocab
    texts = docs[:6]
    ds = tf.data.Dataset.from_tensor_slices(texts).map(vocab.encode_tf)
    assert [x.numpy().tolist() for x in ds] == [vocab.encode(t) for t in texts]
    # decode_tf: padded rows with 0 (= "!") after EOS decode without trailing "!!"
    rows = [vocab.encode(t)[:20] + [vocab.eos_id] for t in texts[:2]]
    width = max(map(len, rows)) + 3
    ids = tf.constant([row + [0] * (width - len(row)) for row in rows], tf.int32)
    decoded = [t.decode() for t in vocab.decode_tf(ids).numpy()]
    assert decoded == [vocab.decode(row) for row in rows] and not decoded[0].endswith("!")
    assert vocab.decode_tf(ids[0]).numpy().decode() == decoded[0]

    name = "test_hf_tokenizer_task"
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(
            lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices(texts),
            splits=["train"]),
        preprocessors=[seqio.map_over_dataset(lambda t: {"targets": t}),
                       seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features={"targets": seqio.Feature(vocab, add_eos=True)})
    try:
        examples = list(seqio.get_mixture_or_task(name).get_dataset(
            None, split="train", shuffle=False).as_numpy_iterator())
    finally:
        seqio.TaskRegistry.remove(name)
    assert [e["targets"].tolist() for e in examples] == [
        vocab.encode(t) + [vocab.eos_id] for t in texts]


def test_hf_tokenizer_vocabulary_identity_and_bad_tokens(hf_vocab, tmp_path):
    import pickle

    vocab, _, _ = hf_vocab
    same = vocabulary.HfTokenizerVocabulary(vocab.path, eos_token="<|end_of_text|>",
                                            bos_token="<|begin_of_text|>")
    other_eos = vocabulary.HfTokenizerVocabulary(vocab.path, eos_token="<|begin_of_text|>")
    assert same == vocab and pickle.loads(pickle.dumps(vocab)) == vocab
    assert vocabulary.vocabulary_checksum(same) == vocabulary.vocabulary_checksum(vocab)
    assert vocabulary.vocabulary_checksum(other_eos) != vocabulary.vocabulary_checksum(vocab)
    with pytest.raises(ValueError, match="eos_token='</s>' is not a token"):
        vocabulary.HfTokenizerVocabulary(vocab.path, eos_token="</s>")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        vocabulary.HfTokenizerVocabulary(tmp_path / "absent.json")


def test_check_model_covers(hf_vocab, vocab, caplog):
    tokenizer_vocab, _, _ = hf_vocab
    with pytest.raises(ValueError, match=r"vocab_size=401 is smaller than the vocabulary's 402"):
        vocabulary.check_model_covers(tokenizer_vocab, 401)
    with pytest.raises(ValueError, match=r"vocab_size=4096 .* 8192 ids"):
        vocabulary.check_model_covers(vocab, 4096)
    with caplog.at_level("WARNING", logger="t5x_like.data.vocabulary"):
        vocabulary.check_model_covers(vocab, 8192)  # tiny models: exact
        vocabulary.check_model_covers(tokenizer_vocab, 1024)  # padded to a multiple of 1024
        assert not caplog.records
        vocabulary.check_model_covers(vocab, 128_256)  # llama3_8b with the demo tokenizer
    assert len(caplog.records) == 1
    assert "vocab_size=128256" in caplog.text and "8192 ids" in caplog.text
