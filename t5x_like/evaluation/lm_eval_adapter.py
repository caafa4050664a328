"""EleutherAI's lm-evaluation-harness over our inference: the `t5x_like` lm_eval model.

    python -m t5x_like.lm_eval --model t5x_like \\
        --model_args checkpoint=runs/demo_llama_causal,gin_file=experiments/demo_llama_causal.gin \\
        --tasks hellaswag --batch_size 8

`python -m t5x_like.lm_eval` is lm_eval's own command line (every flag of `lm_eval
--help`) with this model registered: lm-eval 0.4.x finds models only in its own
registry (no plugin entry points), so the plain `lm_eval` command cannot see it. From
Python: import this module, then `lm_eval.simple_evaluate(model="t5x_like", ...)`.

Model arguments (`--model_args key=value,...`):
- checkpoint: what `python -m t5x_like.infer` reads (a model dir, checkpoints dir, step
  dir or params checkpoint);
- gin_file: the run's gin file (e.g. the experiment's; several joined with `+`); it gives
  MODEL, MESH_CONFIG, TASK_FEATURE_LENGTHS and MIXTURE_OR_TASK_NAME, whose first task's
  targets vocabulary is the tokenizer (`task=NAME` names another task);
- max_length: tokens per scored row (default: TASK_FEATURE_LENGTHS["targets"], what the
  model was trained on); gin_search_paths (comma-free: joined with `+`).
lm_eval's --batch_size is the rows of one forward pass (global, over the mesh; "auto" is
read as 8).

Decoder-only causal LMs (an encoder-decoder or a prefix LM is refused). Every request
starts from the model's start token, the one decoding starts from
(vocabulary.start_id: 0 for our SentencePiece models, as SeqIO's shifted targets start;
a tokenizer.json's BOS), so a text's log-likelihood here is the one our own scorer
(`infer` mode "score", Inference.score) gives it. Rows are laid out with explicit segment
ids, positions and loss weights: no token id is read as padding. loglikelihood_rolling
cuts a text longer than max_length into lm-eval's own windows
(utils.get_rolling_token_windows, context 1), each token scored once. generate_until
decodes (greedy, or sampling when the task asks) until the vocabulary's EOS or
max_gen_toks, then cuts at the first `until` string.

Several processes (srun, or our --coordinator_address/--process_count/--process_index
flags; rows split over processes as in infer): every process takes every request in the
same order, so the batches agree; only process 0 writes lm-eval's results (the others
set LOCAL_RANK, lm-eval's own rule for launchers whose every rank reports rank 0).
Written from lm-eval 0.4.13's LM / TemplateLM and HFLM sources; run here on CPU (one
process, and two on localhost), no GPU, no multi-host.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as error:  # pragma: no cover - the optional extra is missing
    raise ImportError(
        f"The lm-evaluation-harness adapter needs the lm-eval package ({error}). Install "
        "it with `.venv/bin/pip install -e '.[lm_eval]'`.") from None

import jax
import numpy as np

from t5x_like import cluster, launch
from t5x_like.data import mixtures, vocabulary
from t5x_like.evaluation.predict import Inference
from t5x_like.model.decoding import DecodeConfig

log = logging.getLogger("t5x_like.evaluation.lm_eval_adapter")
PROG = "python -m t5x_like.lm_eval"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
MIN_WIDTH = 16  # rows are padded to a power of two ≥ this (≤ max_length): few compiles


class _Scorer(Inference):
    """Inference with one more jitted function: the model's score_and_greedy (each row's
    summed log-likelihood and whether every scored token is the argmax)."""

    def __post_init__(self):
        super().__post_init__()
        self._score_greedy = jax.jit(self._traced(self.model.score_and_greedy))

    def score_and_greedy(self, params, batch) -> tuple[np.ndarray, np.ndarray]:
        return self._run(self._score_greedy, params, batch)


def _width(longest: int, max_length: int) -> int:
    return min(max_length, max(MIN_WIDTH, 1 << max(0, math.ceil(math.log2(max(longest, 1))))))


def score_rows(pairs: Sequence[tuple[list[int], list[int]]], max_length: int,
               batch_size: int) -> list[tuple[dict[str, np.ndarray], list[int]]]:
    """Batches for (context, continuation) token pairs: each row is the pair's tokens
    shifted by one (inputs context + continuation[:-1], targets the same shifted left),
    the last max_length + 1 tokens kept, loss weight 1 on the continuation; rows
    sorted longest first, batches of `batch_size` rows (the last padded with empty
    rows). Returns [(batch, the pairs' indices)]."""
    for i, (context, continuation) in enumerate(pairs):
        if len(continuation) > max_length or not context:
            raise ValueError(
                f"Request {i}: a continuation of {len(continuation)} tokens after "
                f"{len(context)} context tokens cannot be scored in rows of max_length="
                f"{max_length} (it needs at least one context token and at most max_length "
                "scored tokens). Raise max_length in --model_args.")
    order = sorted(range(len(pairs)), key=lambda i: -min(max_length + 1, sum(map(len, pairs[i]))))
    out = []
    for first in range(0, len(order), batch_size):
        chosen = order[first:first + batch_size]
        rows = [(pairs[i][0] + pairs[i][1])[-(max_length + 1):] for i in chosen]
        width = _width(max(len(r) - 1 for r in rows), max_length)
        batch = {name: np.zeros((batch_size, width), np.int32) for name in (
            "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")}
        for row, (i, tokens) in enumerate(zip(chosen, rows)):
            n = len(tokens) - 1
            batch["decoder_input_tokens"][row, :n] = tokens[:-1]
            batch["decoder_target_tokens"][row, :n] = tokens[1:]
            batch["decoder_loss_weights"][row, n - len(pairs[i][1]):n] = 1
            batch["decoder_segment_ids"][row, :n] = 1
            batch["decoder_positions"][row, :n] = np.arange(n)
        out.append((batch, chosen))
    return out


def _config(gin_files: Sequence[str], search_paths: Sequence[str], task: str | None):
    """(model, mesh config, task feature lengths, vocabulary) from the run's gin files."""
    launch.parse_gin(gin_files, [], search_paths)
    model = launch.gin_macro("MODEL")
    mesh_config = launch.gin_macro("MESH_CONFIG")
    lengths = dict(launch.gin_macro("TASK_FEATURE_LENGTHS"))
    if model.bpc_form != "decoder" or "inputs" in lengths:
        kind = ("an encoder-decoder" if model.bpc_form != "decoder"
                else f"a prefix LM (TASK_FEATURE_LENGTHS={lengths} has inputs)")
        raise ValueError(
            f"The gin files {list(gin_files)} describe {kind}; the lm-eval adapter scores "
            "decoder-only causal LMs (TASK_FEATURE_LENGTHS with 'targets' only), whose "
            "log-likelihoods are what lm-eval's tasks ask for. Evaluate this model with "
            "`python -m t5x_like.eval` / `python -m t5x_like.infer` instead.")
    task_name = task or launch.gin_macro("MIXTURE_OR_TASK_NAME")
    vocab = mixtures.leaf_tasks(task_name)[0].output_features["targets"].vocabulary
    vocabulary.check_model_covers(vocab, model.cfg.vocab_size)
    return model, mesh_config, lengths, vocab


def _batch_size(value: Any) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"batch_size={value!r}: expected a number of rows (or 'auto', read "
                         f"as {DEFAULT_BATCH_SIZE}).") from None


@register_model("t5x_like")
class T5xLikeLM(TemplateLM):
    """lm_eval's LM over a t5x_like checkpoint (the module docstring says how)."""

    def __init__(self, checkpoint: str | None = None, gin_file: str | None = None,
                 task: str | None = None, max_length: int | str | None = None,
                 batch_size: int | str | None = None, gin_search_paths: str = "",
                 max_batch_size: Any = None, device: Any = None, **unknown):
        super().__init__()
        del max_batch_size, device  # lm-eval's own; the mesh says which devices run
        if unknown or not checkpoint or not gin_file:
            extra = f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""
            raise ValueError(
                f"--model_args for t5x_like: checkpoint and gin_file are required (got "
                f"checkpoint={checkpoint!r}, gin_file={gin_file!r}); optional: task, "
                f"max_length, gin_search_paths{extra}. E.g. --model_args checkpoint="
                "runs/demo_llama_causal,gin_file=experiments/demo_llama_causal.gin")
        model, mesh_config, lengths, vocab = _config(
            gin_file.split("+"), [p for p in gin_search_paths.split("+") if p], task)
        self.vocab = vocab
        self.batch_size = _batch_size(batch_size)
        self._max_length = int(max_length or lengths["targets"])
        self.decode = vocabulary.resolve_decode(DecodeConfig(), vocab)
        launch.start_devices(mesh_config)
        self.inference, self.params = _Scorer.from_checkpoint(
            model, mesh_config, checkpoint, self.decode, self.batch_size)
        self._decoders: dict[DecodeConfig, Inference] = {}
        if jax.process_count() > 1:  # only process 0 writes lm-eval's results
            os.environ["LOCAL_RANK"] = str(jax.process_index())
        log.info("t5x_like for lm-eval: %s, max_length %d, batch %d, start token %s, EOS %s",
                 checkpoint, self._max_length, self.batch_size, self.decode.bos_id,
                 self.decode.eos_id)

    # -- tokens --

    @property
    def eot_token_id(self) -> int:
        return self.decode.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What a text's first token is predicted from: the model's start token."""
        return self.eot_token_id if self.decode.bos_id is None else self.decode.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.vocab)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        del add_special_tokens, kwargs  # our vocabularies add none
        return [int(t) for t in self.vocab.encode(string)]

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.vocab.decode([int(t) for t in tokens])

    # -- log-likelihoods --

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM's, except that every context starts with the start token (lm-eval
        gives it to an empty context only): our models always saw it first."""
        start = [] if self.decode.bos_id is None else [self.decode.bos_id]
        pairs = []
        for context, continuation in (request.args for request in requests):
            if context == "":
                pairs.append((start or [self.prefix_token_id], self.tok_encode(continuation)))
            else:
                context_enc, continuation_enc = self._encode_pair(context, continuation)
                pairs.append((start + context_enc, continuation_enc))
        results = self._loglikelihood_tokens(
            [((r.args[0], r.args[1]), c, t) for r, (c, t) in zip(requests, pairs)])
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        scored = [i for i, (_, continuation) in enumerate(pairs) if continuation]
        for batch, chosen in score_rows([pairs[i] for i in scored], self.max_length,
                                        self.batch_size):
            scores, greedy = self.inference.score_and_greedy(self.params, batch)
            for row, index in enumerate(chosen):
                results[scored[index]] = (float(scores[row]), bool(greedy[row]))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood, from the start token, in lm-eval's disjoint
        windows of max_length tokens (every token scored once, with as much context as
        a row holds)."""
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for window in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1):
                windows.append((None,) + make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation --

    def _decoder(self, gen_kwargs: dict) -> tuple[Inference, list[str], int]:
        """(Inference decoding as gen_kwargs ask, stop strings, max new tokens)."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        sample = bool(kwargs.pop("do_sample", False)) or temperature > 0
        options = dict(method="sample", temperature=temperature or 1.0,
                       top_k=int(kwargs.pop("top_k", 0) or 0),
                       top_p=float(kwargs.pop("top_p", 1.0) or 1.0)) if sample else {}
        if kwargs:
            log.warning("generate_until: ignoring gen_kwargs %s", sorted(kwargs))
        decode = dataclasses.replace(self.decode, max_decode_length=max_new, **options)
        if decode not in self._decoders:
            self._decoders[decode] = dataclasses.replace(self.inference, decode=decode)
        return self._decoders[decode], until, max_new

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context until the vocabulary's EOS, max_gen_toks, or the
        first of its `until` strings (cut there); requests with the same gen_kwargs
        decode together."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for indices in groups.values():
            decoder, until, max_new = self._decoder(requests[indices[0]].args[1])
            keep = max(1, self.max_length - max_new)
            prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in indices]
            for first in range(0, len(indices), self.batch_size):
                chunk = prompts[first:first + self.batch_size]
                width = _width(max(len(p) for p in chunk), max(self.max_length, MIN_WIDTH))
                batch = {"prompt": np.zeros((self.batch_size, width), np.int32),
                         "prompt_lengths": np.zeros((self.batch_size,), np.int32)}
                for row, prompt in enumerate(chunk):
                    batch["prompt"][row, :len(prompt)] = prompt
                    batch["prompt_lengths"][row] = len(prompt)
                tokens = decoder.predict(self.params, batch)["tokens"]
                for row, index in enumerate(indices[first:first + len(chunk)]):
                    out[index] = self._text(tokens[row], until)
                    self.cache_hook.add_partial("generate_until", requests[index].args,
                                                out[index])
        return out

    def _text(self, tokens: np.ndarray, until: Sequence[str]) -> str:
        ids = [int(t) for t in tokens]
        eos = self.decode.eos_id
        text = self.tok_decode(ids[:ids.index(eos)] if eos in ids else ids)
        for stop in until:
            if stop:
                text = text.split(stop, 1)[0]
        return text


def _join_processes(argv: Sequence[str]) -> list[str]:
    """Joins a multi-process run as our other commands do (srun, or the flags
    --coordinator_address/--process_count/--process_index, --local_device_ids,
    --multiprocess, --distributed_timeout, --heartbeat_timeout); returns lm_eval's flags."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    cluster.add_flags(parser)
    args, rest = parser.parse_known_args(argv)
    cluster.join_if_asked(args)
    return rest


def main(argv: Sequence[str] | None = None) -> None:
    """lm_eval's command line with the t5x_like model registered (and our multi-process
    flags); a configuration error is one paragraph and exit code 2, as our other
    commands."""
    from lm_eval.__main__ import cli_evaluate

    launch.setup_logging()
    launch.hide_gpus_from_tensorflow()
    try:
        rest = _join_processes(sys.argv[1:] if argv is None else argv)
        sys.argv = [PROG, *rest]
        cli_evaluate()
    except launch.CONFIG_ERRORS as e:
        if os.environ.get(launch.DEBUG_ENV):
            raise
        print(f"{PROG}: error: {str(e).strip() or type(e).__name__}\n(set "
              f"{launch.DEBUG_ENV}=1 for the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
