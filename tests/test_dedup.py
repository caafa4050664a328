"""Deduplication: planted exact and near duplicates of known Jaccard similarity are found,
one of each cluster is kept, pairs below the threshold stay apart, the input is never
written to, and the Beam pipeline gives the single-process path's files and report.

The planted near duplicates are a document of N distinct words and copies with its
first k words replaced by new ones: with word 1-gram shingles their Jaccard similarity
is exactly (N - k) / (N + k) (N - k words shared, N + k in the union).
"""

import json
import os

import numpy as np
import pytest

from t5x_like.data import dedup

N = 100
UNIGRAMS = dedup.DedupConfig(shingle="word", ngram=1, threshold=0.8)


def _words(tag: str, n: int = N) -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


def _changed(base: list[str], k: int, tag: str) -> str:
    """`base` with its first k words replaced by words found nowhere else."""
    return " ".join([f"{tag}{i}" for i in range(k)] + base[k:])


def _similarity(k: int) -> float:
    return (N - k) / (N + k)


X, Y = _words("x"), _words("y")
# domain "web": X, two exact variants of it, near copies at k = 5 and 10 (0.905, 0.818:
# duplicates at 0.8), one at k = 20 (0.667 with X and with each copy: kept), unrelated
# text; Y in train with a near copy (k = 8, 0.852) in validation, which is the one kept.
CORPUS = {
    "web": {
        "train-00000-of-00002.tfrecord.gz": [
            " ".join(X), _changed(X, 5, "a"), "an unrelated document about nothing",
            " ".join(Y)],
        "train-00001-of-00002.tfrecord.gz": [
            "  " + " ".join(X).upper() + "\n\n",  # case and whitespace
            _changed(X, 20, "c"), _changed(X, 10, "b"),
            " ".join(X).replace("x1 ", "x\uff11 ")],  # fullwidth 1: NFKC makes it "1"
        "validation-00000-of-00001.tfrecord.gz": [_changed(Y, 8, "v"), "held out, unique"],
    },
    # another domain with X again: a duplicate only with across_domains
    "code": {"train-00000-of-00001.tfrecord.gz": [" ".join(X), "def f(): return 1"]},
    # one document per line
    "lines": {"train.txt": [" ".join(Y), _changed(Y, 3, "w"), "short line"]},
}
WEB_TRAIN0, WEB_TRAIN1 = "web/train-00000-of-00002.tfrecord.gz", "web/train-00001-of-00002.tfrecord.gz"
WEB_VALID = "web/validation-00000-of-00001.tfrecord.gz"


def _write_corpus(root) -> str:
    for domain, files in CORPUS.items():
        os.makedirs(root / domain)
        for name, texts in files.items():
            dedup.write_file(str(root / domain / name), dedup._format_of(name),
                             [t.encode("utf-8") for t in texts])
    return str(root)


