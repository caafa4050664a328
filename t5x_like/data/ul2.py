"""UL2 mixture-of-denoisers (R, X, S) and causal LM as SeqIO preprocessors.

A port of T5's span-corruption machinery (`t5.data.preprocessors` @ e081111c:
`random_spans_helper`, `random_spans_noise_mask`, `noise_span_to_unique_sentinel`,
`split_tokens`, prefix-LM; `reduce_concat_tokens` replaced, see below) to plain
tf.data, so that the `t5` package (which downgrades seqio) stays out of the product.
docs/FORMULAS.md ("UL2 mixture of denoisers") has the semantics and sources; the
numbers are tested in tests/test_ul2.py.

Chain per denoiser, as UL2's `ul2_objective` and T5's `span_corruption` do:
  tokenized documents -> one concatenated token stream cut into chunks of the raw
  length the denoiser needs -> denoise -> prepend the mode token id -> (seqio) EOS.

Deviations from T5/UL2, each deliberate:
- The mode token is one reserved id (`[NLU]` R, `[NLG]` X, `[S2S]` S) prepended to
  the inputs, not the string encoded as text; the raw length is
  computed for `inputs_length - 1` so the mode id never causes truncation.
- `random_spans_helper` applies the same clipping as the noise mask
  (noise in [1, L-1], at least one span) so that its lengths are exact for tiny
  inputs too; for the usual lengths the numbers are T5's (tested).
- S is T5's prefix-LM generalised to a noise density r: the prefix length is uniform
  in [max(1, round((1-2r)(L-1))), L-1]. r=0.5 is exactly T5's `random_prefix_noise_mask`
  (split anywhere); we use r=0.25, i.e. on average the last 25%
  of the chunk is the target and the prefix is never shorter than half the chunk.
  Why 0.25 and not 0.5: UL2 describes S as continuing a long prefix, and with 0.5 a
  quarter of S examples would have a prefix under 25% of the chunk.
- Concatenation streams (`concat_and_split`, a tf.data scan carrying the leftover
  tokens) instead of T5's `reduce_concat_tokens` (padded batches of 128 documents,
  then split). Same token stream, but every chunk is full length except the very
  last one (T5 leaves one short chunk per 128 documents), the first example needs one
  document tokenized instead of 128 (a mixture of 35 tasks starts in seconds), and
  memory does not grow with the longest of 128 documents.
- No `select_random_chunk(max_length=65536)`: it keeps one random 64k chunk of a long
  document and drops the rest; Reka trains a single epoch, so we keep every token.

Determinism: every random choice uses stateless ops seeded through
`seqio.map_over_dataset(num_seeds=...)`, so `get_dataset(seed=...)` reproduces
examples exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from t5x_like.data import mixtures, vocabulary

# S (prefix-LM) noise density: expected fraction of the chunk that becomes targets.
S_NOISE_DENSITY = 0.25

_KINDS = ("R", "X", "S")

# The tf functions here have no tensor-dependent Python control flow, so autograph
# has nothing to convert; skipping it halves the time to build a task's pipeline.
_no_autograph = tf.autograph.experimental.do_not_convert


@dataclasses.dataclass(frozen=True)
class DenoiserSpec:
    """One UL2 denoiser.

    Attributes:
      name: short id used in task names (`r1`, ..., `s`).
      kind: "R" (regular span corruption), "X" (extreme) or "S" (sequential, prefix-LM).
      mean_span: mean noise span length mu for R/X; None for S (one span at the end).
      noise_density: corruption rate r: fraction of the raw chunk that goes to targets.
      mode_token: the paradigm token prepended to inputs: "[NLU]", "[NLG]" or "[S2S]".
    """

    name: str
    kind: str
    mean_span: Optional[float]
    noise_density: float
    mode_token: str

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(
                f"Denoiser {self.name!r}: kind {self.kind!r} is not one of {_KINDS}; "
                "use 'R' or 'X' for span corruption and 'S' for prefix-LM.")
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(
                f"Denoiser {self.name!r}: noise_density {self.noise_density} must be in "
                "(0, 1), e.g. 0.15 for R, 0.5 for X, 0.25 for S.")
        if self.kind == "S":
            if self.mean_span is not None:
                raise ValueError(
                    f"Denoiser {self.name!r}: an S denoiser has one span at the end, so "
                    f"mean_span must be None, got {self.mean_span}.")
        elif self.mean_span is None or self.mean_span < 1:
            raise ValueError(
                f"Denoiser {self.name!r}: kind {self.kind} needs mean_span >= 1, got "
                f"{self.mean_span}.")


# The seven denoisers of UL2 (arXiv 2205.05131 Table 1 as reproduced; docs/FORMULAS.md).
DENOISERS: Mapping[str, DenoiserSpec] = {
    d.name: d for d in (
        DenoiserSpec("r1", "R", 3.0, 0.15, "[NLU]"),
        DenoiserSpec("r2", "R", 8.0, 0.15, "[NLU]"),
        DenoiserSpec("x1", "X", 3.0, 0.5, "[NLG]"),
        DenoiserSpec("x2", "X", 8.0, 0.5, "[NLG]"),
        DenoiserSpec("x3", "X", 64.0, 0.15, "[NLG]"),
        DenoiserSpec("x4", "X", 64.0, 0.5, "[NLG]"),
        DenoiserSpec("s", "S", None, S_NOISE_DENSITY, "[S2S]"),
    )
}


# ----------------------------------------------------------------------------------
# Lengths (host-side Python, mirrors the tf code below exactly)
# ----------------------------------------------------------------------------------


def _num_noise_and_spans(length: int, noise_density: float,
                         mean_span: float) -> tuple[int, int]:
    """Noise tokens and noise spans for a chunk of `length` tokens, as the mask draws them."""
    length = max(length, 2)  # the mask pads degenerate chunks to 2 tokens, then slices
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span), 1)
    return num_noise, num_spans


def random_spans_helper(inputs_length: int,
                        noise_density: float,
                        mean_noise_span_length: float,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> tuple[int, int]:
    """Raw chunk length and targets length so that span corruption fills the inputs.

    Port of T5's `random_spans_helper`. The encoded inputs of a chunk of t tokens hold
    the non-noise tokens, one sentinel per noise span and EOS; the targets hold the noise
    tokens, one sentinel per span and EOS. The raw length is the largest t whose inputs
    fit in `inputs_length`. Both lengths are non-decreasing in t, so shorter chunks (the
    tail of a concatenation) fit as well.

    Args:
      inputs_length: length of the encoded inputs, EOS included.
      noise_density: fraction r of the chunk to corrupt.
      mean_noise_span_length: mean span length mu.
      extra_tokens_per_span_inputs: sentinels per noise span in the inputs.
      extra_tokens_per_span_targets: sentinels per span in the targets.

    Returns:
      (tokens_length, targets_length): raw chunk length and the length of its encoded
      targets, EOS included.
    """

    def lengths(tokens_length):
        num_noise, num_spans = _num_noise_and_spans(tokens_length, noise_density,
                                                    mean_noise_span_length)
        num_nonnoise = tokens_length - num_noise
        return (num_nonnoise + num_spans * extra_tokens_per_span_inputs + 1,
                num_noise + num_spans * extra_tokens_per_span_targets + 1)

    if inputs_length < 2:
        raise ValueError(
            f"random_spans_helper: inputs_length {inputs_length} cannot hold one token "
            "and EOS; use an inputs length of at least 4.")
    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    # Cannot undershoot either: a chunk of inputs_length-1 tokens may encode longer than
    # inputs_length when clipping forces a span onto a tiny chunk.
    while tokens_length > 1 and lengths(tokens_length)[0] > inputs_length:
        tokens_length -= 1
    inputs_len, targets_length = lengths(tokens_length)
    # T5's "minor hack": at r=0.5 trim one raw token so targets == inputs, which is more
    # likely a round number. T5 subtracts 1 from targets; we recompute it, which is the
    # same whenever the trimmed token was a noise token, and never undercounts.
    if noise_density == 0.5 and targets_length > inputs_len:
        tokens_length -= 1
        targets_length = lengths(tokens_length)[1]
    return tokens_length, targets_length


def _min_prefix_length(length: int, noise_density: float) -> int:
    """Shortest S prefix for a chunk of `length` tokens (see `random_prefix_length`)."""
    max_prefix = length - 1
    return min(max_prefix, max(1, round((1 - 2 * noise_density) * (length - 1))))


@dataclasses.dataclass(frozen=True)
class DenoiserLengths:
    """What one denoiser makes of given feature lengths.

    Attributes:
      raw_length: tokens of original text per example (the `split_tokens` length).
      inputs_length: longest encoded inputs (mode token and EOS included).
      targets_length: longest encoded targets (EOS included); the task's targets
        feature length must be at least this.
      num_spans: noise spans in a full-length chunk (sentinels used); 1 for S.
    """

    raw_length: int
    inputs_length: int
    targets_length: int
    num_spans: int


def denoiser_lengths(spec: DenoiserSpec, inputs_length: int) -> DenoiserLengths:
    """Raw chunk length and the longest inputs/targets `spec` produces.

    Args:
      spec: the denoiser.
      inputs_length: the task's `inputs` feature length (mode token and EOS included).

    Returns:
      The DenoiserLengths for full-length chunks (shorter chunks produce shorter
      features).
    """
    if spec.kind == "S":
        # inputs = mode + prefix (at most raw-1 tokens) + EOS.
        raw = inputs_length - 1
        if raw < 2:
            raise ValueError(
                f"Denoiser {spec.name!r} (S) needs an inputs length of at least 3 (mode "
                f"token, one prefix token, EOS), got {inputs_length}.")
        targets = raw - _min_prefix_length(raw, spec.noise_density) + 1
        return DenoiserLengths(raw, raw + 1, targets, 1)
    # One input position goes to the mode token; the rest is T5's arithmetic.
    raw, targets = random_spans_helper(inputs_length - 1, spec.noise_density,
                                       spec.mean_span)
    num_noise, num_spans = _num_noise_and_spans(raw, spec.noise_density, spec.mean_span)
    return DenoiserLengths(raw, 1 + raw - num_noise + num_spans + 1, targets, num_spans)


def _min_inputs_length(spec: DenoiserSpec) -> int:
    """Smallest inputs length for which `spec` denoises chunks of at least 2 tokens."""
    for inputs_length in range(3, 64):
        try:
            if denoiser_lengths(spec, inputs_length).raw_length >= 2:
                return inputs_length
        except ValueError:
            continue
    raise AssertionError(f"no inputs length below 64 works for {spec}")


def validate_feature_lengths(specs: Sequence[DenoiserSpec] | DenoiserSpec,
                             feature_lengths: Optional[Mapping[str, int]],
                             extra_ids: Optional[int] = None
                             ) -> dict[str, DenoiserLengths]:
    """Checks that every denoiser's examples fit `feature_lengths` without truncation,
    and (given the vocabulary's `extra_ids`) that it has a sentinel for every span.

    X denoisers need long targets (docs/FORMULAS.md): with inputs of 512, r=0.5 needs
    targets of 512; and many sentinels: x1 cuts 127 spans at inputs 512, 511 at 2048.
    Call this at start-up; the preprocessors call it too.

    Args:
      specs: one denoiser or several.
      feature_lengths: {"inputs": int, "targets": int}, the task feature lengths.
      extra_ids: the vocabulary's extra ids (sentinels); None skips that check.

    Returns:
      {denoiser name: DenoiserLengths}.

    Raises:
      ValueError: naming the denoiser, the length it needs and the length given, or the
        sentinels it needs and the extra ids there are.
    """
    if isinstance(specs, DenoiserSpec):
        specs = [specs]
    names = [s.name for s in specs]
    if not feature_lengths or "inputs" not in feature_lengths or (
        "targets" not in feature_lengths):
        raise ValueError(
            f"UL2 denoisers {names} need feature lengths for 'inputs' and 'targets', "
            f"got {feature_lengths!r}; pass e.g. sequence_length={{'inputs': 512, "
            "'targets': 512}} (TASK_FEATURE_LENGTHS in gin).")
    inputs_length = int(feature_lengths["inputs"])
    targets_length = int(feature_lengths["targets"])
    out, too_short = {}, []
    for spec in specs:
        needed = _min_inputs_length(spec)
        if inputs_length < needed:
            raise ValueError(
                f"Denoiser {spec.name!r} ({spec.kind}, mean span {spec.mean_span}, noise "
                f"density {spec.noise_density}) needs an inputs length of at least "
                f"{needed}, got {inputs_length}; raise TASK_FEATURE_LENGTHS['inputs'].")
        lengths = denoiser_lengths(spec, inputs_length)
        if lengths.targets_length > targets_length:
            too_short.append((spec, lengths.targets_length))
        out[spec.name] = lengths
    if too_short:
        # Name every denoiser that does not fit, so one run shows the whole fix.
        each = "; ".join(
            f"denoiser {spec.name!r} ({spec.kind}, mean span {spec.mean_span}, noise "
            f"density {spec.noise_density}) needs a targets length of at least {needed}"
            for spec, needed in too_short)
        worst = max(needed for _, needed in too_short)
        raise ValueError(
            f"With inputs length {inputs_length}, {each}; got {targets_length}. Set "
            f"TASK_FEATURE_LENGTHS['targets'] >= {worst} (X denoisers need targets about "
            f"as long as inputs) or give {[s.name for s, _ in too_short]} a rate of 0 in "
            "the mixture.")
    if extra_ids is not None:
        check_sentinel_budget(specs, inputs_length, extra_ids)
    return out


def sentinel_budget(specs: Sequence[DenoiserSpec], inputs_length: int) -> dict[str, int]:
    """Sentinels each R/X denoiser uses at most at this inputs length: one per noise
    span of a full-length chunk ({} for S, which marks no span)."""
    return {spec.name: denoiser_lengths(spec, inputs_length).num_spans
            for spec in specs if spec.kind != "S"}


def check_sentinel_budget(specs: Sequence[DenoiserSpec], inputs_length: int,
                          extra_ids: int) -> None:
    """Raises ValueError when a denoiser would need more sentinels than the vocabulary
    has extra ids: span k gets id vocab_size-1-k, so spans past the extra ids would get
    ordinary pieces' ids and read as text (T5 lets that happen silently; we do not)."""
    over = {name: n for name, n in sentinel_budget(specs, inputs_length).items()
            if n > extra_ids}
    if over:
        by_name = {spec.name: spec for spec in specs}
        each = "; ".join(
            f"denoiser {name!r} ({by_name[name].kind}, mean span {by_name[name].mean_span}, "
            f"noise density {by_name[name].noise_density}) needs {n} sentinels"
            for name, n in over.items())
        raise ValueError(
            f"With inputs length {inputs_length}, {each}, one per noise span, but the "
            f"vocabulary has {extra_ids} extra ids (sentinels): spans past them would reuse "
            f"ordinary token ids. Use a vocabulary with at least {max(over.values())} extra "
            f"ids (t5x_like.data.vocabulary.get_vocabulary() has {vocabulary.NUM_EXTRA_IDS}, "
            "enough for inputs up to 2048), shorter inputs, or give "
            f"{sorted(over)} a rate of 0 in the mixture.")


# ----------------------------------------------------------------------------------
# Single-example tf ops
# ----------------------------------------------------------------------------------


def _random_segmentation(num_items, num_segments, seed):
    """Splits `num_items` into `num_segments` positive lengths, all splits equally likely."""
    first_in_segment = tf.pad(
        seqio.stateless_shuffle(
            tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32), seed),
        [[1, 0]])
    segment_id = tf.cumsum(first_in_segment)
    return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)


