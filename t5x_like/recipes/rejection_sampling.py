"""Rejection sampling (Llama 2): `python -m t5x_like.rejection_sample --gin_file=MODEL
--gin_file=MESH --gin_file=runs/rejection_sample.gin`.

For each prompt of a SeqIO task's split (its `inputs` feature, a trailing EOS dropped),
the policy (a decoder-only LM: any checkpoint `python -m t5x_like.infer` reads, a DPO
run's included) samples `num_samples` responses, continuing the prompt causally; a
preference.RewardModel scores prompt + response as it was trained (best_of_n.py); the
highest-reward response is kept. Checkpoints are restored and run as evaluation/predict.py does
for `infer`. OUTPUT_DIR, written once (never over an earlier output), holds:
- kept.tfrecord.gz: the kept (prompt, response) pairs as a SeqIO-readable source
  (best_of_n.write_sft_source);
- samples.jsonl: per prompt its text, every response with its reward, the kept index;
- summary.json: the mean reward of all samples and of the kept ones, best-of-k for
  k = 1, 2, 4, ..., the settings;
- finetune.gin: include after an experiment and runs/finetune.gin to fine-tune on the
  kept set (`MIXTURE_OR_TASK_NAME = @best_of_n.register_sft_task()`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from t5x_like import launch
from t5x_like.data import mixtures, vocabulary
from t5x_like.evaluation.predict import Inference
from t5x_like.model import families
from t5x_like.objectives import preference
from t5x_like.model.decoding import DecodeConfig
from t5x_like.recipes import best_of_n, outputs

log = logging.getLogger("t5x_like.recipes.rejection_sampling")


def prompt_rows(examples, feature: str, width: int, eos_id: int, batch_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """([batch_size, width] prompt token ids, right-padded with 0 (rows past the
    examples all 0), [batch_size] their lengths), a trailing EOS dropped: the policy
    continues the text. The task's examples are unpadded, so every token counts, 0
    included (a real token in some vocabularies)."""
    rows, lengths = np.zeros((batch_size, width), np.int32), np.zeros(batch_size, np.int32)
    for i, example in enumerate(examples):
        tokens = [int(t) for t in np.asarray(example[feature]).reshape(-1)]
        if tokens and tokens[-1] == eos_id:
            tokens = tokens[:-1]
        rows[i, :len(tokens[:width])] = tokens[:width]
        lengths[i] = len(tokens[:width])
    return rows, lengths


def prompt_batches(task, task_feature_lengths, split: str, batch_size: int, max_prompts):
    ds = task.get_dataset(dict(task_feature_lengths), split=split, shuffle=False,
                          num_epochs=1, use_cached=False)
    if max_prompts is not None:
        ds = ds.take(max_prompts)
    chunk = []
    for example in ds.as_numpy_iterator():
        chunk.append(example)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def best_of_k_means(rewards_NB: np.ndarray) -> dict[int, float]:
    """Mean reward of the best of the first k samples, k = 1, 2, 4, ... and N."""
    n = rewards_NB.shape[0]
    ks = sorted({*(2 ** i for i in range(n.bit_length()) if 2 ** i <= n), n})
    columns = np.arange(rewards_NB.shape[1])
    return {k: float(rewards_NB[best_of_n.best_of(rewards_NB, k), columns].mean()) for k in ks}


def _finetune_gin(output_dir: str, form: str, prompt_length: int, response_length: int
                  ) -> str:
    lengths = ({"targets": prompt_length + response_length} if form == "lm"
               else {"inputs": prompt_length, "targets": response_length})
    return f"""# Fine-tune on the kept set of this rejection-sampling run (written by
# `python -m t5x_like.rejection_sample`). Include after the policy's experiment and
# runs/finetune.gin, e.g.
#   python -m t5x_like.train --gin_file=experiments/demo_llama_causal.gin \\
#     --gin_file=runs/finetune.gin --gin_file={os.path.join(output_dir, 'finetune.gin')} \\
#     --gin.INITIAL_CHECKPOINT_PATH="'<the policy checkpoint>'" --gin.MODEL_DIR="'<new dir>'"
# The task's train and validation splits are both the whole kept set (form {form!r}).
from __gin__ import dynamic_registration
from t5x_like.recipes import best_of_n
from t5x_like.training import train

