"""Tests for tasks/reka_mix.py on the shipped corpus and tokenizer: names, rates, the
examples every task produces, mixture shares measured on real examples, both
encoder-decoder and decoder-only feature converters, skipped documents and errors.
"""

import logging
import math

import numpy as np
import pytest
import seqio
import tensorflow as tf

import tasks  # noqa: F401  (registers)
from t5x_like.data import documents, mixtures, ul2
from t5x_like.data import vocabulary as vocabulary_lib
from tasks import reka_mix

DENOISERS = list(ul2.DENOISERS)
SMALL_LENGTHS = {"inputs": 64, "targets": 64}  # every denoiser fits (x4 needs 63)


def _expected_ul2_rates():
    """{(domain, denoiser): rate} from the configured constants, not from seqio."""
    domain_total = sum(reka_mix.REKA_DOMAIN_RATES.values())
    return {(d, n): reka_mix.REKA_DOMAIN_RATES[d] / domain_total * reka_mix.UL2_RATES[n]
            for d in reka_mix.DOMAINS for n in DENOISERS}


def _labelled_mixture(name, lengths, seed, stand_ins=False):
    """Mixture.get_dataset with each example labelled by the leaf task it came from.

    Seqio mixtures do not say which task an example came from, so the test wraps the
    mixture's own `get_task_dataset` to add a "task_index" feature; sampling, rates
    and the task pipelines are seqio's and ours, unchanged. With `stand_ins`, each
    task's examples are replaced by a constant one (to measure the sampler alone).

    Returns:
      (mixed dataset, leaf task names, {task name: that task's labelled dataset}).
    """
    mixture = seqio.get_mixture_or_task(name)
    names = [t.name for t in mixture.tasks]
    original = mixture.get_task_dataset
    per_task = {}

    def labelled(task, output_feature_keys, *args, **kwargs):
        index = names.index(task.name)
        if stand_ins:
            ds = tf.data.Dataset.from_tensors({"targets": tf.constant([7])}).repeat()
        else:
            ds = original(task, output_feature_keys, *args, **kwargs)
        ds = ds.map(lambda ex: {**ex, "task_index": tf.constant(index, tf.int32)})
        per_task[task.name] = ds
        return ds

    mixture.get_task_dataset = labelled
    try:
        ds = mixture.get_dataset(lengths, split="train", shuffle=False, seed=seed,
                                 num_epochs=None, passthrough_features=["task_index"])
    finally:
        del mixture.get_task_dataset
    return ds, names, per_task


def _check_shares(counts, expected, n, sigmas=None, points=None):
    """|observed - expected| within `sigmas` binomial standard deviations or `points`."""
    for key, p in expected.items():
        observed = counts.get(key, 0) / n
        tol = points / 100 if points else sigmas * math.sqrt(p * (1 - p) / n)
        assert abs(observed - p) <= tol, (key, observed, p, tol)


@pytest.fixture(scope="module")
def ul2_stream():
    """The labelled reka_mix_ul2 dataset at SMALL_LENGTHS, built once (35 pipelines)."""
    return _labelled_mixture("reka_mix_ul2", SMALL_LENGTHS, seed=0)


def _check_ul2_example(task, ex):
    """Layout of one real UL2 example of `task`."""
    vocab = vocabulary_lib.get_vocabulary()
    spec = ul2.DENOISERS[task.split("_ul2_")[1]]
    inputs, targets = ex["inputs"], ex["targets"]
    assert inputs[0] == vocabulary_lib.MODE_TOKENS[spec.mode_token], task
    assert inputs[-1] == targets[-1] == vocabulary_lib.EOS_ID, task
    assert len(inputs) <= SMALL_LENGTHS["inputs"], task
    assert len(targets) <= SMALL_LENGTHS["targets"], task
    if spec.kind == "S":
        assert targets.max() < vocab.vocab_size - vocabulary_lib.NUM_EXTRA_IDS, task
    else:
        assert targets[0] == vocab.vocab_size - 1, task  # <extra_id_0> opens the targets


def _draw_ul2(ds, names, n):
    """Draws n examples, checks each; returns counts by (domain, denoiser)."""
    counts = {}
    for ex in ds.take(n).as_numpy_iterator():
        task = names[ex["task_index"]]
        _check_ul2_example(task, ex)
        key = tuple(task.split("_ul2_"))
        counts[key] = counts.get(key, 0) + 1
    return counts


