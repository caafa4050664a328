"""Tests for t5x_like/data/ul2.py: T5 length arithmetic, denoiser statistics, losslessness,
determinism and the feature-length errors.

Runs the real preprocessors on synthetic token documents (ids far below the sentinel
range, so that sentinels are unambiguous) with a pass-through vocabulary of the
shipped shape (8,192 ids, the top 512 sentinels); tests/test_tasks.py runs them on the
shipped corpus and tokenizer.
"""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_like.data import ul2

VOCAB_SIZE = 8192  # the shipped vocabulary's size (docs/ARCHITECTURE.md)
EXTRA_IDS = 512  # its sentinels
MODE_TOKENS = {"[NLU]": 3, "[NLG]": 4, "[S2S]": 5}  # docs/ARCHITECTURE.md
# Synthetic text ids stay below this, so any id >= it in an output is a sentinel.
MAX_TEXT_ID = VOCAB_SIZE - EXTRA_IDS


class _SentinelVocabulary(seqio.PassThroughVocabulary):
    """Pass-through ids with `extra_ids` sentinels on top, as the shipped tokenizer."""

    def __init__(self, extra_ids=EXTRA_IDS):
        super().__init__(size=VOCAB_SIZE - extra_ids, eos_id=1)
        self._extra_ids = extra_ids


VOCAB = _SentinelVocabulary()
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(VOCAB, add_eos=True),
    "targets": seqio.Feature(VOCAB, add_eos=True),
}


