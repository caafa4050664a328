"""Checkpoints: orbax CheckpointManager over the train state, data iterator and config.

One step directory holds these items:
- `state`: the train-state pytree (`nnx.split(TrainState)[1]`: params, optimizer
  state, step), saved asynchronously (the training loop continues while it is
  written) with orbax's standard pytree handler;
- `data`: the data iterator's state as JSON, one file per process
  (`process_{i}-of-{n}.json`, as grain's own handler does), so each host of a
  multi-host run resumes its own shard; where all processes saved the same (global)
  state, as t5x_like's loader does, it restores under another process count too. It
  accepts a grain iterator or anything with `get_state()`/`set_state()` (state a dict
  or JSON bytes), or a plain dict. Beside it, an iterator with `shard_states()` (the
  stream's: data/stream.py) saves each data shard's tf.data iterator state, one file per
  shard written by one process (`shard_{k}.step_{t}.tfdata`: the state at step t), and
  gets them back through `set_shard_states`, so a run resumes without replaying its
  shards under any process count;
- `config`: the operative gin config text, so a step directory says how it was made;
- `integrity`: a 32-bit checksum per state array (the wrap-around sum of its words, on
  device), so that a damaged array is found on restore; a state with a NaN or Inf is
  never saved (`NonFiniteStateError`);
- `run`: what the run says about itself (JSON, optional): its identity (model, data,
  optimizer, schedule) for checks on resume, and host-side state such as the loss
  history of the spike guard.

`restore_latest` reads the newest checkpoint; when it is damaged (incomplete, its
metadata missing, a file truncated or a bit flipped) the step directory is moved aside
to `damaged/` (never deleted), the reason is logged, and the next newest is tried.

Restoring reads arrays straight into the shardings of a target (abstract) state built
for the *current* mesh and rule preset, so a run saved under one layout resumes under
another. The checkpoint's shapes are compared with the target's first: a mismatch is
an error naming the parameter and both shapes, raised before anything is read, and
nothing in the directory is removed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from t5x_like.training import rundir  # sets epath's gs:// backend before any path is used

STATE, DATA, CONFIG, INTEGRITY, RUN = "state", "data", "config", "integrity", "run"
DAMAGED_DIR = "damaged"

log = logging.getLogger("t5x_like.training.checkpoints")


class CheckpointMismatchError(ValueError):
    """The checkpoint is readable but was written by another model or run."""


class DamagedCheckpointError(RuntimeError):
    """A step directory cannot be read back as it was written."""


class NonFiniteStateError(ValueError):
    """The state holds NaN or Inf: it is not saved."""


# ---------------------------------------------------------------------------
# Data-iterator state as a per-process JSON item


def _capture_data_state(item: Any) -> dict[str, Any]:
    """The iterator's state now, as JSON-ready {"format", "state"} (dict or bytes)."""
    state = item.get_state() if hasattr(item, "get_state") else item
    if isinstance(state, bytes):
        return {"format": "bytes", "state": state.decode()}
    if isinstance(state, Mapping):
        return {"format": "dict", "state": dict(state)}
    raise TypeError(
        f"data iterator state is {type(state).__name__}; expected a dict or bytes from "
        "get_state(), or a plain dict. Pass the iterator itself or its state dict.")