def _texts(directory) -> dict[str, list[str]]:
    """{domain/file: its documents} of a corpus directory, read back."""
    return {f"{f.domain}/{f.file}": [d.text.decode() for d in dedup.read_docs(f)]
            for f in dedup.list_corpus(str(directory))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    return out, dedup.dedup(corpus, str(out), UNIGRAMS, engine="local")


def test_normalisation_folds_unicode_case_and_whitespace():
    assert dedup.normalize("  The\u00a0ﬁle\tＡＢＣ\n\n1 ") == "the file abc 1"
    assert dedup.exact_key(b"Hello   World") == dedup.exact_key("hello world\n")
    assert dedup.exact_key("hello world") != dedup.exact_key("hello, world")


def test_shingles_are_the_n_grams_of_the_normalised_text():
    char3 = dedup.DedupConfig(shingle="char", ngram=3)
    assert len(dedup.shingle_hashes("abcab", char3)) == 3  # abc, bca, cab
    assert len(dedup.shingle_hashes("ab", char3)) == 1  # shorter than n: one shingle
    word2 = dedup.DedupConfig(shingle="word", ngram=2)
    assert len(dedup.shingle_hashes("a b a b A  B", word2)) == 2  # "a b", "b a"
    assert len(dedup.shingle_hashes("   ", word2)) == 0
    a = dedup.shingle_hashes(" ".join(X), UNIGRAMS)
    for k in (5, 10, 20):
        b = dedup.shingle_hashes(_changed(X, k, "q"), UNIGRAMS)
        assert dedup.jaccard(a, b) == pytest.approx(_similarity(k))


def test_minhash_estimates_the_jaccard_similarity():
    a = dedup.shingle_hashes(" ".join(X), UNIGRAMS)
    sig_a = dedup.minhash(a, UNIGRAMS)
    assert sig_a.shape == (UNIGRAMS.num_perm,) and sig_a.max() < dedup.PRIME
    errors = []
    for k in range(0, 60, 5):
        b = dedup.shingle_hashes(_changed(X, k, "q"), UNIGRAMS)
        errors.append(dedup.estimated_jaccard(sig_a, dedup.minhash(b, UNIGRAMS)) - _similarity(k))
    # 100 permutations: a standard error of at most 0.05 per estimate
    assert max(map(abs, errors)) < 0.15 and abs(np.mean(errors)) < 0.05
    assert dedup.estimated_jaccard(sig_a, dedup.minhash(a.copy(), UNIGRAMS)) == 1.0


def test_planted_duplicates_are_found_and_one_of_each_is_kept(corpus, local):
    out, report = local
    exact = {c["kept"]: c["members"] for c in report["exact_clusters"]}
    assert exact == {f"{WEB_TRAIN0}:0": [f"{WEB_TRAIN0}:0", f"{WEB_TRAIN1}:0", f"{WEB_TRAIN1}:3"]}
    near = {c["kept"]: c for c in report["near_clusters"]}
    assert set(near) == {f"{WEB_VALID}:0", f"{WEB_TRAIN0}:0", "lines/train.txt:0"}
    x_cluster = near[f"{WEB_TRAIN0}:0"]
    assert x_cluster["members"] == [f"{WEB_TRAIN0}:0", f"{WEB_TRAIN0}:1", f"{WEB_TRAIN1}:2"]
    expected = {(f"{WEB_TRAIN0}:0", f"{WEB_TRAIN0}:1"): _similarity(5),
                (f"{WEB_TRAIN0}:0", f"{WEB_TRAIN1}:2"): _similarity(10),
                (f"{WEB_TRAIN0}:1", f"{WEB_TRAIN1}:2"): 90 / 110}  # a5 vs b10: 90 shared
    got = {(p["a"], p["b"]): p for p in x_cluster["pairs"]}
    assert got.keys() == expected.keys()
    for pair, similarity in expected.items():
        assert got[pair]["jaccard"] == pytest.approx(similarity, abs=1e-6)
        assert abs(got[pair]["estimated"] - similarity) < 0.15
    # the held-out copy is kept and its train original goes
    assert near[f"{WEB_VALID}:0"]["members"] == [f"{WEB_VALID}:0", f"{WEB_TRAIN0}:3"]
    web = report["domains"]["web"]
    assert (web["documents"], web["exact_removed"], web["near_removed"], web["kept"]) == (10, 2, 3, 5)
    assert report["domains"]["code"]["kept"] == 2  # X again, but in another domain
    assert _texts(out) == {
        WEB_TRAIN0: [" ".join(X), "an unrelated document about nothing"],
        WEB_TRAIN1: [_changed(X, 20, "c")],  # 0.667: below the threshold, kept
        WEB_VALID: [_changed(Y, 8, "v"), "held out, unique"],
        "code/train-00000-of-00001.tfrecord.gz": [" ".join(X), "def f(): return 1"],
        "lines/train.txt": [" ".join(Y), "short line"],
    }
    assert json.loads((out / dedup.REPORT_NAME).read_text()) == report
    assert _texts(corpus) == {f"{d}/{n}": t for d, fs in CORPUS.items() for n, t in fs.items()}


def test_candidates_below_the_threshold_are_verified_and_kept_apart(corpus, tmp_path):
    # One row per band: nearly every pair sharing a word becomes a candidate; only the
    # exact Jaccard check separates the 0.667 copy from the cluster.
    loose = dedup.DedupConfig(shingle="word", ngram=1, bands=40, rows=1, threshold=0.8)
    report = dedup.dedup(corpus, str(tmp_path / "out"), loose, engine="local")
    assert report["candidate_pairs"]["web"] >= 6
    members = {m for c in report["near_clusters"] for m in c["members"]}
    assert f"{WEB_TRAIN1}:1" not in members
    assert report["domains"]["web"]["near_removed"] == 3
    # and a threshold under 0.667 takes it in
    report = dedup.dedup(corpus, str(tmp_path / "low"),
                         dedup.DedupConfig(shingle="word", ngram=1, threshold=0.6), engine="local")
    assert report["domains"]["web"]["near_removed"] == 4


def test_across_domains_removes_the_copy_in_the_other_domain(corpus, tmp_path):
    cfg = dedup.DedupConfig(shingle="word", ngram=1, across_domains=True)
    report = dedup.dedup(corpus, str(tmp_path / "out"), cfg, engine="local")
    # X in code and Y in lines are kept ("code" and "lines" rank before "web"): web
    # loses X, its two variants and Y
    assert report["domains"]["code"]["exact_removed"] == 0
    assert report["domains"]["web"]["exact_removed"] == 4
    [cluster] = [c for c in report["exact_clusters"] if len(c["members"]) == 4]
    assert cluster["kept"] == "code/train-00000-of-00001.tfrecord.gz:0"
    assert {c["group"] for c in report["exact_clusters"]} == {dedup.ALL_DOMAINS}


def test_the_beam_pipeline_gives_the_single_process_result(corpus, local, tmp_path):
    out, report = local
    beam_report = dedup.dedup(corpus, str(tmp_path / "beam"), UNIGRAMS, engine="beam")
    assert beam_report == report
    for name in _texts(out):
        assert (tmp_path / "beam" / name).read_bytes() == (out / name).read_bytes(), name


def test_the_input_is_never_written_and_an_output_never_overwritten(corpus, local, tmp_path):
    with pytest.raises(ValueError, match="inside --input_dir"):
        dedup.dedup(corpus, os.path.join(corpus, "dedup"), UNIGRAMS, engine="local")
    with pytest.raises(FileExistsError, match="already holds files"):
        dedup.dedup(corpus, str(local[0]), UNIGRAMS, engine="local")
    with pytest.raises(FileNotFoundError, match="holds no corpus files"):
        dedup.dedup(str(tmp_path), str(tmp_path / "x"), UNIGRAMS, engine="local")
    with pytest.raises(ValueError, match="threshold"):
        dedup.DedupConfig(threshold=1.5)


def test_the_cli_prints_the_table_and_writes_the_report(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    dedup.main(["--input_dir", corpus, "--output_dir", str(out), "--engine=local",
                "--ngram=1", "--domains=web"])
    printed = capsys.readouterr().out
    assert "web" in printed and "code" not in printed
    assert json.loads((out / dedup.REPORT_NAME).read_text())["domains"]["web"]["kept"] == 5
    with pytest.raises(SystemExit) as e:
        dedup.main(["--input_dir", corpus, "--output_dir", str(out), "--engine=local"])
    assert e.value.code == 2
