"""Tests for t5x_like/data/prepare.py: packing, manifest counts, idempotency, mismatch errors.

The tests register their own tiny seqio tasks (a byte vocabulary over text files written
to a tmp dir) from a module file, so spawned prepare workers can import it too.
"""

import glob
import json
import os
import shutil
import sys
import textwrap

import numpy as np
import pytest

from t5x_like.data import mixtures, store
from t5x_like.data import prepare as prepare_lib

TEST_TASK_MODULE = "t5x_like_test_tasks"

_TASKS_SOURCE = textwrap.dedent(
    '''
    """Tiny seqio tasks for the data tests (written by tests/test_prepare.py)."""
    import functools
    import os

    import seqio
    import tensorflow as tf

    DATA_DIR = os.path.dirname(os.path.abspath(__file__))
    VOCAB = seqio.ByteVocabulary(extra_ids=10)


    def _files(name, split):
        return sorted(tf.io.gfile.glob(os.path.join(DATA_DIR, f"{name}-{split}-*.txt")))


    @seqio.map_over_dataset
    def _to_text(line):
        return {"text": line}


    @seqio.map_over_dataset
    def _split_half(ex):
        # Encoder-decoder shape without a denoiser: first half -> inputs, rest -> targets.
        n = tf.size(ex["text"]) // 2
        return {"inputs": ex["text"][:n], "targets": ex["text"][n:]}


    @seqio.map_over_dataset
    def _text_as_targets(ex):
        return {"targets": ex["text"]}


    @seqio.map_over_dataset
    def _validation_features(ex):
        # One example per document: all its tokens (no EOS, no trimming) and its length
        # in characters, as the {domain}_validation tasks provide.
        return {
            "targets": VOCAB.encode_tf(ex["text"]),
            "num_chars": tf.strings.length(ex["text"], unit="UTF8_CHAR"),
        }


    def _register(name):
        source = seqio.TextLineDataSource(
            split_to_filepattern={s: _files(name, s) for s in ("train", "validation")}
        )
        tokenize = functools.partial(
            seqio.preprocessors.tokenize, output_features={"text": seqio.Feature(VOCAB)},
            copy_pretokenized=False,
        )
        seqio.TaskRegistry.add(
            f"tt_{name}_encdec", source=source,
            preprocessors=[_to_text, tokenize, _split_half, seqio.preprocessors.append_eos_after_trim],
            output_features={"inputs": seqio.Feature(VOCAB), "targets": seqio.Feature(VOCAB)},
        )
        seqio.TaskRegistry.add(
            f"tt_{name}_lm", source=source,
            preprocessors=[_to_text, tokenize, _text_as_targets, seqio.preprocessors.append_eos_after_trim],
            output_features={"targets": seqio.Feature(VOCAB)},
        )
        seqio.TaskRegistry.add(
            f"tt_{name}_validation", source=source,
            preprocessors=[_to_text, _validation_features],
            output_features={"targets": seqio.Feature(VOCAB, add_eos=False)},
        )


    if "tt_a_encdec" not in seqio.TaskRegistry.names():
        _register("a")
        _register("b")
        seqio.MixtureRegistry.add("tt_mix_encdec", [("tt_a_encdec", 3.0), ("tt_b_encdec", 1.0)])
        seqio.MixtureRegistry.add("tt_mix_lm", [("tt_a_lm", 1.0), ("tt_b_lm", 1.0)])
        seqio.MixtureRegistry.add(
            "tt_mix_nested", [("tt_mix_encdec", 1.0), ("tt_b_encdec", 1.0)]
        )
    '''
)

_WORDS = "alpha beta gamma delta epsilon zeta eta theta über façade naïve 数学 λx code".split()


def make_docs(seed: int, num_docs: int, max_words: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        " ".join(rng.choice(_WORDS, size=int(rng.integers(1, max_words))))
        for _ in range(num_docs)
    ]


def install_test_tasks(root: str) -> str:
    """Writes the tiny corpus + task module under `root`, imports it; returns the dir."""
    os.makedirs(root, exist_ok=True)
    for name, max_words, seed in (("a", 40, 1), ("b", 8, 2)):
        for split, n_files, n_docs in (("train", 4, 300), ("validation", 1, 25)):
            # Each document starts with a marker of its task ("a " / "B ") so that tests
            # can tell which task a packed segment came from.
            marker = "a " if name == "a" else "B "
            docs = [marker + d for d in make_docs(seed * 100 + n_files, n_docs * n_files, max_words)]
            for i in range(n_files):
                path = os.path.join(root, f"{name}-{split}-{i}.txt")
                with open(path, "w", encoding="utf-8") as f:
                    f.write("\n".join(docs[i::n_files]) + "\n")
    with open(os.path.join(root, f"{TEST_TASK_MODULE}.py"), "w") as f:
        f.write(_TASKS_SOURCE)
    if root not in sys.path:
        # Spawned prepare workers inherit sys.path, so they can import the module too.
        sys.path.insert(0, root)
    __import__(TEST_TASK_MODULE)
    return root


