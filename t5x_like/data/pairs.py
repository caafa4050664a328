"""Preference pairs as SeqIO data: the feature converter and pairs built from documents.

`PreferenceFeatureConverter` (forms.PREFERENCE) turns a preference example
(task features `inputs` = prompt, `targets` = chosen response, `rejected`, `rating`
0..3; objectives/preference.py) into one unpacked row of model features: `chosen_tokens` /
`rejected_tokens` = prompt + response, right-padded to `inputs + targets` positions,
`chosen_response` / `rejected_response` marking the response's positions (1) within
them, `chosen_segment_ids` / `rejected_segment_ids` marking the prompt's and the
response's (1; 0 on padding), and `rating` [1]. Padding is carried by the segment ids,
never read from the tokens: id 0 is a real token in some vocabularies (Llama 3's "!").

`corrupted_continuation_pairs` builds such pairs from plain documents (the shipped
corpus): the prompt is a document's first tokens, the chosen response its true
continuation, the rejected one the same continuation with a share of its tokens
replaced by other tokens of the document; the larger the share, the higher the rating
(CORRUPTION_BY_RATING).
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

# Llama 2's four rating levels of a preference (how much better the chosen response is).
NUM_RATINGS = 4
RATING_NAMES = ("negligibly better / unsure", "slightly better", "better",
                "significantly better")

# Share of the continuation's tokens replaced in the rejected response, by rating.
CORRUPTION_BY_RATING = (1.0 / 16.0, 0.25, 0.5, 1.0)
# The task's features and a row's (forms.PREFERENCE): one unpacked pair per row.
TASK_FEATURES = ("inputs", "targets", "rejected", "rating")
MODEL_FEATURES = ("chosen_tokens", "chosen_response", "chosen_segment_ids", "rejected_tokens",
                  "rejected_response", "rejected_segment_ids", "rating")


class PreferenceFeatureConverter(seqio.FeatureConverter):
    """Preference examples to unpacked rows of prompt + response (see the module doc).
    Pairs are never packed: both responses of a pair share one row index."""

    TASK_FEATURES = {name: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
                     for name in TASK_FEATURES}
    MODEL_FEATURES = {name: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
                      for name in MODEL_FEATURES}
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, **kwargs):
        kwargs["pack"] = False
        super().__init__(**kwargs)

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        length = self.get_model_feature_lengths(task_feature_lengths)["chosen_tokens"]

        def row(prompt, response):
            tokens = tf.concat([prompt, response], 0)[:length]
            marks = tf.concat([tf.zeros_like(prompt), tf.ones_like(response)], 0)[:length]
            pad = [[0, length - tf.size(tokens)]]
            return (tf.pad(tokens, pad), tf.pad(marks, pad),
                    tf.pad(tf.ones_like(tokens), pad))

        def convert(ex):
            out = {"rating": tf.reshape(tf.cast(ex["rating"], tf.int32)[:1], [1])}
            for side, response in (("chosen", ex["targets"]), ("rejected", ex["rejected"])):
                (out[f"{side}_tokens"], out[f"{side}_response"],
                 out[f"{side}_segment_ids"]) = row(ex["inputs"], response)
            return out

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                  ) -> dict[str, int]:
        missing = [k for k in ("inputs", "targets", "rejected") if k not in task_feature_lengths]
        if missing:
            raise ValueError(
                f"Preference data needs task feature lengths for {missing} (got "
                f"{dict(task_feature_lengths)}); e.g. TASK_FEATURE_LENGTHS = {{'inputs': 32, "
                "'targets': 33, 'rejected': 33, 'rating': 1}.")
        if task_feature_lengths["rejected"] > task_feature_lengths["targets"]:
            raise ValueError(
                f"Preference data: rejected length {task_feature_lengths['rejected']} exceeds "
                f"targets length {task_feature_lengths['targets']}; both responses share one "
                "row length (inputs + targets), so set them equal.")
        length = int(task_feature_lengths["inputs"]) + int(task_feature_lengths["targets"])
        return {name: 1 if name == "rating" else length for name in MODEL_FEATURES}


def corrupted_continuation_pairs(prompt_tokens: int, continuation_tokens: int,
                                 seed: int = 0):
    """A SeqIO preprocessor (after tokenizing the document into `targets`): documents of
    at least prompt + continuation tokens become preference pairs (module doc). The
    rating and the replaced positions are a deterministic function of the text and
    `seed`; a replaced token is one drawn from the document's prompt and continuation, so
    a rejected response has the document's vocabulary but not its order."""

    def make(ex):
        tokens = ex["targets"]
        key = tf.strings.to_hash_bucket_fast(ex["text"], 2**31 - 1)
        rng = tf.stack([tf.cast(key, tf.int64), tf.constant(seed, tf.int64)])
        rating = tf.math.floormod(key, NUM_RATINGS)
        share = tf.gather(tf.constant(CORRUPTION_BY_RATING, tf.float32), rating)
        prompt = tokens[:prompt_tokens]
        chosen = tokens[prompt_tokens:prompt_tokens + continuation_tokens]
        pool = tokens[:prompt_tokens + continuation_tokens]
        draws = tf.random.stateless_uniform([continuation_tokens], rng)
        replace = draws < share
        replace = tf.tensor_scatter_nd_update(  # at least one replaced token
            replace, [[tf.argmin(draws, output_type=tf.int32)]], [True])
        others = tf.random.stateless_uniform([continuation_tokens], rng + 1, maxval=tf.size(pool),
                                             dtype=tf.int32)
        rejected = tf.where(replace, tf.gather(pool, others), chosen)
        return {"inputs": prompt, "targets": chosen, "rejected": rejected,
                "rating": tf.reshape(tf.cast(rating, tf.int32), [1]),
                "text": ex["text"]}

    def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
        ds = ds.filter(lambda ex: tf.size(ex["targets"]) >= prompt_tokens + continuation_tokens)
        return ds.map(make, num_parallel_calls=tf.data.AUTOTUNE)

    return preprocess
