"""SeqIO registrations of dialogues for chat-format SFT (t5x_like/data/chat.py).

Importing registers (no file I/O):
- Task `corpus_chat`: the demo dialogues data/chat/{train,validation}.jsonl, built from
  the shipped corpus by scripts/build_chat_data.py (600 train, 80 held-out dialogues
  from held-out documents), rendered in the shipped SentencePiece vocabulary's "plain"
  format (`Role:` + content + EOS per turn).

Features: `targets` (the dialogue's tokens) and `loss_mask` (1 on the assistant's
content and end-of-turn tokens); TASK_FEATURE_LENGTHS = {'targets': L, 'loss_mask': L}.
A decoder-only model trains on them in the "chat" data form (gin_configs/runs/sft.gin).

Your own dialogues (JSONL, one {"messages": [...]} per line) with your tokenizer:
    from tasks import chat
    chat.register_chat_task("my_chat", {"train": "/data/train.jsonl",
                                        "validation": "/data/val.jsonl"},
                            vocabulary=HfTokenizerVocabulary(".../tokenizer.json",
                                                             eos_token="<|eot_id|>"),
                            chat_template="tokenizer")
in a module your gin file imports. `chat_template` "tokenizer" renders with the
tokenizer_config.json's own template beside tokenizer.json (refused if it has none).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import seqio

from t5x_like.data import chat
from t5x_like.data import vocabulary as vocabulary_lib

DEMO_DIR = pathlib.Path(__file__).resolve().parent.parent / "data" / "chat"
DEMO_TASK = "corpus_chat"


def register_chat_task(name: str, split_to_filepattern: Mapping[str, str],
                       vocabulary: seqio.Vocabulary | None = None,
                       chat_template: str = "auto") -> seqio.Task:
    """(Re)registers task `name` over JSONL dialogue files ({split: file pattern}) with
    `vocabulary` (default: the shipped one) rendered by `chat_template`
    (chat.TEMPLATES). The template is resolved now: one the tokenizer lacks is refused
    before any task is registered."""
    vocab = vocabulary or vocabulary_lib.get_vocabulary()
    preprocess = chat.tokenize_dialogues(vocab, chat_template)
    # The mask is no text; it shares the text's vocabulary so that checks that read a
    # task's vocabularies (model size, checksums) see one.
    features = {"targets": seqio.Feature(vocab, add_eos=False),
                chat.LOSS_MASK: seqio.Feature(vocab, add_eos=False)}
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name, source=seqio.TextLineDataSource(dict(split_to_filepattern)),
        output_features=features, preprocessors=[preprocess], metric_fns=[])


register_chat_task(DEMO_TASK, {split: str(DEMO_DIR / f"{split}.jsonl")
                               for split in ("train", "validation")})