MIXTURE_OR_TASK_NAME = @best_of_n.register_sft_task()
best_of_n.register_sft_task.directory = {output_dir!r}
best_of_n.register_sft_task.form = {form!r}
TASK_FEATURE_LENGTHS = {lengths!r}
EVAL_BPC_TASKS = []
# The data worker processes register the task again when they import the module.
train.DataConfig.task_modules = ['t5x_like.recipes.best_of_n']
"""


def _vocabulary_spec(vocab) -> dict:
    path = getattr(vocab, "sentencepiece_model_file", None)
    if not path:
        raise ValueError(f"The prompt task's vocabulary {vocab!r} is not a SentencePiece "
                         "model file; the kept set can only record one of those.")
    return {"path": os.path.abspath(path), "extra_ids": int(vocab.extra_ids)}


def _check(policy, reward_model, decode: DecodeConfig, num_samples: int, sft_form: str,
           prompt_feature: str, task_feature_lengths: Mapping[str, int], tasks):
    """The settings, before anything is loaded; returns the prompts' vocabulary."""
    if num_samples < 1 or decode.method != "sample":
        raise ValueError(f"rejection sampling needs num_samples >= 1 (RS_NUM_SAMPLES, got "
                         f"{num_samples}) drawn with decoding.DecodeConfig.method = 'sample' "
                         f"(got {decode.method!r}).")
    if sft_form not in best_of_n.SFT_FORMS:
        raise ValueError(f"RS_SFT_FORM={sft_form!r}; expected one of {best_of_n.SFT_FORMS}.")
    if not isinstance(reward_model, preference.RewardModel):
        raise ValueError(f"The reward model must be a preference.RewardModel (got "
                         f"{type(reward_model).__name__}).")
    if type(policy) is not families.DecoderOnlyModel:
        raise ValueError(f"The policy must be a families.DecoderOnlyModel (got "
                         f"{type(policy).__name__}); a DPO run's checkpoint reads as one.")
    if prompt_feature not in task_feature_lengths:
        raise ValueError(f"The prompts are the tasks' {prompt_feature!r} feature, which "
                         f"RS_TASK_FEATURE_LENGTHS={dict(task_feature_lengths)} lacks.")
    vocab = tasks[0].output_features[prompt_feature].vocabulary
    for task in tasks:
        other = task.output_features[prompt_feature].vocabulary
        if vocabulary.vocabulary_checksum(other) != vocabulary.vocabulary_checksum(vocab):
            raise ValueError(f"{task.name}'s vocabulary differs from {tasks[0].name}'s; "
                             "sample each separately.")
    for model in (policy, reward_model):
        vocabulary.check_model_covers(vocab, model.cfg.vocab_size)
    return vocab


def _sample_and_score(policy_run, policy_params, reward_run, reward_params, tasks,
                      task_feature_lengths, split: str, batch_size: int, max_prompts,
                      prompt_feature: str, num_samples: int, eos_id: int, seed: int):
    """(prompts [B, P], their lengths [B], responses [N, B, T], rewards [N, B], task name
    of each prompt) over every task's prompts, in order."""
    width = int(task_feature_lengths[prompt_feature])
    key = jax.random.key(seed)
    prompts, lengths, responses, rewards, names = [], [], [], [], []
    batch_index = 0
    for task in tasks:
        for examples in prompt_batches(task, task_feature_lengths, split, batch_size, max_prompts):
            rows_BP, lengths_B = prompt_rows(examples, prompt_feature, width, eos_id,
                                              batch_size)
            tokens_N, rewards_N = [], []
            for i in range(num_samples):
                sample_key = jax.random.fold_in(jax.random.fold_in(key, batch_index), i)
                tokens_BT = np.asarray(policy_run.predict(
                    policy_params, {"prompt": rows_BP, "prompt_lengths": lengths_B},
                    sample_key)["tokens"])
                joined, segments = best_of_n._joined_rows(rows_BP, tokens_BT, eos_id, lengths_B)
                rewards_B = reward_run.score(reward_params, {"decoder_target_tokens": joined,
                                                             "decoder_segment_ids": segments})
                tokens_N.append(tokens_BT[:len(examples)])
                rewards_N.append(np.asarray(rewards_B, np.float32)[:len(examples)])
            prompts.append(rows_BP[:len(examples)])
            lengths.append(lengths_B[:len(examples)])
            responses.append(np.stack(tokens_N, axis=0))
            rewards.append(np.stack(rewards_N, axis=0))
            names += [task.name] * len(examples)
            batch_index += 1
        log.info("%s: %d prompts sampled", task.name, names.count(task.name))
    if not names:
        return None
    return (np.concatenate(prompts, axis=0), np.concatenate(lengths),
            np.concatenate(responses, axis=1), np.concatenate(rewards, axis=1), names)


