"""Bits-per-character evaluation windows (docs/FORMULAS.md; arXiv 2404.09937).

BPC = total negative log-likelihood in bits / characters of the raw text
    = total_nll_nats / (total_chars · ln 2).

A domain's validation task (`{domain}_validation`: one example per document, `targets` =
its tokens, `num_chars` = Python len() of its text) is read in order, its documents'
tokens concatenated into one stream with the vocabulary's end-of-document token (EOS)
between documents, as training sees documents (every training document ends in EOS);
the EOS tokens are context only (loss weight 0: they are no characters of the text).
The stream is cut into windows of `window` tokens moved by `stride` (reference: 1900
and 512):
  - the first window scores all its tokens;
  - every later window scores only its last `stride` tokens, with window-stride tokens of
    context before them;
  - the tail: the reference drops the < stride tokens after the last full window; here a
    final window ending at the last token scores exactly them (with more context), so
    every document token of the stream is scored exactly once and BPC covers all
    characters.
Scoring the first token: decoder inputs are the stream shifted right with 0 (seqio's BOS)
before token 0, as the models are trained; it is scored like the reference scores a
per-document BOS.

Two batch forms, both dicts of int32 [batch, length] with seqio's model feature names:
  - "decoder" (decoder-only): decoder_input_tokens (previous stream tokens, so later
    windows start with true context rather than BOS), decoder_target_tokens,
    decoder_loss_weights (1 on the scored document tokens, 0 on EOS), decoder_segment_ids
    (1 on the window),
    decoder_positions (0..).
  - "encdec" (encoder-decoder): the context goes to the encoder in S2S mode, the scored
    span to the decoder: encoder_input_tokens = [S2S] + the window's tokens before the
    scored span; decoder_target_tokens = the scored span, decoder_input_tokens = it
    shifted right with 0; loss weights 1 on the span's document tokens. This is how a
    UL2 model continues
    text (the S denoiser: prefix in the encoder, continuation in the decoder), and every
    scored token sees the same context as in the decoder form.
Batches are padded at the end with all-zero rows (loss weight 0) so shapes stay fixed.
Deterministic and never shuffled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from t5x_like.data import mixtures
from t5x_like.data.vocabulary import MODE_TOKENS

DEFAULT_WINDOW = 1900
DEFAULT_STRIDE = 512


@dataclasses.dataclass(frozen=True)
class Window:
    """Target tokens stream[start:end]; the ones from `score_from` on are scored."""

    start: int
    end: int
    score_from: int


def plan_windows(num_tokens: int, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE) -> list[Window]:
    """Windows scoring every token of a stream of `num_tokens` exactly once, in order."""
    if not 0 < stride <= window:
        raise ValueError(
            f"Need 0 < stride <= window so that windows leave no gap; got window={window}, "
            f"stride={stride}."
        )
    if num_tokens <= 0:
        raise ValueError(f"The token stream is empty (num_tokens={num_tokens}); nothing to score.")
    if num_tokens <= window:
        return [Window(0, num_tokens, 0)]
    windows = [Window(0, window, 0)]
    end = window + stride
    while end <= num_tokens:
        windows.append(Window(end - window, end, end - stride))
        end += stride
    scored_to = windows[-1].end
    if scored_to < num_tokens:
        # The tail (< stride tokens): one more window ending at the last token.
        windows.append(Window(num_tokens - window, num_tokens, scored_to))
    return windows


@dataclasses.dataclass
class BpcEval:
    """A domain's validation stream, its windows and its character count.

    `weights` (int32 [num_tokens], default all 1) is 1 on the tokens BPC scores and 0
    on context-only tokens (the EOS between documents)."""

    tokens: np.ndarray  # int32 [num_tokens], all documents concatenated in order
    total_chars: int
    num_documents: int
    window: int = DEFAULT_WINDOW
    stride: int = DEFAULT_STRIDE
    weights: np.ndarray | None = None

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens, dtype=np.int32)
        self.weights = (np.ones(len(self.tokens), np.int32) if self.weights is None
                        else np.asarray(self.weights, dtype=np.int32))
        if self.weights.shape != self.tokens.shape:
            raise ValueError(f"weights {self.weights.shape} must match tokens "
                             f"{self.tokens.shape}.")
        self.windows = plan_windows(len(self.tokens), self.window, self.stride)

    @property
    def num_scored_tokens(self) -> int:
        return int(sum(self.weights[w.score_from:w.end].sum() for w in self.windows))

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self.windows) / batch_size)

    def batches(
        self, batch_size: int, form: str = "decoder", *,
        mode_token_id: int = MODE_TOKENS["[S2S]"]
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yields fixed-shape batches of all windows in order ("decoder" or "encdec")."""
        if form not in ("decoder", "encdec"):
            raise ValueError(f"Unknown batch form {form!r}; expected 'decoder' or 'encdec'.")
        row_fn = self._decoder_row if form == "decoder" else self._encdec_row
        for first in range(0, len(self.windows), batch_size):
            rows = [row_fn(w, mode_token_id) for w in self.windows[first : first + batch_size]]
            batch = {k: np.zeros((batch_size, self.window), np.int32) for k in rows[0]}
            for i, row in enumerate(rows):
                for k, v in row.items():
                    batch[k][i, : len(v)] = v
            yield batch

    def _decoder_row(self, w: Window, mode_token_id: int) -> dict[str, np.ndarray]:
        del mode_token_id
        targets = self.tokens[w.start : w.end]
        if w.start == 0:
            inputs = np.concatenate([[0], targets[:-1]])
        else:
            inputs = self.tokens[w.start - 1 : w.end - 1]
        n = w.end - w.start
        weights = np.zeros(n, np.int32)
        weights[w.score_from - w.start :] = self.weights[w.score_from : w.end]
        return {
            "decoder_input_tokens": inputs,
            "decoder_target_tokens": targets,
            "decoder_loss_weights": weights,
            "decoder_segment_ids": np.ones(n, np.int32),
            "decoder_positions": np.arange(n, dtype=np.int32),
        }

    def _encdec_row(self, w: Window, mode_token_id: int) -> dict[str, np.ndarray]:
        # The encoder row holds the mode token, so at most window-1 context tokens fit;
        # the context is never longer than window-1 (a scored span has >= 1 token).
        context = self.tokens[w.start : w.score_from]
        encoder = np.concatenate([[mode_token_id], context]).astype(np.int32)
        targets = self.tokens[w.score_from : w.end]
        m = len(targets)
        return {
            "encoder_input_tokens": encoder,
            "encoder_segment_ids": np.ones(len(encoder), np.int32),
            "encoder_positions": np.arange(len(encoder), dtype=np.int32),
            "decoder_input_tokens": np.concatenate([[0], targets[:-1]]).astype(np.int32),
            "decoder_target_tokens": targets,
            "decoder_loss_weights": self.weights[w.score_from : w.end],
            "decoder_segment_ids": np.ones(m, np.int32),
            "decoder_positions": np.arange(m, dtype=np.int32),
        }


