"""t5x_like: a JAX training stack for PaLM/Llama decoder-only and UL2 encoder-decoder LMs.

The public API, in data-flow order:

    from t5x_like import TransformerConfig, EncoderDecoderModel, MeshConfig, adamw_llama2

Names resolve on first use (PEP 562), so `import t5x_like` stays cheap and the spawned
data-preparation workers do not pull in jax before they need it; the imports under
TYPE_CHECKING say where each name lives, for readers, type checkers and
go-to-definition.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Mapping

# Worker processes that t5x_like spawns (the data workers, prepare's) die with their
# parent, even when it is killed with SIGKILL: set here, the first t5x_like code a
# spawned child runs, before its seconds of imports. The parent names itself in
# WORKER_PARENT_ENV before spawning; sys.orig_argv, since spawn replaces sys.argv with
# the parent's before this runs.
WORKER_PARENT_ENV = "T5X_LIKE_WORKER_PARENT"
if "--multiprocessing-fork" in sys.orig_argv and WORKER_PARENT_ENV in os.environ:
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except OSError:
        pass
    if os.getppid() != int(os.environ[WORKER_PARENT_ENV]):
        os._exit(1)  # the parent died before the signal was armed

# Large allocations in transparent huge pages: XLA on CPU maps every step's temporary
# buffer afresh (752 MB for bench/reference_llama.gin), and in 4 KiB pages the kernel
# faulted in and zeroed about 184,000 of them per step; in huge pages the step takes
# about 0.9x as long (docs/PERFORMANCE.md, change 5). glibc's malloc asks for huge
# pages when this tunable is set; glibc reads tunables only at start-up, so the entry
# points (`python -m t5x_like.<module>`: sys.argv[0] is "-m" while the package
# imports) restart themselves once with it, before any import. A GLIBC_TUNABLES that
# already names glibc.malloc.hugetlb (e.g. =0, to opt out) is left alone; elsewhere than Linux and
# without transparent huge pages ("never" in /sys/kernel/mm/transparent_hugepage/enabled)
# it changes nothing. Code that imports t5x_like into its own process sets it itself:
# `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python ...`.
HUGETLB = "glibc.malloc.hugetlb"
HUGE_PAGES_TUNABLE = f"{HUGETLB}=1"


def _names_hugetlb(env: Mapping[str, str]) -> bool:
    return HUGETLB in env.get("GLIBC_TUNABLES", "")


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` with HUGE_PAGES_TUNABLE added to GLIBC_TUNABLES, unless that
    already says how glibc.malloc.hugetlb is set."""
    if _names_hugetlb(env):
        return dict(env)
    tunables = env.get("GLIBC_TUNABLES", "")
    return dict(env, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGE_PAGES_TUNABLE])))


if (sys.platform == "linux" and sys.argv[:1] == ["-m"] and sys.executable
        and not _names_hugetlb(os.environ)):
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_huge_pages(os.environ))

if TYPE_CHECKING:  # noqa: SIM108 - imports for readers and tools only
    # ruff: noqa: F401
    from t5x_like.bpc import bits_per_character, load_bpc_eval
    from t5x_like.checkpoints import CheckpointManager
    from t5x_like.evaluation import EvalConfig, evaluate
    from t5x_like.flops import mfu
    from t5x_like.layers import TransformerConfig
    from t5x_like.loader import Loader, to_global_batch
    from t5x_like.models import DecoderOnlyModel, EncoderDecoderModel, model_for
    from t5x_like.partitioning import (MeshConfig, count_params, create_sharded,
                                       validate_for_mesh)
    from t5x_like.prepare import prepare as prepare_store
    from t5x_like.trainer import (TrainState, adafactor_palm, adamw_llama2, make_eval_step,
                                  make_train_step)
    from t5x_like.vocabulary import get_vocabulary

# name -> (module, attribute); kept equal to the imports above by
# tests/test_architecture.py.
_EXPORTS = {
    # data
    "get_vocabulary": ("vocabulary", "get_vocabulary"),
    "prepare_store": ("prepare", "prepare"),
    "Loader": ("loader", "Loader"),
    "to_global_batch": ("loader", "to_global_batch"),
    "load_bpc_eval": ("bpc", "load_bpc_eval"),
    "bits_per_character": ("bpc", "bits_per_character"),
    # model
    "TransformerConfig": ("layers", "TransformerConfig"),
    "DecoderOnlyModel": ("models", "DecoderOnlyModel"),
    "EncoderDecoderModel": ("models", "EncoderDecoderModel"),
    "model_for": ("models", "model_for"),
    "MeshConfig": ("partitioning", "MeshConfig"),
    "create_sharded": ("partitioning", "create_sharded"),
    "validate_for_mesh": ("partitioning", "validate_for_mesh"),
    "count_params": ("partitioning", "count_params"),
    # training
    "adamw_llama2": ("trainer", "adamw_llama2"),
    "adafactor_palm": ("trainer", "adafactor_palm"),
    "TrainState": ("trainer", "TrainState"),
    "make_train_step": ("trainer", "make_train_step"),
    "make_eval_step": ("trainer", "make_eval_step"),
    "CheckpointManager": ("checkpoints", "CheckpointManager"),
    "mfu": ("flops", "mfu"),
    # evaluation (the entry points keep their modules: t5x_like.train.train,
    # t5x_like.prepare.prepare, python -m t5x_like.eval)
    "EvalConfig": ("evaluation", "EvalConfig"),
    "evaluate": ("evaluation", "evaluate"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 't5x_like' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(f"t5x_like.{module}"), attribute)


def __dir__():
    return __all__
