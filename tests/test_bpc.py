"""Tests for t5x_like/evaluation/bpc.py: windows score every token once, with the right context."""

import glob
import math
import os

import numpy as np
import pytest
from test_prepare import test_tasks  # noqa: F401  (fixture)

from t5x_like.data import vocabulary
from t5x_like.evaluation import bpc


def _stream(n, seed=0):
    return np.random.default_rng(seed).integers(6, 1000, size=n).astype(np.int32)


@pytest.mark.parametrize(
    "n,window,stride",
    [(1, 8, 3), (8, 8, 3), (9, 8, 3), (11, 8, 3), (12, 8, 3), (100, 16, 5), (64, 16, 16), (1000, 190, 51)],
)
def test_decoder_windows_score_every_token_once_with_its_context(n, window, stride):
    tokens = _stream(n)
    ev = bpc.BpcEval(tokens, total_chars=3 * n, num_documents=1, window=window, stride=stride)
    scored = np.zeros(n, int)
    for batch in ev.batches(4, "decoder"):
        assert batch["decoder_target_tokens"].shape == (4, window)
        for row in range(4):
            seg = batch["decoder_segment_ids"][row]
            length = int(seg.sum())
            if length == 0:  # padding row
                assert not batch["decoder_loss_weights"][row].any()
                continue
            np.testing.assert_array_equal(batch["decoder_positions"][row, :length], np.arange(length))
            targets = batch["decoder_target_tokens"][row, :length]
            inputs = batch["decoder_input_tokens"][row, :length]
            # Locate the window in the stream by its targets; inputs are the previous tokens.
            start = _find(tokens, targets)
            expected_inputs = np.concatenate([[0], tokens])[start : start + length]
            np.testing.assert_array_equal(inputs, expected_inputs)
            for j in np.nonzero(batch["decoder_loss_weights"][row])[0]:
                scored[start + j] += 1
                # After the first window, every scored token has >= window-stride
                # tokens of context inside its window.
                if start > 0:
                    assert j >= window - stride
    np.testing.assert_array_equal(scored, np.ones(n, int))
    assert ev.num_scored_tokens == n


def _find(tokens, piece):
    for s in range(len(tokens) - len(piece) + 1):
        if np.array_equal(tokens[s : s + len(piece)], piece):
            return s
    raise AssertionError("window not found in stream")


def test_window_plan_matches_reference_and_adds_a_tail_window():
    # Reference: floor((N - 1901)/512 + 1) windows of 1901 tokens (1900 targets).
    n = 1900 + 512 * 3 + 100
    windows = bpc.plan_windows(n, 1900, 512)
    assert len(windows) == 4 + 1  # 4 reference windows + our tail window
    assert windows[0] == bpc.Window(0, 1900, 0)
    assert windows[1] == bpc.Window(512, 2412, 1900)
    assert windows[-1] == bpc.Window(n - 1900, n, 1900 + 3 * 512)
    assert bpc.plan_windows(1900 + 512, 1900, 512)[-1] == bpc.Window(512, 2412, 1900)
    with pytest.raises(ValueError, match="stride=9"):
        bpc.plan_windows(10, 8, 9)


def test_encdec_windows_put_context_in_the_encoder_in_s2s_mode():
    n, window, stride = 50, 12, 5
    tokens = _stream(n, seed=1)
    ev = bpc.BpcEval(tokens, total_chars=n, num_documents=1, window=window, stride=stride)
    scored = []
    for batch in ev.batches(3, "encdec"):
        for row in range(3):
            m = int(batch["decoder_segment_ids"][row].sum())
            if m == 0:
                continue
            enc_len = int(batch["encoder_segment_ids"][row].sum())
            encoder = batch["encoder_input_tokens"][row, :enc_len]
            targets = batch["decoder_target_tokens"][row, :m]
            assert encoder[0] == vocabulary.MODE_TOKENS["[S2S]"]
            np.testing.assert_array_equal(batch["decoder_input_tokens"][row, :m], np.concatenate([[0], targets[:-1]]))
            assert batch["decoder_loss_weights"][row].sum() == m
            start = len(scored)  # spans come in stream order
            np.testing.assert_array_equal(targets, tokens[start : start + m])
            context = encoder[1:]
            # The context is exactly the window's tokens before the span.
            np.testing.assert_array_equal(context, tokens[start - len(context) : start])
            assert len(context) == (0 if start == 0 else max(window - stride, window - m))
            scored.extend(range(start, start + m))
    assert scored == list(range(n))