def _documents(num_docs, seed, min_len=200, max_len=4000):
    """Synthetic tokenized documents of random lengths, as a list of int32 arrays."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(6, MAX_TEXT_ID, size=rng.integers(min_len, max_len), dtype=np.int32)
        for _ in range(num_docs)
    ]


def _dataset(docs):
    if not docs:
        return tf.data.Dataset.from_tensor_slices(
            {"targets": tf.zeros([0, 1], tf.int32)})
    ragged = tf.RaggedTensor.from_row_lengths(
        np.concatenate(docs), [len(d) for d in docs])
    return tf.data.Dataset.from_tensor_slices({"targets": ragged}).map(
        lambda x: {"targets": x["targets"]})


def _denoised(spec, docs, lengths, seed=7, num_examples=None):
    """Runs ul2_denoise as seqio would (seeded through map_seed_manager)."""
    with seqio.utils.map_seed_manager(seed):
        ds = ul2.ul2_denoise(_dataset(docs), lengths, OUTPUT_FEATURES, spec=spec,
                             mode_tokens=MODE_TOKENS)
    if num_examples:
        ds = ds.take(num_examples)
    return [{k: v.numpy() for k, v in ex.items()} for ex in ds]


def _reconstruct(inputs, targets):
    """Merges R/X inputs and targets at the sentinels back into the original chunk.

    Returns (tokens, sentinels in the inputs in order). Asserts the T5 layout on the way:
    the targets read `s_0 span_0 s_1 span_1 ...` with s_k = vocab_size-1-k.
    """
    sentinels_in = [t for t in inputs if t >= MAX_TEXT_ID]
    spans = []
    for t in targets:
        if t >= MAX_TEXT_ID:
            assert t == VOCAB_SIZE - 1 - len(spans), "targets sentinels not consecutive"
            spans.append([])
        else:
            assert spans, "targets must start with a sentinel"
            spans[-1].append(int(t))
    out = []
    for t in inputs:
        if t >= MAX_TEXT_ID:
            out.extend(spans[VOCAB_SIZE - 1 - t])
        else:
            out.append(int(t))
    # A 1-token chunk is all non-noise after T5's mask slices its padding token away, so
    # its targets are a lone sentinel with an empty span (T5 behaviour).
    if len(spans) == len(sentinels_in) + 1:
        assert spans[-1] == [] and len(out) == 1, "only a 1-token chunk has an extra sentinel"
    else:
        assert len(sentinels_in) == len(spans)
    return out, sentinels_in


def test_random_spans_helper_reproduces_t5_numbers():
    # (mu, r) -> (raw, targets) at inputs 512 (docs/FORMULAS.md, from T5's code).
    expected = {(3, .15): (568, 114), (8, .15): (588, 100), (3, .5): (766, 512),
                (8, .5): (908, 512), (64, .15): (600, 92), (64, .5): (1006, 512)}
    for (mu, r), lengths in expected.items():
        assert ul2.random_spans_helper(512, r, mu) == lengths, (mu, r)


def test_denoiser_table_is_the_seven_of_ul2():
    table = {n: (d.kind, d.mean_span, d.noise_density, d.mode_token)
             for n, d in ul2.DENOISERS.items()}
    assert table == {
        "r1": ("R", 3.0, 0.15, "[NLU]"), "r2": ("R", 8.0, 0.15, "[NLU]"),
        "x1": ("X", 3.0, 0.5, "[NLG]"), "x2": ("X", 8.0, 0.5, "[NLG]"),
        "x3": ("X", 64.0, 0.15, "[NLG]"), "x4": ("X", 64.0, 0.5, "[NLG]"),
        "s": ("S", None, 0.25, "[S2S]")}


def test_denoiser_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="kind 'Q'"):
        ul2.DenoiserSpec("q", "Q", 3.0, 0.15, "[NLU]")
    with pytest.raises(ValueError, match="noise_density 1.5"):
        ul2.DenoiserSpec("r", "R", 3.0, 1.5, "[NLU]")
    with pytest.raises(ValueError, match="mean_span >= 1"):
        ul2.DenoiserSpec("r", "R", None, 0.15, "[NLU]")


# Feature lengths for the statistics. x3 at 1024 rather than 512 because T5 rounds the
# span count: at 512, x3 (mu=64, r=0.15) has 90 noise tokens -> round(1.4) = 1 span of
# 90 (test_short_inputs_quantise_long_spans pins that); at 1024 it has 3 spans of ~60.
STAT_LENGTHS = {"inputs": 512, "targets": 512}
X3_STAT_LENGTHS = {"inputs": 1024, "targets": 1024}


@pytest.mark.parametrize("name", list(ul2.DENOISERS))
def test_denoiser_statistics_and_layout(name):
    spec = ul2.DENOISERS[name]
    feature_lengths = X3_STAT_LENGTHS if name == "x3" else STAT_LENGTHS
    lengths = ul2.denoiser_lengths(spec, feature_lengths["inputs"])
    # Enough documents for >= 1000 full examples whatever the raw length.
    # Documents average 2,100 tokens; 10% spare.
    docs = _documents(int(1100 * lengths.raw_length / 2100) + 2, seed=1)
    examples = _denoised(spec, docs, feature_lengths, num_examples=1000)
    assert len(examples) == 1000
    mode_id = MODE_TOKENS[spec.mode_token]
    noise = raw = spans = 0
    for ex in examples:
        inputs, targets = ex["inputs"], ex["targets"]
        assert inputs[0] == mode_id
        # + EOS must fit: the lengths are computed so that seqio never truncates.
        assert len(inputs) + 1 <= feature_lengths["inputs"]
        assert len(targets) + 1 <= lengths.targets_length <= feature_lengths["targets"]
        if spec.kind == "S":
            assert not np.any(targets >= MAX_TEXT_ID) and len(inputs) >= 2
            noise += len(targets)
            raw += len(inputs) - 1 + len(targets)
            spans += 1
            continue
        # Vectorised (test_denoise_is_lossless merges them token by token).
        sentinels = inputs[inputs >= MAX_TEXT_ID]
        descending = np.arange(VOCAB_SIZE - 1, VOCAB_SIZE - 1 - len(sentinels), -1)
        np.testing.assert_array_equal(sentinels, descending)
        np.testing.assert_array_equal(targets[targets >= MAX_TEXT_ID], descending)
        assert targets[0] == VOCAB_SIZE - 1
        n_noise = len(targets) - len(sentinels)
        noise += n_noise
        raw += len(inputs) - 1 - len(sentinels) + n_noise
        spans += len(sentinels)
    density = noise / raw
    assert abs(density - spec.noise_density) <= 0.1 * spec.noise_density, density
    if spec.kind != "S":
        mean_span = noise / spans
        assert abs(mean_span - spec.mean_span) <= 0.1 * spec.mean_span, mean_span


def test_short_inputs_quantise_long_spans():
    # T5 semantics: spans = max(round(noise / mu), 1); x3 at inputs 512 -> one span.
    lengths = ul2.denoiser_lengths(ul2.DENOISERS["x3"], 512)
    assert lengths.num_spans == 1 and lengths.raw_length == 599


@pytest.mark.parametrize("name", list(ul2.DENOISERS))
def test_denoise_is_lossless(name):
    spec = ul2.DENOISERS[name]
    rng = np.random.default_rng(0)
    mode_id = MODE_TOKENS[spec.mode_token]
    for length in [1, 2, 3, 5, 17, 100, 567, 1004]:
        tokens = rng.integers(6, MAX_TEXT_ID, size=length, dtype=np.int32)
        for seed in range(4):
            out = ul2.denoise_tokens(tokens, spec, vocab_size=VOCAB_SIZE, mode_id=mode_id,
                                     seed=tf.constant([seed, length], tf.int32))
            inputs, targets = out["inputs"].numpy(), out["targets"].numpy()
            assert inputs[0] == mode_id
            if spec.kind == "S":
                rebuilt = list(inputs[1:]) + list(targets)
                if length >= 2:
                    assert len(inputs) >= 2 and len(targets) >= 1
            else:
                rebuilt, _ = _reconstruct(inputs[1:], targets)
            np.testing.assert_array_equal(rebuilt, tokens, err_msg=f"{name} L={length}")


def test_noise_mask_counts_follow_t5_rounding():
    for length, r, mu in [(568, .15, 3.0), (1006, .5, 64.0), (10, .15, 3.0), (2, .5, 3.0)]:
        mask = ul2.random_spans_noise_mask(tf.constant(length), r, mu,
                                           tf.constant([[1, 2], [3, 4]]))
        mask = mask.numpy()
        num_noise = min(max(round(length * r), 1), length - 1)
        num_spans = max(round(num_noise / mu), 1)
        assert mask.sum() == num_noise
        starts = np.flatnonzero(mask & ~np.pad(mask[:-1], (1, 0)))
        assert len(starts) == num_spans
        assert not mask[0], "spans alternate starting with non-noise"


def _prefix_lengths(length, noise_density, n=400):
    seeds = tf.data.Dataset.range(n).map(lambda i: tf.stack([tf.cast(i, tf.int32), 0]))
    return {int(k) for k in seeds.map(
        lambda s: ul2.random_prefix_length(tf.constant(length), noise_density, s)
    ).as_numpy_iterator()}


def test_s_prefix_covers_the_documented_range():
    # r=0.25: uniform in [round(0.5 (L-1)), L-1] = [10, 20] for L=21.
    assert _prefix_lengths(21, 0.25) == set(range(10, 21))
    # r=0.5 is T5's random_prefix_noise_mask: anywhere in [1, L-1].
    assert _prefix_lengths(21, 0.5) == set(range(1, 21))


def test_same_seed_same_examples_other_seed_other_examples():
    spec = ul2.DENOISERS["r1"]
    docs = _documents(20, seed=3)
    lengths = {"inputs": 128, "targets": 128}
    a = _denoised(spec, docs, lengths, seed=11, num_examples=30)
    b = _denoised(spec, docs, lengths, seed=11, num_examples=30)
    c = _denoised(spec, docs, lengths, seed=12, num_examples=30)
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_chunking_keeps_every_token_in_order():
    docs = _documents(300, seed=5, min_len=1, max_len=700) + [
        np.arange(6, 6 + 70000, dtype=np.int32) % 7000 + 6]
    chunks = [c["targets"].numpy() for c in ul2.concat_and_split(_dataset(docs), 97)]
    assert all(len(c) == 97 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 97
    np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate(docs))


def test_chunking_repeated_stream_never_emits_short_chunks():
    docs = _documents(7, seed=6, min_len=1, max_len=50)
    ds = ul2.concat_and_split(_dataset(docs).repeat(), 64).take(40)
    assert [len(c["targets"]) for c in ds] == [64] * 40


def test_causal_lm_keeps_documents_apart_by_default():
    """Llama 3's way: every example is a piece of one document (EOS at its end), so the
    packed converter makes each its own segment; nothing crosses a document boundary."""
    docs = _documents(10, seed=9, min_len=5, max_len=80)
    targets_features = {"targets": seqio.Feature(VOCAB, add_eos=True)}
    out = [x["targets"].numpy() for x in ul2.causal_lm(
        _dataset(docs), {"targets": 32}, targets_features)]
    pieces = iter(out)
    for doc in docs:
        expected, got = np.append(doc, 1), []
        while len(got) < len(expected):
            piece = next(pieces)
            assert 0 < len(piece) <= 32
            got.extend(piece)
        np.testing.assert_array_equal(got, expected)  # no piece reaches into the next
    assert next(pieces, None) is None


def test_causal_lm_concatenates_documents_when_asked():
    """T5's full_lm (GPT-3, PaLM): one stream, EOS between documents, full chunks."""
    docs = _documents(10, seed=9, min_len=5, max_len=60)
    targets_features = {"targets": seqio.Feature(VOCAB, add_eos=True)}
    out = [x["targets"].numpy() for x in ul2.causal_lm(
        _dataset(docs), {"targets": 32}, targets_features, document_boundaries=False)]
    assert all(len(x) == 32 for x in out[:-1]) and len(out[-1]) <= 32
    expected = np.concatenate([np.append(d, 1) for d in docs])
    np.testing.assert_array_equal(np.concatenate(out), expected)


