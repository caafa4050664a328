"""SeqIO registrations of Ghost Attention (GAtt) dialogues (t5x_like/data/gatt.py).

Importing registers (no file I/O):
- Task `corpus_chat_gatt`: the multi-turn (2 user turns) dialogues of the shipped
  data/chat/{train,validation}.jsonl (186 and 32 of them) as GAtt training rows, their own
  assistant replies standing in for the samples: an instruction of
  data/gatt/instructions.txt (drawn per dialogue, seed 0) appended to the first user turn
  only, the loss on the last assistant turn only. The shipped replies were not written
  under the instruction; the task shows the data form and trains the run
  (gin_configs/runs/gatt.gin). The real data comes from `python -m t5x_like.gatt`.

`register_gatt_task(name, directory)` registers the dialogues.jsonl of a `python -m
t5x_like.gatt` output (gin: `MIXTURE_OR_TASK_NAME = @gatt_tasks.register_gatt_task()`,
what that output's finetune.gin says). The registration is recorded in the environment
(mixtures.record_registration, kind GATT_TASK) and replayed when this module is imported
again, so the trainer's data worker processes see the same task.

Features: `targets` and `loss_mask`, TASK_FEATURE_LENGTHS = {'targets': L, 'loss_mask': L};
a decoder-only model trains on them in the "chat" data form.
"""

from __future__ import annotations

import os
import pathlib

import seqio

from t5x_like.data import chat, gatt, mixtures
from t5x_like.data import vocabulary as vocabulary_lib

DEMO_DIR = pathlib.Path(__file__).resolve().parent.parent / "data" / "chat"
DEMO_TASK = "corpus_chat_gatt"
GATT_TASK = "gatt_task"  # a registration kind: key the task name; directory
DIALOGUES_FILE = "dialogues.jsonl"
SUMMARY_FILE = "summary.json"


def _features(vocab):
    # The mask shares the text's vocabulary, as in tasks/chat.py.
    return {"targets": seqio.Feature(vocab, add_eos=False),
            chat.LOSS_MASK: seqio.Feature(vocab, add_eos=False)}


def register_gatt_dialogues_task(name: str, split_to_filepattern, vocabulary=None,
                                 chat_template: str = "auto", instructions_path: str | None = None,
                                 seed: int = 0) -> seqio.Task:
    """(Re)registers `name` over JSONL dialogue files ({split: pattern}) as GAtt training
    rows with their own replies (data/gatt.py `gatt_dialogues`, then chat's rendering);
    instructions from `instructions_path` (default the shipped list), drawn with `seed`."""
    vocab = vocabulary or vocabulary_lib.get_vocabulary()
    preprocessors = [gatt.gatt_dialogues(instructions_path or gatt.INSTRUCTIONS_PATH, seed),
                     chat.tokenize_dialogues(vocab, chat_template)]
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name, source=seqio.TextLineDataSource(dict(split_to_filepattern)),
        output_features=_features(vocab), preprocessors=preprocessors, metric_fns=[])


def read_summary(directory: str) -> dict:
    return mixtures.read_directory_summary(
        directory, SUMMARY_FILE, "python -m t5x_like.gatt",
        "gatt_tasks.register_gatt_task.directory", "GATT_OUTPUT_DIR")


def register_gatt_task(name: str, directory: str) -> str:
    """Registers the training dialogues of a `python -m t5x_like.gatt` output directory
    as task `name` (splits train and validation, both the whole file: a sampling run
    holds nothing out), rendered with the vocabulary and chat template it was sampled
    with; returns `name` (gin: MIXTURE_OR_TASK_NAME = @gatt_tasks.register_gatt_task())."""
    directory = os.path.abspath(directory)
    summary = read_summary(directory)
    vocab = gatt.vocabulary_from_spec(summary["vocabulary"])
    path = os.path.join(directory, DIALOGUES_FILE)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=seqio.TextLineDataSource({"train": path, "validation": path}),
        output_features=_features(vocab),
        preprocessors=[chat.tokenize_dialogues(vocab, summary["chat_template"])],
        metric_fns=[])
    mixtures.record_registration(GATT_TASK, name, directory=directory)
    return name


register_gatt_dialogues_task(DEMO_TASK, {split: str(DEMO_DIR / f"{split}.jsonl")
                                         for split in ("train", "validation")})
# The GAtt tasks a parent process registered (a data worker's import).
mixtures.replay_directory_tasks(GATT_TASK, SUMMARY_FILE, lambda name, entry: register_gatt_task(
    name, entry["directory"]))
