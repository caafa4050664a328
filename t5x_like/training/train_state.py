"""Train state and the jitted train and eval steps (optimizers: `optimizers.py`).

The model is whatever implements the model contract of `model/families.py`:
`loss_fn(module, batch, rng=None) -> (loss, metrics)` where `loss` is a mean over the
batch's target tokens (weighted by `decoder_loss_weights`) and `metrics` carries the
sums (`*_sum`, `num_tokens`) that let pieces of a batch be combined exactly.

Design:
- `TrainState` is an NNX module holding the model and an `nnx.Optimizer`; its step
  counter is the optimizer's. `nnx.split(state)` gives a graphdef (static) and a pytree
  of arrays: that pytree is what is jitted over, sharded, donated and checkpointed.
- `make_train_step` returns a `jax.jit` of a pure function over that pytree, so the
  mesh shardings go in as plain `in_shardings` / `out_shardings` and the old state is
  donated (one copy of params + optimizer state in memory, not two).
- Gradient accumulation scans over microbatches, sums fp32 gradients weighted by each
  microbatch's loss-weight total, and divides by the batch total: accumulating k
  microbatches gives the gradient of one big batch (tested), not a mean of means.
- Dropout randomness is `fold_in(key(seed), step)` (then the microbatch index), so a
  resumed run draws exactly what an uninterrupted one would.
- Params stay fp32 (master weights); the compute dtype is the model config's business.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from t5x_like.model import partitioning
from t5x_like.training import checkpoints

Batch = Mapping[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

# Metric names that are totals over tokens/examples: summed across microbatches (and
# across eval batches by the caller). Everything else is a per-token mean, averaged
# with the microbatch's weight_sum as weight.
_SUM_SUFFIX = "_sum"
_COUNT_KEYS = ("num_tokens",)
_WEIGHT_KEY = "weight_sum"



# ---------------------------------------------------------------------------
# Train state


def _placeholders_replicated(tx: optax.GradientTransformation
                             ) -> optax.GradientTransformation:
    """`tx` whose initial state keeps a parameter's logical axes only on leaves of that
    parameter's shape.

    NNX gives each optimizer leaf made from a parameter that parameter's axes and
    shards it so on a mesh. Optax's Adafactor also keeps a shape-(1,) placeholder per
    parameter (the factored statistics an unfactored run never fills), which cannot
    carry a matrix's axes: sharded initialisation failed on every mesh. Those become
    plain arrays, replicated. (A leaf is matched to its parameter by path: the state
    mirrors the parameter tree below its own fields.)
    """
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

    def init(params):
        shapes = {path: jnp.shape(leaf.get_value()) for path, leaf in
                  jax.tree_util.tree_flatten_with_path(params, is_leaf=is_var)[0]}

        def unbox(path, leaf):
            if is_var(leaf):
                own = next((shape for p, shape in shapes.items()
                            if tuple(path[-len(p):]) == p), None)
                if own is not None and own != jnp.shape(leaf.get_value()):
                    return leaf.get_value()
            return leaf

        return jax.tree_util.tree_map_with_path(unbox, tx.init(params), is_leaf=is_var)

    return optax.GradientTransformation(init, tx.update)


class TrainState(nnx.Module):
    """The model, its optimizer state, and the step counter (`optimizer.step`)."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation):
        self.model = model
        self.optimizer = nnx.Optimizer(model, _placeholders_replicated(tx), wrt=nnx.Param)

    @property
    def step(self) -> jax.Array:
        return self.optimizer.step[...]


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation
                       ) -> tuple[nnx.GraphDef, nnx.State]:
    """Wraps `model` with an optimizer and splits it: (static graphdef, array pytree).

    For a sharded model call this inside `jax.set_mesh(mesh)` and the logical axis rules,
    as partitioning's sharded init does, so the optimizer state inherits the shardings.
    """
    return nnx.split(TrainState(model, tx))


def _train_state_factory(model, tx: optax.GradientTransformation, seed: int):
    """The zero-argument factory partitioning's sharded init and abstract state take."""

    def factory():
        return TrainState(model.make_module(nnx.Rngs(seed)), tx)

    return factory


