"""Process start-up shared by the entry points (train, eval, infer): flags, gin, logging,
multi-process initialisation and the device count.

An entry point's `main` is `launch.run(configurable)`: it parses the T5X-style flags
(`--gin_file`, `--gin.NAME=VALUE`, `--gin_bindings`, `--gin_search_paths`, the
multi-process flags), sets up logging, joins a multi-process run when asked, parses the
gin files and calls the gin-configured function. Library code below the entry points
never imports gin.

Device start-up has two steps, because jax's CPU device count and XLA's flags can only
be set before its backends start: `start_devices(mesh_config)` (the mesh preset's XLA
flags and, on a CPU-only host, the emulated device count; before any computation) and
then `mesh_for(mesh_config)`, which checks the count and builds the mesh. TensorFlow,
which SeqIO loads to read data on the host, is kept off the GPUs (`run` does it first).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
from jax._src import distributed as _jax_distributed
from jax._src import xla_bridge as _xla_bridge

from t5x_like import cluster

log = logging.getLogger("t5x_like.launch")


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GIN_SEARCH_PATHS = (os.path.join(REPO_ROOT, "gin_configs"), REPO_ROOT)

DEBUG_ENV = "T5X_LIKE_DEBUG"
# What a user can fix in their configuration: reported as one paragraph, exit code 2
# (the full traceback with --debug). Anything else is a bug and shows its traceback.
CONFIG_ERRORS = (ValueError, TypeError, KeyError, OSError, ImportError)

# Python modules that the parsed gin files import (`import my_tasks`): the task modules
# that worker processes must import too, so that they see the same SeqIO registry.
_gin_imports: list[str] = []


class RunStopped(RuntimeError):
    """The run stopped itself on purpose (a guard fired); the message says why.

    `save_state`: the state is good to checkpoint before stopping (after skipped
    non-finite steps it is the last good one; after a loss spike it is not)."""

    def __init__(self, message: str, save_state: bool = False):
        super().__init__(message)
        self.save_state = save_state


# ---------------------------------------------------------------------------
# Flags and gin


def parse_flags(argv: Sequence[str], prog: str = "python -m t5x_like.train",
                description: str = "",
                extra_flags: Mapping[str, Mapping[str, Any]] | None = None
                ) -> argparse.Namespace:
    """T5X-style flags: --gin_file (repeatable), --gin.NAME=VALUE, --gin_search_paths,
    the multi-process flags, and an entry point's own (`extra_flags`: {name:
    argparse.add_argument keywords}, e.g. plan's --output)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, options in (extra_flags or {}).items():
        parser.add_argument(f"--{name}", **options)
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin file to parse (repeatable), found on the search paths.")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="a gin binding such as \"TRAIN_STEPS=100\" (repeatable).")
    parser.add_argument("--gin_search_paths", default="",
                        help="comma-separated directories searched for gin files and includes.")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of configuration errors (or set "
                             f"{DEBUG_ENV}=1).")
    cluster.add_flags(parser)
    args, rest = parser.parse_known_args(argv)
    for item in rest:
        if item.startswith("--gin."):
            name, sep, value = item[len("--gin."):].partition("=")
            if not sep:
                parser.error(f"{item!r}: expected --gin.NAME=VALUE, e.g. --gin.TRAIN_STEPS=100")
            args.gin_bindings.append(f"{name} = {value}")
        else:
            parser.error(f"unrecognised argument {item!r}")
    if not args.gin_file:
        parser.error("at least one --gin_file is required, e.g. "
                     "--gin_file=experiments/demo_encdec_ul2.gin")
    return args


def _drop_package_resource_reader() -> None:
    """Keeps gin from looking includes up as resources of Python packages.

    gin tries "runs/pretrain.gin" as a file inside a package named `runs` before the
    search paths; a plain directory ./runs (our MODEL_DIRs live there) is a namespace
    package without a file, and gin's lookup then crashes with a TypeError. Our files
    are always found on the search paths, so only the plain file reader is kept. gin
    offers no public way to remove a reader (tests/test_launch.py pins the behaviour).
    """
    readers = gin.config._FILE_READERS  # noqa: SLF001
    readers[:] = [(reader, exists) for reader, exists in readers
                  if getattr(exists, "__module__", "") != "gin.resource_reader"]