class _DataStateHandler(ocp.CheckpointHandler):
    """Writes/reads one JSON file per process (captured state, see `_capture_data_state`)."""

    def save(self, directory: epath.Path, *args, **kwargs):
        args = kwargs.get("args", args[-1] if args else None)
        path = epath.Path(directory) / _process_file(jax.process_index(), jax.process_count())
        path.write_text(json.dumps(args.payload))
        for shard, (step, state) in args.shard_states.items():
            (epath.Path(directory) / f"shard_{shard:05d}.step_{step}.tfdata").write_bytes(state)

    def restore(self, directory: epath.Path, *args, **kwargs):
        payload = read_data_state(epath.Path(directory), jax.process_index(),
                                  jax.process_count())
        # Only the names are listed here; the iterator reads the files of its shards.
        names = (_SHARD_FILE.fullmatch(p.name) for p in epath.Path(directory).iterdir())
        files = {int(m[1]): (int(m[2]), str(epath.Path(directory) / m[0])) for m in names if m}
        return {**payload, "shard_files": files} if files else payload

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(_DataStateHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    payload: dict[str, Any]
    shard_states: dict[int, tuple[int, bytes]] = dataclasses.field(default_factory=dict)


@ocp.args.register_with_handler(_DataStateHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    pass


_SHARD_FILE = re.compile(r"shard_(\d+)\.step_(\d+)\.tfdata")


def _process_file(index: int, count: int) -> str:
    return f"process_{index}-of-{count}.json"


def read_data_state(directory: epath.Path, process_index: int, process_count: int) -> dict:
    """This process's saved iterator state. A checkpoint written by another number of
    processes restores when every process saved the same state (a global state, as
    t5x_like's loader has: see loader.py); per-process states need the same count."""
    own = directory / _process_file(process_index, process_count)
    if own.exists():
        return json.loads(own.read_text())
    saved = sorted(directory.glob("process_*-of-*.json"))
    if not saved:
        raise FileNotFoundError(f"{directory} holds no data iterator state.")
    states = {path.read_text() for path in saved}
    if len(states) == 1:
        return json.loads(states.pop())
    raise CheckpointMismatchError(
        f"{own} is missing: the data iterator state in {directory} was written by "
        f"{len(saved)} processes, each with its own position ({saved[0].name}, ...), and "
        f"this run has {process_count}. Resume with the process count that saved it.")


def _apply_data_state(payload: dict[str, Any], target: Any) -> Any:
    """Sets `target`'s state (if it has set_state) and returns the target or the state."""
    state = payload["state"]
    if payload["format"] == "bytes":
        state = state.encode()
    if target is not None and hasattr(target, "set_state"):
        target.set_state(state)
        if hasattr(target, "set_shard_states"):  # after set_state: states of its step
            target.set_shard_states(payload.get("shard_files", {}))
        return target
    return state


# ---------------------------------------------------------------------------
# Shape check and restore targets


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _check_compatible(stored: Any, target: Any, where: str) -> None:
    stored_shapes, target_shapes = _flat_shapes(stored), _flat_shapes(target)
    problems = []
    for name in sorted(set(stored_shapes) | set(target_shapes)):
        if name not in stored_shapes:
            problems.append(f"  {name}: in the model {target_shapes[name]}, not in the checkpoint")
        elif name not in target_shapes:
            problems.append(f"  {name}: in the checkpoint {stored_shapes[name]}, not in the model")
        elif stored_shapes[name] != target_shapes[name]:
            problems.append(f"  {name}: checkpoint shape {stored_shapes[name]} != model shape "
                            f"{target_shapes[name]}")
    if problems:
        shown = "\n".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more"
                                            if len(problems) > 20 else "")
        raise CheckpointMismatchError(
            f"the checkpoint at {where} does not match the model ({len(problems)} "
            f"differences):\n{shown}\nThe model config differs from the one that wrote this "
            "checkpoint: use the same model config, or a new model_dir. Nothing in the "
            "checkpoint directory was changed.")


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding: a restore target from a state.

    Leaves may be jax.Arrays (a freshly initialised state on the new mesh) or
    ShapeDtypeStructs (e.g. from `nnx.eval_shape` + shardings). A leaf without a
    sharding is placed on the first local device.
    """
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x):
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, state)


# ---------------------------------------------------------------------------
# Integrity: checksums and finiteness, computed on device


def _words_u32(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    unsigned = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _checksums_and_finite(state: Any) -> tuple[list[jax.Array], jax.Array]:
    leaves = jax.tree.leaves(state)
    sums = [jnp.sum(_words_u32(x), dtype=jnp.uint32) for x in leaves]
    finite = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return sums, jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)


def integrity(state: Any) -> tuple[dict[str, int], bool]:
    """({array path: 32-bit checksum}, whether every float is finite) of a state.

    The checksum is the sum of the array's 32-bit words modulo 2**32: one flipped bit
    anywhere changes it, and it costs one pass over the arrays on their own devices.
    """
    sums, finite = jax.device_get(_checksums_and_finite(state))
    names = list(_flat_shapes(state))
    return {name: int(v) for name, v in zip(names, sums)}, bool(finite)


# ---------------------------------------------------------------------------
# The manager


@dataclasses.dataclass
class Restored:
    """What `restore` returns: the state on the target shardings and the side items."""

    step: int
    state: Any
    data: Any = None  # the data iterator (state set), or its state if no iterator given
    config_text: str | None = None
    run: dict[str, Any] | None = None  # the `run` item, if the checkpoint has one


class CheckpointManager:
    """Orbax CheckpointManager with this project's items and checks.

    Use as a context manager (or call `close()`): it waits for in-flight async saves on
    exit, including when the training loop raises, so the last save is never torn.
    """

    def __init__(self, directory: str | epath.PathLike, *, save_interval_steps: int = 1000,
                 max_to_keep: int | None = 3, async_save: bool = True, create: bool = True):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps={save_interval_steps} must be ≥ 1.")
        # orbax rejects relative local paths; users pass MODEL_DIR relative to the cwd.
        self.directory = rundir.path(directory)
        self._save_interval_steps = save_interval_steps
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=create,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: _DataStateHandler(),
                CONFIG: ocp.JsonCheckpointHandler(),
                INTEGRITY: ocp.JsonCheckpointHandler(),
                RUN: ocp.JsonCheckpointHandler(),
            },
        )

    @property
    def save_interval_steps(self) -> int:
        return self._save_interval_steps

    # -- saving --

    def save(self, step: int, state: Any, *, data_iterator: Any = None,
             config_text: str | None = None, run: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Starts saving `state` (and the iterator state, config, run item) at `step` if
        it is due.

        Due means a multiple of `save_interval_steps` (or `force=True`, e.g. the last
        step). The data iterator's state and the checksums are taken now, synchronously,
        so the loop may go on while the arrays are being written. Returns whether a save
        started. Raises NonFiniteStateError, saving nothing, if the state holds a NaN
        or Inf.
        """
        # Our own rule rather than orbax's should_save, which also saves the first step
        # it sees whatever its number: a resumed run would write an off-interval step.
        if not force and step % self._save_interval_steps:
            return False
        checksums, finite = integrity(state)
        if not finite:
            raise NonFiniteStateError(
                f"the train state at step {step} holds NaN or Inf values; it was not saved "
                f"to {self.directory}, whose checkpoints stay as they were.")
        items = {STATE: ocp.args.StandardSave(state),
                 INTEGRITY: ocp.args.JsonSave({"uint32_word_sums": checksums})}
        if data_iterator is not None:
            items[DATA] = _DataSave(_capture_data_state(data_iterator),
                                    getattr(data_iterator, "shard_states", dict)())
        if config_text is not None:
            items[CONFIG] = ocp.args.JsonSave({"operative_config": config_text})
        if run is not None:
            items[RUN] = ocp.args.JsonSave(dict(run))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- reading --

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def newest_run_item(self) -> dict[str, Any] | None:
        """The `run` item of the newest checkpoint, read alone (None if there is none or
        it cannot be read: `restore_latest` then finds out why)."""
        step = self.latest_step()
        if step is None:
            return None
        try:
            return self._manager.restore(step, args=ocp.args.Composite(
                **{RUN: ocp.args.JsonRestore()}))[RUN]
        except Exception:  # noqa: BLE001 - a missing or damaged item: not this check's job
            return None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, step: int, target_state: Any, *, data_iterator: Any = None) -> Restored:
        """Restores `step` onto the shapes, dtypes and shardings of `target_state`.

        `target_state` is the state as the current run would build it (arrays or
        ShapeDtypeStructs with shardings; see `abstract_like`), possibly on another mesh
        or rule preset than the one that saved. Raises CheckpointMismatchError, before
        reading any array, if the stored shapes differ from the target's, and
        DamagedCheckpointError if the step cannot be read back as it was written.
        """
        where = self.directory / str(step)
        try:
            stored = self._manager.item_metadata(step)[STATE]
        except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise many kinds
            raise DamagedCheckpointError(f"{where}: its metadata cannot be read ({e!r})") from e
        if stored is None:
            raise DamagedCheckpointError(f"{where}: it has no '{STATE}' item metadata")
        _check_compatible(getattr(stored, "tree", stored), target_state, str(where))
        present = {p.name for p in where.iterdir()} if where.exists() else set()
        items = {STATE: ocp.args.StandardRestore(abstract_like(target_state))}
        items.update({name: ocp.args.JsonRestore() for name in (CONFIG, INTEGRITY, RUN)
                      if name in present})
        if DATA in present:
            items[DATA] = _DataRestore()
        elif data_iterator is not None:
            raise DamagedCheckpointError(
                f"{where} has no data iterator state, but a data iterator was given "
                "to restore; it was saved without one.")
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001
            if isinstance(e.__cause__, CheckpointMismatchError):
                raise e.__cause__ from None
            raise DamagedCheckpointError(f"{where}: its arrays cannot be read ({e!r})") from e
        _verify(out, items, where)
        data = _apply_data_state(out[DATA], data_iterator) if DATA in items else None
        return Restored(step=step, state=out[STATE], data=data,
                        config_text=out[CONFIG]["operative_config"] if CONFIG in items else None,
                        run=out[RUN] if RUN in items else None)

    def restore_latest(self, target_state: Any, *, data_iterator: Any = None
                       ) -> Restored | None:
        """Restores the newest good checkpoint, or returns None if there is none.

        A damaged newest checkpoint is reported with its path and the reason, moved
        aside to `damaged/` (nothing is deleted), and the next newest is tried.
        CheckpointMismatchError (another model wrote it) is raised, moving nothing.
        """
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return self.restore(step, target_state, data_iterator=data_iterator)
            except DamagedCheckpointError as e:
                moved = self.move_aside(step, DAMAGED_DIR)
                reason = str(e).splitlines()[0][:400]
                log.warning("checkpoint %s is damaged and was moved to %s; falling back to "
                            "the previous one. Reason: %s", self.directory / str(step), moved,
                            reason)
        return None

    def move_aside(self, step: int, into: str) -> epath.Path:
        """Moves step directory `step` to `<directory>/<into>/<step>-<time>` (nothing is
        deleted; orbax no longer lists it)."""
        self._manager.wait_until_finished()
        target = self.directory / into / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"t5x_like.training.checkpoints: moved {step}")
        self._manager.reload()
        return target