def abstract_train_state(model, tx: optax.GradientTransformation, mesh, rules
                         ) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of `model` + optimizer on `mesh` as shapes only: every leaf a
    ShapeDtypeStruct carrying its NamedSharding, nothing allocated (a checkpoint's
    restore target; what `python -m t5x_like.plan` compiles the train step against)."""
    return partitioning.abstract_sharded(_train_state_factory(model, tx, 0), mesh, rules)


def init_or_restore(model, tx: optax.GradientTransformation, mesh, rules, seed: int,
                    ckpt=None, data_iterator=None, initial_checkpoint: str | None = None,
                    reference_checkpoint: str | None = None):
    """(graphdef, state, restored) of `model` + optimizer on `mesh`.

    model: a model/families.py model (its `make_module` builds the network).
    ckpt: a checkpoints.CheckpointManager or None. With a good checkpoint in it, the
      newest one is read straight into this mesh's shards (and `data_iterator` set to
      where it was; damaged ones are moved aside on the way) and `restored` is the
      checkpoints.Restored (step, run item, ...); otherwise the state is initialised
      in its shards from `seed` and `restored` is None. Never both: a restored run
      holds one copy of the state.
    initial_checkpoint: for a run that starts (nothing in `ckpt`), take the parameters
      from this checkpoint (T5X's INITIAL_CHECKPOINT_PATH: another run's, or a params
      checkpoint), onto this mesh and rule preset, with a fresh optimizer state.
    reference_checkpoint: for a run that starts, the parameters of the module's frozen
      `reference` (DoReMi's proxy: the reference run's checkpoint), read onto the shapes
      and shardings of the module's own parameters (the reference is the same network).
    """
    if ckpt is not None and ckpt.latest_step() is not None:
        graphdef, target = abstract_train_state(model, tx, mesh, rules)
        restored = ckpt.restore_latest(target, data_iterator=data_iterator)
        if restored is not None:
            return graphdef, restored.state, restored
    factory = _train_state_factory(model, tx, seed)
    train_state = partitioning.create_sharded(factory, mesh, rules)
    if initial_checkpoint is not None:
        params = checkpoints.restore_params(initial_checkpoint,
                                            nnx.state(train_state.model, nnx.Param))
        nnx.update(train_state.model, params)
        model.after_initial_params(train_state.model)
    if reference_checkpoint is not None:
        reference = model.frozen_reference(train_state.model)
        if reference is None:
            raise ValueError(f"reference_checkpoint={reference_checkpoint!r}, but the model "
                             f"{type(model).__name__} has no frozen reference.")
        params = checkpoints.restore_params(reference_checkpoint,
                                            nnx.state(train_state.model, nnx.Param))
        nnx.update(reference, params)
    graphdef, state = nnx.split(train_state)
    return graphdef, state, None


def state_shardings(state: nnx.State) -> nnx.State:
    """The sharding of every array in `state` (to pin jit in/out shardings)."""
    return jax.tree.map(lambda x: x.sharding, state)


def params_of(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.State:
    """The model's parameters (an nnx.State of arrays) inside a train-state pytree."""
    return nnx.state(nnx.merge(graphdef, state).model, nnx.Param)


# ---------------------------------------------------------------------------
# Steps


def _split_microbatches(batch: Batch, num_microbatches: int) -> dict[str, jax.Array]:
    """[B, ...] → [k, B/k, ...], microbatch i = rows i, i+k, i+2k, ...

    Strided, not contiguous: each device's contiguous block of rows reshapes locally to
    (B/(k·devices), k), so no example moves between devices; the order of examples does
    not matter to a token-weighted mean.
    """
    out = {}
    for name, x in batch.items():
        if x.shape[0] % num_microbatches:
            raise ValueError(
                f"batch feature {name!r} has {x.shape[0]} examples, not divisible by "
                f"num_microbatches={num_microbatches}; pick a batch size that is a multiple.")
        x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
        out[name] = jnp.swapaxes(x, 0, 1)
    return out


