"""SeqIO registrations of the Reka-style corpus mix: UL2, causal LM and validation tasks.

Importing registers (no file I/O; datasets are built only by get_dataset):
- Task `{domain}_ul2_{denoiser}` for each domain x UL2 denoiser (features inputs,
  targets; t5x_like/data/ul2.py),
- Task `{domain}_causal` (feature targets; each document its own example(s), EOS at
  its end, so that packing keeps documents apart, as Llama 3 trains) and
  `{domain}_causal_concat` (documents concatenated with EOS between them and cut into
  full rows, T5's `full_lm`, as GPT-3 and PaLM train),
- Task `{domain}_validation`: one example per document, `targets` = its tokens
  (no EOS, no chunking) and `num_chars` = Python len() of its text, for bits per
  character (docs/FORMULAS.md). Use it with split="validation" and sequence_length=None.
- Mixture `{domain}_ul2` over the denoisers, `reka_mix_ul2` over the domains,
  `reka_mix_causal` and `reka_mix_causal_concat` over the causal tasks; `{domain}_upalm`
  and `reka_mix_upalm` the
  same with U-PaLM's denoiser rates.

Domains and names are pinned in docs/ARCHITECTURE.md. Every source document that is
empty (only whitespace) or not valid UTF-8 is dropped before tokenizing
(`t5x_like.data.documents.filter_documents`); `count_skipped` counts them with the same
predicate.

Rates are plain Python (`register_mixtures`); a gin file picks a registered mixture by
name, and a user module can register other rates under a new name. Example:
    import tasks  # registers
    ds = seqio.get_dataset("reka_mix_ul2", {"inputs": 512, "targets": 512},
                           feature_converter=seqio.EncDecFeatureConverter(pack=True),
                           split="train", shuffle=True, seed=0, num_epochs=1)
"""

from __future__ import annotations

import functools
import logging
import pathlib
from typing import Mapping, Optional, Union

import seqio
import tensorflow as tf

from t5x_like.data import documents, mixtures, ul2
from t5x_like.data import vocabulary as vocabulary_lib

DOMAINS = ("code", "stem", "web", "math", "multilingual")
SPLITS = ("train", "validation")
DEFAULT_CORPUS_DIR = pathlib.Path(__file__).resolve().parent.parent / "data" / "corpus"

# UL2 default (docs/FORMULAS.md, "UL2"): S at 0.2, the six R/X denoisers share 0.8
# equally.
UL2_RATES: Mapping[str, float] = {
    **{name: 0.8 / 6 for name in ("r1", "r2", "x1", "x2", "x3", "x4")}, "s": 0.2}
# U-PaLM's UL2R (arXiv 2210.11399 section 2.3): 50% S, 25% R (mu=3, r=0.15 = r1),
# 25% X. U-PaLM's X (mu=32 or r=0.5) is not in the UL2 table, so its 25% is shared
# equally by the four X denoisers here.
UPALM_RATES: Mapping[str, float] = {
    "r1": 0.25, "x1": 0.0625, "x2": 0.0625, "x3": 0.0625, "x4": 0.0625, "s": 0.5}
DENOISER_RATE_PRESETS: Mapping[str, Mapping[str, float]] = {
    "ul2": UL2_RATES, "upalm": UPALM_RATES}
# Reka's report (code 25, STEM 30, web 25, math 10, multilingual 15) sums to 105;
# register_mixtures divides by the sum and logs it.
REKA_DOMAIN_RATES: Mapping[str, float] = {
    "code": 25.0, "stem": 30.0, "web": 25.0, "math": 10.0, "multilingual": 15.0}

# What the last register_* calls used, so that re-registering tasks keeps the rates.
_state = {"corpus_dir": DEFAULT_CORPUS_DIR,
          "mixtures": {"ul2": (UL2_RATES, REKA_DOMAIN_RATES),
                       "upalm": (UPALM_RATES, REKA_DOMAIN_RATES)}}


def ul2_task_name(domain: str, denoiser: str) -> str:
    return f"{domain}_ul2_{denoiser}"


def domain_mixture_name(domain: str, name: str = "ul2") -> str:
    return f"{domain}_{name}"


