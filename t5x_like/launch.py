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
    multi = parser.add_argument_group(
        "multi-process (one process per host or GPU node, all with the same flags)")
    multi.add_argument("--multiprocess", action="store_true",
                       help="join a multi-process run that jax detects (Cloud TPU pods, Open "
                            "MPI); under srun (SLURM) the run is joined without it.")
    multi.add_argument("--coordinator_address", default=None,
                       help="host:port of process 0 (then also --process_count/--process_index).")
    multi.add_argument("--process_count", type=int, default=None)
    multi.add_argument("--process_index", type=int, default=None)
    multi.add_argument("--local_device_ids", default=None,
                       help="comma-separated GPU ordinals this process drives (default: "
                            "from SLURM's layout, else all it sees).")
    multi.add_argument("--distributed_timeout", type=float, default=DISTRIBUTED_TIMEOUT_S,
                       help="seconds to wait for every process to join (default %(default)g).")
    multi.add_argument("--heartbeat_timeout", type=float, default=HEARTBEAT_TIMEOUT_S,
                       help="seconds without heartbeats after which a process counts as dead "
                            "and every other one is stopped (default %(default)g).")
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


# How long a process waits for the others to join (jax.distributed's initialization
# timeout; nodes that pull a container or a venv may start minutes apart), and after how
# long without heartbeats a process counts as dead, which makes the coordination service
# stop every other process (also the wait at exit for the others to finish). jax's own
# defaults; --distributed_timeout / --heartbeat_timeout change them.
DISTRIBUTED_TIMEOUT_S = 300
HEARTBEAT_TIMEOUT_S = 100

# What srun sets in every task of a job step (jax's SLURM detection needs the same five).
_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID")


def slurm_step_tasks(env: Mapping[str, str] = os.environ) -> int:
    """How many tasks the SLURM job step this process belongs to has (0: not a task that
    srun started; a batch script itself is none). The entry points join a multi-process
    run by themselves when this is more than 1."""
    if not all(name in env for name in _SLURM_STEP_VARS):
        return 0
    try:
        return int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]))
    except ValueError:
        return 0  # not a count: slurm_layout names the variable


def _tasks_per_node(value: str) -> list[int]:
    """SLURM's compressed tasks-per-node list: "8(x2),4" -> [8, 8, 4]."""
    counts = []
    for part in value.split(","):
        found = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not found:
            raise ValueError(part)
        counts += [int(found.group(1))] * int(found.group(2) or 1)
    return counts


def _slurm_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise ValueError(_slurm_problem(env, f"{name}={env.get(name)!r} is not a number")
                         ) from None


def _slurm_problem(env: Mapping[str, str], problem: str) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("SLURM_")
                      and any(word in k for word in ("TASK", "PROCID", "LOCALID", "NODE")))
    return (f"The SLURM environment of this process is inconsistent: {problem} ({shown}). "
            "Start the entry point with srun inside the allocation (srun sets them), not "
            "by hand with some SLURM_* variables copied from elsewhere; or give "
            "--coordinator_address, --process_count and --process_index, which win over "
            "SLURM's variables.")


