"""Tests for optimizers.py and train_state.py: schedules, Adafactor β2, gradient
accumulation, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from t5x_like.training import optimizers, train_state

V, D, B, L = 64, 32, 8, 16


class _TinyLM(nnx.Module):
    """Stand-in for the model contract: embed → norm → dense → logits, weighted CE."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.dense = nnx.Linear(D, D, rngs=rngs)
        self.head = nnx.Linear(D, V, use_bias=False, rngs=rngs)


def _loss_fn(module, batch, rng=None):
    x_BLD = module.embed(batch["decoder_input_tokens"])
    x_BLD = jax.nn.gelu(module.dense(module.norm(x_BLD)))
    if rng is not None:  # dropout-like noise, to check the rng is folded deterministically
        x_BLD = x_BLD * jax.random.bernoulli(rng, 0.9, x_BLD.shape) / 0.9
    logits_BLV = module.head(x_BLD).astype(jnp.float32)
    targets_BL = batch["decoder_target_tokens"]
    weights_BL = batch["decoder_loss_weights"].astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    nll_BL = log_z_BL - jnp.take_along_axis(logits_BLV, targets_BL[..., None], -1)[..., 0]
    z_BL = 1e-4 * log_z_BL**2
    weight_sum = jnp.sum(weights_BL)
    denom = jnp.maximum(weight_sum, 1.0)
    nll_sum = jnp.sum(nll_BL * weights_BL)
    z_loss_sum = jnp.sum(z_BL * weights_BL)
    correct_sum = jnp.sum((jnp.argmax(logits_BLV, -1) == targets_BL) * weights_BL)
    loss = (nll_sum + z_loss_sum) / denom
    return loss, {
        "loss": loss, "z_loss": z_loss_sum / denom, "accuracy": correct_sum / denom,
        "num_tokens": weight_sum, "nll_sum": nll_sum, "z_loss_sum": z_loss_sum,
        "correct_sum": correct_sum, "weight_sum": weight_sum,
    }


def _batch(seed=0, batch=B):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, (batch, L + 1)).astype(np.int32)
    # Uneven loss weights per example, so a mean of microbatch means would be wrong.
    lengths = rng.integers(2, L + 1, (batch,))
    weights = (np.arange(L)[None, :] < lengths[:, None]).astype(np.int32)
    return {"decoder_input_tokens": jnp.asarray(tokens[:, :-1]),
            "decoder_target_tokens": jnp.asarray(tokens[:, 1:]),
            "decoder_loss_weights": jnp.asarray(weights)}


def _state(opt, seed=0):
    return train_state.create_train_state(_TinyLM(nnx.Rngs(seed)), opt.tx)


# --- schedules and optimizers -------------------------------------------------


def test_adamw_schedule_key_steps():
    opt = optimizers.adamw_llama2(3e-4, warmup_steps=2000, total_steps=100_000)
    s = opt.schedule
    np.testing.assert_allclose(s(0), 0.0)
    np.testing.assert_allclose(s(1000), 1.5e-4, rtol=1e-6)
    np.testing.assert_allclose(s(2000), 3e-4, rtol=1e-6)  # warmup end = peak
    mid = 2000 + (100_000 - 2000) // 2  # half-way down the cosine: (peak + end) / 2
    np.testing.assert_allclose(s(mid), (3e-4 + 3e-5) / 2, rtol=1e-5)
    np.testing.assert_allclose(s(100_000), 3e-5, rtol=1e-6)  # end = 10% of peak
    np.testing.assert_allclose(s(200_000), 3e-5, rtol=1e-6)


def test_palm_schedule_key_steps():
    s = optimizers.adafactor_palm().schedule
    for k in (0, 1, 5000, 9999, 10_000):
        np.testing.assert_allclose(s(k), 1e-2, rtol=1e-6)
    for k in (10_001, 40_000, 250_000):
        np.testing.assert_allclose(s(k), 1 / np.sqrt(k), rtol=1e-6)


def test_adafactor_beta2_is_one_minus_k_pow_minus_08():
    """Drive optax's unfactored second moment and read back the decay it used."""
    from optax._src import factorized

    tx = factorized.scale_by_factored_rms(factored=False, decay_rate=0.8, epsilon=0.0)
    p = jnp.ones((3,))
    state = tx.init(p)
    v = np.zeros(3)
    for k in range(1, 6):
        g = jnp.full((3,), float(k))
        _, state = tx.update(g, state, p)
        beta2 = float(optimizers.adafactor_beta2(k))
        np.testing.assert_allclose(beta2, 1 - k ** -0.8, rtol=1e-7)
        v = beta2 * v + (1 - beta2) * float(k) ** 2
        np.testing.assert_allclose(np.asarray(state.v)[0], v, rtol=1e-6)
    assert float(optimizers.adafactor_beta2(1)) == 0.0  # first update: v = g², no bias


