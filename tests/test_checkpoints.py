"""Tests for checkpoints.py: round trip, keep-K, resume, resharded restore, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from t5x_like.model import families, layers, partitioning
from t5x_like.training import checkpoints, optimizers, train_state

CFG = layers.TransformerConfig(
    vocab_size=64, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
    num_decoder_layers=2, block="sequential", tie_embeddings=False, dtype="float32")
B, L = 8, 16
_ADAMW = optimizers.adamw_llama2(1e-2, warmup_steps=1, total_steps=20)


class _Iterator:
    """Stand-in for the grain loader's iterator: get_state/set_state of a few ints."""

    def __init__(self, as_bytes=False):
        self.next_index, self.as_bytes = 0, as_bytes

    def __next__(self):
        self.next_index += 1
        return _batch(self.next_index)

    def get_state(self):
        state = {"next_index": self.next_index}
        return repr(state).replace("'", '"').encode() if self.as_bytes else state

    def set_state(self, state):
        import json
        self.next_index = (json.loads(state) if self.as_bytes else state)["next_index"]


def _batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (B, L + 1)).astype(np.int32)
    return {"decoder_input_tokens": jnp.asarray(tokens[:, :-1]),
            "decoder_target_tokens": jnp.asarray(tokens[:, 1:]),
            "decoder_loss_weights": jnp.ones((B, L), jnp.int32)}


def _state(seed=0, cfg=CFG):
    module = families.DecoderOnlyModel(cfg).make_module(seed)
    return train_state.create_train_state(module, _ADAMW.tx)


_GRAPHDEF, _ = _state()
_STEP = train_state.make_train_step(_GRAPHDEF, families.DecoderOnlyModel(CFG).loss_fn,
                                _ADAMW.schedule)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_round_trip_with_iterator_state_and_config(tmp_path):
    _, state = _state(0)
    it = _Iterator()
    for _ in range(2):
        state, _ = _STEP(state, next(it), jax.random.key(0))
    with checkpoints.CheckpointManager(tmp_path, save_interval_steps=1) as mgr:
        assert mgr.save(2, state, data_iterator=it, config_text="TRAIN_STEPS = 10\n")
    _, fresh = _state(1)  # different init: a restore must overwrite every leaf
    new_it = _Iterator()
    with checkpoints.CheckpointManager(tmp_path) as mgr:
        restored = mgr.restore_latest(fresh, data_iterator=new_it)
    assert restored.step == 2
    _assert_trees_equal(restored.state, state)
    assert restored.data is new_it and new_it.next_index == 2
    assert restored.config_text == "TRAIN_STEPS = 10\n"
    for path in (tmp_path, tmp_path / "2"):  # a checkpoints directory, a step of it
        assert checkpoints.stored_config(path) == "TRAIN_STEPS = 10\n"


def test_bytes_state_plain_dict_and_grain_iterator(tmp_path):
    import grain

    _, state = _state(0)
    it = _Iterator(as_bytes=True)
    next(it), next(it), next(it)
    ds_it = iter(grain.MapDataset.range(100).shuffle(seed=3).to_iter_dataset())
    seen = [next(ds_it) for _ in range(5)]
    with checkpoints.CheckpointManager(tmp_path, save_interval_steps=1) as mgr:
        mgr.save(1, state, data_iterator=it)
        mgr.save(2, state, data_iterator={"next_index": 7})
        mgr.save(3, state, data_iterator=ds_it)
    expected_next = next(ds_it)
    with checkpoints.CheckpointManager(tmp_path) as mgr:
        assert mgr.restore(1, state, data_iterator=_Iterator(as_bytes=True)).data.next_index == 3
        assert mgr.restore(2, state).data == {"next_index": 7}
        new_ds_it = iter(grain.MapDataset.range(100).shuffle(seed=3).to_iter_dataset())
        mgr.restore(3, state, data_iterator=new_ds_it)
    assert next(new_ds_it) == expected_next and expected_next not in seen


def test_data_state_under_another_process_count(tmp_path):
    """A global iterator state (the same file from every process) restores under any
    process count; per-process states only under the count that wrote them."""
    from etils import epath

    directory = epath.Path(tmp_path)
    for p in range(2):
        (directory / f"process_{p}-of-2.json").write_text('{"format": "dict", "state": {"i": 4}}')
    assert checkpoints.read_data_state(directory, 1, 2)["state"] == {"i": 4}
    for index, count in [(0, 1), (3, 4)]:
        assert checkpoints.read_data_state(directory, index, count)["state"] == {"i": 4}
    (directory / "process_1-of-2.json").write_text('{"format": "dict", "state": {"i": 5}}')
    assert checkpoints.read_data_state(directory, 1, 2)["state"] == {"i": 5}
    with pytest.raises(ValueError, match="written by 2 processes.*this run has 1"):
        checkpoints.read_data_state(directory, 0, 1)