def random_spans_noise_mask(length, noise_density: float, mean_span: float,
                            seeds) -> tf.Tensor:
    """Boolean mask [length] of noise spans, T5's `random_spans_noise_mask`.

    num_noise = clip(round(L*r), 1, L-1); num_spans = max(round(num_noise/mu), 1);
    noise and non-noise tokens are each cut at random into num_spans pieces that
    alternate, starting with non-noise (so with one span the noise sits at the end).

    Args:
      length: int32 scalar, tokens in the chunk.
      noise_density: r.
      mean_span: mu.
      seeds: int32 [2, 2], two stateless seeds.
    """
    orig_length = length
    length = tf.maximum(length, 2)  # avoid degenerate 0/1-token chunks, slice back below
    num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
    num_noise = tf.minimum(tf.maximum(num_noise, 1), length - 1)
    num_spans = tf.cast(
        tf.round(tf.cast(num_noise, tf.float32) / mean_span), tf.int32)
    num_spans = tf.maximum(num_spans, 1)
    num_nonnoise = length - num_noise
    noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
    nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, seeds[1])
    interleaved = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1),
                             [num_spans * 2])
    span_starts = tf.cumsum(interleaved)[:-1]
    span_start_indicator = tf.math.unsorted_segment_sum(
        tf.ones_like(span_starts), span_starts, length)
    span_num = tf.cumsum(span_start_indicator)
    return tf.equal(span_num % 2, 1)[:orig_length]