_CACHE = {}


def _cached(key, make):
    # Module-level cache: test_loader/test_bpc import these fixtures, and a session
    # fixture defined in several modules would otherwise run once per module. Each
    # shard build costs ~5 s of tf.data tracing, so stores are built once per session.
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


@pytest.fixture(scope="session")
def test_tasks(tmp_path_factory):
    return _cached("tasks", lambda: install_test_tasks(str(tmp_path_factory.mktemp("tasks"))))


ENCDEC_STORE_ARGS = dict(mixture="tt_mix_encdec", converter="encdec",
                         lengths="inputs=64,targets=64", n=40, seed=3, shards=2)


@pytest.fixture(scope="session")
def encdec_store(test_tasks, tmp_path_factory):
    """A 40-row encoder-decoder store in 2 shards, shared by the data tests (read-only)."""
    def make():
        out = tmp_path_factory.mktemp("encdec") / "store"
        _prepare(out, **ENCDEC_STORE_ARGS)
        return out
    return _cached("encdec_store", make)


def _prepare(out_dir, mixture="tt_mix_encdec", converter="encdec", lengths="inputs=64,targets=64",
             n=40, seed=3, shards=2, workers=1):
    return prepare_lib.prepare(
        mixture, lengths, converter, n, seed, str(out_dir), shards, workers,
        task_modules=(TEST_TASK_MODULE,),
    )


def read_rows(out_dir):
    """All rows of a store as {feature: [N, L]} in shard order (the loader's parse, by hand)."""
    from array_record.python import array_record_module

    manifest = store.load_manifest(str(out_dir))
    rows = []
    for name in manifest["shards"]:
        reader = array_record_module.ArrayRecordReader(os.path.join(out_dir, name))
        rows += reader.read_all()
        reader.close()
    flat = np.frombuffer(b"".join(rows), dtype="<i4").reshape(len(rows), -1)
    out, offset = {}, 0
    for feature in manifest["features"]:
        (length,) = feature["shape"]
        out[feature["name"]] = flat[:, offset : offset + length]
        offset += length
    return manifest, out


def _check_packing(rows, prefix):
    seg, pos = rows[f"{prefix}_segment_ids"], rows[f"{prefix}_positions"]
    for seg_row, pos_row in zip(seg, pos):
        n = np.count_nonzero(seg_row)
        # Non-padding positions come first, segments are numbered 1..k in order.
        assert np.all(seg_row[:n] > 0) and np.all(seg_row[n:] == 0)
        assert np.all(np.diff(seg_row[:n]) >= 0)
        for s in range(1, int(seg_row.max()) + 1):
            idx = np.nonzero(seg_row == s)[0]
            assert len(idx) > 0, "segment ids must be contiguous 1..k"
            np.testing.assert_array_equal(pos_row[idx], np.arange(len(idx)))  # restart per example


def test_encdec_store_packing_and_manifest_counts(encdec_store):
    out = encdec_store
    manifest = _prepare(out, **ENCDEC_STORE_ARGS)  # complete: validated, not rebuilt
    manifest2, rows = read_rows(out)
    assert manifest == manifest2 and manifest["complete"]
    assert rows["encoder_input_tokens"].shape == (40, 64)
    assert manifest["examples_per_shard"] == [20, 20]
    _check_packing(rows, "encoder")
    _check_packing(rows, "decoder")
    # Inputs and targets are packed jointly: the same examples share a row.
    np.testing.assert_array_equal(
        rows["encoder_segment_ids"].max(1), rows["decoder_segment_ids"].max(1)
    )
    # Padding fraction and token counts are counts of the data itself.
    enc = np.count_nonzero(rows["encoder_input_tokens"])
    dec = np.count_nonzero(rows["decoder_target_tokens"])
    assert manifest["tokens"] == enc + dec
    assert manifest["padding_fraction"] == pytest.approx(1 - (enc + dec) / (40 * 128))
    assert manifest["loss_tokens"] == int(rows["decoder_loss_weights"].sum())
    # Per-task counts are real: they add up to the packed examples, and follow the 3:1 rate.
    counts = manifest["task_counts"]
    assert sum(counts.values()) == int(rows["decoder_segment_ids"].max(1).sum())
    assert set(counts) == {"tt_a_encdec", "tt_b_encdec"}
    assert manifest["task_rates"] == {"tt_a_encdec": 0.75, "tt_b_encdec": 0.25}
    assert manifest["features"][0] == {"name": "encoder_input_tokens", "dtype": "int32", "shape": [64]}
    assert manifest["vocabulary_checksum"]


