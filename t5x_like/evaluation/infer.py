"""Inference: `python -m t5x_like.infer --gin_file=EXPERIMENT --gin_file=runs/infer.gin`.

T5X's infer: a SeqIO task's split goes through the model and each example becomes one
JSON line in INFER_OUTPUT_DIR/<task>-<mode>.jsonl:
- mode "predict": {"inputs", "targets", "prediction", "score"}: the decoded prediction
  with the task's postprocessor applied, and its log-probability;
- mode "score": {"inputs", "targets", "score"}: the log-likelihood of the targets.
Parameters come from CHECKPOINT_PATH: a training run's model dir, checkpoints dir or step
dir, or a params-only checkpoint (`python -m t5x_like.hf import` writes one); a DPO
run's reads as its policy. The same
`predict` / `score` functions serve evaluation (evaluation/evaluate.py) with SeqIO's metrics.

Examples are read in order (not shuffled), in fixed-shape batches (evaluation/predict.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from t5x_like import launch
from t5x_like.data import forms, mixtures, vocabulary
from t5x_like.evaluation.predict import (
    Inference,
    decoded_predictions,
    example_batches,
    decode_for_tasks,
    text_of,
)
from t5x_like.model.decoding import DecodeConfig
from t5x_like.training import rundir

log = logging.getLogger("t5x_like.evaluation.infer")
MODES = ("predict", "score")


def _output_path(output_dir: str, task_name: str, mode: str) -> str:
    path = rundir.join(output_dir, f"{task_name}-{mode}.jsonl")
    if rundir.exists(path):
        raise FileExistsError(
            f"{path} exists; inference never overwrites earlier results. Use another "
            "INFER_OUTPUT_DIR or move the file.")
    return path


def infer(*, model, mesh_config, mixture_or_task_name: str,
          task_feature_lengths: Mapping[str, int], checkpoint_path: str, output_dir: str,
          mode: str = "predict", split: str = "validation", decode: DecodeConfig = DecodeConfig(),
          batch_size: int = 8, max_examples: int | None = None,
          prompts: Sequence[str] = ()) -> dict[str, str]:
    """Runs every task of `mixture_or_task_name` (its `split`, in order) through the model
    restored from `checkpoint_path`; writes one JSON line per example. Returns
    {task: output file}. With `prompts` (texts, mode tokens and sentinels written as
    [S2S], <extra_id_0>: vocabulary.encode_prompt), decodes those instead, prints them
    and writes prompts-predict.jsonl."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES} (INFER_MODE).")
    rundir.check_writable(output_dir, "INFER_OUTPUT_DIR", lock=False)  # its bucket exists
    launch.start_devices(mesh_config)
    form = model.data_form(task_feature_lengths)
    tasks = mixtures.leaf_tasks(mixture_or_task_name)
    decode = decode_for_tasks(decode, tasks)
    if prompts:
        vocab = tasks[0].output_features["targets"].vocabulary
        path = _output_path(output_dir, "prompts", "predict")
        inference, params = Inference.from_checkpoint(model, mesh_config, checkpoint_path,
                                                      decode, batch_size)
        rundir.makedirs(output_dir)
        _infer_prompts(inference, params, vocab, prompts, form, path)
        return {"prompts": path}
    if mode == "predict" and "inputs" not in form.task_features:
        raise ValueError(
            f"{mixture_or_task_name!r} has no 'inputs' feature (TASK_FEATURE_LENGTHS="
            f"{dict(task_feature_lengths)}): a prediction needs a prompt. Use mode='score' "
            "for the likelihood of the targets.")
    for task in tasks:
        vocabulary.check_model_covers(task.output_features["targets"].vocabulary,
                                      model.cfg.vocab_size)
    paths = {task.name: _output_path(output_dir, task.name, mode) for task in tasks}
    inference, params = Inference.from_checkpoint(model, mesh_config, checkpoint_path, decode,
                                                  batch_size)
    rundir.makedirs(output_dir)
    for task in tasks:
        count = _infer_task(inference, params, task, task_feature_lengths, form, split,
                            mode, max_examples, paths[task.name])
        log.info("%s: %d examples → %s", task.name, count, paths[task.name])
    return paths


def _infer_task(inference: Inference, params, task, task_feature_lengths, form: forms.DataForm,
                split: str, mode: str, max_examples, path: str) -> int:
    vocab = task.output_features["targets"].vocabulary
    count = 0
    with rundir.atomic_writer(path) as f:  # the file appears complete, or not at all
        for batch, examples in example_batches(task, task_feature_lengths, split, form,
                                               inference.batch_size, max_examples):
            if mode == "predict":
                out = inference.predict(params, batch)
                predictions = decoded_predictions(task, out["tokens"], examples)
                scores = out["scores"]
            else:
                predictions, scores = [None] * len(examples), inference.score(params, batch)
            for example, prediction, score in zip(examples, predictions, scores):
                record = {"inputs": text_of(example, "inputs", vocab),
                          "targets": text_of(example, "targets", vocab), "score": float(score)}
                if mode == "predict":
                    record["prediction"] = prediction
                f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                count += 1
    return count


def _infer_prompts(inference: Inference, params, vocab, prompts: Sequence[str],
                   form: forms.DataForm, path: str) -> None:
    """Prompts as the model was trained to read them: an encoder's or a prefix LM's
    inputs end with EOS; a causal LM continues the text."""
    eos = [vocab.eos_id] if form.prompt_has_eos else []
    rows = [vocabulary.encode_prompt(vocab, text) + eos for text in prompts]
    width = max(len(r) for r in rows)
    key = form.prompt_feature
    with rundir.atomic_writer(path) as f:  # the file appears complete, or not at all
        for first in range(0, len(rows), inference.batch_size):
            chunk = rows[first:first + inference.batch_size]
            batch = np.zeros((inference.batch_size, width), np.int32)
            lengths = np.zeros((inference.batch_size,), np.int32)
            for i, row in enumerate(chunk):
                batch[i, :len(row)] = row
                lengths[i] = len(row)
            # The padding travels as lengths (segment ids for an encoder): id 0 may be a
            # real token of the prompt (Llama 3's "!").
            features = {key: batch, "prompt_lengths": lengths}
            if key == "encoder_input_tokens":
                features = {key: batch, "encoder_segment_ids": (
                    np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)}
            out = inference.predict(params, features)
            for text, tokens, score in zip(prompts[first:], out["tokens"], out["scores"]):
                ids = [int(t) for t in tokens]
                ids = ids[:ids.index(vocab.eos_id)] if vocab.eos_id in ids else ids
                prediction = vocab.decode(ids)
                print(f"{text!r} -> {prediction!r}  (log-prob {float(score):.2f})", flush=True)
                f.write(json.dumps({"inputs": text, "prediction": prediction,
                                    "score": float(score)}, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    return launch.run("t5x_like.evaluation.infer.infer", argv, prog="python -m t5x_like.infer")