def _verify(out: Any, items: Mapping[str, Any], where: epath.Path) -> None:
    """Raises DamagedCheckpointError if the restored arrays' checksums differ from the
    ones saved with them (a flipped bit, a truncated file read as zeros)."""
    if INTEGRITY not in items:
        return  # written before checksums existed
    saved = out[INTEGRITY]["uint32_word_sums"]
    checksums, _ = integrity(out[STATE])
    bad = [name for name, value in checksums.items() if saved.get(name) != value]
    if bad:
        raise DamagedCheckpointError(
            f"{where}: {len(bad)} array(s) differ from what was saved, e.g. {bad[0]} "
            f"(checksum {checksums[bad[0]]} != saved {saved.get(bad[0])})")


# ---------------------------------------------------------------------------
# Params-only checkpoints: what `python -m t5x_like.hf import` writes and what
# fine-tuning / inference start from. One orbax step directory holding `params` (the
# model's nnx.Param state) and `config` (the model gin text), the same items and
# handlers as a training step directory, so both are read by `restore_params`.

PARAMS = "params"


def _absolute(directory: str | epath.PathLike) -> epath.Path:
    # orbax rejects relative local paths (as in CheckpointManager).
    return rundir.path(directory)


def save_params(directory: str | epath.PathLike, params: Any, *,
                config_text: str | None = None) -> epath.Path:
    """Writes `params` (e.g. `nnx.state(module, nnx.Param)`) as a params-only checkpoint.

    `directory` becomes an orbax step directory with the items `params` and, when
    given, `config` ({"operative_config": text}, as in training checkpoints). It must
    not exist yet: a params checkpoint is written once, never over another one.
    """
    path = _absolute(directory)
    if path.exists():
        raise FileExistsError(
            f"{path} already exists; a params checkpoint is written into a new directory. "
            "Pick another --out, or delete the old one first.")
    items = {PARAMS: ocp.args.StandardSave(params)}
    if config_text is not None:
        items[CONFIG] = ocp.args.JsonSave({"operative_config": config_text})
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        checkpointer.save(path, args=ocp.args.Composite(**items))
    finally:
        checkpointer.close()
    return path