def test_adafactor_first_update_is_lr_times_param_rms_plus_decay():
    """Step 1: v = g², m = 0.1·u; update = -(0.1·lr·rms(p)·sign(g) + lr²·p)."""
    opt = optimizers.adafactor_palm(clip_norm=1e9)
    p = {"w": jnp.full((4, 4), 2.0)}
    g = {"w": jnp.full((4, 4), -0.5)}
    state = opt.tx.init(p)
    upd, _ = opt.tx.update(g, state, p)
    lr = 1e-2
    expected = -(0.1 * lr * 2.0 * -1.0 + lr**2 * 2.0)
    np.testing.assert_allclose(np.asarray(upd["w"]), expected, rtol=1e-5)


def test_default_decay_mask_skips_norms_and_biases():
    # what nnx.Optimizer hands to optax: a State of plain arrays
    params = nnx.as_pure(nnx.state(_TinyLM(nnx.Rngs(0)), nnx.Param))
    mask = optimizers.default_decay_mask(params)
    flat = {"/".join(str(k.key) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["dense/kernel"] and flat["head/kernel"] and flat["embed/embedding"]
    assert not flat["dense/bias"] and not flat["norm/scale"]


# --- train step ---------------------------------------------------------------


_ADAMW = optimizers.adamw_llama2(1e-2, warmup_steps=1, total_steps=10)
_STEPS = {}


def _train_step(num_microbatches, loss_fn=_loss_fn):
    """One jitted step per configuration for the whole module: compiles are the cost."""
    key = (num_microbatches, loss_fn)
    if key not in _STEPS:
        graphdef, _ = _state(_ADAMW)
        _STEPS[key] = train_state.make_train_step(graphdef, loss_fn, _ADAMW.schedule,
                                              num_microbatches=num_microbatches)
    return _STEPS[key]


def _run(num_microbatches, steps=2, seed=0, loss_fn=_loss_fn):
    graphdef, state = _state(_ADAMW, seed)
    step = _train_step(num_microbatches, loss_fn)
    key = jax.random.key(seed)
    history = []
    for i in range(steps):
        state, metrics = step(state, _batch(i), key)
        history.append(jax.device_get(metrics))
    return graphdef, state, history


def _loss_no_rng(module, batch, rng=None):
    return _loss_fn(module, batch, None)


def test_grad_accumulation_equals_full_batch():
    """k microbatches with uneven token counts == one batch: metrics, grads, params."""
    # No dropout noise here: the masks differ by construction between k=1 and k=4.
    results = {k: _run(k, steps=2, loss_fn=_loss_no_rng) for k in (1, 4)}
    (g, s1, m1), (_, s4, m4) = results[1], results[4]
    for a, b in zip(m1, m4):
        for name in ("loss", "z_loss", "accuracy", "nll_sum", "weight_sum", "grad_norm",
                     "learning_rate"):
            np.testing.assert_allclose(b[name], a[name], rtol=2e-5, atol=1e-7, err_msg=name)
    p1, p4 = train_state.params_of(g, s1), train_state.params_of(g, s4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), p1, p4)
    # and the metrics are the ones promised
    assert {"loss", "accuracy", "grad_norm", "learning_rate", "param_norm"} <= set(m1[0])
    assert float(m1[1]["learning_rate"]) == pytest.approx(1e-2, rel=1e-6)


def test_overfit_one_batch_adafactor():
    opt = optimizers.adafactor_palm()
    graphdef, state = _state(opt)
    step = train_state.make_train_step(graphdef, _loss_fn, opt.schedule)
    batch = _batch(0)
    losses = []
    for _ in range(20):
        state, m = step(state, batch, jax.random.key(0))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.3, losses


def test_determinism_bitwise_and_resume():
    """Same seed → bitwise-equal params; a run split in two (resume) equals one run."""
    graphdef, a, _ = _run(2, steps=3)
    _, b, _ = _run(2, steps=3)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)
    # resume: 2 steps, copy state to host and back (as a checkpoint would), 1 more step.
    _, state, _ = _run(2, steps=2)
    state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), jax.device_get(state))
    state, _ = _train_step(2)(state, _batch(2), jax.random.key(0))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, state)
    assert int(nnx.merge(graphdef, state).step) == 3


