"""Joining a multi-process run: one process per host, per node or per GPU, from explicit
flags, from SLURM's variables (srun) or from what jax detects (Cloud TPU pods), with
start-up and heartbeat timeouts, and a crashed process that exits at once.

`launch.run` calls `initialize_distributed` before anything else touches jax; the rest
are its parts, public for the tests and the scripts in scripts/cluster/. Written from
SLURM's srun/sbatch documentation and jax's distributed and clusters modules; no SLURM
cluster, GPU or TPU pod was available here, so only environments and localhost processes
were tested (docs/OPERATIONS.md, "Processes").
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax._src import distributed as _jax_distributed

log = logging.getLogger("t5x_like.launch")


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


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags of every command (join_if_asked reads them)."""
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


def join_if_asked(args: argparse.Namespace) -> None:
    """Joins a multi-process run when the flags (add_flags) or srun ask for one."""
    if args.multiprocess or args.coordinator_address is not None or slurm_step_tasks() > 1:
        initialize_distributed(
            args.coordinator_address, args.process_count, args.process_index,
            device_ids_flag(args.local_device_ids), args.distributed_timeout,
            args.heartbeat_timeout)


def device_ids_flag(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(i) for i in value.split(",") if i.strip()]
    except ValueError:
        raise ValueError(f"--local_device_ids={value!r}: expected GPU ordinals separated by "
                         "commas, e.g. --local_device_ids=0,1,2,3.") from None


def crash_alone_if_distributed() -> None:
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