@pytest.mark.parametrize("form", ["decoder", "encdec"])
def test_the_eos_between_documents_is_context_never_scored(form):
    """Two documents joined by EOS (id 1): every document token is scored exactly once
    in either form, the EOS never, though later tokens see it as context."""
    docs = [_stream(30, seed=2), _stream(25, seed=3)]
    tokens = np.concatenate([docs[0], [1], docs[1]]).astype(np.int32)
    weights = (np.arange(len(tokens)) != 30).astype(np.int32)
    ev = bpc.BpcEval(tokens, total_chars=100, num_documents=2, window=16, stride=6,
                     weights=weights)
    assert ev.num_scored_tokens == 55
    weight_sum, eos_as_input = 0, False
    for batch in ev.batches(4, form):
        targets, loss = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        weight_sum += int(loss.sum())
        assert not loss[targets == 1].any()  # the EOS is never scored
        context = batch["encoder_input_tokens"] if form == "encdec" else batch[
            "decoder_input_tokens"]
        eos_as_input |= bool((context == 1).any())
    assert weight_sum == 55 and eos_as_input


def test_bits_per_character():
    assert bpc.bits_per_character(100 * math.log(2), 50) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="total_chars must be positive, got 0"):
        bpc.bits_per_character(1.0, 0)


def test_load_from_a_validation_task(test_tasks):
    ev = bpc.load_bpc_eval("tt_a_validation", window=64, stride=16)
    docs = []
    for path in sorted(glob.glob(os.path.join(test_tasks, "a-validation-*.txt"))):
        with open(path, encoding="utf-8") as f:
            docs += f.read().splitlines()
    assert ev.num_documents == len(docs)
    assert ev.total_chars == sum(len(d) for d in docs)  # characters, not bytes
    assert ev.total_chars < sum(len(d.encode()) for d in docs)
    # Byte vocabulary: the stream is the documents' UTF-8 bytes (+3), in order, with the
    # end-of-document token (EOS, 1) between them as training sees documents: context
    # only, weight 0.
    pieces = [np.frombuffer(d.encode(), np.uint8).astype(np.int32) + 3 for d in docs]
    expected = np.concatenate([x for p in pieces for x in (p, [1])][:-1])
    np.testing.assert_array_equal(ev.tokens, expected)
    np.testing.assert_array_equal(ev.weights, (expected != 1).astype(np.int32))
    assert ev.num_scored_tokens == sum(len(p) for p in pieces) == len(expected) - len(docs) + 1
    with pytest.raises(ValueError, match="needs 'num_chars'"):
        bpc.load_bpc_eval("tt_a_lm", split="validation")


def test_max_tokens_keeps_whole_documents(test_tasks):
    full = bpc.load_bpc_eval("tt_a_validation", window=64, stride=16)
    assert full.num_documents >= 3
    lengths = []
    for path in sorted(glob.glob(os.path.join(test_tasks, "a-validation-*.txt"))):
        with open(path, encoding="utf-8") as f:
            lengths += [len(d.encode()) for d in f.read().splitlines()]
    cap = lengths[0] + 1  # reached inside the second document
    capped = bpc.load_bpc_eval("tt_a_validation", window=64, stride=16, max_tokens=cap)
    assert capped.num_documents == 2
    assert len(capped.tokens) == lengths[0] + 1 + lengths[1]  # EOS between the two
    np.testing.assert_array_equal(capped.tokens, full.tokens[: len(capped.tokens)])
