"""SeqIO registrations of preference pairs built from the shipped corpus.

Importing registers (no file I/O):
- Task `{domain}_preference`: per document of at least PROMPT_TOKENS +
  CONTINUATION_TOKENS tokens, the prompt = its first PROMPT_TOKENS tokens, chosen =
  the true continuation, rejected = that continuation with a share of its tokens replaced
  by other tokens of the document, the share set by the pair's rating (0..3, from a hash
  of the text; t5x_like/data/pairs.py, CORRUPTION_BY_RATING). Splits train and
  validation, from the corpus's own splits, so held-out pairs come from held-out
  documents.
- Mixture `reka_preference`: the five domains at equal rates.
- Mixture `reka_safety_preference`: the SAFETY_DOMAINS' pairs only, the demo's stand-in
  for Llama 2's safety preference data (a second reward model trained on it scores the
  RLHF demo's safety prompts, those of the same domains).

Features: `inputs` (no EOS), `targets` and `rejected` (EOS appended), `rating` [1];
TASK_FEATURE_LENGTHS = PREFERENCE_FEATURE_LENGTHS.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Union

import seqio

from t5x_like.data import documents, pairs
from t5x_like.data import vocabulary as vocabulary_lib
from tasks import reka_mix

PROMPT_TOKENS = 32
CONTINUATION_TOKENS = 32
# The demo's stand-in for safety prompts and safety preference data (module docstring).
SAFETY_DOMAINS = ("web", "multilingual")
PREFERENCE_FEATURE_LENGTHS = {"inputs": PROMPT_TOKENS, "targets": CONTINUATION_TOKENS + 1,
                              "rejected": CONTINUATION_TOKENS + 1, "rating": 1}


def preference_task_name(domain: str) -> str:
    return f"{domain}_preference"


def register_tasks(corpus_dir: Union[str, pathlib.Path, None] = None, seed: int = 0) -> None:
    """(Re)registers `{domain}_preference` over `corpus_dir` (default: the shipped
    corpus) and the `reka_preference` mixture."""
    corpus_dir = pathlib.Path(corpus_dir or reka_mix.DEFAULT_CORPUS_DIR)
    vocab = vocabulary_lib.get_vocabulary()
    features = {"inputs": seqio.Feature(vocab, add_eos=False),
                "targets": seqio.Feature(vocab, add_eos=True),
                "rejected": seqio.Feature(vocab, add_eos=True),
                "rating": seqio.Feature(seqio.PassThroughVocabulary(4), add_eos=False)}
    keep_text = functools.partial(seqio.preprocessors.rekey,
                                  key_map={"targets": "text", "text": "text"})
    tokenize = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)
    for domain in reka_mix.DOMAINS:
        name = preference_task_name(domain)
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name, source=reka_mix.make_source(corpus_dir, domain), output_features=features,
            preprocessors=[
                documents.filter_documents, keep_text, tokenize,
                pairs.corrupted_continuation_pairs(PROMPT_TOKENS,
                                                             CONTINUATION_TOKENS, seed),
                seqio.preprocessors.append_eos,
            ],
            metric_fns=[])
    seqio.MixtureRegistry.remove("reka_preference")
    seqio.MixtureRegistry.add("reka_preference",
                              [(preference_task_name(d), 1.0) for d in reka_mix.DOMAINS])
    seqio.MixtureRegistry.remove("reka_safety_preference")
    seqio.MixtureRegistry.add("reka_safety_preference",
                              [(preference_task_name(d), 1.0) for d in SAFETY_DOMAINS])


register_tasks()
