"""Look-ups in SeqIO's registry: tasks and mixtures by name, leaf tasks and their rates.

SeqIO's own `get_mixture_or_task` does the look-up; ours adds the nearest registered
names to its error, since a misspelt MIXTURE_OR_TASK_NAME is the most common mistake.
Registrations themselves live in task modules (the shipped `tasks/`, or a user's module
imported by their gin file); worker processes import the same modules
(`import_task_modules`) to see the same registry.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Sequence

import seqio


def get_mixture_or_task(name: str) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture `name`, or a ValueError naming the nearest ones."""
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        mixtures, tasks = seqio.MixtureRegistry.names(), seqio.TaskRegistry.names()
        close = difflib.get_close_matches(name, sorted(set(mixtures) | set(tasks)), n=5,
                                          cutoff=0.5)
        raise ValueError(
            f"No SeqIO task or mixture named {name!r}; nearest registered names: "
            f"{close or 'none'} ({len(mixtures)} mixtures, {len(tasks)} tasks registered). "
            "Fix MIXTURE_OR_TASK_NAME, or import the module that registers it (a gin "
            "file's `import my_tasks` line, or --task_module).") from None


def leaf_tasks(name: str) -> list[seqio.Task]:
    """The tasks a task or mixture draws from (a mixture's with a positive rate)."""
    provider = get_mixture_or_task(name)
    if isinstance(provider, seqio.Mixture):
        return [t for t in provider.tasks if provider.get_rate(t) > 0]
    return [provider]


def leaf_tasks_and_rates(name: str) -> list[tuple[str, float]]:
    """Flattens a task or mixture into (leaf task name, normalised rate), sorted by name.

    seqio multiplies rates through sub-mixtures (`Mixture.get_rate`); sorting makes the
    order independent of registration order.
    """
    provider = get_mixture_or_task(name)
    if isinstance(provider, seqio.Mixture):
        pairs = [(t.name, float(provider.get_rate(t))) for t in provider.tasks]
    else:
        pairs = [(provider.name, 1.0)]
    pairs = sorted((n, r) for n, r in pairs if r > 0)
    total = sum(r for _, r in pairs)
    if not pairs or total <= 0:
        raise ValueError(f"Mixture {name!r} has no task with a positive rate: {pairs}.")
    return [(n, r / total) for n, r in pairs]


def import_task_modules(task_modules: Sequence[str]) -> None:
    """Imports the modules that register tasks (in a worker process, say)."""
    for name in task_modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(
                f"Could not import task module {name!r} ({e}). Task modules register the "
                "SeqIO tasks/mixtures at import; pass importable module names "
                "(e.g. --task_module tasks) and make sure their directory is on sys.path."
            ) from e