def _imports_of(parsed: gin.config.ParsedConfigFileIncludesAndImports) -> list[str]:
    names = list(parsed.imports)
    for include in parsed.includes:
        names += _imports_of(include)
    return names


# Modules that moved into the subpackages (old `t5x_like.<name>` -> new module); a gin file
# or binding that still names the old place gets the new one in its error message.
MOVED_MODULES = {
    "vocabulary": "data.vocabulary", "mixtures": "data.mixtures", "documents": "data.documents",
    "packing": "data.packing", "store": "data.store", "pipeline": "data.pipeline",
    "preference_data": "data.pairs", "ul2": "data.ul2", "stream": "data.stream",
    "partitioning": "model.partitioning", "layers": "model.layers", "network": "model.network",
    "models": "model.families", "decoding": "model.decoding", "flops": "model.flops",
    "hardware": "model.hardware", "preference": "objectives.preference",
    "group_dro": "objectives.group_dro", "trainer": "training.optimizers",
    "loop": "training.loop", "checkpoints": "training.checkpoints", "guards": "training.guards",
    "metrics": "training.metrics", "loader": "training.loader", "train": "training.train",
    "evaluation": "evaluation.evaluate", "bpc": "evaluation.bpc",
    "inference": "evaluation.predict", "infer": "evaluation.infer", "plan": "planning.planner",
    "memory": "planning.memory", "collectives": "planning.collectives", "hf": "interop.hf",
    "doremi": "recipes.doremi", "rejection": "recipes.best_of_n",
    "rejection_sample": "recipes.rejection_sampling",
}
# Classes that left their module's successor (models.RewardModel -> preference.RewardModel).
_MOVED_NAMES = {"RewardModel": "objectives.preference", "DPOModel": "objectives.preference",
                "DoReMiModel": "objectives.group_dro", "TrainState": "training.train_state",
                "make_train_step": "training.train_state"}