def _combine_metrics(metrics_K: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Exact combination of stacked per-microbatch metrics (leading axis K)."""
    weight_K = metrics_K[_WEIGHT_KEY].astype(jnp.float32)
    total_weight = jnp.sum(weight_K)
    out = {}
    for name, value_K in metrics_K.items():
        value_K = value_K.astype(jnp.float32)
        if name.endswith(_SUM_SUFFIX) or name in _COUNT_KEYS:
            out[name] = jnp.sum(value_K)
        else:
            out[name] = jnp.sum(value_K * weight_K) / jnp.maximum(total_weight, 1e-8)
    return out


def _check_metrics(metrics: Mapping[str, Any]) -> None:
    if _WEIGHT_KEY not in metrics:
        raise KeyError(
            f"loss_fn metrics lack {_WEIGHT_KEY!r} (got {sorted(metrics)}); gradient "
            "accumulation needs each microbatch's loss-weight total, see the model contract "
            "in docs/ARCHITECTURE.md.")


def _accumulate(grads_and_metrics, params, batch: Batch, step_key: jax.Array,
                num_microbatches: int):
    """Gradient accumulation: (grads, metrics) of the whole batch from a scan over its
    microbatches, each weighted by its loss-weight total (exactly the big batch's)."""

    def body(grad_sum, xs):
        index, microbatch = xs
        grads, metrics = grads_and_metrics(microbatch, jax.random.fold_in(step_key, index))
        weight = metrics[_WEIGHT_KEY].astype(jnp.float32)
        # loss_i = S_i / W_i, so Σ W_i·∇loss_i / Σ W_i = ∇(Σ S_i / Σ W_i).
        grad_sum = jax.tree.map(
            lambda acc, g: acc + weight * g.astype(jnp.float32), grad_sum, grads)
        return grad_sum, metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    indices = jnp.arange(num_microbatches)
    micro_KB = _split_microbatches(batch, num_microbatches)
    grad_sum, metrics_K = jax.lax.scan(body, zeros, (indices, micro_KB))
    metrics = _combine_metrics(metrics_K)
    total_weight = jnp.maximum(metrics[_WEIGHT_KEY], 1e-8)
    grads = jax.tree.map(lambda g, p: (g / total_weight).astype(p.dtype), grad_sum, params)
    return grads, metrics


def _keep_if_not_finite(new_state, old_state, metrics: dict[str, jax.Array]):
    """`new_state`, or `old_state` when the step's loss or gradient norm is NaN or Inf
    (counted in metrics["nonfinite"]).

    The decision reads nothing the update computes, so XLA fuses each leaf's select into
    the optimizer's own elementwise update and the new state is written in place over
    the donated one. Deciding on the updated parameters' norm too would need all of them
    first: on the TPU compile of Llama 3 8B (docs/PERFORMANCE.md) that cost 0.7 GiB per
    chip and 12% of the compiler's step estimate. Parameters that turn non-finite from
    finite gradients are caught on the host instead (guards.LossGuards, `param_norm`)."""
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                        old_state), metrics


def _in_shardings(state_sharding, batch_sharding, *rest):
    if state_sharding is None and batch_sharding is None:
        return None  # let jit take the inputs' own shardings
    return (state_sharding, batch_sharding, *rest)


def _with_rules(rules):
    """Traces the decorated step under `rules` (activation constraints), if given."""

    def decorate(fn):
        if rules is None:
            return fn

        @functools.wraps(fn)
        def wrapped(*args):
            with nnx.logical_axis_rules(rules):
                return fn(*args)

        return wrapped

    return decorate


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    schedule: optax.Schedule | None = None,
    *,
    num_microbatches: int = 1,
    state_sharding: Any = None,
    batch_sharding: Any = None,
    rules: Any = None,
    donate: bool = True,
    after_update: Callable[[nnx.Module, dict], dict] | None = None,
) -> Callable[[nnx.State, Batch, jax.Array], tuple[nnx.State, dict[str, jax.Array]]]:
    """Builds `train_step(state, batch, key) -> (new_state, metrics)`, jitted.

    Args:
      graphdef: from `create_train_state`.
      loss_fn: the model contract's `loss_fn(module, batch, rng) -> (loss, metrics)`.
      schedule: the optimizer's schedule, to report `learning_rate` (this step's rate).
      num_microbatches: gradient accumulation: the global batch is split into this many
        microbatches along the batch dimension, run one after another (lax.scan).
      state_sharding, batch_sharding: shardings of the state pytree and of the batch
        (e.g. `state_shardings(state)` and a NamedSharding over the batch axes); None lets
        jit propagate whatever the inputs carry. The output state keeps `state_sharding`.
      rules: the logical-axis rule set the model's activation constraints resolve with;
        call the step under `jax.set_mesh(mesh)` (without both the constraints are
        no-ops, and FSDP on 8 CPU devices ran 4x slower).
      donate: donate the input state buffers (the caller must not use them afterwards).
      after_update: `(module, metrics) -> metrics` after the update (DoReMi's weights).

    `key` is `jax.random.key(seed)`, the same every step: the step's rng is `fold_in(key,
    step)`, microbatch i's is `fold_in(that, i)`.
    Metrics: the model's metrics combined exactly over microbatches, plus
    `learning_rate`, `grad_norm` (global L2 norm before clipping), `param_norm` (of the
    state returned) and `nonfinite` (1.0 when the step was rejected: a NaN or Inf loss or
    gradient norm returns the state given, `_keep_if_not_finite`).
    `loss_scale` (1.0 in training) scales loss and gradients (guards.FaultDrills' NaN).
    """
    _check_step_options(num_microbatches, after_update)

    @_with_rules(rules)
    def step_fn(state: nnx.State, batch: Batch, key: jax.Array, loss_scale):
        # A copy of the containers: the optimizer update below mutates the Variables
        # that `state` and the merged module share.
        old_state = jax.tree.map(lambda x: x, state)
        train_state = nnx.merge(graphdef, state)
        model = train_state.model
        step = train_state.optimizer.step[...]
        step_key = jax.random.fold_in(key, step)
        model_def, params, rest = nnx.split(model, nnx.Param, ...)

        def grads_and_metrics(microbatch, rng):
            def pure_loss(p):
                # loss_fn must not mutate the module: anything it changed would be dropped.
                loss, metrics = loss_fn(nnx.merge(model_def, p, rest), microbatch, rng)
                return loss_scale * loss, metrics  # (no pass of its own over the grads)

            (_, metrics), grads = jax.value_and_grad(pure_loss, has_aux=True)(params)
            _check_metrics(metrics)
            return grads, metrics

        if num_microbatches == 1:
            grads, metrics = grads_and_metrics(batch, jax.random.fold_in(step_key, 0))
            metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        else:
            grads, metrics = _accumulate(grads_and_metrics, params, batch, step_key,
                                         num_microbatches)

        metrics["loss"] = loss_scale * metrics["loss"]
        metrics["grad_norm"] = optax.global_norm(grads)
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(step), jnp.float32)
        train_state.optimizer.update(model, grads)
        metrics = after_update(model, metrics) if after_update else metrics
        kept, metrics = _keep_if_not_finite(nnx.state(train_state), old_state, metrics)
        nnx.update(train_state, kept)
        metrics["param_norm"] = optax.global_norm(nnx.state(model, nnx.Param))
        return kept, metrics

    return _jit_train_step(step_fn, state_sharding, batch_sharding, donate)


