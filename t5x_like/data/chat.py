"""Chat-format SFT data: dialogues as token rows with the loss on the assistant's tokens.

A dialogue is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
(one JSON object per line of a `.jsonl` file, Hugging Face's chat format). It becomes two
task features of one length:
- `targets`: the rendered dialogue's token ids;
- `loss_mask` (LOSS_MASK): 1 on the assistant turns' content and their end-of-turn
  token(s), 0 on system and user turns and on every header (role names, Llama 3's
  `<|start_header_id|>assistant<|end_header_id|>\\n\\n`).
An assistant message may carry `"train": false`: the turn stays in the dialogue as
context and its tokens get weight 0 (Ghost Attention's earlier turns, data/gatt.py).
`ChatFeatureConverter` (data form "chat", forms.CHAT) makes decoder-only rows of them:
`decoder_loss_weights` is the mask, and padding is carried by `decoder_segment_ids` = 0
(and weight 0), never inferred from token id 0, so a vocabulary whose id 0 is a real
token (Llama 3's "!") trains on it. Packed rows keep dialogues apart by their segment
ids, as the causal form does.

How a dialogue is rendered (`chat_format(vocab, template)`):
- "tokenizer": the Jinja `chat_template` of the `tokenizer_config.json` beside a
  `tokenizer.json` vocabulary, rendered as transformers' `apply_chat_template` does
  (sandboxed Jinja with trim_blocks / lstrip_blocks, loop controls, `raise_exception`,
  `strftime_now`, `tojson`, the config's special tokens as variables; the
  `{% generation %}` tag renders its body). Written from transformers'
  `utils/chat_template_utils.py`; transformers itself is not a dependency.
- "llama3": Meta's Llama 3 Instruct template (LLAMA3_TEMPLATE, as shipped in Llama 3's
  tokenizer_config.json), for a tokenizer.json that has Llama 3's header tokens but no
  template of its own.
- "plain": for vocabularies without turn tokens (the shipped SentencePiece one): each
  turn is `Role:` (System / User / Assistant, encoded as text), its content, then the
  vocabulary's EOS id as the end of the turn; a prompt for generation ends with
  `Assistant:`. So a model stops generating at the end of its turn.
- "auto" (the default): "tokenizer" when the vocabulary has a template, else "llama3"
  when it has Llama 3's header tokens, else "plain".

Where the assistant's tokens are (Jinja templates): the dialogue is rendered once per
prefix of its messages; the text that message i adds is its turn, and for an assistant
turn the part after the generation prompt (rendering the first i messages with
`add_generation_prompt=True`) is its content and end of turn. The whole dialogue is then
tokenized once (so the ids are those of the rendered text, merges across turns
included) and a token carries weight 1 when its first character lies in an assistant
span (tokenizers' character offsets). A template that renders earlier turns differently
once later ones follow is refused: the spans would be wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from t5x_like.data import vocabulary as vocabulary_lib

ROLES = ("system", "user", "assistant")
LOSS_MASK = "loss_mask"
TASK_FEATURES = ("targets", LOSS_MASK)
TEMPLATES = ("auto", "tokenizer", "llama3", "plain")
PLAIN_HEADERS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}
LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Meta-Llama-3-8B-Instruct's tokenizer_config.json "chat_template".
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")


def check_messages(messages) -> list[dict[str, str]]:
    """The dialogue as [{role, content}], once checked: roles from ROLES, a system turn
    only first, string contents, at least one assistant turn and none first (there must
    be something to answer)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(f"A dialogue's messages must be a non-empty list of "
                         f"{{'role', 'content'}} objects, got {messages!r:.200}.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES \
                or not isinstance(m.get("content"), str):
            raise ValueError(
                f"Message {i} of a dialogue is {m!r:.200}; each message must be "
                f"{{'role': one of {list(ROLES)}, 'content': a string}}.")
        if m["role"] == "system" and i:
            raise ValueError(f"Message {i} is a system turn; a system turn may only come "
                             "first. Fold later instructions into a user turn.")
        if "train" in m and (m["role"] != "assistant" or not isinstance(m["train"], bool)):
            raise ValueError(f"Message {i} has 'train': {m['train']!r}; the flag is true or "
                             "false on an assistant turn (false: context, no loss on it).")
        out.append({"role": m["role"], "content": m["content"],
                    **({"train": m["train"]} if "train" in m else {})})
    roles = [m["role"] for m in out]
    first = next(r for r in roles if r != "system")
    if not any(map(trained, out)) or first == "assistant":
        raise ValueError(
            f"A dialogue with roles {roles} has nothing to train on: it needs an assistant "
            "turn (not marked \"train\": false) that answers a user turn (loss is on the "
            "assistant's tokens only).")
    return out


def trained(message: Mapping) -> bool:
    """Whether a message's tokens carry loss: an assistant turn not marked "train": false."""
    return message["role"] == "assistant" and message.get("train", True)


def parse_dialogue(line: bytes | str) -> list[dict[str, str]]:
    """One JSONL line {"messages": [...]} as checked messages."""
    text = line.decode("utf-8") if isinstance(line, bytes) else line
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"A dialogue line is not JSON ({e}): {text[:200]!r}. Each line must "
                         "be one object {\"messages\": [{\"role\": ..., \"content\": ...}]}."
                         ) from None
    if not isinstance(record, Mapping) or "messages" not in record:
        raise ValueError(f"A dialogue line has no 'messages': {text[:200]!r}.")
    return check_messages(record["messages"])


