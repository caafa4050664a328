"""Ghost Attention sampling (Llama 2 section 3.3): `python -m t5x_like.gatt
--gin_file=MODEL --gin_file=MESH --gin_file=runs/gatt_sample.gin`.

For each multi-turn dialogue (at least `min_user_turns` user turns) of JSONL dialogue
files and its instruction (data/gatt.py: drawn from the instruction file by the
dialogue's text and `seed`), the policy (a decoder-only LM; any checkpoint `python -m
t5x_like.infer` reads) samples every assistant reply turn by turn, with the instruction
appended to every user turn (gatt.sampling_dialogue): each turn's prompt is the dialogue
so far, sampled replies included, rendered by chat.py's format with the generation
prompt, decoded with Inference.predict (KV-cache decoding on the run's mesh) up to the
vocabulary's EOS (the plain format's end of turn). A dialogue whose prompt outgrows
`prompt_length` is dropped (counted). OUTPUT_DIR, written once under `.partial` and
renamed (never over an earlier output), holds:
- dialogues.jsonl: per dialogue {"instruction", "source", "messages"}: the training
  dialogue (gatt.training_dialogue: the instruction in the first user turn only, the
  earlier assistant turns `"train": false`), which chat.tokenize_dialogues reads;
- summary.json: counts (dialogues, replies, replies cut at max_decode_length, dropped),
  the instructions drawn, the settings, the vocabulary and chat template;
- finetune.gin: include after an experiment and runs/gatt.gin to fine-tune on it.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Sequence

import jax
import numpy as np

from t5x_like import launch
from t5x_like.data import chat, gatt, mixtures, vocabulary
from t5x_like.evaluation.predict import Inference
from t5x_like.model import families
from t5x_like.model.decoding import DecodeConfig
from t5x_like.recipes import outputs

log = logging.getLogger("t5x_like.recipes.gatt")
DIALOGUES_FILE = "dialogues.jsonl"
SUMMARY_FILE = "summary.json"


def task_name(output_dir: str) -> str:
    """The task name of a GAtt sampling output directory (mixtures.directory_task_name)."""
    return mixtures.directory_task_name("gatt", output_dir)


def _reply(tokens_T: np.ndarray, eos_id: int, vocab) -> tuple[str, bool]:
    """(the reply's text up to its EOS, whether it reached EOS)."""
    ids = [int(t) for t in tokens_T]
    finished = eos_id in ids
    return vocab.decode(ids[:ids.index(eos_id)] if finished else ids), finished


def sample_replies(run: Inference, params, fmt, prompts: Sequence[Sequence[dict]],
                   prompt_length: int, key) -> list[tuple[list[str], int] | None]:
    """Per sampling dialogue (system and user turns), (its sampled replies, one per user
    turn, how many stopped at max_decode_length without EOS), or None where a turn's
    prompt is longer than `prompt_length`. Turn t of every dialogue of the batch
    (len(prompts) <= run.batch_size) is decoded in one predict call, with key t."""
    eos_id, vocab = run.decode.eos_id, fmt.vocab
    so_far = [[m for m in d if m["role"] == "system"] for d in prompts]
    users = [[m for m in d if m["role"] == "user"] for d in prompts]
    replies, cut = [[] for _ in prompts], [0] * len(prompts)
    alive = [True] * len(prompts)
    for t in range(max(len(u) for u in users)):
        rows_BP = np.zeros((run.batch_size, prompt_length), np.int32)
        lengths_B = np.zeros(run.batch_size, np.int32)
        for b in range(len(prompts)):
            if alive[b] and t < len(users[b]):
                so_far[b].append(users[b][t])
                ids, _ = fmt.encode(so_far[b], add_generation_prompt=True)
                alive[b] = len(ids) <= prompt_length
                if alive[b]:
                    rows_BP[b, :len(ids)], lengths_B[b] = ids, len(ids)
        if not lengths_B.any():
            break
        tokens_BT = run.predict(params, {"prompt": rows_BP, "prompt_lengths": lengths_B},
                                jax.random.fold_in(key, t))["tokens"]
        for b in np.flatnonzero(lengths_B):
            text, finished = _reply(tokens_BT[b], eos_id, vocab)
            so_far[b].append({"role": "assistant", "content": text})
            replies[b].append(text)
            cut[b] += not finished
    return [(r, c) if a else None for r, c, a in zip(replies, cut, alive)]


def _finetune_gin(output_dir: str, task_name: str) -> str:
    return f"""# Fine-tune on the GAtt dialogues of this sampling run (written by `python -m
# t5x_like.gatt`). Include after the policy's experiment and runs/gatt.gin, e.g.
#   python -m t5x_like.train --gin_file=experiments/demo_gatt.gin \\
#     --gin_file={os.path.join(output_dir, 'finetune.gin')} --gin.MODEL_DIR="'<new dir>'"
# The task's train and validation splits are both the whole file.
from __gin__ import dynamic_registration
from tasks import gatt as gatt_tasks

MIXTURE_OR_TASK_NAME = @gatt_tasks.register_gatt_task()
gatt_tasks.register_gatt_task.name = {task_name!r}
gatt_tasks.register_gatt_task.directory = {output_dir!r}
"""


def _write_output(output_dir: str, rows: list[dict], summary: dict) -> None:
    """The output directory (module docstring), written whole (outputs.written_whole)."""
    with outputs.written_whole(output_dir) as partial:
        with open(os.path.join(partial, DIALOGUES_FILE), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        with open(os.path.join(partial, SUMMARY_FILE), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(partial, "finetune.gin"), "w", encoding="utf-8") as f:
            f.write(_finetune_gin(output_dir, summary["task_name"]))


def _sample_all(run, params, fmt, dialogues, instructions, prompt_length: int, seed: int):
    """(training-dialogue rows, replies, replies cut, dropped) over every dialogue."""
    rows, replies, cut, dropped = [], 0, 0, 0
    key = jax.random.key(seed)
    for start in range(0, len(dialogues), run.batch_size):
        batch = dialogues[start:start + run.batch_size]
        chosen = [gatt.instruction_for(d, instructions, seed) for d in batch]
        prompts = [gatt.sampling_dialogue(d, i) for d, i in zip(batch, chosen)]
        sampled = sample_replies(run, params, fmt, prompts, prompt_length,
                                 jax.random.fold_in(key, start // run.batch_size))
        for k, (messages, instruction, out) in enumerate(zip(batch, chosen, sampled)):
            if out is None:
                dropped += 1
                continue
            dialogue = gatt.replace_replies(messages, out[0])
            rows.append({"instruction": instruction, "source": start + k,
                         "messages": gatt.training_dialogue(dialogue, instruction)})
            replies, cut = replies + len(out[0]), cut + out[1]
        log.info("%d of %d dialogues sampled", min(start + run.batch_size, len(dialogues)),
                 len(dialogues))
    return rows, replies, cut, dropped


def sample_gatt_dialogues(*, policy, policy_checkpoint: str, mesh_config, output_dir: str,
                          dialogues: str | None = None, instructions: str | None = None,
                          vocab=None, chat_template: str = "auto",
                          decode: DecodeConfig = DecodeConfig(method="sample"),
                          prompt_length: int = 512, batch_size: int = 8,
                          max_dialogues: int | None = None,
                          min_user_turns: int = gatt.MIN_USER_TURNS, seed: int = 0) -> dict:
    """Samples the GAtt dialogues of `dialogues` (JSONL files, a glob; default the shipped
    data/chat/train.jsonl) with instructions from `instructions` (default the shipped
    data/gatt/instructions.txt); writes `output_dir` (module docstring), returns the
    summary."""
    if type(policy) is not families.DecoderOnlyModel:
        raise ValueError(f"The GAtt policy must be a families.DecoderOnlyModel (got "
                         f"{type(policy).__name__}); a DPO run's checkpoint reads as one.")
    vocab = vocab or vocabulary.get_vocabulary()
    vocabulary.check_model_covers(vocab, policy.cfg.vocab_size)
    fmt = chat.chat_format(vocab, chat_template)
    decode = vocabulary.resolve_decode(decode, vocab)  # its EOS and BOS, or a clear error
    listed = gatt.read_instructions(instructions or gatt.INSTRUCTIONS_PATH)
    source = gatt.read_dialogues(dialogues or gatt.DEMO_DIALOGUES)
    multi = [d for d in source if gatt.user_turns(d) >= min_user_turns][:max_dialogues]
    if not multi:
        raise ValueError(f"No dialogue of {dialogues or gatt.DEMO_DIALOGUES!r} has "
                         f"{min_user_turns} user turns; GAtt needs multi-turn dialogues.")
    output_dir = os.path.abspath(output_dir)
    outputs.check_new(output_dir, "GAtt sampling", "GATT_OUTPUT_DIR")
    launch.start_devices(mesh_config)
    run, params = Inference.from_checkpoint(policy, mesh_config, policy_checkpoint, decode,
                                            batch_size)
    rows, replies, cut, dropped = _sample_all(run, params, fmt, multi, listed, prompt_length,
                                              seed)
    if not rows:
        raise ValueError(f"Every dialogue's prompt is longer than prompt_length="
                         f"{prompt_length} tokens; raise GATT_PROMPT_LENGTH.")
    summary = {
        "dialogues": len(rows), "replies": replies, "replies_without_eos": cut,
        "dropped_too_long": dropped, "source_dialogues": len(source),
        "instructions": dict(collections.Counter(r["instruction"] for r in rows)),
        "policy_checkpoint": policy_checkpoint,
        "dialogue_files": dialogues or gatt.DEMO_DIALOGUES,
        "instructions_file": instructions or gatt.INSTRUCTIONS_PATH, "seed": seed,
        "min_user_turns": min_user_turns, "prompt_length": prompt_length,
        "decode": {k: getattr(decode, k) for k in ("method", "max_decode_length", "temperature",
                                                   "top_k", "top_p", "eos_id", "bos_id")},
        "chat_template": fmt.name, "vocabulary": gatt.vocabulary_spec(vocab),
        "task_name": task_name(output_dir),
    }
    _write_output(output_dir, rows, summary)
    log.info("%d GAtt dialogues (%d replies, %d without EOS, %d dropped) -> %s", len(rows),
             replies, cut, dropped, output_dir)
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    return launch.run("t5x_like.recipes.gatt.sample_gatt_dialogues", argv,
                      prog="python -m t5x_like.gatt")
