"""Rejection sampling (Llama 2): sample N responses per prompt with a policy, score each
with a reward model, keep the best as supervised fine-tuning data.

`sample_and_score` decodes N samples per prompt (models.predict_batch with a sampling
DecodeConfig, one key per sample) and scores prompt + response with a
preference.RewardModel, the row laid out as the reward model was trained (prompt tokens,
then the response up to and including its EOS, right-padded). `best_of` picks, per
prompt, the highest-reward sample among the first k, so best-of-k for k = 1, 2, 4, ...
comes from one set of samples. `write_sft_source` writes the kept pairs as a gzipped
TFRecord of token ids (`inputs`, `targets`) and their text, and `sft_task` registers a
SeqIO task over it to fine-tune on.

`python -m t5x_like.rejection_sample` (recipes/rejection_sampling.py) runs the whole step over a
SeqIO task's prompts and writes an output directory; `register_sft_task(directory)`
(gin-configurable: `MIXTURE_OR_TASK_NAME = @best_of_n.register_sft_task()`) registers
its kept set as a task for `runs/finetune.gin`. The registration is also recorded in the
environment (`mixtures.record_registration`, kind SFT_TASK), and importing this module
replays what is recorded there: the trainer's data worker processes import it
(train.DataConfig.task_modules) and so see the same task.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import seqio
import tensorflow as tf
from flax import nnx

from t5x_like.data import mixtures
from t5x_like.data import vocabulary as vocabulary_lib
from t5x_like.model.decoding import DecodeConfig

SFT_TASK = "sft_task"  # a registration kind: key the task name; directory, form
SFT_FILE = "kept.tfrecord.gz"
SUMMARY_FILE = "summary.json"
# How the kept pairs are trained on: "lm", one causal text (prompt + response, the loss on
# both), as the policy sampled them and the reward model scored them; "prefix_lm", SeqIO
# inputs/targets (the prompt seen bidirectionally, the loss on the response only).
SFT_FORMS = ("lm", "prefix_lm")


def prompt_lengths(prompts_BP: np.ndarray, lengths_B=None) -> np.ndarray:
    """[B] each prompt's length: `lengths_B` where given (a vocabulary whose id 0 is a
    real token needs them), else SeqIO's right padding with 0 (up to the last non-zero
    token)."""
    prompts_BP = np.asarray(prompts_BP)
    if lengths_B is not None:
        return np.asarray(lengths_B, np.int64)
    columns = np.arange(1, prompts_BP.shape[1] + 1)
    return np.max(np.where(prompts_BP != 0, columns[None, :], 0), axis=1, initial=0)


def _joined_rows(prompts_BP: np.ndarray, responses_BT: np.ndarray, eos_id: int,
                 lengths_B=None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, segment ids) [B, P + T]: each prompt's first `lengths_B` tokens
    (`prompt_lengths`) followed by its response up to and including the first EOS,
    right-padded with 0; the segment ids are 1 on those tokens, 0 on the padding, so a
    token 0 inside (Llama 3's "!") is never taken for padding."""
    prompts_BP, responses_BT = np.asarray(prompts_BP), np.asarray(responses_BT)
    lengths_B = prompt_lengths(prompts_BP, lengths_B)
    shape = (prompts_BP.shape[0], prompts_BP.shape[1] + responses_BT.shape[1])
    out, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for b, (prompt, response) in enumerate(zip(prompts_BP, responses_BT)):
        row = list(prompt[:lengths_B[b]]) + _response_tokens(response, eos_id)
        out[b, :len(row)] = row
        segments[b, :len(row)] = 1
    return out, segments


def _response_tokens(response: np.ndarray, eos_id: int) -> list[int]:
    """A sampled response up to and including its first EOS (all of it without one);
    the decoder writes 0 after EOS, and a 0 before it is a token."""
    tokens = [int(x) for x in response]
    return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def sample_and_score(policy, policy_module, reward_model, reward_module, prompts_BP,
                     n: int, decode: DecodeConfig, seed: int = 0, lengths_B=None):
    """(responses [N, B, T], rewards [N, B]): N sampled responses per prompt (`prompts_BP`
    right-padded token ids of `lengths_B` tokens (`prompt_lengths`), continued causally)
    and the reward of each. `decode`'s special ids must be resolved
    (data/vocabulary.resolve_decode)."""
    if n < 1 or decode.method != "sample":
        raise ValueError(f"rejection sampling needs n >= 1 samples (got {n}) drawn with "
                         f"DecodeConfig(method='sample') (got {decode.method!r}).")
    decode.check_resolved()
    prompts_BP = np.asarray(prompts_BP, np.int32)
    lengths_B = prompt_lengths(prompts_BP, lengths_B).astype(np.int32)
    predict = nnx.jit(lambda m, p, lengths, key: policy.predict_batch(
        m, {"prompt": p, "prompt_lengths": lengths}, decode, key))
    score = nnx.jit(lambda m, rows, segments: reward_model.rewards(m, rows, None, segments))
    responses, rewards = [], []
    for i in range(n):
        out = predict(policy_module, prompts_BP, lengths_B,
                      jax.random.fold_in(jax.random.key(seed), i))
        tokens_BT = np.asarray(jax.device_get(out["tokens"]))
        responses.append(tokens_BT)
        rows, segments = _joined_rows(prompts_BP, tokens_BT, decode.eos_id, lengths_B)
        rewards.append(np.asarray(score(reward_module, rows, segments)))
    return np.stack(responses), np.stack(rewards)