# ----------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------


class PlainFormat:
    """`Role:` + content + EOS per turn (module docstring); any vocabulary with an EOS."""

    name = "plain"

    def __init__(self, vocab: seqio.Vocabulary):
        if vocab.eos_id is None:
            raise ValueError(f"The plain chat format ends every turn with the vocabulary's "
                             f"EOS id, and {vocab} has none; name its eos token.")
        self.vocab = vocab

    def encode(self, messages, add_generation_prompt: bool = False
               ) -> tuple[list[int], list[int]]:
        """(token ids, loss weights) of a dialogue; with `add_generation_prompt` the
        prompt for the assistant's next turn (all weights 0)."""
        ids, weights = [], []
        for m in messages:
            header = self.vocab.encode(PLAIN_HEADERS[m["role"]])
            body = [*self.vocab.encode(m["content"]), self.vocab.eos_id]
            ids += header + body
            weights += [0] * len(header) + [int(trained(m))] * len(body)
        if add_generation_prompt:
            header = self.vocab.encode(PLAIN_HEADERS["assistant"])
            ids += header
            weights += [0] * len(header)
        return ids, weights


def _jinja_environment():
    """The sandboxed environment transformers renders chat templates in."""
    import datetime

    import jinja2
    from jinja2 import ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(ext.Extension):
        # transformers marks assistant text with {% generation %}; its body renders as is.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class JinjaFormat:
    """A Jinja chat template over a `tokenizer.json` vocabulary (module docstring)."""

    def __init__(self, vocab: vocabulary_lib.HfTokenizerVocabulary, template: str,
                 special_tokens: Mapping[str, str], name: str):
        self.vocab, self.source, self.name = vocab, template, name
        self.template = _jinja_environment().from_string(template)
        self.special_tokens = dict(special_tokens)

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        """The template's text for `messages`, as `apply_chat_template(tokenize=False)`."""
        return self.template.render(messages=list(messages), tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt,
                                    **self.special_tokens)

    def assistant_spans(self, messages) -> tuple[str, list[tuple[int, int]]]:
        """(the dialogue's text, [(start, end)] character spans of the trained assistant
        turns' content and end of turn)."""
        spans, before = [], ""
        for i, m in enumerate(messages):
            upto = self.render(messages[:i + 1])
            start = len(before)
            if m["role"] == "assistant":
                prompt = self.render(messages[:i], add_generation_prompt=True)
                self._check_prefix(prompt, upto, i, "with the generation prompt")
                self._check_prefix(before, prompt, i, "before the generation prompt")
                start = len(prompt)
                if trained(m):
                    spans.append((start, len(upto)))
            self._check_prefix(before, upto, i, "")
            before = upto
        return before, spans

    def _check_prefix(self, prefix: str, text: str, i: int, where: str) -> None:
        if not text.startswith(prefix):
            raise ValueError(
                f"The {self.name!r} chat template renders the turns before message {i} "
                f"differently once message {i} follows{' (' + where + ')' if where else ''}: "
                f"{prefix[-80:]!r} is not a prefix of {text[:len(prefix) + 40][-120:]!r}. "
                "The assistant's tokens cannot be located in such a rendering (templates "
                "that rewrite earlier turns); use chat_template 'llama3' or 'plain', or a "
                "template whose rendering of a dialogue's first turns does not change.")

    def encode(self, messages, add_generation_prompt: bool = False
               ) -> tuple[list[int], list[int]]:
        """(token ids, loss weights): the rendered text tokenized once; weight 1 on the
        tokens whose first character is in an assistant span."""
        if add_generation_prompt:
            text, spans = self.render(messages, add_generation_prompt=True), []
        else:
            text, spans = self.assistant_spans(messages)
        encoding = self.vocab.tokenizer.encode(text, add_special_tokens=False)
        starts = np.array([start for start, _ in encoding.offsets], np.int64)
        weights = np.zeros(len(starts), np.int32)
        for start, end in spans:
            weights[(starts >= start) & (starts < end)] = 1
        return list(encoding.ids), weights.tolist()