def random_prefix_length(length, noise_density: float, seed) -> tf.Tensor:
    """S denoiser split point: uniform in [max(1, round((1-2r)(L-1))), L-1].

    T5's `random_prefix_noise_mask` is the r=0.5 case (uniform in [1, L-1]); its mask is
    `range(L) < prefix_length`. A 1-token chunk gets prefix 0 (all target), as in T5.

    Args:
      length: int32 scalar, tokens in the chunk.
      noise_density: r, the expected fraction of the chunk in the targets.
      seed: int32 [2].
    """
    max_prefix = length - 1
    min_prefix = tf.cast(
        tf.round((1.0 - 2.0 * noise_density) * tf.cast(length - 1, tf.float32)),
        tf.int32)
    min_prefix = tf.minimum(max_prefix, tf.maximum(min_prefix, 1))
    return tf.random.stateless_uniform([], minval=min_prefix, maxval=max_prefix + 1,
                                       dtype=tf.int32, seed=seed)


def noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size: int) -> tf.Tensor:
    """Replaces each noise span by one sentinel; span k gets vocab_size-1-k (T5)."""
    prev_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
    first_noise = tf.logical_and(noise_mask, tf.logical_not(prev_is_noise))
    subsequent_noise = tf.logical_and(noise_mask, prev_is_noise)
    sentinel = vocab_size - tf.cumsum(tf.cast(first_noise, tokens.dtype))
    tokens = tf.where(first_noise, sentinel, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(subsequent_noise))