def _write_output(partial: str, output_dir: str, summary: dict, prompts_BP, lengths_B,
                  responses_NBT, rewards_NB, chosen_B, names, vocab, eos_id: int,
                  response_length: int) -> None:
    """The files of the output directory (module docstring) into `partial`, which
    becomes `output_dir` (outputs.written_whole)."""
    best_of_n.write_sft_source(os.path.join(partial, best_of_n.SFT_FILE), prompts_BP,
                               responses_NBT, chosen_B, vocab, eos_id, lengths_B)
    with open(os.path.join(partial, "samples.jsonl"), "w", encoding="utf-8") as f:
        for b, name in enumerate(names):
            texts = [vocab.decode([t for t in best_of_n._response_tokens(
                responses_NBT[i, b], eos_id) if t != eos_id])
                for i in range(responses_NBT.shape[0])]
            f.write(json.dumps({
                "task": name,
                "prompt": vocab.decode([int(t) for t in prompts_BP[b, :lengths_B[b]]]),
                "responses": texts, "rewards": [float(r) for r in rewards_NB[:, b]],
                "kept": int(chosen_B[b])}, ensure_ascii=False) + "\n")
    with open(os.path.join(partial, best_of_n.SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(partial, "finetune.gin"), "w", encoding="utf-8") as f:
        f.write(_finetune_gin(output_dir, summary["sft_form"], summary["prompt_length"],
                              response_length))


def rejection_sample(*, policy, policy_checkpoint: str, reward_model, reward_checkpoint: str,
                     mesh_config, mixture_or_task_name: str,
                     task_feature_lengths: Mapping[str, int], output_dir: str,
                     num_samples: int = 8, split: str = "validation",
                     decode: DecodeConfig = DecodeConfig(method="sample"),
                     batch_size: int = 8, max_prompts: int | None = None, seed: int = 0,
                     prompt_feature: str = "inputs", sft_form: str = "lm") -> dict:
    """Samples, scores and keeps the best response per prompt of every task of
    `mixture_or_task_name` (its `split`, in order, at most `max_prompts` per task);
    writes `output_dir` (module docstring) and returns the summary."""
    tasks = mixtures.leaf_tasks(mixture_or_task_name)
    vocab = _check(policy, reward_model, decode, num_samples, sft_form, prompt_feature,
                   task_feature_lengths, tasks)
    decode = vocabulary.resolve_decode(decode, vocab)  # its EOS and BOS, or a clear error
    output_dir = os.path.abspath(output_dir)
    outputs.check_new(output_dir, "rejection sampling", "RS_OUTPUT_DIR")
    launch.start_devices(mesh_config)
    policy_run, policy_params = Inference.from_checkpoint(
        policy, mesh_config, policy_checkpoint, decode, batch_size)
    reward_run, reward_params = Inference.from_checkpoint(
        reward_model, mesh_config, reward_checkpoint, DecodeConfig(), batch_size)
    sampled = _sample_and_score(policy_run, policy_params, reward_run, reward_params, tasks,
                                task_feature_lengths, split, batch_size, max_prompts,
                                prompt_feature, num_samples, decode.eos_id, seed)
    if sampled is None:
        raise ValueError(f"{mixture_or_task_name!r} has no examples in split {split!r}.")
    prompts_BP, lengths_B, responses_NBT, rewards_NB, names = sampled
    chosen_B = best_of_n.best_of(rewards_NB, num_samples)
    summary = {
        "prompts": len(names), "num_samples": num_samples,
        "mean_reward_all_samples": float(rewards_NB.mean()),
        "mean_reward_kept": float(rewards_NB[chosen_B, np.arange(len(names))].mean()),
        "mean_best_of_k_reward": {str(k): v for k, v in best_of_k_means(rewards_NB).items()},
        "policy_checkpoint": policy_checkpoint, "reward_checkpoint": reward_checkpoint,
        "mixture_or_task_name": mixture_or_task_name, "split": split,
        "tasks": {t.name: names.count(t.name) for t in tasks},
        "decode": {k: getattr(decode, k) for k in ("max_decode_length", "temperature",
                                                   "top_k", "top_p", "eos_id", "bos_id")},
        "seed": seed, "prompt_length": int(task_feature_lengths[prompt_feature]),
        "sft_form": sft_form, "sft_file": best_of_n.SFT_FILE,
        "sft_task_name": best_of_n.sft_task_name(output_dir),
        "vocabulary": _vocabulary_spec(vocab),
    }
    with outputs.written_whole(output_dir) as partial:
        _write_output(partial, output_dir, summary, prompts_BP, lengths_B, responses_NBT,
                      rewards_NB, chosen_B, names, vocab, decode.eos_id,
                      decode.max_decode_length)
    log.info("kept %d of %d x %d samples (mean reward %.4f, all samples %.4f) -> %s",
             len(names), len(names), num_samples, summary["mean_reward_kept"],
             summary["mean_reward_all_samples"], output_dir)
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    return launch.run("t5x_like.recipes.rejection_sampling.rejection_sample", argv,
                      prog="python -m t5x_like.rejection_sample")