def moved_hint(message: str) -> str | None:
    """For a gin error that names a module's old place, where it is now (else None)."""
    found = (re.search(r"No module named 't5x_like\.(\w+)'", message)
             or re.search(r"No configurable matching '(\w+)\.(\w+)", message))
    if not found or found.group(1) not in MOVED_MODULES:
        return None
    old = found.group(1)
    new = _MOVED_NAMES.get(found.group(2) if found.lastindex == 2 else "", MOVED_MODULES[old])
    package, module = new.rsplit(".", 1)
    return (f"t5x_like's modules moved into subpackages: `from t5x_like import {old}` is now "
            f"`from t5x_like.{package} import {module}`, and gin names its configurables "
            f"`{module}.<name>` (e.g. --gin.{module}.<name>.<param>=...). Every move: "
            "docs/ARCHITECTURE.md, \"Package layout\".")


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> list[str]:
    """Parses gin files then bindings (later ones win), with our search paths and the
    working directory on sys.path (a user's task module beside their gin file).

    Returns the Python modules the files import, also kept for `gin_imports()`.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for path in (*search_paths, *DEFAULT_GIN_SEARCH_PATHS):
        if path:
            gin.add_config_file_search_path(path)
    _drop_package_resource_reader()
    try:
        parsed = gin.parse_config_files_and_bindings(gin_files, bindings,
                                                     finalize_config=False)
    except (ImportError, ValueError) as e:
        hint = moved_hint(str(e))
        if hint is None:
            raise
        # (gin re-raises a proxy class that takes no message: a plain one instead)
        error = ModuleNotFoundError if isinstance(e, ImportError) else ValueError
        raise error(f"{e}\n{hint}") from None
    imported = [name for p in parsed for name in _imports_of(p)]
    _gin_imports[:] = sorted({name for name in imported
                              if not name.startswith(("t5x_like", "__gin__"))})
    return list(_gin_imports)


def check_bindings(bindings: Sequence[str]) -> None:
    """A command-line macro that nothing references (a misspelt `--gin.TRAIN_STPES=6`)
    is an error naming it and the nearest macros that are used. gin itself already
    refuses unknown configurables and parameters."""
    text = gin.config_str()
    referenced = set(re.findall(r"%([A-Za-z_]\w*)", text))
    for binding in bindings:
        name = binding.split("=", 1)[0].strip()
        if re.fullmatch(r"[A-Za-z_]\w*", name) and name not in referenced:
            near = difflib.get_close_matches(name, sorted(referenced), n=3, cutoff=0.6)
            raise ValueError(
                f"The binding {binding.strip()!r} sets the macro {name}, which nothing in "
                f"the config uses, so it would change nothing. Did you mean "
                f"{' or '.join(near) if near else 'a macro of the gin files'}? Macros in use: "
                f"{', '.join(sorted(referenced))}.")

def gin_macro(name: str) -> Any:
    """The object the parsed gin macro `name` stands for (e.g. MODEL_CONFIG), built
    with its bindings: for commands that need a model's config but run no
    gin-configured function (`python -m t5x_like.hf export`)."""
    try:
        value = gin.query_parameter(f"{name}/macro.value")
    except ValueError:
        raise ValueError(f"the gin files bind no macro {name!r}; include a model gin file "
                         "(gin_configs/models/*.gin, or the one `hf import --gin_out` "
                         "wrote).") from None
    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn()
    return value


def gin_imports() -> list[str]:
    """The Python modules (other than t5x_like's) that the parsed gin files imported."""
    return list(_gin_imports)


# ---------------------------------------------------------------------------
# Logging, processes, devices


def setup_logging() -> None:
    """Our loggers at INFO on the console; libraries (gin, absl, orbax) at WARNING."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    root = logging.getLogger()
    for handler in list(root.handlers):
        # A library that logged while being imported gave the root logger Python's
        # default console handler; ours replaces it (others, e.g. pytest's, stay).
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("t5x_like", "tasks"):
        logging.getLogger(name).setLevel(logging.INFO)


def hide_gpus_from_tensorflow() -> None:
    """Keeps TensorFlow (SeqIO's data pipelines, the tokenizer) off the GPUs.

    Left alone, TensorFlow maps every visible GPU and reserves most of its memory the
    first time it runs an op, memory jax then cannot have. T5X and MaxText hide the
    GPUs from it the same way. A no-op without TensorFlow; must run before TensorFlow
    runs anything (its devices cannot change afterwards).
    """
    try:
        import tensorflow as tf  # noqa: PLC0415 - only where TensorFlow is installed
    except ImportError:
        return
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as error:  # TensorFlow already initialised its devices
        log.warning("TensorFlow already initialised its devices, so it may hold GPU "
                    "memory: %s", error)


def apply_xla_flags(flags: Sequence[str]) -> None:
    """Adds `flags` (e.g. a GPU mesh preset's collective-overlap flags) to XLA_FLAGS.

    XLA reads XLA_FLAGS when jax's first backend starts, so this must run before any
    computation; a flag already in XLA_FLAGS (set by the user) is kept as the user set
    it. An unknown flag makes XLA abort at start-up, naming it.
    """
    current = os.environ.get("XLA_FLAGS", "").split()
    names = {flag.split("=", 1)[0] for flag in current}
    added = [flag for flag in flags if flag.split("=", 1)[0] not in names]
    if not added:
        return
    if _xla_bridge.backends_are_initialized():
        log.warning("jax's backends are already up; XLA flags %s take no effect.", added)
        return
    os.environ["XLA_FLAGS"] = " ".join(current + added)


# jax's GPU allocator takes this fraction of each GPU when its backend starts
# (partitioning.MeshConfig.memory_fraction; the planner judges fit against the same field).
MEMORY_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"


def apply_environment(variables: Mapping[str, str]) -> dict[str, str]:
    """Sets the environment variables of a mesh preset (the GPU presets' NCCL settings
    and memory fraction) that the environment does not set already: a variable you
    exported keeps your value. Returns the ones it set.

    CUDA and jax's GPU allocator read them when jax's GPU backend starts, NCCL when it
    makes its first communicator (NCCL's and JAX's GPU memory documentation; no GPU ran
    here), so this runs before any computation; after it, nothing is set and a warning
    names what takes no effect.
    """
    yours = {name: os.environ[name] for name in variables if name in os.environ}
    changed = {name: value for name, value in yours.items() if value != variables[name]}
    if changed:
        log.info("kept from your environment over the mesh preset's: %s",
                 ", ".join(f"{n}={v} (preset: {variables[n]})" for n, v in changed.items()))
    if MEMORY_FRACTION_ENV in changed:
        log.warning("%s=%s from your environment, but the plan (python -m t5x_like.plan) "
                    "judged fit at the mesh preset's %s: set "
                    "--gin.partitioning.MeshConfig.memory_fraction=%s instead so both agree.",
                    MEMORY_FRACTION_ENV, changed[MEMORY_FRACTION_ENV],
                    variables[MEMORY_FRACTION_ENV], changed[MEMORY_FRACTION_ENV])
    added = {name: value for name, value in variables.items() if name not in yours}
    if not added:
        return {}
    if _xla_bridge.backends_are_initialized():
        log.warning("jax's backends are already up; environment variables %s take no "
                    "effect.", added)
        return {}
    os.environ.update(added)
    log.info("environment from the mesh preset: %s",
             " ".join(f"{n}={v}" for n, v in sorted(added.items())))
    return added


def start_devices(mesh_config) -> None:
    """Everything about the devices that must happen before jax starts its backends:
    the mesh preset's XLA flags and environment (memory fraction, NCCL settings), and
    on a CPU-only host the emulated device count."""
    apply_xla_flags(mesh_config.xla_flags)
    apply_environment(mesh_config.environment())
    use_cpu_devices(mesh_config.num_devices)


# Counts of jax's persistent-compilation-cache events in this process (jax.monitoring):
# every compile that consults the cache is a hit (read from it) or a miss (compiled).
_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
                 "/jax/compilation_cache/cache_misses": "misses"}
_cache_counts = {"hits": 0, "misses": 0, "listening": 0}


def _count_cache_event(event: str, **kwargs) -> None:
    if event in _CACHE_EVENTS:
        _cache_counts[_CACHE_EVENTS[event]] += 1


def cache_counts() -> tuple[int, int]:
    """(hits, misses) of jax's persistent compilation cache in this process so far."""
    return _cache_counts["hits"], _cache_counts["misses"]


# Where a run keeps jax's persistent compilation cache by default (docs/OPERATIONS.md).
COMPILATION_CACHE_DIR = "{model_dir}/compilation_cache"


@contextlib.contextmanager
def compilation_cache(directory: str | None, run_dir: str = ""):
    """jax's persistent compilation cache in `directory` while the block runs (its
    `{model_dir}` replaced by `run_dir`; None or '': no cache): a restarted run reads
    its compiled programs back instead of compiling them again.

    A cache the user configured (JAX_COMPILATION_CACHE_DIR, or jax.config in their own
    code) is kept. jax writes an entry only from process 0 and only for programs that
    took at least jax_persistent_cache_min_compile_time_secs (1 s) to compile; a
    directory on an object store (gs://...) goes through etils.epath, as jax's cache
    does itself. The setting is undone after the block (a later run in the same process
    never writes into this one's directory).
    """
    current = jax.config.jax_compilation_cache_dir
    if directory == COMPILATION_CACHE_DIR and not current and jax.process_count() > 1:
        # A 2-process CPU run started again hung here in its first cross-process
        # computation read from the cache (both processes waiting on a gloo all-reduce);
        # untested on GPUs. A multi-process run opts in by naming a directory.
        log.info("persistent compilation cache: off by default in a multi-process run; "
                 "set train.train.compilation_cache_dir to a shared path to use one")
        directory = None
    if not directory or current:
        if current:
            log.info("persistent compilation cache: %s (yours)", current)
        yield current
        return
    path = directory.replace("{model_dir}", os.fspath(run_dir).rstrip("/"))
    path = path if "://" in path else os.path.abspath(path)
    from jax.experimental.compilation_cache import compilation_cache as jax_cache  # noqa: PLC0415

    if not _cache_counts["listening"]:
        jax.monitoring.register_event_listener(_count_cache_event)
        _cache_counts["listening"] = 1
    before = cache_counts()
    jax.config.update("jax_compilation_cache_dir", path)
    jax_cache.reset_cache()  # a cache opened earlier in this process at another path
    try:
        yield path
    finally:
        hits, misses = (now - then for now, then in zip(cache_counts(), before))
        log.info("persistent compilation cache %s: %d of %d compiled programs read from it",
                 path, hits, hits + misses)
        jax.config.update("jax_compilation_cache_dir", None)
        jax_cache.reset_cache()


@contextlib.contextmanager
def compile_timer(what: str):
    """Logs how long the block's compile took and whether jax's persistent compilation
    cache served it: "train step compiled in 0.41s (persistent compilation cache: 1
    hit, 0 misses)"."""
    before, start = cache_counts(), time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    hits, misses = (now - then for now, then in zip(cache_counts(), before))
    log.info("%s compiled in %.2fs (persistent compilation cache: %d hit%s, %d miss%s)",
             what, seconds, hits, "" if hits == 1 else "s", misses,
             "" if misses == 1 else "es")


def use_cpu_devices(n: int) -> None:
    """On a CPU-only host, emulate the `n` mesh devices over this run's processes.

    Must run before jax's first computation; a no-op when XLA_FLAGS already sets the
    count or the backends are up (e.g. inside a test process).
    """
    if "--xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    # Not jax.process_count(): that would start the backends before the update below.
    processes = _jax_distributed.global_state.num_processes or 1
    try:
        jax.config.update("jax_num_cpu_devices", max(1, n // processes))
    except RuntimeError:
        pass  # backends already up: use what is there.


def mesh_for(mesh_config) -> tuple[jax.sharding.Mesh, Any]:
    """(mesh, logical-axis rules) of a partitioning.MeshConfig, after checking that the
    mesh uses every device jax sees."""
    cluster.check_local_devices(mesh_config.num_devices)
    if mesh_config.num_devices != jax.device_count():
        raise ValueError(
            f"The mesh {mesh_config.global_shape} needs {mesh_config.num_devices} devices but "
            f"jax sees {jax.device_count()} ({jax.devices()[0].platform}). Pick a mesh gin file "
            "that matches (gin_configs/meshes/), or on CPU set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={mesh_config.num_devices} before starting.")
    return mesh_config.make_mesh(), mesh_config.rule_set()


# ---------------------------------------------------------------------------
# The entry point


def run(configurable: str, argv: Sequence[str] | None = None,
        prog: str = "python -m t5x_like.train",
        extra_flags: Mapping[str, Mapping[str, Any]] | None = None) -> Any:
    """Parses flags and gin, starts logging and processes, and calls the configurable.

    `configurable` is the gin-registered function by its full name, e.g.
    "t5x_like.training.train.train": run as `python -m`, an entry point's file is `__main__`, a
    second module object that gin never registered, so the name (not the function
    object) says which one gin calls. `extra_flags` are the entry point's own flags,
    passed to it as keyword arguments (over its gin bindings). A configuration error
    (CONFIG_ERRORS) is printed as one paragraph and exits with code 2, a run a guard
    stopped (RunStopped) with code 1; `--debug` shows the traceback instead.
    """
    args = parse_flags(sys.argv[1:] if argv is None else argv, prog=prog,
                       extra_flags=extra_flags)
    setup_logging()
    # The entry point set it (process.restart_with_huge_pages): say so, it moves the speed.
    log.info("GLIBC_TUNABLES=%s", os.environ.get("GLIBC_TUNABLES", ""))
    hide_gpus_from_tensorflow()
    try:
        cluster.join_if_asked(args)
        parse_gin(args.gin_file, args.gin_bindings,
                  [p for p in args.gin_search_paths.split(",") if p])
        check_bindings(args.gin_bindings)
        extra = {name: getattr(args, name) for name in (extra_flags or {})}
        return gin.get_configurable(configurable)(**extra)
    except (*CONFIG_ERRORS, RunStopped) as e:
        if args.debug or os.environ.get(DEBUG_ENV):
            raise
        message = str(e).strip() or type(e).__name__
        print(f"{prog}: {'stopped' if isinstance(e, RunStopped) else 'error'}: "
              f"{message}\n(run with --debug for the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(1 if isinstance(e, RunStopped) else 2) from None
    except Exception:
        cluster.crash_alone_if_distributed()
        raise