def test_different_seed_differs():
    _, a, _ = _run(1, steps=1, seed=0)
    _, b, _ = _run(1, steps=1, seed=1)
    pa, pb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert any(not np.array_equal(x, y) for x, y in zip(pa, pb))


def test_bad_microbatch_count_is_a_clear_error():
    graphdef, state = _state(_ADAMW)
    step = train_state.make_train_step(graphdef, _loss_fn, _ADAMW.schedule, num_microbatches=3)
    with pytest.raises(ValueError, match="num_microbatches=3"):
        step(state, _batch(0), jax.random.key(0))


def test_eval_step_sums_aggregate_exactly():
    graphdef, state = _state(_ADAMW)
    eval_step = train_state.make_eval_step(graphdef, _loss_fn)
    full = _batch(0, batch=8)
    total = None
    for lo in range(0, 8, 2):
        piece = {k: v[lo:lo + 2] for k, v in full.items()}
        total = train_state.accumulate(total, eval_step(state, piece))
    whole = eval_step(state, full)
    assert set(whole) == {"num_tokens", "nll_sum", "z_loss_sum", "correct_sum", "weight_sum"}
    for k in whole:
        np.testing.assert_allclose(total[k], whole[k], rtol=1e-5)
    summary = train_state.summarize_eval(total)
    _, m = _loss_fn(nnx.merge(graphdef, state).model, full)
    np.testing.assert_allclose(summary["loss"], m["loss"], rtol=1e-5)
    np.testing.assert_allclose(summary["accuracy"], m["accuracy"], rtol=1e-5)


@pytest.mark.slow
def test_sharded_train_step_keeps_shardings_and_matches_unsharded():
    from jax.sharding import AxisType, Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"),
                axis_types=(AxisType.Auto,) * 2)
    graphdef, state = _state(_ADAMW)
    _, ref_state, _ = _run(1, steps=1)

    def spec(x):
        return P(None, "model") if x.ndim == 2 and x.shape[1] % 2 == 0 else P()

    shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), state)
    state = jax.device_put(state, shardings)
    batch_sharding = NamedSharding(mesh, P("data"))
    step = train_state.make_train_step(graphdef, _loss_fn, _ADAMW.schedule, state_sharding=shardings,
                                   batch_sharding=batch_sharding)
    state, _ = step(state, jax.device_put(_batch(0), batch_sharding), jax.random.key(0))
    jax.tree.map(lambda x, s: (x.sharding == s) or pytest.fail(f"{x.sharding} != {s}"),
                 state, shardings)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 state, ref_state)


# --- the real model contract (families.py) ----------------------------------------------


def test_real_model_decay_mask():
    """Tiny Llama-style decoder: norm scales (2-D under scan) are not decayed."""
    from tiny import make_module, tiny_config

    cfg = tiny_config(block="sequential", tie_embeddings=False)
    params = nnx.as_pure(nnx.state(make_module(cfg), nnx.Param))
    mask = {jax.tree_util.keystr(p): v
            for p, v in jax.tree_util.tree_leaves_with_path(optimizers.default_decay_mask(params))}
    assert mask["['decoder']['layers']['mlp']['wi_0']"]
    assert mask["['embed']['embedding']"] and mask["['output']['lm_head']['kernel']"]
    assert not mask["['decoder']['layers']['pre_mlp_norm']['scale']"]  # shape (layers, D)
    assert not mask["['output']['final_norm']['scale']"]


@pytest.mark.slow
def test_real_model_grad_accumulation():
    """Tiny Llama-style decoder through the real loss_fn: k=2 microbatches == k=1."""
    from tiny import make_module, model_for, tiny_config

    cfg = tiny_config(block="sequential", tie_embeddings=False)
    model = model_for(cfg)
    batch = {k: v for k, v in _batch(3).items()}
    batch["decoder_input_tokens"] = batch["decoder_input_tokens"] % cfg.vocab_size
    batch["decoder_target_tokens"] = batch["decoder_target_tokens"] % cfg.vocab_size
    results = []
    for k in (1, 2):
        graphdef, state = train_state.create_train_state(make_module(cfg), _ADAMW.tx)
        step = train_state.make_train_step(graphdef, model.loss_fn, _ADAMW.schedule,
                                       num_microbatches=k)
        state, m = step(state, batch, jax.random.key(0))
        results.append((train_state.params_of(graphdef, state), jax.device_get(m)))
    (p1, m1), (p2, m2) = results
    for name in ("loss", "accuracy", "grad_norm", "weight_sum"):
        np.testing.assert_allclose(m2[name], m1[name], rtol=2e-5, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), p1, p2)


