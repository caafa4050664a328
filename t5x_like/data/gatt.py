"""Ghost Attention (GAtt, Llama 2, arXiv 2307.09288 section 3.3): dialogues that teach a
model to keep following an instruction given once, at the start of a conversation.

Llama 2's recipe, which this module's pure functions lay out as data:
1. a synthetic instruction (`build_instructions`: templates x attributes, e.g. "Always
   answer in French.", "Act as Napoleon."; the shipped list is data/gatt/instructions.txt)
   is chosen for a multi-turn dialogue (`instruction_for`: deterministic from the
   dialogue's text and a seed);
2. the sampling dialogue (`sampling_dialogue`) has the instruction appended to every
   user turn; the current model samples every assistant reply turn by turn with it
   (t5x_like/recipes/gatt.py);
3. the training dialogue (`training_dialogue`) keeps the instruction only in the first
   user turn, and every assistant turn but the last is marked `"train": false`, so that
   chat.py's rendering gives the loss only to the last assistant turn's content and end
   of turn: every token of the earlier turns, earlier assistant replies included, has
   weight 0.

`gatt_dialogues` is a SeqIO preprocessor from JSONL dialogue lines to training-dialogue
lines; followed by chat.tokenize_dialogues it makes the `targets` + `loss_mask` features
the "chat" data form trains on (tasks/gatt.py). The output of `python -m t5x_like.gatt`
(dialogues.jsonl) holds training dialogues already and reads with chat.tokenize_dialogues
alone.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import seqio
import tensorflow as tf

from t5x_like.data import chat
from t5x_like.data import vocabulary as vocabulary_lib

_REPO_ROOT = Path(__file__).resolve().parents[2]
INSTRUCTIONS_PATH = str(_REPO_ROOT / "data" / "gatt" / "instructions.txt")
DEMO_DIALOGUES = str(_REPO_ROOT / "data" / "chat" / "train.jsonl")
SEPARATOR = "\n\n"  # between a user turn's text and the instruction appended to it
MIN_USER_TURNS = 2  # GAtt is about later turns: single-turn dialogues are skipped
# Llama 2's constraint kinds (hobbies, languages, public figures), one template each.
TEMPLATES = {
    "language": "Always answer in {}.",
    "public_figure": "Act as {}.",
    "hobby": "You enjoy {}; mention it in every answer.",
}
ATTRIBUTES = {
    "language": ("French", "Spanish", "German", "Italian", "Portuguese", "Dutch", "Latin",
                 "Greek"),
    "public_figure": ("Napoleon", "Shakespeare", "Cleopatra", "Einstein", "Abraham Lincoln",
                      "Mozart", "Isaac Newton", "Marie Curie"),
    "hobby": ("tennis", "chess", "gardening", "painting", "hiking", "cooking", "astronomy",
              "fishing"),
}


# ----------------------------------------------------------------------------------
# Instructions
# ----------------------------------------------------------------------------------


def build_instructions(templates: Mapping[str, str] = TEMPLATES,
                       attributes: Mapping[str, Sequence[str]] = ATTRIBUTES) -> list[str]:
    """Every template filled with every attribute of its kind, in order (the shipped
    data/gatt/instructions.txt is `build_instructions()`, one a line)."""
    missing = sorted(set(templates) - set(attributes))
    if missing:
        raise ValueError(f"GAtt instruction templates {missing} have no attributes; give "
                         f"each template kind a list of attributes (kinds: {sorted(attributes)}).")
    return [templates[kind].format(value) for kind in templates for value in attributes[kind]]


def read_instructions(path: str = INSTRUCTIONS_PATH) -> list[str]:
    """The instructions of a text file, one a line (blank lines and `#` lines skipped),
    refused if there are none or one repeats."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    out = [line for line in lines if line and not line.startswith("#")]
    repeated = sorted({x for x in out if out.count(x) > 1})
    if not out or repeated:
        raise ValueError(f"{path} must list distinct GAtt instructions, one a line; it has "
                         f"{'none' if not out else f'repeats: {repeated[:3]}'}. Write e.g. "
                         "\"Always answer in French.\" lines (gatt.build_instructions()).")
    return out


def dialogue_key(messages: Sequence[Mapping]) -> str:
    """The text a dialogue's instruction is drawn from: its roles and contents, the same
    whatever the JSON formatting of its line or the flags on it."""
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def instruction_for(messages: Sequence[Mapping], instructions: Sequence[str], seed: int = 0
                    ) -> str:
    """The dialogue's instruction: a hash of (seed, its text) picks one, so a dialogue
    gets the same one in every process, shard and order."""
    digest = hashlib.sha256(f"{seed}\0{dialogue_key(messages)}".encode("utf-8")).digest()
    return instructions[int.from_bytes(digest[:8], "big") % len(instructions)]


# ----------------------------------------------------------------------------------
# Dialogues
# ----------------------------------------------------------------------------------


def user_turns(messages: Sequence[Mapping]) -> int:
    return sum(m["role"] == "user" for m in messages)


def with_instruction(content: str, instruction: str) -> str:
    """A user turn's text with the instruction appended (after SEPARATOR)."""
    return f"{content}{SEPARATOR}{instruction}"


def sampling_dialogue(messages: Sequence[Mapping], instruction: str) -> list[dict]:
    """The dialogue's system and user turns, each user turn with the instruction
    appended; its assistant turns dropped (the model samples them)."""
    return [{"role": m["role"], "content": with_instruction(m["content"], instruction)
             if m["role"] == "user" else m["content"]}
            for m in messages if m["role"] != "assistant"]