def slurm_layout(env: Mapping[str, str] = os.environ) -> dict[str, int]:
    """This task's place in its SLURM job step, from srun's variables, checked against
    each other: process_count, process_index, node (SLURM_NODEID), nodes, local_index
    (SLURM_LOCALID) and tasks_on_node (from SLURM_STEP_TASKS_PER_NODE, SLURM's compressed
    per-node list; else SLURM_TASKS_PER_NODE / SLURM_NTASKS_PER_NODE)."""
    count, index = _slurm_int(env, "SLURM_NTASKS"), _slurm_int(env, "SLURM_PROCID")
    local = _slurm_int(env, "SLURM_LOCALID")
    if "SLURM_STEP_NUM_TASKS" in env and _slurm_int(env, "SLURM_STEP_NUM_TASKS") != count:
        raise ValueError(_slurm_problem(env, "SLURM_STEP_NUM_TASKS and SLURM_NTASKS differ"))
    per_node_name = next((name for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
                                            "SLURM_NTASKS_PER_NODE") if env.get(name)), None)
    node = _slurm_int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else None
    if per_node_name is None:  # only the counts: all nodes alike
        nodes = _slurm_int(env, "SLURM_STEP_NUM_NODES") if "SLURM_STEP_NUM_NODES" in env else 1
        if count % nodes:
            raise ValueError(_slurm_problem(env, f"{count} tasks do not split over {nodes} nodes"))
        per_node = [count // nodes] * nodes
    else:
        try:
            per_node = _tasks_per_node(env[per_node_name])
        except ValueError:
            raise ValueError(_slurm_problem(env, f"{per_node_name} is not a SLURM task list such "
                                                 "as 8(x2)")) from None
        if per_node_name == "SLURM_NTASKS_PER_NODE" and len(per_node) == 1:
            per_node = per_node * max(1, count // per_node[0])  # one number for every node
    node = index // per_node[0] if node is None else node
    problems = [text for bad, text in (
        (not 0 <= index < count, f"SLURM_PROCID {index} is not below SLURM_NTASKS {count}"),
        (sum(per_node) != count, f"{per_node_name} adds up to {sum(per_node)} tasks, not "
                                 f"SLURM_NTASKS {count}"),
        (not 0 <= node < len(per_node), f"SLURM_NODEID {node} is not one of the step's "
                                        f"{len(per_node)} nodes"),
        (node < len(per_node) and not 0 <= local < per_node[node],
         f"SLURM_LOCALID {local} is not below the {per_node[min(node, len(per_node) - 1)]} "
         "tasks of its node")) if bad]
    if problems:
        raise ValueError(_slurm_problem(env, "; ".join(problems)))
    return {"process_count": count, "process_index": index, "node": node,
            "nodes": len(per_node), "local_index": local, "tasks_on_node": per_node[node]}


# One entry per GPU the NVIDIA driver knows on this node (no CUDA start-up needed).
NVIDIA_GPUS_DIR = "/proc/driver/nvidia/gpus"


def _gpu_counts(env: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(GPUs this process can see, GPUs of its node), None where unknown, without starting
    CUDA: CUDA_VISIBLE_DEVICES (which SLURM sets to the task's or the node's GPUs),
    SLURM_GPUS_ON_NODE, and the NVIDIA driver's /proc/driver/nvidia/gpus."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    seen = len([v for v in visible.split(",") if v.strip()]) if visible is not None else None
    node = None
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        node = int(env["SLURM_GPUS_ON_NODE"])
    elif os.path.isdir(NVIDIA_GPUS_DIR):
        node = len(os.listdir(NVIDIA_GPUS_DIR))
    return (seen if seen is not None else node), (node if node is not None else seen)


def slurm_local_device_ids(layout: Mapping[str, int],
                           env: Mapping[str, str] = os.environ) -> list[int] | None:
    """The GPUs (CUDA ordinals, after CUDA_VISIBLE_DEVICES) this SLURM task drives.

    One task per node: all the GPUs it sees. Several tasks per node, each seeing all of
    the node's GPUs: an equal share, by SLURM_LOCALID (one each: one process per GPU).
    A task that SLURM bound to its own GPUs (--gpus-per-task, --gpu-bind; it sees fewer
    than the node has): all of those. None where no GPU is known (a CPU host, where jax
    uses its CPU devices) and one task per node (jax then restricts nothing); with several
    tasks and no GPU count, [SLURM_LOCALID], as jax does.
    Written from SLURM's srun/sbatch documentation and jax's clusters/slurm_cluster.py;
    no SLURM cluster or GPU was available here, so only environments were tested."""
    seen, node = _gpu_counts(env)
    tasks, local = layout["tasks_on_node"], layout["local_index"]
    if seen is None:
        return None if tasks == 1 else [local]
    if tasks == 1 or seen < node:
        return list(range(seen))
    if seen % tasks:
        raise ValueError(_slurm_problem(
            env, f"{tasks} tasks on this node cannot share its {seen} GPUs equally (set "
                 "--ntasks-per-node to 1 or to the node's GPU count)"))
    share = seen // tasks
    return list(range(local * share, (local + 1) * share))


def distributed_arguments(coordinator_address: str | None = None,
                          process_count: int | None = None,
                          process_index: int | None = None,
                          local_device_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """The jax.distributed.initialize arguments that join this process to its run.

    Explicit flags (all three of coordinator/count/index) win, with jax's detection off.
    Under srun: ours from SLURM's variables (slurm_layout, slurm_local_device_ids; the
    coordinator as jax picks it: the step's first node, a port from the job id or
    JAX_COORDINATOR_PORT), with jax's detection off, since it would give a process that
    drives a whole node one GPU. Otherwise nothing: jax detects the cluster (Cloud TPU
    pods, one process per host, Open MPI, Kubernetes). Reads os.environ."""
    explicit = (coordinator_address, process_count, process_index)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError(
            "Give all of --coordinator_address, --process_count and --process_index (or "
            "none of them, under srun or with --multiprocess, to let the cluster's "
            f"environment say); got {coordinator_address!r}, {process_count!r}, "
            f"{process_index!r}.")
    ids = None if local_device_ids is None else [int(i) for i in local_device_ids]
    if coordinator_address is not None:
        return dict(coordinator_address=coordinator_address, num_processes=process_count,
                    process_id=process_index, local_device_ids=ids,
                    cluster_detection_method="deactivate")
    if slurm_step_tasks():
        from jax._src.clusters import slurm_cluster  # noqa: PLC0415 - jax's own port rule

        layout = slurm_layout()
        address = slurm_cluster.SlurmCluster.get_coordinator_address(
            None, os.environ.get("JAX_COORDINATOR_PORT"))
        if ids is None:
            ids = slurm_local_device_ids(layout)
        return dict(coordinator_address=address, num_processes=layout["process_count"],
                    process_id=layout["process_index"], local_device_ids=ids,
                    cluster_detection_method="deactivate")
    return dict(local_device_ids=ids)


# What this process joined with (initialize_distributed), for check_local_devices.
_joined: dict[str, Any] = {}


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _check_coordinator(address: str, process_id: int, timeout_s: float) -> None:
    """Process 0 must be able to open the coordinator's port; the others must reach it
    within the start-up timeout. Checked here because jax, on either failure, aborts the
    process from C++ with no Python error to report."""
    import socket  # noqa: PLC0415
    import time  # noqa: PLC0415

    host, port = _host_port(address)
    if process_id == 0:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", port))
            except OSError as e:
                raise OSError(
                    f"Process 0 cannot serve the multi-process run's coordinator on port "
                    f"{port} of this host ({e.strerror}): another program, or another run of "
                    "the same SLURM job, holds it. Pick a free port (--coordinator_address="
                    "HOST:PORT, or JAX_COORDINATOR_PORT under SLURM).") from None
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=5).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise OSError(
                    f"Process {process_id} could not reach the coordinator {address} of its "
                    f"multi-process run within {timeout_s:g} s ({e.strerror or e}). Process 0 "
                    "serves it: check that process 0 was started and is still running, that "
                    "this host can reach its host and port (firewall, the right network "
                    "interface), and that every process got the same coordinator; a slow "
                    "start wants a longer --distributed_timeout.") from None
            time.sleep(1)


def initialize_distributed(coordinator_address: str | None = None,
                           process_count: int | None = None,
                           process_index: int | None = None,
                           local_device_ids: Sequence[int] | None = None,
                           timeout_s: float = DISTRIBUTED_TIMEOUT_S,
                           heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> None:
    """Joins a multi-process run: one process per host, per node or per GPU, all running
    the same command (distributed_arguments says from what). Gives up after `timeout_s`
    if the others do not all join; once joined, a process that stops sending heartbeats
    for `heartbeat_timeout_s` (killed, crashed, its node lost) makes jax's coordination
    service abort every other process (non-zero exit), so none hangs in a collective."""
    if os.environ.get("JAX_LOCAL_DEVICE_IDS") and local_device_ids is None:
        local_device_ids = [int(i) for i in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
    arguments = distributed_arguments(coordinator_address, process_count, process_index,
                                      local_device_ids)
    if arguments.get("coordinator_address"):
        log.info("process %d of %d joins the run at %s (local devices: %s; start-up timeout "
                 "%g s, heartbeat timeout %g s)", arguments["process_id"],
                 arguments["num_processes"], arguments["coordinator_address"],
                 arguments["local_device_ids"] or "all", timeout_s, heartbeat_timeout_s)
        _check_coordinator(arguments["coordinator_address"], arguments["process_id"], timeout_s)
    else:
        log.info("joining a multi-process run that jax detects (Cloud TPU, Open MPI, ...)")
    jax.distributed.initialize(**arguments, initialization_timeout=int(timeout_s),
                               heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    _joined.update(arguments)


def check_local_devices(num_devices: int) -> None:
    """A mesh of `num_devices` needs process count x local devices to be that many; checked
    before jax starts its backends when this process was given local_device_ids."""
    ids = _joined.get("local_device_ids")
    processes = _jax_distributed.global_state.num_processes or 1
    if ids and len(ids) * processes != num_devices:
        raise ValueError(
            f"This process drives local devices {list(ids)} ({len(ids)} of them), so the "
            f"{processes} processes hold {len(ids) * processes} devices, but the mesh needs "
            f"{num_devices}. Give each process mesh devices / processes = "
            f"{num_devices / processes:g} devices (--local_device_ids, JAX_LOCAL_DEVICE_IDS, "
            "or under SLURM one task per node or one per GPU), or pick a mesh of "
            f"{len(ids) * processes} devices.")


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
    check_local_devices(mesh_config.num_devices)
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
        if (args.multiprocess or args.coordinator_address is not None
                or slurm_step_tasks() > 1):
            initialize_distributed(
                args.coordinator_address, args.process_count, args.process_index,
                _device_ids_flag(args.local_device_ids), args.distributed_timeout,
                args.heartbeat_timeout)
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
        _crash_alone_if_distributed()
        raise


def _device_ids_flag(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(i) for i in value.split(",") if i.strip()]
    except ValueError:
        raise ValueError(f"--local_device_ids={value!r}: expected GPU ordinals separated by "
                         "commas, e.g. --local_device_ids=0,1,2,3.") from None


def _crash_alone_if_distributed() -> None:
    """A process of a multi-process run that crashed (not a configuration error, which
    every process meets alike) exits now with code 1, after its traceback, skipping jax's
    exit barrier: that would wait up to 300 s for the others while they wait for it in a
    collective. They see its heartbeats stop and are stopped within --heartbeat_timeout."""
    if _jax_distributed.global_state.client is None:
        return
    import traceback  # noqa: PLC0415

    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(1)