def _newest_step_dir(directory: epath.Path) -> epath.Path | None:
    """The newest finished step of a CheckpointManager directory (orbax writes a step
    under a temporary name and renames it to the bare number when it is complete)."""
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()]
    return directory / str(max(steps)) if steps else None


def params_source(path: str | epath.PathLike) -> tuple[epath.Path, tuple[str, ...]]:
    """(orbax pytree directory, key path of the params inside it) for `path`, one of:

    - a params-only checkpoint (`<path>/params`);
    - a training step directory (`<path>/state`, params under `model`);
    - a CheckpointManager directory (`<model_dir>/checkpoints`: its newest step);
    - a model dir (`<model_dir>/checkpoints`, its newest step).
    """
    path = _absolute(path)
    if (path / PARAMS).is_dir():
        return path / PARAMS, ()
    if (path / STATE).is_dir():
        return path / STATE, ("model",)
    for directory in (path, path / "checkpoints"):
        step_dir = _newest_step_dir(directory) if directory.is_dir() else None
        if step_dir is not None:
            return params_source(step_dir)
    raise FileNotFoundError(
        f"{path} holds no parameters: expected a params checkpoint (a `{PARAMS}` item, as "
        f"`python -m t5x_like.hf import` writes), a training step directory (a `{STATE}` "
        "item), or a checkpoints / model directory with numbered steps. Pass one of those.")