def _check_ul2_shares(counts, n, **tolerance):
    expected = _expected_ul2_rates()
    by_domain = {d: sum(c for (dd, _), c in counts.items() if dd == d)
                 for d in reka_mix.DOMAINS}
    by_denoiser = {k: sum(c for (_, kk), c in counts.items() if kk == k)
                   for k in DENOISERS}
    _check_shares(by_domain, {d: sum(v for (dd, _), v in expected.items() if dd == d)
                              for d in reka_mix.DOMAINS}, n, **tolerance)
    _check_shares(by_denoiser, dict(reka_mix.UL2_RATES), n, **tolerance)


def test_registered_names_follow_the_contract():
    expected_tasks = {f"{d}_ul2_{n}" for d in reka_mix.DOMAINS for n in DENOISERS}
    expected_tasks |= {f"{d}_{k}" for d in reka_mix.DOMAINS
                       for k in ("causal", "causal_concat", "validation")}
    assert expected_tasks <= set(seqio.TaskRegistry.names())
    expected_mixtures = {f"{d}_ul2" for d in reka_mix.DOMAINS} | {
        "reka_mix_ul2", "reka_mix_causal", "reka_mix_causal_concat"}
    assert expected_mixtures <= set(seqio.MixtureRegistry.names())
    assert len(expected_tasks) == 50


def test_registered_rates_are_the_configured_ones():
    mix = seqio.get_mixture_or_task("reka_mix_ul2")
    total = sum(mix.get_rate(t) for t in mix.tasks)
    got = {tuple(t.name.split("_ul2_")): mix.get_rate(t) / total for t in mix.tasks}
    expected = _expected_ul2_rates()
    assert got.keys() == expected.keys()
    for key, rate in expected.items():
        assert got[key] == pytest.approx(rate, rel=1e-9), key
    assert sum(v for (d, _), v in got.items() if d == "stem") == pytest.approx(30 / 105)
    causal = seqio.get_mixture_or_task("reka_mix_causal")
    assert {t.name: causal.get_rate(t) for t in causal.tasks} == pytest.approx(
        {f"{d}_causal": r / 105 for d, r in reka_mix.REKA_DOMAIN_RATES.items()})


def _denoiser_shares(mixture_name):
    mixture = seqio.get_mixture_or_task(mixture_name)
    total = sum(mixture.get_rate(t) for t in mixture.tasks)
    return {t.name.rsplit("_", 1)[1]: mixture.get_rate(t) / total for t in mixture.tasks}


def test_upalm_preset_named_rates_and_rate_errors(caplog):
    # U-PaLM's rates are registered at import beside UL2's, under their own names.
    upalm = {"s": 0.5, "r1": 0.25, "x1": 0.0625, "x2": 0.0625, "x3": 0.0625, "x4": 0.0625}
    assert _denoiser_shares("code_upalm") == pytest.approx(upalm)
    mix = seqio.get_mixture_or_task("reka_mix_upalm")
    assert {t.name for t in mix.tasks if mix.get_rate(t) > 0} == {
        f"{d}_ul2_{n}" for d in reka_mix.DOMAINS for n in upalm}
    # A user's own rates under a new name leave the shipped mixtures as they are.
    try:
        with caplog.at_level(logging.INFO):
            rates = reka_mix.register_mixtures({"r1": 1.0, "s": 3.0}, name="rs")
        assert "normalised by their sum 105" in caplog.text
        assert _denoiser_shares("math_rs") == pytest.approx({"r1": 0.25, "s": 0.75})
        assert rates["denoiser_rates"] == pytest.approx({"r1": 0.25, "s": 0.75})
        assert len(seqio.get_mixture_or_task("reka_mix_rs").tasks) == 10
        assert len(seqio.get_mixture_or_task("code_ul2").tasks) == 7
        with pytest.raises(ValueError, match=r"Unknown denoiser 'x9'.*'r1'"):
            reka_mix.register_mixtures({"x9": 1.0}, name="bad")
        with pytest.raises(ValueError, match=r"Unknown domain 'bio'"):
            reka_mix.register_mixtures("ul2", {"bio": 1.0}, name="bad")
        with pytest.raises(ValueError, match=r"Unknown denoiser rate preset 'upalm2'"):
            reka_mix.register_mixtures("upalm2", name="bad")
        with pytest.raises(ValueError, match=r"sum to 0.0"):
            reka_mix.register_mixtures("ul2", {"code": 0.0}, name="bad")
    finally:
        for name in ["reka_mix_rs", *(f"{d}_rs" for d in reka_mix.DOMAINS)]:
            seqio.MixtureRegistry.remove(name)
    assert _denoiser_shares("code_ul2") == pytest.approx(reka_mix.UL2_RATES)


