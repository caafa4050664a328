"""DoReMi mixture optimisation: `python -m t5x_like.doremi --gin_file=...`.

DoReMi (Xie et al. 2023, arXiv 2305.10429; docs/FORMULAS.md, "DoReMi") learns the
domain weights of a mixture with two small models, both ordinary runs of this stack
(`train.train`: the same model gin, trainer, checkpoints, metrics and evaluation):

1. a reference model trained on the baseline mixture (the gin's MIXTURE_OR_TASK_NAME);
2. a proxy model of the same shape (`group_dro.DoReMiModel`) trained on the same mixture
   with Group DRO over its domains against the frozen reference (read from the
   reference run's checkpoint): each step moves the domain weights α towards the
   domains where the proxy's loss exceeds the reference's most, and the proxy
   minimises the α-weighted loss;
3. the result is ᾱ, the mean of α over the proxy's weight updates (a step the
   non-finite guard skipped updates nothing), written as a mixture file
   (`mixtures.mixture_file_text`: a gin file that registers a SeqIO mixture with those
   rates over the same parts, e.g. `reka_mix_doremi`).

The domains are the top-level parts of the mixture (`mixtures.components`: for
`reka_mix_ul2` the five `{domain}_ul2` mixtures). With `rounds` > 1 the process repeats
with the learned mixture as the next round's baseline (iterated DoReMi) until the
weights move by less than `tolerance` (max-norm).

Runs live under MODEL_DIR: `reference/`, `proxy/` (or `round{r}/...`), `doremi.json`
(weights per round) and the mixture file. Started again, each run resumes from its
checkpoints; finished runs only evaluate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import numpy as np
from flax import nnx

from t5x_like import launch
from t5x_like.data import mixtures
from t5x_like.model import network
from t5x_like.objectives import group_dro
from t5x_like.training import checkpoints, guards
from t5x_like.training import train as train_lib

log = logging.getLogger("t5x_like.recipes.doremi")
SUMMARY_NAME = "doremi.json"


def average_weights(proxy_dir: str, proxy: group_dro.DoReMiModel) -> np.ndarray:
    """ᾱ of a finished proxy run: Σ_t α_t over its weight updates, divided by their
    number, read from its newest checkpoint.

    The number of updates is not the run's step count: a step the non-finite guard
    skipped keeps the whole state, α and its running sum included
    (train_state._keep_if_not_finite). Every α_t is a distribution over the domains
    (it sums to 1), so the running sum's total, Σ_k Σ_t α_t,k, is that number; dividing
    by it keeps ᾱ a distribution however many steps were skipped."""
    abstract = nnx.eval_shape(lambda: proxy.make_module(0))
    target = nnx.state(abstract, network.DomainState)
    restored = checkpoints.restore_params(proxy_dir, target, part=True)
    total = np.asarray(nnx.to_pure_dict(restored)["domain_weights_sum"], np.float64)
    updates = float(total.sum())
    if not updates > 0:
        raise ValueError(
            f"The proxy run in {proxy_dir} made no domain-weight update (every step it "
            "took was skipped as non-finite, or it took none), so it learned no weights. "
            "Look at its metrics.jsonl for the cause, fix it, and run the proxy again "
            "(move its directory aside first).")
    return total / updates


class Stopped(guards.RunStopped):
    """A run of the round stopped before its last step (a signal, a preemption)."""


def _check_finished(summary, what: str) -> None:
    if summary.stopped_by is not None:
        raise Stopped(f"the {what} run in {summary.model_dir} stopped at step "
                      f"{summary.end_step} ({summary.stopped_by}); run the same command to "
                      "resume it and go on.")


def _round_dir(model_dir: str, round_index: int, rounds: int) -> str:
    return model_dir if rounds == 1 else os.path.join(model_dir, f"round{round_index + 1}")


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _mixture_file(path: str, name: str, rates: Mapping[str, float], comment: str) -> None:
    """Writes and registers a mixture file; records it for the data workers to come."""
    _write(path, mixtures.mixture_file_text(name, rates, comment))
    mixtures.register_mixture_file(path, record=True)


def run_round(train_fn, model, data: train_lib.DataConfig, round_dir: str, eta: float,
              smoothing: float) -> dict[str, Any]:
    """Reference run, then proxy run, on `data`'s mixture; returns the round's record."""
    parts = mixtures.components(data.mixture_or_task_name)
    names, rates = [p[0] for p in parts], [p[1] for p in parts]
    reference_dir = os.path.join(round_dir, "reference")
    proxy_dir = os.path.join(round_dir, "proxy")
    log.info("DoReMi: reference model on %s (%s) in %s", data.mixture_or_task_name,
             ", ".join(f"{n} {r:.4f}" for n, r in zip(names, rates)), reference_dir)
    reference = train_fn(model=model, data=data, model_dir=reference_dir)
    _check_finished(reference, "reference")
    proxy = group_dro.DoReMiModel(model, names, rates, eta=eta, smoothing=smoothing)
    log.info("DoReMi: proxy model with Group DRO (eta %g, smoothing %g) in %s", eta,
             smoothing, proxy_dir)
    proxy_run = train_fn(model=proxy, data=dataclasses.replace(data, domain_ids=True),
                         model_dir=proxy_dir, reference_checkpoint=reference_dir)
    _check_finished(proxy_run, "proxy")
    weights = average_weights(proxy_dir, proxy)
    return {"mixture": data.mixture_or_task_name, "reference_dir": reference_dir,
            "proxy_dir": proxy_dir, "sampling_rates": dict(zip(names, rates)),
            "weights": dict(zip(names, weights.tolist())),
            "reference_eval": reference.eval_end or reference.eval_start,
            "proxy_eval": proxy_run.eval_end or proxy_run.eval_start}


def doremi(
    *,
    model,
    data: train_lib.DataConfig,
    model_dir: str,
    mixture_name: str = "reka_mix_doremi",
    mixture_file: str | None = None,
    rounds: int = 1,
    tolerance: float = 1e-3,
    eta: float = group_dro.ETA,
    smoothing: float = group_dro.SMOOTHING,
    train_fn=None,
) -> dict[str, Any]:
    """Learns the domain weights of `data`'s mixture with DoReMi; returns the summary
    also written to MODEL_DIR/doremi.json.

    model: the reference's and proxy's model (the experiment's MODEL).
    data: the baseline mixture and the data settings of both runs.
    mixture_name, mixture_file: the learned mixture's name and its mixture file
      (default MODEL_DIR/<mixture_name>.gin; copy it to gin_configs/mixtures/ to have
      `import tasks` register it everywhere).
    rounds: at most this many rounds; a round after the first trains its reference on
      the previous round's weights. Stops early when no weight moves by `tolerance`.
    eta, smoothing: the Group DRO step size η and uniform smoothing c.
    train_fn: `train.train` with the gin's bindings (runs' steps, optimizer, mesh,
      evaluation); given explicitly in tests.
    """
    if rounds < 1:
        raise ValueError(f"doremi.rounds={rounds} must be ≥ 1.")
    train_fn = train_fn or gin.get_configurable("t5x_like.training.train.train")
    mixture_file = mixture_file or os.path.join(model_dir, f"{mixture_name}.gin")
    baseline = data.mixture_or_task_name
    summary: dict[str, Any] = {"baseline": baseline, "mixture_name": mixture_name,
                               "mixture_file": mixture_file, "eta": eta,
                               "smoothing": smoothing, "rounds": []}
    previous = {n: r for n, r, _ in mixtures.components(baseline)}
    for r in range(rounds):
        record = run_round(train_fn, model, data, _round_dir(model_dir, r, rounds), eta,
                           smoothing)
        moved = max(abs(record["weights"][n] - previous[n]) for n in previous)
        record["max_change"] = moved
        summary["rounds"].append(record)
        previous = record["weights"]
        log.info("DoReMi round %d: weights %s (max change %.4g)", r + 1,
                 {n: round(w, 4) for n, w in previous.items()}, moved)
        if r + 1 < rounds and moved >= tolerance:
            name = f"{mixture_name}_round{r + 1}"
            _mixture_file(os.path.join(model_dir, f"{name}.gin"), name, previous,
                          f"DoReMi round {r + 1} weights over the parts of {baseline}.")
            data = dataclasses.replace(data, mixture_or_task_name=name)
        else:
            break
    summary["weights"] = previous
    _mixture_file(mixture_file, mixture_name, previous, _comment(summary))
    _write(os.path.join(model_dir, SUMMARY_NAME), json.dumps(summary, indent=1, default=str))
    print(f"\nDoReMi weights ({len(summary['rounds'])} round(s)) over the parts of {baseline}:")
    for name, weight in previous.items():
        print(f"  {name:24s} {weight:.4f}   (baseline {summary['rounds'][0]['sampling_rates'][name]:.4f})")
    print(f"mixture {mixture_name!r}: {mixture_file}", flush=True)
    return summary


def _comment(summary: Mapping[str, Any]) -> str:
    last = summary["rounds"][-1]
    return (f"Domain weights learned by DoReMi (python -m t5x_like.doremi): the mean Group "
            f"DRO weights of\nthe proxy run {last['proxy_dir']} against the reference "
            f"{last['reference_dir']},\neta {summary['eta']}, smoothing "
            f"{summary['smoothing']}, {len(summary['rounds'])} round(s), baseline "
            f"{summary['baseline']}.\nInclude after an experiment to train on it: "
            f"--gin_file=<this file>.")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return launch.run("t5x_like.recipes.doremi.doremi", argv, prog="python -m t5x_like.doremi")
