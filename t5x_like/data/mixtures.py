"""Look-ups in SeqIO's registry: tasks and mixtures by name, leaf tasks and their rates.

SeqIO's own `get_mixture_or_task` does the look-up; ours adds the nearest registered
names to its error, since a misspelt MIXTURE_OR_TASK_NAME is the most common mistake.
Registrations themselves live in task modules (the shipped `tasks/`, or a user's module
imported by their gin file); worker processes import the same modules
(`import_task_modules`) to see the same registry. A registration made at run time (a
mixture file DoReMi wrote, a rejection-sampling output) is also recorded in the
environment (`record_registration`), which worker processes inherit, and the module
that made it replays it when a worker imports that module (`recorded_registrations`).
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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


def components(name: str) -> list[tuple[str, float, list[str]]]:
    """The top-level parts of a task or mixture: (name, normalised rate, its leaf task
    names), sorted by name. A mixture of per-domain mixtures (`reka_mix_ul2`) has one
    part per domain; a task is one part. These are the "domains" a per-domain loss
    (DoReMi's Group DRO) groups tokens by. A part's rate is the sum of its leaf tasks'
    rates (seqio multiplies rates through sub-mixtures)."""
    leaves = dict(leaf_tasks_and_rates(name))
    provider = get_mixture_or_task(name)
    if not isinstance(provider, seqio.Mixture):
        return [(provider.name, 1.0, [provider.name])]
    parts = []
    # seqio keeps a mixture's own entries (tasks or sub-mixtures) only privately.
    for part_name, part in sorted(provider._task_map.items()):  # noqa: SLF001
        tasks = part.tasks if isinstance(part, seqio.Mixture) else [part]
        names = sorted(t.name for t in tasks if t.name in leaves)
        if names:
            parts.append((part_name, sum(leaves[n] for n in names), names))
    return parts


def leaf_components(name: str) -> list[int]:
    """For each leaf task of `leaf_tasks_and_rates(name)` (in that order), the index of
    its part in `components(name)`."""
    index = {leaf: i for i, (_, _, leaves) in enumerate(components(name)) for leaf in leaves}
    return [index[leaf] for leaf, _ in leaf_tasks_and_rates(name)]


# Registrations the data workers repeat: {kind: {key: JSON-able arguments}} as JSON.
REGISTRATIONS_ENV = "T5X_LIKE_REGISTRATIONS"


def record_registration(kind: str, key: str, **arguments: Any) -> None:
    """Records a registration of `kind` in REGISTRATIONS_ENV, so that worker processes
    (which inherit the environment) can replay it; a later one with the same kind and
    key replaces it."""
    recorded = json.loads(os.environ.get(REGISTRATIONS_ENV, "{}"))
    recorded.setdefault(kind, {})[key] = arguments
    os.environ[REGISTRATIONS_ENV] = json.dumps(recorded)


def recorded_registrations(kind: str) -> dict[str, dict[str, Any]]:
    """The registrations of `kind` recorded here or by a parent process, {key:
    arguments}, in the order first recorded."""
    return json.loads(os.environ.get(REGISTRATIONS_ENV, "{}")).get(kind, {})


def directory_task_name(prefix: str, directory: str) -> str:
    """The task name of a recipe's output directory: `prefix`, its base name and a hash
    of its absolute path (two outputs never share one)."""
    directory = os.path.abspath(directory)
    base = re.sub(r"[^0-9a-zA-Z_]", "_", os.path.basename(directory.rstrip(os.sep)))
    return f"{prefix}_{base}_{hashlib.sha1(directory.encode()).hexdigest()[:8]}"


def read_directory_summary(directory: str, summary_file: str, command: str, setting: str,
                           output_flag: str) -> dict:
    """The JSON summary a recipe's output directory ends with; a FileNotFoundError naming
    the `command` that writes it, the gin `setting` to point at a finished run's output
    and the command's `output_flag`."""
    path = os.path.join(directory, summary_file)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: {directory!r} is not the output of `{command}` (or "
            f"that run did not finish). Point {setting} at a finished run's {output_flag}.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def replay_directory_tasks(kind: str, marker: str,
                           register: Callable[[str, dict[str, Any]], Any]) -> None:
    """Registers here the tasks of `kind` a parent process recorded over output
    directories (a data worker's import of the registering module): `register(name,
    arguments)` for each one not registered yet whose `directory` still holds `marker`;
    one since removed is skipped with a warning."""
    for name, entry in recorded_registrations(kind).items():
        if name in seqio.TaskRegistry.names():
            continue
        if not os.path.exists(os.path.join(entry["directory"], marker)):
            logging.getLogger("t5x_like.data.mixtures").warning(
                "%s records task %s over %s, which has no %s any more; it is not "
                "registered.", REGISTRATIONS_ENV, name, entry["directory"], marker)
            continue
        register(name, entry)


# A mixture file (what `python -m t5x_like.doremi` writes): a gin file whose lines
#   MIXTURE_OR_TASK_NAME = 'reka_mix_doremi'
#   MIXTURE_RATES = {'code_ul2': 0.21, ...}
# name a mixture and its rates over registered tasks or mixtures. Task modules register
# such files at import (`register_mixture_files`): the shipped gin_configs/mixtures/*.gin
# and those recorded as MIXTURE_FILE registrations (keyed by absolute path), which
# worker processes inherit. Including the file in a run's gin files then trains on that
# mixture.
MIXTURE_FILE = "mixture_file"
_NAME_LINE = re.compile(r"^MIXTURE_OR_TASK_NAME\s*=\s*(.+)$", re.M)
_RATES_LINE = re.compile(r"^MIXTURE_RATES\s*=\s*(\{.*\})\s*$", re.M)


def mixture_file_text(name: str, rates: Mapping[str, float], comment: str = "") -> str:
    """The gin text of a mixture file (above): `import tasks` (which registers it),
    MIXTURE_OR_TASK_NAME and MIXTURE_RATES, after `comment` lines."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    rates = {k: round(float(v), 6) for k, v in sorted(rates.items())}
    lines += ["import tasks  # registers this file's mixture (mixtures.register_mixture_files)",
              "", f"MIXTURE_OR_TASK_NAME = {name!r}", f"MIXTURE_RATES = {rates!r}", ""]
    return "\n".join(lines)


def read_mixture_file(path: str) -> tuple[str, dict[str, float]]:
    """(name, rates) of a mixture file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    name, rates = _NAME_LINE.search(text), _RATES_LINE.search(text)
    if name is None or rates is None:
        raise ValueError(f"{path} is not a mixture file: it needs the lines "
                         "`MIXTURE_OR_TASK_NAME = 'name'` and `MIXTURE_RATES = {...}`.")
    return ast.literal_eval(name.group(1).strip()), dict(ast.literal_eval(rates.group(1)))


def register_mixture_file(path: str, record: bool = False) -> str:
    """Registers the mixture of a mixture file (its parts must be registered); returns
    its name. `record`: also for the data worker processes to come (a MIXTURE_FILE
    registration, which `register_mixture_files` replays)."""
    name, rates = read_mixture_file(path)
    for part in rates:
        get_mixture_or_task(part)
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, [(part, float(r)) for part, r in sorted(rates.items())
                                     if r > 0])
    if record:
        record_registration(MIXTURE_FILE, os.path.abspath(path))
    return name


def register_mixture_files(paths: Sequence[str] = ()) -> list[str]:
    """Registers the mixture files `paths` and those recorded as MIXTURE_FILE
    registrations (here or by a parent process)."""
    recorded = recorded_registrations(MIXTURE_FILE)
    return [register_mixture_file(p) for p in dict.fromkeys([*paths, *recorded])]


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
