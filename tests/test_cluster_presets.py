"""Every shipped experiment works on its mesh's processes with the defaults it ships:
the rows of each process, the stream shards and the eval batch are derived and valid,
checked without devices and without compiling (`planner.data_layouts`, which the plan
report prints).

Layouts: one process per node (all of its GPUs) and one process per GPU (as `srun`
starts one task per GPU); the CPU demos run in one process.
"""
import pathlib

import gin
import pytest

from test_partitioning import _FakeGpu
from t5x_like import launch
from t5x_like.data import stream
from t5x_like.model import partitioning
from t5x_like.planning import planner

GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin_configs"
# Training experiments: an RLHF run (it includes runs/rlhf.gin) reads prompts, not a
# training data stream.
EXPERIMENTS = sorted(p for p in (GIN_DIR / "experiments").glob("*.gin")
                     if "runs/rlhf.gin" not in p.read_text())


def _experiment(path):
    """(MESH_CONFIG, the train.DataConfig, EVAL_CONFIG) of an experiment gin file."""
    gin.clear_config()
    try:
        launch.parse_gin([str(path)], [])
        mesh_cfg, evaluation = (gin.query_parameter(f"{name}/macro.value")
                                .scoped_configurable_fn()
                                for name in ("MESH_CONFIG", "EVAL_CONFIG"))
        data = gin.query_parameter("train.train.data").scoped_configurable_fn()
        return mesh_cfg, data, evaluation
    finally:
        gin.clear_config()


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_splits_its_data_over_its_processes(path):
    mesh_cfg, data, evaluation = _experiment(path)
    layouts = planner.data_layouts(mesh_cfg, data, evaluation)
    cluster = mesh_cfg.devices_per_node is not None
    for name in ("process per node", "process per device") if cluster else ("process per node",):
        layout = layouts[name]
        assert "error" not in layout, (name, layout)
        assert layout["rows_per_process"] * layout["row_groups"] == data.batch_size
        assert layout["stream_shards"] % layout["row_groups"] == 0
    batch_shards = mesh_cfg.global_shape["data"] * mesh_cfg.global_shape["fsdp"]
    assert layouts["eval_rows_per_step"] % batch_shards == 0
    assert layouts["eval_rows_per_step"] >= 16


def test_every_shard_is_made_by_one_group_of_processes():
    """Llama 3 70B on 8 nodes, one process per GPU: the 8 processes of a node hold one
    slice of the batch (tensor 8 inside the node) and make the same shard."""
    mesh_cfg, data, _ = _experiment(GIN_DIR / "experiments" / "llama3_70b_h100_8nodes.gin")
    devices = [_FakeGpu(i, i, i // 8) for i in range(mesh_cfg.num_devices)]
    rows = partitioning.rows_of_processes(mesh_cfg.device_array(devices),
                                          partitioning.MESH_AXES, data.batch_size)
    makers = {}
    for p, r in rows.items():
        for k in stream.shards_for_rows(8, data.batch_size, r.ranges):
            makers.setdefault(k, set()).add(p // 8)  # the node of process p
    assert makers == {k: {k} for k in range(8)}
    assert sum(r.counts for r in rows.values()) == 8  # one process per group counts rows
    with pytest.raises(ValueError, match=r"stream_shards=2 must divide BATCH_SIZE=64 .* be "
                                         r"a multiple of 8"):
        stream.shards_for_rows(2, data.batch_size, rows[0].ranges)