def test_task_counts_are_real_counts(test_tasks, tmp_path):
    manifest = _prepare(tmp_path / "s", mixture="tt_mix_lm", converter="lm",
                        lengths="targets=128", n=30, shards=1)
    _, rows = read_rows(tmp_path / "s")
    _check_packing(rows, "decoder")
    np.testing.assert_array_equal(rows["decoder_loss_weights"] > 0, rows["decoder_segment_ids"] > 0)
    # Count the tasks from the data: the first byte of every packed document is its
    # task marker (ByteVocabulary id = byte + 3).
    seg, tok = rows["decoder_segment_ids"], rows["decoder_target_tokens"]
    starts = (seg > 0) & (rows["decoder_positions"] == 0)
    first_bytes = tok[starts] - 3
    assert set(first_bytes.tolist()) <= {ord("a"), ord("B")}
    assert manifest["task_counts"] == {
        "tt_a_lm": int(np.sum(first_bytes == ord("a"))),
        "tt_b_lm": int(np.sum(first_bytes == ord("B"))),
    }
    assert min(manifest["task_counts"].values()) > 0


def test_prefix_lm_store(test_tasks, tmp_path):
    manifest = _prepare(tmp_path / "p", converter="prefix_lm", n=10, shards=1)
    _, rows = read_rows(tmp_path / "p")
    assert manifest["model_feature_lengths"]["decoder_target_tokens"] == 128
    assert "decoder_causal_attention" in rows
    _check_packing(rows, "decoder")
    # Loss only on targets: never on a position with bidirectional (inputs) attention
    # except the one extra position seqio adds, never on padding.
    assert np.all(rows["decoder_loss_weights"][rows["decoder_segment_ids"] == 0] == 0)
    assert 0 < rows["decoder_loss_weights"].sum() < np.count_nonzero(rows["decoder_segment_ids"])


def test_nested_mixture_rates_are_flattened(test_tasks):
    rates = mixtures.leaf_tasks_and_rates("tt_mix_nested")
    assert dict(rates) == pytest.approx({"tt_a_encdec": 0.375, "tt_b_encdec": 0.625})


@pytest.mark.slow  # determinism of a rebuilt shard is also checked by the idempotency test
def test_deterministic_given_seed(test_tasks, tmp_path):
    _prepare(tmp_path / "x", n=12, shards=2)
    _prepare(tmp_path / "y", n=12, shards=2)
    _prepare(tmp_path / "z", n=12, shards=2, seed=4)
    _, x = read_rows(tmp_path / "x")
    _, y = read_rows(tmp_path / "y")
    _, z = read_rows(tmp_path / "z")
    np.testing.assert_array_equal(x["encoder_input_tokens"], y["encoder_input_tokens"])
    assert not np.array_equal(x["encoder_input_tokens"], z["encoder_input_tokens"])


def test_idempotent_skips_done_shards_and_ignores_tmp(encdec_store, tmp_path, monkeypatch):
    out = tmp_path / "store"
    shutil.copytree(encdec_store, out)
    first = json.loads((out / "manifest.json").read_text())
    _, rows_first = read_rows(out)
    # Simulate a run killed while writing shard 1: no done record, a stray tmp file.
    os.remove(out / "train-00001-of-00002.done.json")
    os.remove(out / "train-00001-of-00002.array_record")
    (out / ".train-00001-of-00002.array_record.tmp-999-dead").write_bytes(b"partial garbage")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))

    written = []
    original = prepare_lib._prepare_shard
    monkeypatch.setattr(
        prepare_lib, "_prepare_shard",
        lambda spec, i, d: written.append(i) or original(spec, i, d),
    )
    second = _prepare(out, **ENCDEC_STORE_ARGS)
    assert written == [1]  # shard 0 was skipped
    _, rows_second = read_rows(out)
    for k in rows_first:
        np.testing.assert_array_equal(rows_first[k], rows_second[k])
    for k in ("task_counts", "tokens", "padding_fraction"):
        assert first[k] == second[k]
    # A complete store is returned as is, nothing rewritten.
    written.clear()
    assert prepare_lib.prepare(
        "tt_mix_encdec", {"inputs": 64, "targets": 64}, "encdec", 40, 3, str(out), 2, 1,
        task_modules=(TEST_TASK_MODULE,),
    )["complete"]
    assert written == []