def training_dialogue(messages: Sequence[Mapping], instruction: str) -> list[dict]:
    """The dialogue (its replies the sampled ones) up to its last assistant turn, the
    instruction in its first user turn only, every assistant turn but the last marked
    `"train": false` (chat.py gives its tokens weight 0)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if last < 0 or first_user is None or first_user > last:
        raise ValueError(f"A GAtt dialogue needs a user turn answered by an assistant turn; "
                         f"roles {[m['role'] for m in messages]}.")
    out = []
    for i, m in enumerate(messages[:last + 1]):
        content = with_instruction(m["content"], instruction) if i == first_user else m["content"]
        turn = {"role": m["role"], "content": content}
        if m["role"] == "assistant" and i != last:
            turn["train"] = False
        out.append(turn)
    return out


def replace_replies(messages: Sequence[Mapping], replies: Sequence[str]) -> list[dict]:
    """The system and user turns of `messages`, each user turn followed by its reply
    (replies[k] answers the k-th user turn): a sampled dialogue in its original words."""
    out, k = [], 0
    for m in messages:
        if m["role"] == "assistant":
            continue
        out.append({"role": m["role"], "content": m["content"]})
        if m["role"] == "user":
            out.append({"role": "assistant", "content": replies[k]})
            k += 1
    return out


def read_dialogues(pattern: str) -> list[list[dict]]:
    """The checked dialogues of the JSONL files matching `pattern` (sorted), in order."""
    paths = sorted(glob.glob(os.path.expanduser(pattern)))
    if not paths:
        raise FileNotFoundError(f"No dialogue file matches {pattern!r}; pass JSONL files of "
                                "{\"messages\": [...]} lines (e.g. data/chat/train.jsonl).")
    out = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            out += [chat.parse_dialogue(line) for line in f if line.strip()]
    return out


def gatt_line(line: bytes | str, instructions: Sequence[str], seed: int = 0,
              min_user_turns: int = MIN_USER_TURNS) -> str:
    """One JSONL dialogue line -> its training dialogue's line {"messages", "instruction"}
    with its own replies as the samples; "" for a dialogue of fewer user turns."""
    messages = chat.parse_dialogue(line)
    if user_turns(messages) < min_user_turns:
        return ""
    instruction = instruction_for(messages, instructions, seed)
    return json.dumps({"instruction": instruction,
                       "messages": training_dialogue(messages, instruction)},
                      ensure_ascii=False)


# ----------------------------------------------------------------------------------
# SeqIO
# ----------------------------------------------------------------------------------


def gatt_dialogues(instructions: Sequence[str] | str = INSTRUCTIONS_PATH, seed: int = 0,
                   min_user_turns: int = MIN_USER_TURNS):
    """A SeqIO preprocessor: JSONL dialogue lines (strings or {"text": line}) -> the
    training-dialogue lines of those with at least `min_user_turns` user turns
    (`gatt_line`); chat.tokenize_dialogues turns them into `targets` + `loss_mask`.
    `instructions`: a list, or the path of a file of them, read when the data is made
    (registering a task reads no file)."""

    def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
        listed = (read_instructions(instructions) if isinstance(instructions, str)
                  else list(instructions))
        if not listed:
            raise ValueError("GAtt needs at least one instruction (data/gatt/instructions.txt).")

        def convert_line(line: bytes) -> bytes:
            return gatt_line(line, listed, seed, min_user_turns).encode("utf-8")

        @tf.autograph.experimental.do_not_convert
        def convert(example):
            line = example["text"] if isinstance(example, Mapping) else example
            line = tf.numpy_function(convert_line, [line], tf.string, stateful=False)
            return tf.ensure_shape(line, [])

        @tf.autograph.experimental.do_not_convert
        def not_blank(example):
            line = example["text"] if isinstance(example, Mapping) else example
            return tf.strings.length(tf.strings.strip(line)) > 0

        return ds.filter(not_blank).map(convert, num_parallel_calls=tf.data.AUTOTUNE
                                        ).filter(not_blank)

    return preprocess


def vocabulary_spec(vocab: seqio.Vocabulary) -> dict:
    """How to load `vocab` again (a sampling output records it for its task)."""
    if isinstance(vocab, vocabulary_lib.HfTokenizerVocabulary):
        names = {f"{k}_token": vocab.tokenizer.id_to_token(i) for k, i in
                 (("eos", vocab.eos_id), ("bos", vocab.bos_id), ("unk", vocab.unk_id))
                 if i is not None}
        return {"tokenizer_json": os.path.abspath(vocab.path), **names}
    path = getattr(vocab, "sentencepiece_model_file", None)
    if not path:
        raise ValueError(f"{vocab!r} is neither a SentencePiece model nor a tokenizer.json; "
                         "a GAtt output can only record one of those.")
    return {"sentencepiece": os.path.abspath(path), "extra_ids": int(vocab.extra_ids)}


def vocabulary_from_spec(spec: Mapping) -> seqio.Vocabulary:
    if "tokenizer_json" in spec:
        return vocabulary_lib.HfTokenizerVocabulary(
            spec["tokenizer_json"], **{k: v for k, v in spec.items() if k.endswith("_token")})
    if spec["extra_ids"] == vocabulary_lib.NUM_EXTRA_IDS:
        return vocabulary_lib.get_vocabulary(spec["sentencepiece"])
    return seqio.SentencePieceVocabulary(spec["sentencepiece"], extra_ids=spec["extra_ids"])