def test_a_non_finite_step_leaves_the_whole_state_unchanged():
    """NaN gradients (the drill's loss_scale) → the state that went in comes out, bitwise,
    with the optimizer's step counter; the next good step trains as if it never happened."""
    graphdef, state = _state(_ADAMW)
    step = train_state.make_train_step(graphdef, _loss_fn, _ADAMW.schedule, donate=False)
    key = jax.random.key(0)
    state1, m1 = step(state, _batch(0), key)
    poisoned, m_nan = step(state1, _batch(1), key, float("nan"))
    assert float(m_nan["nonfinite"]) == 1.0 and float(m1["nonfinite"]) == 0.0
    assert not np.isfinite(float(m_nan["grad_norm"]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 state1, poisoned)
    after_skip, _ = step(poisoned, _batch(1), key)
    straight, _ = step(state1, _batch(1), key)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 straight, after_skip)


def test_parameters_that_overflow_from_finite_gradients_stop_the_run_unsaved():
    """The step's guard reads the loss and gradient norm (so that it fuses into the
    update); an update that overflows from finite gradients is caught on the host, from
    `param_norm`, and the run stops without saving the non-finite parameters."""
    from t5x_like.training import guards  # noqa: PLC0415

    overflowing = optimizers.Optimizer(optax.sgd(3e38), optax.constant_schedule(3e38))
    graphdef, state = _state(overflowing)
    step = train_state.make_train_step(graphdef, _loss_fn, overflowing.schedule)
    _, m = jax.device_get(step(state, _batch(0), jax.random.key(0)))
    assert m["nonfinite"] == 0.0 and np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
    assert not np.isfinite(m["param_norm"])
    with pytest.raises(guards.RunStopped, match="param_norm") as stopped:
        guards.LossGuards(guards.GuardConfig()).observe(1, m)
    assert not stopped.value.save_state


def test_loss_scale_multiplies_loss_and_gradients():
    graphdef, state = _state(_ADAMW)
    step = train_state.make_train_step(graphdef, _loss_no_rng, _ADAMW.schedule, donate=False)
    _, m1 = step(state, _batch(0), jax.random.key(0))
    _, m3 = step(state, _batch(0), jax.random.key(0), 3.0)
    np.testing.assert_allclose(float(m3["loss"]), 3 * float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m3["grad_norm"]), 3 * float(m1["grad_norm"]), rtol=1e-5)


def test_a_warmup_longer_than_the_run_is_shortened_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        opt = optimizers.adamw_llama2(1e-3, warmup_steps=2000, total_steps=6)
    assert "warming up for 0 steps" in caplog.text
    assert float(opt.schedule(0)) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="warmup_steps=-1 must be ≥ 0"):
        optimizers.adamw_llama2(1e-3, warmup_steps=-1, total_steps=6)


def test_adafactor_initialises_sharded_on_a_mesh():
    """PaLM's optimizer on an FSDP mesh (sharded init raised before): the second moment
    of each matrix is split like the matrix; Adafactor's shape-(1,) placeholders for
    the factored statistics an unfactored run never fills are replicated."""
    from test_configs import model_config  # noqa: PLC0415

    from t5x_like.model import families, partitioning  # noqa: PLC0415

    model = families.model_for(model_config("tiny_palm"))
    mesh = partitioning.make_mesh({"fsdp": 8})
    graphdef, state, _ = train_state.init_or_restore(
        model, optimizers.adafactor_palm().tx, mesh, partitioning.get_rules("fsdp"), seed=0)
    params = train_state.params_of(graphdef, state)
    wi = params["decoder"]["layers"]["mlp"]["wi_0"][...]
    flat = {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(state["optimizer"])}
    moments = [leaf for path, leaf in flat.items() if path.endswith("['wi_0'].value")]
    # v (second moment) and the momentum: split like the matrix; v_row, v_col: (1,).
    assert sum(m.shape == wi.shape and m.sharding.spec == wi.sharding.spec
               for m in moments) == 2
    placeholders = [leaf for leaf in flat.values() if leaf.shape == (1,)]
    assert placeholders and all(p.sharding.is_fully_replicated for p in placeholders)