def tokenizer_config(vocab: vocabulary_lib.HfTokenizerVocabulary) -> dict:
    """The `tokenizer_config.json` beside the vocabulary's tokenizer.json ({} if none)."""
    path = os.path.join(os.path.dirname(vocab.path), "tokenizer_config.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _special_tokens(config: Mapping) -> dict[str, str]:
    """bos_token, eos_token, ... of a tokenizer_config.json, as strings (a token there
    is a string or an AddedToken {"content": ...})."""
    out = {}
    for key, value in config.items():
        if key.endswith("_token") and value is not None:
            out[key] = value["content"] if isinstance(value, Mapping) else str(value)
    return out


def _config_template(config: Mapping) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def chat_format(vocab: seqio.Vocabulary, template: str = "auto"):
    """The format dialogues are rendered in for `vocab` (module docstring): a PlainFormat
    or a JinjaFormat; `template` one of TEMPLATES. Refused, with what to do, where the
    vocabulary cannot serve it."""
    if template not in TEMPLATES:
        raise ValueError(f"Unknown chat_template {template!r}; expected one of {list(TEMPLATES)}.")
    hf = isinstance(vocab, vocabulary_lib.HfTokenizerVocabulary)
    config = tokenizer_config(vocab) if hf else {}
    own = _config_template(config)
    has_llama3 = hf and all(vocab.tokenizer.token_to_id(t) is not None for t in LLAMA3_TOKENS)
    if template == "auto":
        template = "tokenizer" if own else "llama3" if has_llama3 else "plain"
    if template == "plain":
        return PlainFormat(vocab)
    if not hf:
        raise ValueError(
            f"chat_template {template!r} is a Jinja template over a Hugging Face "
            f"tokenizer.json, and {vocab} is not one; use chat_template 'plain' (or 'auto').")
    if template == "tokenizer" and own is None:
        where = os.path.join(os.path.dirname(vocab.path), "tokenizer_config.json")
        raise ValueError(
            f"chat_template 'tokenizer' asks for the tokenizer's own chat template, and "
            f"{where} {'has no chat_template' if config else 'does not exist'}. Put the "
            "model's tokenizer_config.json (with its chat_template) beside tokenizer.json, "
            "or use chat_template 'llama3' (Llama 3's format, when the tokenizer has its "
            "header tokens) or 'plain'.")
    if template == "llama3" and not has_llama3:
        raise ValueError(
            f"chat_template 'llama3' needs the tokens {list(LLAMA3_TOKENS)}, which "
            f"{vocab.path} lacks; use the tokenizer's own template ('tokenizer') or 'plain'.")
    special = _special_tokens(config)
    if template == "llama3":
        special.setdefault("bos_token", "<|begin_of_text|>")
        return JinjaFormat(vocab, LLAMA3_TEMPLATE, special, "llama3")
    return JinjaFormat(vocab, own, special, "tokenizer")


# ----------------------------------------------------------------------------------
# SeqIO: preprocessor and feature converter
# ----------------------------------------------------------------------------------


def tokenize_dialogues(vocab: seqio.Vocabulary, template: str = "auto"):
    """A SeqIO preprocessor: JSONL lines (a TextLineDataSource's strings, or {"text":
    line}; blank lines skipped) -> {"targets": int32 [n], LOSS_MASK: int32 [n]}. The
    format is resolved here,
    at registration, so a template the tokenizer lacks is refused before any data."""
    fmt = chat_format(vocab, template)

    def encode(line: bytes):
        ids, weights = fmt.encode(parse_dialogue(line))
        return np.asarray(ids, np.int32), np.asarray(weights, np.int32)

    @tf.autograph.experimental.do_not_convert
    def convert(example):
        line = example["text"] if isinstance(example, Mapping) else example
        ids, weights = tf.numpy_function(encode, [line], [tf.int32, tf.int32], stateful=False)
        return {"targets": tf.ensure_shape(ids, [None]),
                LOSS_MASK: tf.ensure_shape(weights, [None])}

    @tf.autograph.experimental.do_not_convert
    def not_blank(example):
        line = example["text"] if isinstance(example, Mapping) else example
        return tf.strings.length(tf.strings.strip(line)) > 0

    def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.filter(not_blank).map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    return preprocess


def check_lengths(lengths: Mapping[str, int]) -> None:
    """The chat form's task lengths: `targets` and LOSS_MASK, equal (one per token)."""
    if int(lengths["targets"]) != int(lengths[LOSS_MASK]):
        raise ValueError(
            f"A chat task's feature lengths must be equal (one loss weight per token), got "
            f"{dict(lengths)}; set TASK_FEATURE_LENGTHS = {{'targets': L, '{LOSS_MASK}': L}}.")


class ChatFeatureConverter(seqio.FeatureConverter):
    """Dialogues (`targets`, LOSS_MASK) -> decoder-only rows: `decoder_loss_weights` =
    the mask; `decoder_segment_ids` and `decoder_positions` in packed and unpacked rows
    alike, padding = segment 0 (id 0 may be a real token)."""

    TASK_FEATURES = {"targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                     LOSS_MASK: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
    MODEL_FEATURES = {
        "decoder_target_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "decoder_input_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "decoder_loss_weights": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "decoder_segment_ids": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "decoder_positions": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    PACKING_FEATURE_DTYPES = {}

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """A packed row (seqio's packed task features) -> model features."""
        segment_ids = features["targets_segment_ids"]
        return {
            "decoder_target_tokens": features["targets"],
            "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(
                features["targets"], sequence_id=segment_ids, bos_id=self.bos_id),
            "decoder_loss_weights": features[LOSS_MASK] * tf.cast(segment_ids > 0, tf.int32),
            "decoder_segment_ids": segment_ids,
            "decoder_positions": features["targets_positions"],
        }

    def _unpacked(self, lengths: Mapping[str, int]):
        """One dialogue per row, trimmed and padded to the length, with segment 1 on its
        tokens and 0 on padding (from its length, not its ids)."""
        length = int(lengths["targets"])

        def row(ex):
            targets, mask = ex["targets"][:length], ex[LOSS_MASK][:length]
            n = tf.size(targets)
            pad = [[0, length - n]]
            return {"targets": tf.pad(targets, pad), LOSS_MASK: tf.pad(mask, pad),
                    "targets_segment_ids": tf.pad(tf.ones([n], tf.int32), pad),
                    "targets_positions": tf.pad(tf.range(n, dtype=tf.int32), pad)}

        return row

    def _packed(self, ds: tf.data.Dataset, lengths: Mapping[str, int]) -> tf.data.Dataset:
        """seqio's greedy in-order packing, which drops zeros as padding (a real token id
        0, a 0 in the mask), over values shifted by one and shifted back on the packed
        segments. (Training's pool packer, packing.py, packs by length and calls
        `_convert_example` directly.)"""
        names = list(self.TASK_FEATURES)

        def shift(ex):
            return {k: ex[k] + 1 for k in names}

        def unshift(row):
            segments = row["targets_segment_ids"]
            return {**row, **{k: tf.where(segments > 0, row[k] - 1, 0) for k in names}}

        ds = ds.map(shift, num_parallel_calls=tf.data.AUTOTUNE)
        ds = self._pack_or_pad(ds, lengths)
        return ds.map(unshift, num_parallel_calls=tf.data.AUTOTUNE)

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
                          ) -> tf.data.Dataset:
        check_lengths(task_feature_lengths)
        if self.pack:
            ds = self._packed(ds, task_feature_lengths)
        else:
            ds = ds.map(self._unpacked(task_feature_lengths),
                        num_parallel_calls=tf.data.AUTOTUNE)
        return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                  ) -> dict[str, int]:
        length = int(task_feature_lengths["targets"])
        return {name: length for name in self.MODEL_FEATURES}