def best_of(rewards_NB: np.ndarray, k: int) -> np.ndarray:
    """[B] index of the highest-reward sample among the first k of each prompt."""
    if not 1 <= k <= rewards_NB.shape[0]:
        raise ValueError(f"best_of: k={k} must be in 1..{rewards_NB.shape[0]} (the samples drawn).")
    return np.argmax(rewards_NB[:k], axis=0)


def write_sft_source(path: str, prompts_BP, responses_NBT, chosen_B, vocab,
                     eos_id: int, lengths_B=None) -> int:
    """Writes the kept (prompt, response) pairs to a gzipped TFRecord at `path`; returns
    the number written. Prompts: their first `lengths_B` tokens (`prompt_lengths`). The
    response keeps its EOS (SeqIO's `add_eos` is then off)."""
    prompts_BP = np.asarray(prompts_BP)
    lengths_B = prompt_lengths(prompts_BP, lengths_B)
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for b, index in enumerate(chosen_B):
            inputs = [int(t) for t in prompts_BP[b, :lengths_B[b]]]
            targets = _response_tokens(np.asarray(responses_NBT)[index, b], eos_id)
            text = vocab.decode([t for t in targets if t != eos_id])
            feature = {
                "inputs": tf.train.Feature(int64_list=tf.train.Int64List(value=inputs)),
                "targets": tf.train.Feature(int64_list=tf.train.Int64List(value=targets)),
                "inputs_text": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[vocab.decode(inputs).encode("utf-8")])),
                "targets_text": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[text.encode("utf-8")]))}
            writer.write(tf.train.Example(
                features=tf.train.Features(feature=feature)).SerializeToString())
    return len(chosen_B)


def sft_task(name: str, path: str, vocab, split: str | tuple[str, ...] = "train",
             form: str = "prefix_lm") -> seqio.Task:
    """(Re)registers a SeqIO task over a `write_sft_source` file, for fine-tuning: every
    split in `split` reads the whole file. `form` "prefix_lm": features `inputs`,
    `targets` (token ids as written); "lm": one feature `targets`, the prompt's tokens
    followed by the response's (SFT_FORMS)."""
    if form not in SFT_FORMS:
        raise ValueError(f"SFT form {form!r}; expected one of {SFT_FORMS}.")
    splits = (split,) if isinstance(split, str) else tuple(split)
    source = seqio.TFExampleDataSource(
        split_to_filepattern={s: path for s in splits},
        feature_description={"inputs": tf.io.VarLenFeature(tf.int64),
                             "targets": tf.io.VarLenFeature(tf.int64)},
        reader_cls=functools.partial(tf.data.TFRecordDataset, compression_type="GZIP"))

    @seqio.map_over_dataset
    def dense(ex):
        ex = {k: tf.cast(tf.sparse.to_dense(ex[k]), tf.int32) for k in ("inputs", "targets")}
        if form == "lm":
            return {"targets": tf.concat([ex["inputs"], ex["targets"]], axis=0)}
        return ex

    features = ("targets",) if form == "lm" else ("inputs", "targets")
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name, source=source, preprocessors=[dense],
        output_features={k: seqio.Feature(vocab, add_eos=False) for k in features},
        metric_fns=[])


def sft_task_name(directory: str) -> str:
    """The task name of a rejection-sampling output directory
    (mixtures.directory_task_name)."""
    return mixtures.directory_task_name("rejection_sft", directory)


def read_summary(directory: str) -> dict:
    return mixtures.read_directory_summary(
        directory, SUMMARY_FILE, "python -m t5x_like.rejection_sample",
        "best_of_n.register_sft_task.directory", "RS_OUTPUT_DIR")


def summary_vocabulary(summary: dict):
    spec = summary["vocabulary"]
    if spec["extra_ids"] == vocabulary_lib.NUM_EXTRA_IDS:
        return vocabulary_lib.get_vocabulary(spec["path"])
    return seqio.SentencePieceVocabulary(spec["path"], extra_ids=spec["extra_ids"])


def register_sft_task(directory: str, form: str | None = None, name: str | None = None) -> str:
    """Registers the kept set of a `python -m t5x_like.rejection_sample` output directory
    as a SeqIO task (splits train and validation, both the whole kept set: there is no
    held-out part) and returns its name: gin's `MIXTURE_OR_TASK_NAME =
    @best_of_n.register_sft_task()`. `form`: SFT_FORMS (default: the one the run wrote
    its fine-tuning gin file for); `name`: default `sft_task_name(directory)`."""
    directory = os.path.abspath(directory)
    summary = read_summary(directory)
    form = form or summary["sft_form"]
    name = name or sft_task_name(directory)
    sft_task(name, os.path.join(directory, SFT_FILE), summary_vocabulary(summary),
             ("train", "validation"), form)
    mixtures.record_registration(SFT_TASK, name, directory=directory, form=form)
    return name


# The SFT tasks a parent process registered (a data worker's import).
mixtures.replay_directory_tasks(SFT_TASK, SUMMARY_FILE, lambda name, entry: register_sft_task(
    entry["directory"], entry["form"], name))
