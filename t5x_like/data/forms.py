"""A model's data form: what its rows are, from a task's features to the model's.

A model says which form its data takes (`model.data_form(task_feature_lengths)`, the
family decides: encoder-decoder, prefix LM when the task has `inputs`, causal LM,
preference pairs), and every module that builds, stores, streams, evaluates or decodes
rows asks the form instead of naming it:

- `converter(pack)`: the SeqIO feature converter (packed for training, one example per
  row for evaluation and inference);
- `task_features` a task must provide, `model_features` a row holds, `packs` whether rows
  pack several examples, `text` whether they are text (BPC and predictions apply);
- `prompt_feature` (where a free-text prompt goes for decoding, and whether it ends with
  EOS);
- `check_lengths`: the one check of the task feature lengths;
- `tokens_per_example`: the token positions one row feeds the model (FLOPs, tokens/s).

`name` is what stores and streams record in their manifests ("encdec", "prefix_lm", "lm",
"chat", "preference"), so a store written before stays readable. A new form (a new task shape)
is one more `DataForm` here, and the family that returns it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import seqio
import tensorflow as tf

from t5x_like.data import chat, packing, pairs, token_zero

_DECODER = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")


@dataclasses.dataclass(frozen=True)
class DataForm:
    name: str
    task_features: tuple[str, ...]
    model_features: tuple[str, ...]
    packs: bool
    # Rows are text the model predicts token by token (BPC, predictions and scores
    # apply); False for preference pairs, which only the model's own loss evaluates.
    text: bool
    # The feature a prompt given as text is decoded from (`python -m t5x_like.infer
    # --prompts`) and whether it ends with EOS as the task's inputs do; None: no decoding.
    prompt_feature: str | None
    prompt_has_eos: bool

    def converter(self, pack: bool = True, zero_is_token: bool = False
                  ) -> seqio.FeatureConverter:
        """The SeqIO feature converter of these rows: packed (when the form packs) for
        training, one example per row for evaluation and inference. `zero_is_token`:
        the task vocabulary's id 0 is a real token (vocabulary.zero_is_padding false),
        so SeqIO's converters, which read 0 as padding, get token_zero's wrapper."""
        if zero_is_token and self.name in ("encdec", "prefix_lm", "lm"):
            return token_zero.ZeroIsTokenConverter(self.converter(pack))
        pack = pack and self.packs
        if self.name == "encdec":
            return seqio.EncDecFeatureConverter(pack=pack)
        if self.name == "prefix_lm":
            return seqio.PrefixLMFeatureConverter(pack=pack, loss_on_targets_only=True)
        if self.name == "lm":
            return seqio.LMFeatureConverter(pack=pack)
        if self.name == "chat":
            return chat.ChatFeatureConverter(pack=pack)
        return pairs.PreferenceFeatureConverter()

    def check_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        """The task feature lengths as {name: int}, sorted, once checked: exactly this
        form's task features, each positive."""
        lengths = dict(task_feature_lengths)
        if set(lengths) != set(self.task_features):
            example = ",".join(f"{k}=512" for k in self.task_features)
            raise ValueError(
                f"Data form {self.name!r} takes task feature lengths for "
                f"{sorted(self.task_features)}, got {lengths}. Set TASK_FEATURE_LENGTHS "
                f"(gin) or --feature_lengths (prepare) to those names, e.g. {example}.")
        bad = {k: v for k, v in lengths.items() if int(v) <= 0}
        if bad:
            raise ValueError(f"Feature lengths must be positive, got {bad}.")
        if self.name == "chat":
            chat.check_lengths(lengths)
        return {str(k): int(v) for k, v in sorted(lengths.items())}

    def model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        """The packed row length of every model feature (seqio's
        get_model_feature_lengths), in `model_features` order."""
        lengths = self.converter().get_model_feature_lengths(dict(task_feature_lengths))
        return {name: int(lengths[name]) for name in self.model_features}

    def tokens_per_example(self, task_feature_lengths: Mapping[str, int]) -> int:
        """Token positions one row feeds the model: inputs and targets (both responses of
        a preference pair, each after the prompt)."""
        tokens = sum(int(task_feature_lengths[k]) for k in ("inputs", "targets")
                     if k in task_feature_lengths)
        return 2 * tokens if self.name == "preference" else tokens

    def before_packing(self, examples: tf.data.Dataset, task_feature_lengths):
        """(examples, lengths) as the packer sees them: a prefix LM's inputs and targets
        become one decoder sequence first (seqio's own concatenation); other forms pack
        their task features as they are."""
        lengths = dict(task_feature_lengths)
        if self.name != "prefix_lm":
            return examples, lengths
        converter = self.converter()
        examples = examples.map(
            lambda ex: {**converter._concat_and_add_masks(ex), packing.TASK: ex[packing.TASK]},
            num_parallel_calls=tf.data.AUTOTUNE)
        return examples, converter._concat_task_feature_lengths(lengths)


ENCDEC = DataForm(
    "encdec", ("inputs", "targets"),
    ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions", *_DECODER),
    packs=True, text=True, prompt_feature="encoder_input_tokens", prompt_has_eos=True)
PREFIX_LM = DataForm(
    "prefix_lm", ("inputs", "targets"), (*_DECODER, "decoder_causal_attention"),
    packs=True, text=True, prompt_feature="inputs", prompt_has_eos=True)
LM = DataForm("lm", ("targets",), _DECODER, packs=True, text=True, prompt_feature="prompt",
              prompt_has_eos=False)
# Dialogues with the loss on the assistant's tokens (data/chat.py): a decoder-only model
# on a task with `loss_mask` beside `targets`.
CHAT = DataForm("chat", chat.TASK_FEATURES, _DECODER, packs=True, text=True,
                prompt_feature="prompt", prompt_has_eos=False)
PREFERENCE = DataForm("preference", pairs.TASK_FEATURES, pairs.MODEL_FEATURES, packs=False,
                      text=False, prompt_feature=None, prompt_has_eos=False)
FORMS = {form.name: form for form in (ENCDEC, PREFIX_LM, LM, CHAT, PREFERENCE)}


def get(name: str) -> DataForm:
    """The form a store's or stream's manifest (or prepare's --converter) names."""
    if name not in FORMS:
        raise ValueError(f"Unknown data form {name!r}; expected one of {sorted(FORMS)}.")
    return FORMS[name]
