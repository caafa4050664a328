"""SeqIO's feature converters for a vocabulary whose id 0 is a real token.

SeqIO reads id 0 as padding: its converters give a 0 target no loss weight
(`non_padding_position`), and unpacked rows carry no segment ids, so the model reads
their padding from the tokens. In a `tokenizer.json` vocabulary id 0 is a real token
(Llama 3's "!"). `ZeroIsTokenConverter` wraps a converter: every token id is raised by
one before SeqIO sees it (so SeqIO's padding 0 is only padding), and lowered again in
the rows it makes, clamped at 0 (padding and the shifted-in start token stay 0);
loss weights, segment ids, positions and prefix-LM attention are then SeqIO's own, made
from the true lengths. Unpacked rows also get segment ids (1 on tokens, 0 on padding),
so padding travels with them to the model. Both of the ways rows are made go through
it: the converter called on examples (`__call__`) and per packed row
(`_convert_example`, data/pipeline.py's pool packer, whose rows carry segment ids).
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

# Task features holding token ids (raised by one), and the model features made of them
# with the segment-id feature an unpacked row gets for each.
_TASK_TOKENS = ("inputs", "targets")
_MODEL_TOKENS = {"decoder_target_tokens": "decoder_segment_ids",
                 "encoder_input_tokens": "encoder_segment_ids",
                 "decoder_input_tokens": None}


def _shift(ex: Mapping[str, tf.Tensor], segments: Mapping[str, tf.Tensor] | None = None):
    """Token features raised by one (within a packed row: where its segment id is set)."""
    out = dict(ex)
    for name in _TASK_TOKENS:
        if name in ex:
            tokens = tf.cast(ex[name], tf.int32)
            segment = None if segments is None else segments.get(f"{name}_segment_ids")
            out[name] = tokens + 1 if segment is None else tf.where(segment != 0, tokens + 1, 0)
    return out


def _unshift(row: Mapping[str, tf.Tensor], add_segments: bool):
    out = dict(row)
    for name, segment_name in _MODEL_TOKENS.items():
        if name not in row:
            continue
        if add_segments and segment_name and segment_name not in row:
            out[segment_name] = tf.cast(row[name] != 0, tf.int32)
        out[name] = tf.maximum(row[name] - 1, 0)
    return out


class ZeroIsTokenConverter:
    """A SeqIO feature converter (`inner`) for a vocabulary whose id 0 is a real token:
    the same rows, with id 0 weighted, attended and counted like any other token (see
    the module doc). Anything else is the inner converter's."""

    def __init__(self, inner: seqio.FeatureConverter):
        self.inner = inner

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
                 ) -> tf.data.Dataset:
        ds = ds.map(_shift, num_parallel_calls=tf.data.AUTOTUNE)
        rows = self.inner(ds, task_feature_lengths)
        add_segments = not self.inner.pack
        return rows.map(lambda row: _unshift(row, add_segments),
                        num_parallel_calls=tf.data.AUTOTUNE)

    def _convert_example(self, row: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """One packed row (task features with their `*_segment_ids`) to model features."""
        shifted = _shift(row, {k: v for k, v in row.items() if k.endswith("_segment_ids")})
        return _unshift(self.inner._convert_example(shifted), add_segments=False)

    def __getattr__(self, name):
        return getattr(self.inner, name)