def _check_step_options(num_microbatches: int, after_update) -> None:
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be ≥ 1.")
    if after_update is not None and num_microbatches != 1:
        # Its metrics (DoReMi's weights, arrays) are not combined over microbatches.
        raise ValueError(f"num_microbatches={num_microbatches}: a model whose step updates "
                         "its own state (DoReMi's proxy) trains with NUM_MICROBATCHES = 1.")


def _jit_train_step(step_fn, state_sharding, batch_sharding, donate: bool):
    """`train_step(state, batch, key, loss_scale=1.0)` over the jitted `step_fn`, with
    `.lower(...)` for ahead-of-time compilation."""
    jitted = jax.jit(
        step_fn,
        in_shardings=_in_shardings(state_sharding, batch_sharding, None, None),
        out_shardings=(state_sharding, None) if state_sharding is not None else None,
        donate_argnums=(0,) if donate else (),
    )

    # jit takes no keyword arguments beside in_shardings: `loss_scale` goes positionally.
    def train_step(state, batch, key, loss_scale=1.0):
        return jitted(state, batch, key, jnp.float32(loss_scale))

    # Lowered with an abstract scalar: jnp.float32(...) would run on the current mesh's
    # devices, which for a TPU topology compiled on a CPU host cannot execute anything.
    train_step.lower = lambda state, batch, key, loss_scale=1.0: jitted.lower(
        state, batch, key, jax.ShapeDtypeStruct((), jnp.float32))
    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    *,
    state_sharding: Any = None,
    batch_sharding: Any = None,
    rules: Any = None,
) -> Callable[[nnx.State, Batch], dict[str, jax.Array]]:
    """Builds `eval_step(state, batch) -> metric sums`, jitted; nothing is donated.

    Returns only additive quantities (`*_sum`, `num_tokens`) so batches add up exactly;
    `summarize_eval` turns the totals into means.
    """

    @_with_rules(rules)
    def step_fn(state: nnx.State, batch: Batch):
        model = nnx.merge(graphdef, state).model
        _, metrics = loss_fn(model, batch, None)
        _check_metrics(metrics)
        return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()
                if k.endswith(_SUM_SUFFIX) or k in _COUNT_KEYS}

    return jax.jit(step_fn, in_shardings=_in_shardings(state_sharding, batch_sharding))


def accumulate(total: dict[str, Any] | None, sums: Mapping[str, Any]) -> dict[str, Any]:
    """Adds one eval step's sums into a running total (None starts one)."""
    if total is None:
        return dict(sums)
    return {k: total[k] + sums[k] for k in total}


def summarize_eval(totals: Mapping[str, Any]) -> dict[str, float]:
    """Means from summed eval metrics: loss = (nll + z_loss) / weight, accuracy, ..."""
    weight = max(float(totals[_WEIGHT_KEY]), 1e-8)
    out = {k: float(v) for k, v in totals.items()}
    if "nll_sum" in totals:
        out["nll"] = float(totals["nll_sum"]) / weight
        out["loss"] = (float(totals["nll_sum"]) + float(totals.get("z_loss_sum", 0.0))) / weight
    if "z_loss_sum" in totals:
        out["z_loss"] = float(totals["z_loss_sum"]) / weight
    if "correct_sum" in totals:
        out["accuracy"] = float(totals["correct_sum"]) / weight
    return out
