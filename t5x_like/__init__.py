"""t5x_like: a JAX training stack for PaLM/Llama decoder-only and UL2 encoder-decoder LMs.

The public API, in data-flow order. Names resolve on first use (PEP 562), so
`import t5x_like` stays cheap and `python -m t5x_like.prepare` does not pull in jax
before it needs to:

    from t5x_like import TransformerConfig, EncoderDecoderModel, MeshConfig, adamw_llama2
"""

import importlib

_EXPORTS = {
    # data
    "get_vocabulary": "vocabulary",
    "prepare_store": "prepare",
    "Loader": "loader",
    "to_global_batch": "loader",
    "load_bpc_eval": "bpc",
    "bits_per_character": "bpc",
    # model
    "TransformerConfig": "layers",
    "DecoderOnlyModel": "models",
    "EncoderDecoderModel": "models",
    "MeshConfig": "partitioning",
    "create_sharded": "partitioning",
    "validate_for_mesh": "partitioning",
    "count_params": "partitioning",
    # training
    "adamw_llama2": "trainer",
    "adafactor_palm": "trainer",
    "TrainState": "trainer",
    "make_train_step": "trainer",
    "make_eval_step": "trainer",
    "CheckpointManager": "checkpoints",
    "train_flops_per_step": "flops",
    "mfu": "flops",
    # entry points (the modules `train` and `prepare` keep their names; their
    # functions are t5x_like.train.train and t5x_like.prepare.prepare)
    "evaluate": "eval",
}

_ALIASES = {"prepare_store": "prepare"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 't5x_like' has no attribute {name!r}")
    module = importlib.import_module(f"t5x_like.{_EXPORTS[name]}")
    return getattr(module, _ALIASES.get(name, name))


def __dir__():
    return __all__