def test_too_short_targets_name_the_denoiser_and_the_length():
    with pytest.raises(ValueError, match=r"'x1'.*at least 510;.*got 114.* >= 511"):
        ul2.validate_feature_lengths(list(ul2.DENOISERS.values()),
                                     {"inputs": 512, "targets": 114})
    with pytest.raises(ValueError, match=r"'s'.*at least 257; got 200"):
        ul2.validate_feature_lengths(ul2.DENOISERS["s"], {"inputs": 512, "targets": 200})
    with pytest.raises(ValueError, match=r"'r1'.*inputs length of at least 4, got 3"):
        ul2.validate_feature_lengths(ul2.DENOISERS["r1"], {"inputs": 3, "targets": 64})
    with pytest.raises(ValueError, match="need feature lengths for 'inputs' and 'targets'"):
        ul2.validate_feature_lengths(ul2.DENOISERS["r1"], None)
    # And the preprocessor itself refuses, before building anything.
    with pytest.raises(ValueError, match=r"'x4'.*at least 511; got 256"):
        ul2.ul2_denoise(_dataset([]), {"inputs": 512, "targets": 256}, OUTPUT_FEATURES,
                        spec=ul2.DENOISERS["x4"], mode_tokens=MODE_TOKENS)


def test_the_sentinel_budget_follows_the_denoisers_and_the_inputs_length():
    denoisers = list(ul2.DENOISERS.values())
    # x1 (mean span 3, r 0.5) cuts the most spans: 127 at inputs 512, 511 at 2048.
    # T5's arithmetic on the raw lengths of FORMULAS.md: e.g. x2 at raw 908, 454 noise
    # tokens in spans of 8: 57. One inputs position is the mode token.
    assert ul2.sentinel_budget(denoisers, 512) == {
        "r1": 28, "r2": 11, "x1": 127, "x2": 57, "x3": 1, "x4": 8}
    assert max(ul2.sentinel_budget(denoisers, 2048).values()) == 511
    ul2.check_sentinel_budget(denoisers, 2048, EXTRA_IDS)  # the shipped 512 suffice
    with pytest.raises(ValueError, match=r"inputs length 2048, .*denoiser 'x1' \(X, mean "
                       r"span 3.0, noise density 0.5\) needs 511 sentinels.*has 100 extra ids.*at "
                       r"least 511 extra ids"):
        ul2.check_sentinel_budget(denoisers, 2048, 100)
    with pytest.raises(ValueError, match=r"inputs length 4096.*'x1'.*needs 1023 sentinels"):
        ul2.validate_feature_lengths(denoisers, {"inputs": 4096, "targets": 4096}, EXTRA_IDS)