def test_unknown_name_suggests_the_nearest_registered_names():
    with pytest.raises(ValueError, match=r"'reka_mix_u2'.*'reka_mix_ul2'"):
        mixtures.get_mixture_or_task("reka_mix_u2")
    with pytest.raises(ValueError, match=r"'code_ul2_x5'.*'code_ul2_x"):
        mixtures.get_mixture_or_task("code_ul2_x5")
    assert mixtures.get_mixture_or_task("web_causal").name == "web_causal"


def test_too_short_feature_lengths_name_the_denoiser_and_length():
    with pytest.raises(ValueError, match=r"'reka_mix_ul2'.*'x1'.*at least 510;.*got 114"):
        ul2.validate_mixture_lengths("reka_mix_ul2", {"inputs": 512, "targets": 114})
    assert ul2.validate_mixture_lengths("reka_mix_causal", {"targets": 64}) == {}
    lengths = ul2.validate_mixture_lengths("code_ul2", {"inputs": 512, "targets": 512})
    assert set(lengths) == set(DENOISERS)
    # The task itself refuses when seqio builds it.
    task = seqio.get_mixture_or_task("math_ul2_x4")
    with pytest.raises(ValueError, match=r"'x4'.*at least 511; got 256"):
        task.get_dataset({"inputs": 512, "targets": 256}, split="train", shuffle=False)


@pytest.mark.parametrize("name", DENOISERS)
def test_at_2048_token_inputs_every_sentinel_is_an_extra_id(name):
    """The shipped tokenizer's 512 extra ids cover every span UL2 cuts at 2,048-token
    inputs: the sentinels are <extra_id_0>, <extra_id_1>, ... in order, and no ordinary
    piece reaches their range (T5's 100 would have x1's spans 101..511 reuse pieces)."""
    vocab = vocabulary_lib.get_vocabulary()
    first_extra = vocab.vocab_size - vocab.extra_ids
    spec = ul2.DENOISERS[name]
    spans = ul2.denoiser_lengths(spec, 2048).num_spans
    task = seqio.get_mixture_or_task(f"multilingual_ul2_{name}")
    ds = task.get_dataset({"inputs": 2048, "targets": 2048}, split="validation",
                          shuffle=False)
    for ex in ds.take(2).as_numpy_iterator():  # full-length chunks of a long stream
        inputs, targets = ex["inputs"], ex["targets"]
        sentinels = inputs[inputs >= first_extra]
        if spec.kind == "S":
            assert len(sentinels) == 0 and targets.max() < first_extra
            continue
        assert len(sentinels) == spans <= vocab.extra_ids
        np.testing.assert_array_equal(sentinels, vocab.vocab_size - 1 - np.arange(spans))
        np.testing.assert_array_equal(targets[targets >= first_extra], sentinels)
        assert vocab.decode([int(sentinels[-1])]) == f"<extra_id_{spans - 1}>"
        assert vocab.decode([first_extra - 1]) != f"<extra_id_{vocab.extra_ids}>"
    if name == "x1":
        assert spans == 511