def causal_task_name(domain: str, document_boundaries: bool = True) -> str:
    return f"{domain}_causal" if document_boundaries else f"{domain}_causal_concat"


def validation_task_name(domain: str) -> str:
    return f"{domain}_validation"


# ----------------------------------------------------------------------------------
# Source and document filter
# ----------------------------------------------------------------------------------


def make_source(corpus_dir: Union[str, pathlib.Path], domain: str) -> seqio.DataSource:
    """The gzipped-TFRecord source of one domain: {"text": bytes} per document."""
    corpus_dir = pathlib.Path(corpus_dir)
    return seqio.TFExampleDataSource(
        split_to_filepattern={
            split: str(corpus_dir / domain / f"{split}-*-of-*.tfrecord.gz")
            for split in SPLITS},
        feature_description={"text": tf.io.FixedLenFeature([], tf.string)},
        reader_cls=functools.partial(tf.data.TFRecordDataset, compression_type="GZIP"),
    )


def count_skipped(domain: str, split: str,
                  corpus_dir: Optional[Union[str, pathlib.Path]] = None
                  ) -> dict[str, int]:
    """Counts the documents the tasks of `domain` drop, reading the source once.

    Args:
      domain: one of DOMAINS.
      split: "train" or "validation".
      corpus_dir: the corpus root; default: the one the tasks are registered with.

    Returns:
      {"documents": all documents, "kept": used, "empty": ..., "non_utf8": ...}.
    """
    _check_name(domain, DOMAINS, "domain")
    _check_name(split, SPLITS, "split")
    out = documents.count_skipped(make_source(corpus_dir or _state["corpus_dir"], domain),
                                  split)
    if out["kept"] != out["documents"]:
        logging.warning("%s/%s: skipped %d empty and %d non-UTF-8 documents of %d.",
                        domain, split, out["empty"], out["non_utf8"], out["documents"])
    return out


def skipped_documents(name: str, split: str) -> dict[str, dict[str, int]]:
    """`count_skipped` for every domain a registered task or mixture reads.

    For the prepare manifest: {domain: {"documents", "kept", "empty", "non_utf8"}}.
    """
    tasks = mixtures.leaf_tasks(name)
    domains = sorted({t.name.split("_")[0] for t in tasks} & set(DOMAINS))
    return {d: count_skipped(d, split) for d in domains}


@seqio.map_over_dataset
def _validation_features(x):
    return {"targets": x["text"],
            # Python len() counts code points, as UTF8_CHAR does (docs/FORMULAS.md).
            "num_chars": tf.strings.length(x["text"], unit="UTF8_CHAR")}


# ----------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------


def _check_name(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"Unknown {what} {value!r}; expected one of {list(allowed)}.")


def _add_task(name, **kwargs):
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, **kwargs)


def register_tasks(corpus_dir: Union[str, pathlib.Path, None] = None) -> None:
    """(Re)registers every task over `corpus_dir` (default: the shipped data/corpus).

    Mixtures hold their tasks, so they are re-registered too, with the current rates.
    """
    corpus_dir = pathlib.Path(corpus_dir or DEFAULT_CORPUS_DIR)
    _state["corpus_dir"] = corpus_dir
    vocab = vocabulary_lib.get_vocabulary()
    # Defined once: every task of a mixture must share the same features and vocabulary.
    ul2_features = {"inputs": seqio.Feature(vocab, add_eos=True),
                    "targets": seqio.Feature(vocab, add_eos=True)}
    lm_features = {"targets": seqio.Feature(vocab, add_eos=True)}
    validation_features = {"targets": seqio.Feature(vocab, add_eos=False)}
    to_targets = functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"})
    tokenize = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)
    for domain in DOMAINS:
        source = make_source(corpus_dir, domain)
        for spec in ul2.DENOISERS.values():
            _add_task(
                ul2_task_name(domain, spec.name), source=source,
                output_features=ul2_features,
                preprocessors=[
                    documents.filter_documents, to_targets, tokenize,
                    ul2.make_denoiser_preprocessor(spec, vocabulary_lib.MODE_TOKENS),
                    seqio.preprocessors.append_eos,
                ],
                metric_fns=[])
        for boundaries in (True, False):
            _add_task(
                causal_task_name(domain, boundaries), source=source,
                output_features=lm_features,
                preprocessors=[documents.filter_documents, to_targets, tokenize,
                               functools.partial(ul2.causal_lm,
                                                 document_boundaries=boundaries)],
                metric_fns=[])
        _add_task(
            validation_task_name(domain), source=source,
            output_features=validation_features,
            preprocessors=[documents.filter_documents, _validation_features, tokenize],
            metric_fns=[])
    for name, (denoiser_rates, domain_rates) in _state["mixtures"].items():
        register_mixtures(denoiser_rates, domain_rates, name=name)