def test_a_vocabulary_without_enough_sentinels_is_refused_before_any_data():
    # T5 and UL2 let spans past the extra ids take ordinary ids; here it is an error.
    few = {k: seqio.Feature(_SentinelVocabulary(100), add_eos=True) for k in OUTPUT_FEATURES}
    with pytest.raises(ValueError, match=r"'x1'.*needs 127 sentinels.*has 100 extra ids"):
        ul2.ul2_denoise(_dataset([]), {"inputs": 512, "targets": 512}, few,
                        spec=ul2.DENOISERS["x1"], mode_tokens=MODE_TOKENS)
    ul2.ul2_denoise(_dataset([]), {"inputs": 512, "targets": 512}, few,
                    spec=ul2.DENOISERS["r1"], mode_tokens=MODE_TOKENS)  # 28 spans: fits


def test_validate_accepts_the_standard_lengths():
    lengths = ul2.validate_feature_lengths(list(ul2.DENOISERS.values()),
                                           {"inputs": 512, "targets": 512})
    assert max(l.targets_length for l in lengths.values()) == 511
    assert all(l.inputs_length <= 512 for l in lengths.values())


def test_missing_mode_token_is_an_error():
    with pytest.raises(ValueError, match=r"mode token '\[NLG\]' is not in"):
        ul2.ul2_denoise(_dataset([]), STAT_LENGTHS, OUTPUT_FEATURES,
                        spec=ul2.DENOISERS["x1"], mode_tokens={"[NLU]": 3})
