"""Running a trained model over SeqIO examples: jitted predict and score on a mesh.

`Inference` holds a model's jitted `predict_batch` / `score_batch` for a mesh and rule
preset; the parameters are passed at each call (a restored checkpoint for inference, the
live train state for in-training evaluation). `example_batches` reads a task's split in
order through SeqIO's unpacked feature converter, in fixed-shape batches, so decoding
compiles once per (batch, lengths, decode length). Used by infer.py (JSON lines) and
evaluation/evaluate.py (losses, bits per character and each task's metric_fns).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import seqio
from flax import nnx
from jax.experimental import multihost_utils

from t5x_like import launch
from t5x_like.data import forms, vocabulary
from t5x_like.model import partitioning
from t5x_like.model.decoding import DecodeConfig
from t5x_like.training import checkpoints, loader


@dataclasses.dataclass
class Inference:
    """A model's jitted predict and score functions on a mesh (params passed per call).

    graphdef: the model module's (`nnx.split` of `model.make_module`); the params are
    its nnx.Param state, e.g. `train_state.params_of(...)` or `checkpoints.restore_params`.
    """

    model: Any
    mesh: Any
    rules: Any
    graphdef: Any
    decode: DecodeConfig = DecodeConfig()
    batch_size: int = 8

    def __post_init__(self):
        self._predict = jax.jit(self._traced(
            lambda module, batch, *rng: self.model.predict_batch(module, batch, self.decode,
                                                                 *rng)))
        self._score = jax.jit(self._traced(self.model.score_batch))

    @classmethod
    def from_checkpoint(cls, model, mesh_config, checkpoint_path: str, decode: DecodeConfig,
                        batch_size: int) -> tuple[Inference, Any]:
        """(Inference, params restored from `checkpoint_path` onto the mesh's shards)."""
        mesh, rules = launch.mesh_for(mesh_config)
        partitioning.validate_for_mesh(model.make_module, mesh, rules, batch_size=batch_size)
        graphdef, target = partitioning.abstract_sharded(model.make_module, mesh, rules)
        params = checkpoints.restore_params(checkpoint_path, target)
        return cls(model, mesh, rules, graphdef, decode, batch_size), params

    def _run(self, fn, params, batch: Mapping[str, np.ndarray], *extra):
        """fn on `batch` (the whole batch, the same in every process): each process
        places the rows its devices hold, and every process gets the whole result."""
        rows = partitioning.process_rows(self.mesh, len(next(iter(batch.values()))))
        batch = loader.to_global_batch({k: rows.take(np.asarray(v)) for k, v in batch.items()},
                                       self.mesh, rows)
        with jax.set_mesh(self.mesh):
            out = fn(params, batch, *extra)
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True))

    def predict(self, params, batch: Mapping[str, np.ndarray], rng=None
                ) -> dict[str, np.ndarray]:
        """model.predict_batch (tokens, scores) of one batch of converted features;
        `rng`: the sampling key (DecodeConfig(method='sample'); default: a fixed one)."""
        return self._run(self._predict, params, batch, *(() if rng is None else (rng,)))

    def score(self, params, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """model.score_batch: [B] log-likelihood of the targets."""
        return self._run(self._score, params, batch)

    def _traced(self, fn):
        """fn(module, batch), traced with the mesh's logical-axis rules (the cache and
        activation constraints need them)."""

        def run(params, batch, *extra):
            with nnx.logical_axis_rules(self.rules):
                return fn(nnx.merge(self.graphdef, params), batch, *extra)

        return run


def decode_for_tasks(decode: DecodeConfig, tasks) -> DecodeConfig:
    """`decode` with the special ids of the tasks' targets vocabulary (one set for all
    of them; vocabulary.resolve_decode refuses a setting that contradicts it)."""
    resolved = {vocabulary.resolve_decode(decode, t.output_features["targets"].vocabulary)
                for t in tasks}
    if len(resolved) > 1:
        raise ValueError(
            f"The tasks {[t.name for t in tasks]} use vocabularies with different special "
            f"ids ({sorted((d.eos_id, str(d.bos_id)) for d in resolved)} as (eos, bos)); "
            "run them separately, one decoding each.")
    return resolved.pop() if resolved else decode


def example_batches(task: seqio.Task, task_feature_lengths: Mapping[str, int], split: str,
                    form: forms.DataForm, batch_size: int, max_examples: int | None = None
                    ) -> Iterator[tuple[dict[str, np.ndarray], list[dict[str, Any]]]]:
    """(model features [batch_size, L] of the unpacked converter, the task's examples)
    in order; the last batch is padded with all-zero rows (no example)."""
    ds = task.get_dataset(dict(task_feature_lengths), split=split, shuffle=False,
                          num_epochs=1, use_cached=False)
    if max_examples is not None:
        ds = ds.take(max_examples)
    zero_is_token = not vocabulary.zero_is_padding(task.output_features["targets"].vocabulary)
    model_features = form.converter(False, zero_is_token)(ds, dict(task_feature_lengths))
    rows, examples = [], []
    for features, example in zip(model_features.as_numpy_iterator(), ds.as_numpy_iterator()):
        rows.append(features)
        examples.append(example)
        if len(rows) == batch_size:
            yield stack_rows(rows, batch_size), examples
            rows, examples = [], []
    if rows:
        yield stack_rows(rows, batch_size), examples


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]], batch_size: int
               ) -> dict[str, np.ndarray]:
    """Rows of features stacked into a batch, padded to `batch_size` with all-zero rows."""
    out = {}
    for name in rows[0]:
        stacked = np.stack([np.asarray(r[name], np.int32) for r in rows])
        out[name] = np.pad(stacked, [(0, batch_size - len(rows)), (0, 0)])
    return out


def text_of(example: Mapping[str, Any], feature: str, vocab) -> str | None:
    if f"{feature}_pretokenized" in example:
        value = example[f"{feature}_pretokenized"]
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if feature in example:
        return vocab.decode([int(t) for t in np.asarray(example[feature]).reshape(-1)])
    return None


def decoded_predictions(task: seqio.Task, tokens_BT: np.ndarray, examples) -> list[Any]:
    """Each row's tokens up to EOS, decoded and passed through the task's postprocessor."""
    vocab = task.output_features["targets"].vocabulary
    out = []
    for row, example in zip(tokens_BT, examples):
        ids = [int(t) for t in row]
        ids = ids[:ids.index(vocab.eos_id)] if vocab.eos_id in ids else ids
        text = vocab.decode(ids)
        out.append(task.postprocess_fn(text, example=example, is_target=False))
    return out