def _normalised(rates: Mapping[str, float], allowed, what: str) -> dict[str, float]:
    for key, rate in rates.items():
        _check_name(key, allowed, what)
        if not rate >= 0:
            raise ValueError(f"Rate of {what} {key!r} is {rate}; rates must be >= 0.")
    total = float(sum(rates.values()))
    if total <= 0:
        raise ValueError(
            f"{what} rates {dict(rates)} sum to {total}; give at least one a positive rate.")
    return {k: float(v) / total for k, v in rates.items() if v > 0}


def register_mixtures(
    denoiser_rates: Union[str, Mapping[str, float]] = "ul2",
    domain_rates: Mapping[str, float] = REKA_DOMAIN_RATES,
    name: str = "ul2",
) -> dict[str, dict[str, float]]:
    """(Re)registers `{domain}_{name}` and `reka_mix_{name}` (and, for the default
    name "ul2", `reka_mix_causal` and `reka_mix_causal_concat` with the same domain
    rates).

    Importing this module registers the UL2 rates as `reka_mix_ul2` and U-PaLM's as
    `reka_mix_upalm`; a gin file picks one with MIXTURE_OR_TASK_NAME. Other rates: call
    this from your own task module (imported by your gin file, so that data-preparation
    workers register them too) with a new `name`, e.g.
    `register_mixtures({"r1": 1, "s": 1}, name="rs")` -> `reka_mix_rs`.

    Args:
      denoiser_rates: a preset name ("ul2", "upalm") or {denoiser: rate}; missing or
        zero-rate denoisers are left out. Normalised to sum to 1.
      domain_rates: {domain: rate}, normalised to sum to 1 (Reka's 105 -> 1); missing
        or zero-rate domains are left out.
      name: the mixtures' suffix.

    Returns:
      {"denoiser_rates": ..., "domain_rates": ...}, the normalised rates registered.
    """
    if isinstance(denoiser_rates, str):
        _check_name(denoiser_rates, DENOISER_RATE_PRESETS, "denoiser rate preset")
        denoiser_rates = DENOISER_RATE_PRESETS[denoiser_rates]
    denoisers = _normalised(denoiser_rates, ul2.DENOISERS, "denoiser")
    domains = _normalised(domain_rates, DOMAINS, "domain")
    logging.info("UL2 denoiser rates %s normalised by their sum %.4g to %s",
                 dict(denoiser_rates), sum(denoiser_rates.values()), denoisers)
    logging.info("Domain rates %s normalised by their sum %.4g to %s",
                 dict(domain_rates), sum(domain_rates.values()), domains)
    _state["mixtures"][name] = (dict(denoiser_rates), dict(domain_rates))

    def add(mixture, tasks):
        seqio.MixtureRegistry.remove(mixture)
        seqio.MixtureRegistry.add(mixture, tasks)

    for domain in DOMAINS:
        add(domain_mixture_name(domain, name),
            [(ul2_task_name(domain, d), rate) for d, rate in denoisers.items()])
    add(f"reka_mix_{name}", [(domain_mixture_name(d, name), r) for d, r in domains.items()])
    if name == "ul2":
        add("reka_mix_causal", [(causal_task_name(d), r) for d, r in domains.items()])
        add("reka_mix_causal_concat",
            [(causal_task_name(d, False), r) for d, r in domains.items()])
    return {"denoiser_rates": denoisers, "domain_rates": domains}


register_tasks()