def load_bpc_eval(
    task_name: str,
    *,
    window: int = DEFAULT_WINDOW,
    stride: int = DEFAULT_STRIDE,
    split: str = "validation",
    max_documents: int | None = None,
    max_tokens: int | None = None,
) -> BpcEval:
    """Reads a validation task in order (no shuffling) into a `BpcEval`.

    max_documents / max_tokens cap the stream at whole documents: the first documents,
    up to and including the one that brings the stream to `max_tokens` tokens (so every
    counted character is scored). Documents are joined by the vocabulary's EOS (loss
    weight 0), as training sees them.

    The task must give one example per document with `targets` (all its tokens) and
    `num_chars` (its length in characters), as `{domain}_validation` does.
    """
    task = mixtures.get_mixture_or_task(task_name)
    eos_id = task.output_features["targets"].vocabulary.eos_id
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1)
    if max_documents is not None:
        ds = ds.take(max_documents)
    pieces, total_chars, num_docs, num_tokens = [], 0, 0, 0
    for example in ds.as_numpy_iterator():
        if pieces and eos_id is not None:
            pieces.append(np.array([eos_id], np.int32))  # between documents
        if "num_chars" not in example:
            raise ValueError(
                f"Task {task_name!r} gives features {sorted(example)} but BPC needs "
                "'num_chars' (characters of each document) beside 'targets'. Use a "
                "`{domain}_validation` task."
            )
        pieces.append(np.asarray(example["targets"], np.int32).reshape(-1))
        total_chars += int(example["num_chars"])
        num_docs += 1
        num_tokens += len(pieces[-1])
        if max_tokens is not None and num_tokens >= max_tokens:
            break
    tokens = np.concatenate(pieces) if pieces else np.zeros([0], np.int32)
    # Weight 0 exactly on the separators: the EOS pieces placed between documents.
    weights = np.concatenate([np.full(len(p), 0 if i % 2 and eos_id is not None else 1,
                                      np.int32) for i, p in enumerate(pieces)]
                             ) if pieces else np.zeros([0], np.int32)
    return BpcEval(tokens, total_chars, num_docs, window=window, stride=stride,
                   weights=weights)


def bits_per_character(total_nll_nats: float, total_chars: int) -> float:
    """BPC = total_nll_nats / (total_chars · ln 2)."""
    if total_chars <= 0:
        raise ValueError(f"total_chars must be positive, got {total_chars}.")
    return float(total_nll_nats) / (total_chars * math.log(2))