def test_manifest_mismatch_is_an_error_and_deletes_nothing(encdec_store, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(encdec_store, out)
    before = sorted(os.listdir(out))
    with pytest.raises(prepare_lib.ManifestMismatchError) as e:
        _prepare(out, n=40, shards=2, seed=5, lengths="inputs=64,targets=32")
    message = str(e.value)
    assert "seed: store has 3, requested 5" in message
    assert "task_feature_lengths" in message and "new --out" in message
    assert "converter" not in message
    with pytest.raises(prepare_lib.ManifestMismatchError, match="mixture"):
        _prepare(out, mixture="tt_mix_nested", n=40, shards=2)
    assert sorted(os.listdir(out)) == before


def test_bad_arguments_name_the_value(test_tasks, tmp_path):
    with pytest.raises(ValueError, match="tt_mix_encdek.*tt_mix_encdec"):
        _prepare(tmp_path / "a", mixture="tt_mix_encdek")
    with pytest.raises(ValueError, match="'lm' takes task feature lengths for \\['targets'\\]"):
        _prepare(tmp_path / "b", converter="lm")
    with pytest.raises(ValueError, match="Bad feature length"):
        _prepare(tmp_path / "c", lengths="inputs:64")


@pytest.mark.slow
def test_parallel_workers_match_serial(test_tasks, tmp_path):
    _prepare(tmp_path / "serial", n=16, shards=2, workers=1)
    manifest = _prepare(tmp_path / "parallel", n=16, shards=2, workers=2)
    _, a = read_rows(tmp_path / "serial")
    _, b = read_rows(tmp_path / "parallel")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert manifest["complete"] and len(glob.glob(str(tmp_path / "parallel" / "*.done.json"))) == 2


def test_an_unfinished_store_of_other_settings_is_moved_aside_not_blocking(
        encdec_store, tmp_path):
    """A preparation that failed or was killed with wrong settings does not block the
    corrected command: its store is moved aside (kept), the new one is written."""
    out = tmp_path / "store"
    shutil.copytree(encdec_store, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    rebuilt = _prepare(out, n=40, shards=2, seed=5)
    assert rebuilt["complete"] and rebuilt["seed"] == 5
    aside = [p for p in os.listdir(tmp_path) if p.startswith("store.incomplete-")]
    assert len(aside) == 1
    assert json.loads((tmp_path / aside[0] / "manifest.json").read_text())["seed"] == 3


def test_a_complete_store_serves_a_shorter_request(encdec_store, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(encdec_store, out)
    before = sorted(os.listdir(out))
    manifest = _prepare(out, **{**ENCDEC_STORE_ARGS, "n": 16})
    assert manifest["num_examples"] == 40 and sorted(os.listdir(out)) == before
    with pytest.raises(prepare_lib.ManifestMismatchError, match="num_examples"):
        _prepare(out, **{**ENCDEC_STORE_ARGS, "n": 48})


def test_each_shard_records_the_hash_of_its_rows(encdec_store):
    import hashlib

    manifest, _ = read_rows(encdec_store)
    from array_record.python import array_record_module

    for name, expected in zip(manifest["shards"], manifest["shard_sha256"]):
        reader = array_record_module.ArrayRecordReader(os.path.join(encdec_store, name))
        digest = hashlib.sha256(b"".join(reader.read_all())).hexdigest()
        reader.close()
        assert digest == expected
    assert "sha256=" in store.fingerprint(manifest)


def test_the_beam_pipeline_writes_the_rows_of_the_local_run(encdec_store, tmp_path):
    """`--runner=DirectRunner`: the same shards as an Apache Beam pipeline, byte for byte
    the store the local processes wrote (rows, hashes, counts)."""
    out = tmp_path / "beam"
    manifest = prepare_lib.prepare(
        "tt_mix_encdec", "inputs=64,targets=64", "encdec", 40, 3, str(out), 2,
        task_modules=(TEST_TASK_MODULE,), beam_args=["--runner=DirectRunner"])
    local, rows_local = read_rows(encdec_store)
    _, rows_beam = read_rows(out)
    for k in rows_local:
        np.testing.assert_array_equal(rows_beam[k], rows_local[k])
    for k in ("shard_sha256", "task_counts", "tokens", "padding_fraction", "loss_tokens"):
        assert manifest[k] == local[k], k


def test_the_beam_runner_from_the_command_line(test_tasks, tmp_path, capsys):
    prepare_lib.main(["--task_module", TEST_TASK_MODULE, "--mixture", "tt_mix_lm",
                      "--feature_lengths", "targets=32", "--converter", "lm",
                      "--num_examples", "6", "--num_shards", "2", "--out", str(tmp_path / "s"),
                      "--runner=DirectRunner", "--direct_num_workers=1"])
    assert json.loads(capsys.readouterr().out)["num_examples"] == 6
    assert store.load_manifest(str(tmp_path / "s"))["complete"]
    with pytest.raises(SystemExit):
        prepare_lib.main(["--task_module", TEST_TASK_MODULE, "--mixture", "tt_mix_lm",
                          "--feature_lengths", "targets=32", "--converter", "lm",
                          "--num_examples", "6", "--out", str(tmp_path / "t"),
                          "--direct_num_workers=1"])  # Beam options without a runner