def test_save_interval_and_keep_last_k(tmp_path):
    _, state = _state(0)
    with checkpoints.CheckpointManager(tmp_path, save_interval_steps=2, max_to_keep=2) as mgr:
        started = [mgr.save(step, state) for step in range(1, 8)]
        mgr.wait_until_finished()
        assert started == [False, True, False, True, False, True, False]
        assert mgr.all_steps() == [4, 6]
        assert mgr.save(7, state, force=True)  # the last step of a run, off the interval
        mgr.wait_until_finished()
        assert mgr.all_steps() == [6, 7] and mgr.latest_step() == 7


def test_resume_from_latest_equals_uninterrupted_run(tmp_path):
    key = jax.random.key(0)
    _, straight = _state(0)
    for i in range(4):
        straight, _ = _STEP(straight, _batch(i), key)

    _, state = _state(0)
    with checkpoints.CheckpointManager(tmp_path, save_interval_steps=2) as mgr:
        for i in range(3):  # "crash" after step 3; the last save was after step 2
            state, _ = _STEP(state, _batch(i), key)
            mgr.save(i + 1, state)
    _, fresh = _state(5)
    with checkpoints.CheckpointManager(tmp_path, save_interval_steps=2) as mgr:
        restored = mgr.restore_latest(fresh)
    state = restored.state
    assert restored.step == 2 and int(jax.device_get(state["optimizer"]["step"][...])) == 2
    for i in range(restored.step, 4):
        state, _ = _STEP(state, _batch(i), key)
    _assert_trees_equal(state, straight)


def _shard(state, mesh, axes):
    """Shards each leaf's largest divisible dim over `axes` (fsdp-like), else replicates."""
    size = int(np.prod([mesh.shape[a] for a in axes]))

    def spec(x):
        dims = [d for d in np.argsort(x.shape)[::-1] if x.shape[d] % size == 0 and x.shape[d] > 1]
        if not dims:
            return NamedSharding(mesh, P())
        parts = [None] * x.ndim
        parts[dims[0]] = axes if len(axes) > 1 else axes[0]
        return NamedSharding(mesh, P(*parts))

    return jax.device_put(state, jax.tree.map(spec, state))


def test_resharded_restore_fsdp8_to_fsdp_tp_2x4(tmp_path):
    devices = np.array(jax.devices()[:8])
    fsdp = Mesh(devices.reshape(8), ("fsdp",), axis_types=(AxisType.Auto,))
    fsdp_tp = Mesh(devices.reshape(2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    _, state = _state(0)
    state, _ = _STEP(state, _batch(0), jax.random.key(0))
    saved = _shard(state, fsdp, ("fsdp",))
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(saved))
    with checkpoints.CheckpointManager(tmp_path, save_interval_steps=1) as mgr:
        mgr.save(1, saved)

    # target: the layout a 2x4 fsdp_tp run would build (here: tensor on the largest dim,
    # fsdp on the next), as abstract arrays; no values needed.
    def tp_spec(x):
        parts = [None] * x.ndim
        order = list(np.argsort(x.shape)[::-1])
        for axis, n in (("tensor", 4), ("fsdp", 2)):
            for d in order:
                if parts[d] is None and x.shape[d] % n == 0 and x.shape[d] > 1:
                    parts[d] = axis
                    break
        return NamedSharding(fsdp_tp, P(*parts))

    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=tp_spec(x)),
                          state)
    with checkpoints.CheckpointManager(tmp_path) as mgr:
        restored = mgr.restore_latest(target).state
    jax.tree.map(lambda x, t: x.sharding == t.sharding or pytest.fail(f"{x.sharding}"),
                 restored, target)
    _assert_trees_equal(restored, state)


def test_mismatched_model_is_a_clear_error_and_deletes_nothing(tmp_path):
    _, state = _state(0)
    with checkpoints.CheckpointManager(tmp_path, save_interval_steps=1) as mgr:
        mgr.save(1, state, config_text="x")
    before = _listing(tmp_path)
    wider = families.DecoderOnlyModel(layers.TransformerConfig(**{**CFG.__dict__, "emb_dim": 48}))
    # the target only needs shapes: what a run with the wider config would build
    abstract = nnx.eval_shape(lambda: train_state.TrainState(wider.make_module(0), _ADAMW.tx))
    _, other = nnx.split(abstract)
    with checkpoints.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ValueError) as err:
            mgr.restore_latest(other)
    message = str(err.value)
    assert "model/embed/embedding" in message
    assert "(64, 32)" in message and "(64, 48)" in message
    assert "Nothing in the checkpoint directory was changed" in message
    assert _listing(tmp_path) == before


def test_waits_for_async_save_when_the_loop_raises(tmp_path):
    _, state = _state(0)
    with pytest.raises(RuntimeError, match="boom"):
        with checkpoints.CheckpointManager(tmp_path, save_interval_steps=1) as mgr:
            mgr.save(3, state)
            raise RuntimeError("boom")
    with checkpoints.CheckpointManager(tmp_path) as mgr:
        assert mgr.latest_step() == 3
        _assert_trees_equal(mgr.restore(3, state).state, state)