def denoise_tokens(tokens, spec: DenoiserSpec, *, vocab_size: int, mode_id: int,
                   seed) -> dict[str, tf.Tensor]:
    """Turns one raw chunk into {"inputs", "targets"} for `spec` (no EOS yet).

    R/X: inputs = [mode] + chunk with each noise span replaced by a sentinel;
    targets = sentinel_0 span_0 sentinel_1 span_1 ... (T5 span corruption).
    S: inputs = [mode] + prefix; targets = the rest of the chunk.

    Args:
      tokens: int32 [L] chunk of token ids.
      spec: the denoiser.
      vocab_size: vocabulary size; sentinels count down from vocab_size-1.
      mode_id: id of spec.mode_token.
      seed: int32 [2] stateless seed.
    """
    tokens = tf.convert_to_tensor(tokens)
    length = tf.size(tokens)
    mode = tf.constant([mode_id], tokens.dtype)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    if spec.kind == "S":
        prefix = random_prefix_length(length, spec.noise_density, seeds[0])
        return {"inputs": tf.concat([mode, tokens[:prefix]], 0), "targets": tokens[prefix:]}
    mask = random_spans_noise_mask(length, spec.noise_density, spec.mean_span, seeds)
    inputs = noise_span_to_unique_sentinel(tokens, mask, vocab_size)
    targets = noise_span_to_unique_sentinel(tokens, tf.logical_not(mask), vocab_size)
    return {"inputs": tf.concat([mode, inputs], 0), "targets": targets}


