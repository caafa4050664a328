"""t5x_like: a JAX training stack for PaLM/Llama decoder-only and UL2 encoder-decoder LMs.

The package's folders follow the data flow, each importing only the ones before it:

    data/        tasks' building blocks, UL2, pipelines, stores, streaming, vocabularies, dedup
    model/       layers, networks, the two families, decoding, sharding rules, FLOPs
    objectives/  losses on top of a family: reward model, DPO, DoReMi's Group DRO
    training/    train state, optimizers, the loop, checkpoints, guards, metrics
    evaluation/  evaluation, bits per character, prediction and inference runs
    planning/    the cluster planner, memory and collectives models
    interop/     Hugging Face weights in and out
    recipes/     procedures of several runs: DoReMi, rejection sampling

`launch.py` (flags, gin, logging, devices) and `process.py` (process start-up) sit below
them all; the files beside them (`train.py`, `eval.py`, ...) are the `python -m
t5x_like.<entry>` commands. docs/ARCHITECTURE.md draws the whole map.

The public API, in data-flow order:

    from t5x_like import TransformerConfig, EncoderDecoderModel, MeshConfig, adamw_llama2

Names resolve on first use (PEP 562): importing the package runs nothing and imports no
jax; the imports under TYPE_CHECKING say where each name lives, for readers, type
checkers and go-to-definition.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # noqa: SIM108 - imports for readers and tools only
    # ruff: noqa: F401
    from t5x_like.data.prepare import prepare as prepare_store
    from t5x_like.data.vocabulary import get_vocabulary
    from t5x_like.evaluation.bpc import bits_per_character, load_bpc_eval
    from t5x_like.evaluation.evaluate import EvalConfig, evaluate
    from t5x_like.model.families import DecoderOnlyModel, EncoderDecoderModel, model_for
    from t5x_like.model.flops import mfu
    from t5x_like.model.layers import TransformerConfig
    from t5x_like.model.partitioning import (
        MeshConfig,
        count_params,
        create_sharded,
        validate_for_mesh,
    )
    from t5x_like.training.checkpoints import CheckpointManager
    from t5x_like.training.loader import Loader, to_global_batch
    from t5x_like.training.optimizers import adafactor_palm, adamw_llama2
    from t5x_like.training.train_state import (
        TrainState,
        make_eval_step,
        make_train_step,
    )

# name -> (module, attribute); kept equal to the imports above by
# tests/test_architecture.py.
_EXPORTS = {
    # data
    "get_vocabulary": ("data.vocabulary", "get_vocabulary"),
    "prepare_store": ("data.prepare", "prepare"),
    # model
    "TransformerConfig": ("model.layers", "TransformerConfig"),
    "DecoderOnlyModel": ("model.families", "DecoderOnlyModel"),
    "EncoderDecoderModel": ("model.families", "EncoderDecoderModel"),
    "model_for": ("model.families", "model_for"),
    "MeshConfig": ("model.partitioning", "MeshConfig"),
    "create_sharded": ("model.partitioning", "create_sharded"),
    "validate_for_mesh": ("model.partitioning", "validate_for_mesh"),
    "count_params": ("model.partitioning", "count_params"),
    "mfu": ("model.flops", "mfu"),
    # training
    "Loader": ("training.loader", "Loader"),
    "to_global_batch": ("training.loader", "to_global_batch"),
    "adamw_llama2": ("training.optimizers", "adamw_llama2"),
    "adafactor_palm": ("training.optimizers", "adafactor_palm"),
    "TrainState": ("training.train_state", "TrainState"),
    "make_train_step": ("training.train_state", "make_train_step"),
    "make_eval_step": ("training.train_state", "make_eval_step"),
    "CheckpointManager": ("training.checkpoints", "CheckpointManager"),
    # evaluation
    "EvalConfig": ("evaluation.evaluate", "EvalConfig"),
    "evaluate": ("evaluation.evaluate", "evaluate"),
    "load_bpc_eval": ("evaluation.bpc", "load_bpc_eval"),
    "bits_per_character": ("evaluation.bpc", "bits_per_character"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 't5x_like' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(f"t5x_like.{module}"), attribute)


def __dir__():
    return __all__