def _two_steps(directory):
    """Checkpoints at steps 1 and 2 of a real train state; returns {step: host state}."""
    _, state = _state(0)
    saved = {}
    with checkpoints.CheckpointManager(directory, save_interval_steps=1, max_to_keep=5,
                                       async_save=False) as mgr:
        for step in (1, 2):
            state, _ = _STEP(state, _batch(step), jax.random.key(0))
            saved[step] = jax.device_get(state)
            mgr.save(step, state, data_iterator={"next_index": step},
                     run={"identity": {"schedule": {"train_steps": 20}}, "step": step})
    return saved


def _biggest_array_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()
                and "ocdbt" in str(p) and "/d/" in str(p)), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    f = _biggest_array_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_a_bit(step_dir):
    f = _biggest_array_file(step_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


def _drop_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("damage", [_truncate, _flip_a_bit, _drop_metadata],
                         ids=["truncated", "bit-flipped", "no-metadata"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    saved = _two_steps(tmp_path)
    damage(tmp_path / "2")
    good_before = _listing(tmp_path / "1")
    with checkpoints.CheckpointManager(tmp_path) as mgr, caplog.at_level("WARNING"):
        restored = mgr.restore_latest(_state(0)[1], data_iterator=_Iterator())
        assert mgr.all_steps() == [1]
    assert restored.step == 1 and restored.data.next_index == 1 and restored.run["step"] == 1
    _assert_trees_equal(jax.device_get(restored.state), saved[1])
    assert f"{tmp_path / '2'} is damaged and was moved to" in caplog.text
    moved = list((tmp_path / "damaged").iterdir())  # moved aside, not deleted
    assert len(moved) == 1 and moved[0].name.startswith("2-")
    assert _listing(tmp_path / "1") == good_before  # the good one untouched


def test_a_state_with_nan_is_never_saved(tmp_path):
    _, state = _state(0)
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan)
                       if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    with checkpoints.CheckpointManager(tmp_path, save_interval_steps=1) as mgr:
        mgr.save(1, state)
        with pytest.raises(checkpoints.NonFiniteStateError, match="step 2 holds NaN or Inf"):
            mgr.save(2, bad)
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1]


def test_newest_run_item_is_read_alone(tmp_path):
    _two_steps(tmp_path)
    with checkpoints.CheckpointManager(tmp_path, create=False) as mgr:
        assert mgr.newest_run_item() == {"identity": {"schedule": {"train_steps": 20}},
                                         "step": 2}

# ------------------------------------------------------------------------------ params only


def _params(seed=0, cfg=CFG):
    return nnx.state(families.DecoderOnlyModel(cfg).make_module(seed), nnx.Param)


def test_params_checkpoint_round_trip_with_its_config(tmp_path):
    params = _params(0)
    path = checkpoints.save_params(tmp_path / "imported", params, config_text="MODEL = 1\n")
    assert {"params", "config"} <= {p.name for p in path.iterdir()}
    restored = checkpoints.restore_params(path, checkpoints.abstract_like(_params(1)))
    _assert_trees_equal(restored, params)
    assert checkpoints.stored_config(path) == "MODEL = 1\n"
    assert checkpoints.stored_config(
        checkpoints.save_params(tmp_path / "bare", params)) is None
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoints.save_params(path, params)


def test_restore_params_reads_the_model_of_a_training_checkpoint_onto_another_mesh(tmp_path):
    model = families.DecoderOnlyModel(CFG)
    fsdp = partitioning.make_mesh({"fsdp": 8})
    with checkpoints.CheckpointManager(tmp_path / "run" / "checkpoints") as mgr:
        graphdef, state, restored_step = train_state.init_or_restore(
            model, _ADAMW.tx, fsdp, "fsdp", seed=3, ckpt=mgr)
        assert restored_step is None
        mgr.save(1, state, force=True)
    expected = train_state.params_of(graphdef, state)
    _, abstract = partitioning.abstract_sharded(
        model.make_module, partitioning.make_mesh({"fsdp": 2, "tensor": 4}), "fsdp_tp")
    target = abstract.filter(nnx.Param)
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints",
                 tmp_path / "run" / "checkpoints" / "1"):
        restored = checkpoints.restore_params(path, target)
        _assert_trees_equal(restored, expected)  # the params only: no optimizer leaves
        jax.tree.map(lambda x, t: x.sharding == t.sharding or pytest.fail(f"{x.sharding}"),
                     restored, target)


def test_restore_params_names_the_first_mismatching_parameter_and_both_shapes(tmp_path):
    path = checkpoints.save_params(tmp_path / "p", _params(0))
    other = families.DecoderOnlyModel(layers.TransformerConfig(**{**CFG.__dict__, "mlp_dim": 80}))
    with pytest.raises(ValueError) as err:
        checkpoints.restore_params(path, partitioning.abstract_params(other.make_module))
    lines = str(err.value).splitlines()
    assert "3 differences" in lines[0]
    assert lines[1].strip() == ("decoder/layers/mlp/wi_0/value: checkpoint shape (2, 32, 64) "
                                "!= model shape (2, 32, 80)")
    assert "--gin_out" in lines[-1]


def test_restore_params_from_a_directory_without_parameters_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no parameters.*params checkpoint"):
        checkpoints.restore_params(tmp_path, checkpoints.abstract_like(_params(0)))