def _write_corpus(path, docs):
    path.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path / "validation-00000-of-00001.tfrecord.gz"),
                              tf.io.TFRecordOptions(compression_type="GZIP")) as w:
        for d in docs:
            w.write(tf.train.Example(features=tf.train.Features(feature={
                "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[d]))}))
                .SerializeToString())


def test_empty_and_non_utf8_documents_are_skipped_and_counted(tmp_path):
    docs = [b"first document", b"", b"  \n\t", b"\xff\xfe broken", b"cut \xc3",
            "Ünïcödé 数学 \U0001F600".encode(), b"\xed\xa0\x80 surrogate", b"last one"]
    _write_corpus(tmp_path / "code", docs)
    counts = reka_mix.count_skipped("code", "validation", corpus_dir=tmp_path)
    assert counts == {"documents": 8, "kept": 3, "empty": 2, "non_utf8": 3}
    # The predicate agrees with Python's decoder.
    for d in docs:
        try:
            python_ok = bool(d.decode("utf-8").strip())
        except UnicodeDecodeError:
            python_ok = False
        assert (int(documents.document_status(tf.constant(d))) == 0) == python_ok, d
    try:
        reka_mix.register_tasks(tmp_path)
        task = seqio.get_mixture_or_task("code_validation")
        out = list(task.get_dataset(None, split="validation", shuffle=False)
                   .as_numpy_iterator())
        assert [int(x["num_chars"]) for x in out] == [
            len("first document"), len("Ünïcödé 数学 \U0001F600"), len("last one")]
        ul2_out = list(seqio.get_mixture_or_task("code_ul2_r1").get_dataset(
            SMALL_LENGTHS, split="validation", shuffle=False).as_numpy_iterator())
        assert ul2_out, "the kept documents still make an example"
        assert reka_mix.skipped_documents("code_validation", "validation") == {
            "code": counts}
    finally:
        reka_mix.register_tasks()
    assert reka_mix.count_skipped("code", "validation")["documents"] > 8


def _raw_texts(domain, split):
    files = sorted((reka_mix.DEFAULT_CORPUS_DIR / domain).glob(f"{split}-*.tfrecord.gz"))
    texts = []
    for f in files:
        for record in tf.data.TFRecordDataset(str(f), compression_type="GZIP"):
            ex = tf.train.Example.FromString(record.numpy())
            texts.append(ex.features.feature["text"].bytes_list.value[0])
    return texts


@pytest.mark.parametrize("domain", reka_mix.DOMAINS)
def test_validation_task_is_one_example_per_document(domain):
    vocab = vocabulary_lib.get_vocabulary()
    texts = [t.decode("utf-8") for t in _raw_texts(domain, "validation")]
    texts = [t for t in texts if t.strip()]
    task = seqio.get_mixture_or_task(f"{domain}_validation")
    out = list(task.get_dataset(None, split="validation", shuffle=False)
               .as_numpy_iterator())
    assert len(out) == len(texts) >= 1
    assert [int(x["num_chars"]) for x in out] == [len(t) for t in texts]
    for x, text in zip(out, texts):
        # Lossless, no EOS, no truncation. (Not `== vocab.encode(text)`: tf_text's
        # SentencePiece op and the Python library break ties between equal-score
        # segmentations of whitespace runs differently; both decode to the text.)
        assert vocab.decode(x["targets"].tolist()) == text
        assert vocabulary_lib.EOS_ID not in x["targets"]
    assert out[0]["num_chars"].dtype == np.int32


def test_mixture_sampler_shares_over_10000_examples_within_2_points():
    # seqio's own sampler with the registered rates, tasks replaced by stand-ins (the
    # real-example version is the slow test below; building 35 pipelines dominates).
    ds, names, _ = _labelled_mixture("reka_mix_ul2", SMALL_LENGTHS, seed=3,
                                     stand_ins=True)
    n = 10000
    labels = np.fromiter((ex["task_index"] for ex in ds.take(n).as_numpy_iterator()),
                         np.int32, n)
    counts = {tuple(names[i].split("_ul2_")): int(c)
              for i, c in enumerate(np.bincount(labels, minlength=len(names)))}
    _check_ul2_shares(counts, n, points=2)


@pytest.fixture(scope="module")
def ul2_first_examples(ul2_stream):
    """{task: its first real example}, from the datasets the reka_mix_ul2 mixture built."""
    _, _, per_task = ul2_stream
    return {task: next(ds.as_numpy_iterator()) for task, ds in sorted(per_task.items())}


def test_every_ul2_task_yields_real_examples(ul2_stream, ul2_first_examples):
    _, names, _ = ul2_stream
    assert sorted(ul2_first_examples) == sorted(names) and len(names) == 35
    for task, ex in ul2_first_examples.items():
        assert names[ex["task_index"]] == task
        _check_ul2_example(task, ex)


def test_both_converters_batch_reka_mix_ul2(ul2_first_examples):
    # Real examples of every reka_mix_ul2 task through both converters (what
    # seqio.get_dataset does after Mixture.get_dataset; the slow
    # test_seqio_get_dataset_end_to_end runs seqio.get_dataset itself). Reusing the
    # examples saves restarting 35 pipelines.
    examples = list(ul2_first_examples.values())
    real = tf.data.Dataset.from_generator(
        lambda: ({"inputs": e["inputs"], "targets": e["targets"]} for e in examples),
        output_signature={k: tf.TensorSpec([None], tf.int32)
                          for k in ("inputs", "targets")})
    modes = set(vocabulary_lib.MODE_TOKENS.values())
    encdec = seqio.EncDecFeatureConverter(pack=True)(real, SMALL_LENGTHS)
    batch = next(encdec.batch(4).as_numpy_iterator())
    assert set(batch) == {"encoder_input_tokens", "encoder_segment_ids",
                          "encoder_positions", "decoder_input_tokens",
                          "decoder_target_tokens", "decoder_loss_weights",
                          "decoder_segment_ids", "decoder_positions"}
    assert batch["encoder_input_tokens"].shape == (4, 64)
    starts = (batch["encoder_positions"] == 0) & (batch["encoder_segment_ids"] > 0)
    assert set(batch["encoder_input_tokens"][starts]) <= modes
    prefix = seqio.PrefixLMFeatureConverter(pack=True)(real, SMALL_LENGTHS)
    batch = next(prefix.batch(4).as_numpy_iterator())
    assert batch["decoder_target_tokens"].shape == (4, 128)
    assert "decoder_causal_attention" in batch
    # The mode token opens each packed example's bidirectional prefix.
    starts = (batch["decoder_positions"] == 0) & (batch["decoder_segment_ids"] > 0)
    assert set(batch["decoder_target_tokens"][starts]) <= modes
    causal = batch["decoder_causal_attention"][starts]
    assert causal.all(), "each example's prefix (from its mode token) is bidirectional"


def test_causal_tasks_and_lm_converter():
    ds, names, per_task = _labelled_mixture("reka_mix_causal", {"targets": 64}, seed=1)
    assert sorted(per_task) == sorted(f"{d}_causal" for d in reka_mix.DOMAINS)
    for task, task_ds in per_task.items():
        ex = next(task_ds.as_numpy_iterator())
        assert len(ex["targets"]) == 64, task  # chunks fill the length exactly
    lm = seqio.LMFeatureConverter(pack=True)(
        ds.map(lambda ex: {"targets": ex["targets"]}), {"targets": 64})
    batch = next(lm.batch(2).as_numpy_iterator())
    assert batch["decoder_target_tokens"].shape == (2, 64)
    assert (batch["decoder_loss_weights"] > 0).all(), "chunks fill the rows exactly"


@pytest.mark.slow
def test_real_mixture_shares_2000_within_4_sigma_and_10000_within_2_points(ul2_stream):
    ds, names, _ = ul2_stream
    # 4 binomial standard deviations at 2,000: a right rate fails with p < 1e-4.
    _check_ul2_shares(_draw_ul2(ds, names, 2000), 2000, sigmas=4)
    _check_ul2_shares(_draw_ul2(ds, names, 10000), 10000, points=2)
    ds, names, _ = _labelled_mixture("reka_mix_causal", {"targets": 64}, seed=1)
    n = 2000
    counts = {}
    for ex in ds.take(n).as_numpy_iterator():
        counts[names[ex["task_index"]]] = counts.get(names[ex["task_index"]], 0) + 1
    _check_shares(counts, {f"{d}_causal": r / 105
                           for d, r in reka_mix.REKA_DOMAIN_RATES.items()}, n, sigmas=4)


@pytest.mark.slow
def test_every_registered_task_builds_on_its_own():
    for name in sorted(seqio.TaskRegistry.names()):
        if not name.split("_")[0] in reka_mix.DOMAINS:
            continue
        task = seqio.get_mixture_or_task(name)
        lengths = None if name.endswith("_validation") else (
            {"targets": 128} if name.endswith("_causal") else SMALL_LENGTHS)
        for split in ("train", "validation"):
            ex = next(task.get_dataset(lengths, split=split, shuffle=False)
                      .as_numpy_iterator())
            assert len(ex["targets"]) > 0, (name, split)


@pytest.mark.slow
@pytest.mark.parametrize("converter,name,lengths", [
    (seqio.EncDecFeatureConverter(pack=True), "reka_mix_ul2",
     {"inputs": 512, "targets": 512}),
    (seqio.PrefixLMFeatureConverter(pack=True), "reka_mix_ul2",
     {"inputs": 512, "targets": 512}),
    (seqio.LMFeatureConverter(pack=True), "reka_mix_causal", {"targets": 512}),
])
def test_seqio_get_dataset_end_to_end(converter, name, lengths):
    ds = seqio.get_dataset(name, lengths, converter, dataset_split="train",
                           shuffle=True, seed=0, num_epochs=1)
    batch = next(ds.batch(2).as_numpy_iterator())
    assert batch["decoder_target_tokens"].shape[0] == 2