def stored_config(path: str | epath.PathLike) -> str | None:
    """The operative gin config saved with the parameters `path` names (any of
    `params_source`'s forms), None where none was saved with them."""
    step_dir = params_source(path)[0].parent
    if not (step_dir / CONFIG).is_dir():
        return None
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        out = checkpointer.restore(step_dir,
                                   args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
    finally:
        checkpointer.close()
    return out[CONFIG].get("operative_config")


def _subtree(tree: Any, keys: tuple[str, ...], where: epath.Path) -> Any:
    for key in keys:
        if not isinstance(tree, Mapping) or key not in tree:
            raise ValueError(f"{where} has no `{key}` subtree; it is not a train state "
                             "saved by t5x_like (expected {model: ..., optimizer: ...}).")
        tree = tree[key]
    return tree


def _wrap(tree: Any, keys: tuple[str, ...]) -> Any:
    for key in reversed(keys):
        tree = {key: tree}
    return tree


# What a DPO run's model holds beside its policy (network.DPODecoder): the frozen
# reference, a full copy of the policy's parameters under this key.
DPO_REFERENCE = "reference"


def _without_dpo_reference(stored: Any, target_params: Any) -> Any:
    """A DPO run's stored model read as its policy: its `reference` subtree is dropped
    when the target model has none (a plain decoder-only LM for inference or fine-tuning,
    or a DPOModel's trainable parameters); the policy's names are a plain Decoder's."""
    try:
        target_has = DPO_REFERENCE in target_params
    except TypeError:
        target_has = False
    if isinstance(stored, Mapping) and DPO_REFERENCE in stored and not target_has:
        return {k: v for k, v in stored.items() if k != DPO_REFERENCE}
    return stored


def _only(stored: Any, target: Any) -> Any:
    """`stored` cut to the keys `target` has (a part of a state: DoReMi's weights)."""
    if isinstance(stored, Mapping) and isinstance(target, Mapping):
        return {k: _only(stored[k], target[k]) for k in target if k in stored}
    return stored


def _check_stored_params(handler, item_dir: epath.Path, keys: tuple[str, ...],
                         target_params: Any, part: bool = False) -> None:
    stored = _without_dpo_reference(
        _subtree(handler.metadata(item_dir).tree, keys, item_dir), target_params)
    if part:
        stored = _only(stored, target_params)
    try:
        _check_compatible(stored, target_params, str(item_dir))
    except ValueError as e:
        raise type(e)(f"{e} A params checkpoint written by `python -m t5x_like.hf "
                      "import` needs the model gin file it wrote (--gin_out).") from None


def check_params(path: str | epath.PathLike, target_params: Any) -> None:
    """`restore_params`'s shape check alone (metadata only, no array read): for a run
    to refuse a mismatching initial checkpoint before it writes anything."""
    item_dir, keys = params_source(path)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        _check_stored_params(handler, item_dir, keys, target_params)
    finally:
        handler.close()


def restore_params(path: str | epath.PathLike, target_params: Any, part: bool = False) -> Any:
    """Reads parameters onto the shapes, dtypes and shardings of `target_params`.

    `path`: a params-only checkpoint or a training checkpoint (see `params_source`);
    from a training checkpoint only the `model` subtree of its `state` item is read,
    never the optimizer state; from a DPO run's, the policy (its frozen reference is
    skipped when the target has none). `target_params`: the model's params (nnx.State of
    arrays or ShapeDtypeStructs carrying shardings, e.g. from
    `partitioning.abstract_sharded` filtered to nnx.Param). Raises ValueError before
    reading any array when the stored shapes differ, naming the first differing
    parameter with both shapes. `part`: `target_params` is only a part of the stored
    model state (e.g. DoReMi's domain weights): the rest is neither checked nor read.
    """
    item_dir, keys = params_source(path)
    # The item's own handler: a Checkpointer would look for step metadata in the item.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        _check_stored_params(handler, item_dir, keys, target_params, part)
        target = _wrap(abstract_like(target_params), keys)
        restored = handler.restore(item_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
    finally:
        handler.close()
    return _subtree(restored, keys, item_dir)