# ----------------------------------------------------------------------------------
# Dataset-level preprocessors
# ----------------------------------------------------------------------------------


def split_tokens(dataset: tf.data.Dataset, max_tokens_per_segment: int,
                 feature_key: str = "targets") -> tf.data.Dataset:
    """Splits each example's `feature_key` into pieces of `max_tokens_per_segment`.

    T5's `split_tokens` with a fixed length: only the last piece of an example may be
    shorter; empty examples are dropped; other features are dropped.
    """
    if max_tokens_per_segment < 1:
        raise ValueError(
            f"split_tokens: max_tokens_per_segment must be >= 1, got "
            f"{max_tokens_per_segment}.")
    length = max_tokens_per_segment

    @_no_autograph
    def _split(x):
        tokens = x[feature_key]
        n = tf.size(tokens)
        num_segments = (n + length - 1) // length
        padding = num_segments * length - n
        padded = tf.pad(tokens, [[0, padding]])
        lengths = tf.concat([tf.fill([num_segments - 1], length), [length - padding]], 0)
        return tf.reshape(padded, [num_segments, length]), lengths

    @_no_autograph
    def _strip(segment, segment_length):
        return {feature_key: segment[:segment_length]}

    @_no_autograph
    def _non_empty(x):
        return tf.size(x[feature_key]) > 0

    dataset = dataset.filter(_non_empty)
    dataset = dataset.map(_split, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.unbatch()
    return dataset.map(_strip, num_parallel_calls=tf.data.AUTOTUNE)


def concat_and_split(dataset: tf.data.Dataset, raw_length: int,
                     feature_key: str = "targets") -> tf.data.Dataset:
    """Documents -> one token stream -> chunks of exactly `raw_length` tokens.

    Lossless and in order; only the chunk at the very end of a finite dataset may be
    shorter. A scan carries the tokens left over after cutting full chunks (fewer than
    `raw_length`) from one document to the next; a final flush element emits them.
    Other features are dropped.
    """
    if raw_length < 1:
        raise ValueError(f"concat_and_split: raw_length must be >= 1, got {raw_length}.")
    dtype = dataset.element_spec[feature_key].dtype

    @_no_autograph
    def not_last(x):
        return x[feature_key], False

    @_no_autograph
    def step(leftover, element):
        tokens, is_last = element
        stream = tf.concat([leftover, tokens], 0)
        n = tf.size(stream)
        cut = tf.where(is_last, n, n // raw_length * raw_length)
        return stream[cut:], stream[:cut]

    @_no_autograph
    def non_empty(tokens):
        return tf.size(tokens) > 0

    @_no_autograph
    def as_features(tokens):
        return {feature_key: tokens}

    flush = tf.data.Dataset.from_tensors((tf.zeros([0], dtype), True))
    pieces = dataset.map(not_last).concatenate(flush).scan(tf.zeros([0], dtype), step)
    pieces = pieces.filter(non_empty).map(as_features)
    return split_tokens(pieces, raw_length, feature_key)


def _targets_vocabulary(output_features, name: str):
    if output_features is None or "targets" not in output_features:
        raise ValueError(
            f"{name} needs output_features with a 'targets' feature, got "
            f"{output_features!r}; use it as a preprocessor of a seqio.Task.")
    return output_features["targets"].vocabulary


def ul2_denoise(dataset: tf.data.Dataset,
                sequence_length: Optional[Mapping[str, int]],
                output_features: Mapping[str, seqio.Feature],
                *,
                spec: DenoiserSpec,
                mode_tokens: Mapping[str, int]) -> tf.data.Dataset:
    """SeqIO preprocessor: tokenized documents in "targets" -> one UL2 denoiser's examples.

    Use after `seqio.preprocessors.tokenize` and before `seqio.preprocessors.append_eos`,
    bound with functools.partial(ul2_denoise, spec=..., mode_tokens=MODE_TOKENS).

    Args:
      dataset: examples with int32 token ids in "targets".
      sequence_length: the task feature lengths {"inputs", "targets"} (seqio passes
        them); they fix the raw chunk length and are validated.
      output_features: the task's output features (seqio passes them); the targets
        vocabulary gives vocab_size for the sentinels.
      spec: the denoiser.
      mode_tokens: {"[NLU]": id, "[NLG]": id, "[S2S]": id}.

    Returns:
      A dataset of {"inputs", "targets"} int32 without EOS.
    """
    vocab = _targets_vocabulary(output_features, f"Denoiser {spec.name!r}")
    lengths = validate_feature_lengths(spec, sequence_length,
                                       getattr(vocab, "extra_ids", 0))[spec.name]
    if "inputs" in output_features and (
        output_features["inputs"].vocabulary != vocab):
        raise ValueError(
            f"Denoiser {spec.name!r} builds inputs from the targets' tokens, so the "
            "'inputs' and 'targets' features must share one vocabulary; got "
            f"{output_features['inputs'].vocabulary} and {vocab}.")
    if spec.mode_token not in mode_tokens:
        raise ValueError(
            f"Denoiser {spec.name!r}: mode token {spec.mode_token!r} is not in "
            f"mode_tokens {dict(mode_tokens)}; pass t5x_like.data.vocabulary.MODE_TOKENS.")
    mode_id = int(mode_tokens[spec.mode_token])
    vocab_size = int(vocab.vocab_size)

    dataset = concat_and_split(dataset, lengths.raw_length)

    @seqio.map_over_dataset(num_seeds=1)
    @_no_autograph
    def _denoise(x, seed):
        return denoise_tokens(x["targets"], spec, vocab_size=vocab_size, mode_id=mode_id,
                              seed=seed)

    return _denoise(dataset)


def causal_lm(dataset: tf.data.Dataset,
              sequence_length: Optional[Mapping[str, int]],
              output_features: Mapping[str, seqio.Feature],
              *, document_boundaries: bool = True) -> tf.data.Dataset:
    """SeqIO preprocessor: tokenized documents -> causal LM examples of at most the
    targets length, EOS after each document. Do not append EOS again.

    document_boundaries=True (Llama 3's training): each document is cut into pieces of
      the targets length (the last one shorter) and each piece is one example, so the
      packed feature converter makes every piece its own segment: attention and RoPE
      positions never cross a document boundary. Packing then leaves some padding.
    document_boundaries=False: T5's `full_lm` (GPT-3, PaLM): documents concatenated
      into one stream and cut into chunks of exactly the targets length (only the last
      chunk of a finite dataset may be shorter): no padding, but a chunk's tokens attend
      to the end of the previous document.
    """
    if not sequence_length or "targets" not in sequence_length:
        raise ValueError(
            "causal_lm needs a feature length for 'targets', got "
            f"{sequence_length!r}; pass e.g. sequence_length={{'targets': 1024}}.")
    targets_length = int(sequence_length["targets"])
    if targets_length < 2:
        raise ValueError(
            f"causal_lm: targets length {targets_length} is too short to predict "
            "anything; use at least 2.")
    _targets_vocabulary(output_features, "causal_lm")
    dataset = seqio.preprocessors.append_eos(dataset, output_features)
    if document_boundaries:
        return split_tokens(dataset, targets_length)
    return concat_and_split(dataset, targets_length)


def make_denoiser_preprocessor(spec: DenoiserSpec, mode_tokens: Mapping[str, int]):
    """`ul2_denoise` bound to one denoiser, ready for a seqio.Task preprocessor list."""
    return functools.partial(ul2_denoise, spec=spec, mode_tokens=dict(mode_tokens))


def denoiser_of(task: seqio.Task) -> Optional[DenoiserSpec]:
    """The UL2 denoiser a task applies (from its preprocessor list), or None."""
    for preprocessor in task.preprocessors:
        if isinstance(preprocessor, functools.partial) and preprocessor.func is ul2_denoise:
            return preprocessor.keywords["spec"]
    return None


def validate_mixture_lengths(name: str, feature_lengths: Mapping[str, int]
                             ) -> dict[str, DenoiserLengths]:
    """Start-up check, before any data is made: every UL2 denoiser of a task or mixture
    fits `feature_lengths` and has a sentinel for every span in its tasks' vocabulary.

    Raises the `validate_feature_lengths` error, prefixed with `name`. Returns
    {denoiser: DenoiserLengths} ({} for tasks/mixtures without UL2 denoisers).
    """
    tasks = [t for t in mixtures.leaf_tasks(name) if denoiser_of(t)]
    if not tasks:
        return {}
    specs = {denoiser_of(t).name: denoiser_of(t) for t in tasks}
    extra_ids = min(getattr(t.output_features["targets"].vocabulary, "extra_ids", 0)
                    for t in tasks)
    try:
        return validate_feature_lengths(list(specs.values()), feature_lengths, extra_ids)
    except ValueError as e:
        raise ValueError(f"{name!r}: {e}") from None
