"""Compile time of a train step against the number of layers: the scan over layers
(TransformerConfig.scan_layers) makes it nearly independent of depth.

    .venv/bin/python bench/compile_bench.py [--config.model=tiny_llama] \
        [--config.layers=4,32] [--config.devices=8] [--config.rules=fsdp] \
        [--config.batch_size=8] [--config.length=128] [--config.repeats=3]

For each layer count: lower + compile of train_state.make_train_step on abstract sharded
state (nothing allocated), `repeats` times in fresh jit objects (jax's compile cache is
cleared between them), the median printed; then the ratio of the deepest to the
shallowest. The same with scan_layers=False for contrast (`--config.unrolled=True`).
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "tiny_llama"  # gin_configs/models/<model>.gin
    config.layers = "4,32"
    config.devices = 8
    config.rules = "fsdp"
    config.batch_size = 8
    config.length = 128
    config.repeats = 3
    config.unrolled = False
    return config


_CONFIG = config_flags.DEFINE_config_dict("config", default_config())


def compile_seconds(layers: int, config) -> float:
    """Median seconds to lower and compile the train step of `layers` layers."""
    import gin  # noqa: PLC0415

    from t5x_like import launch
    from t5x_like.model import partitioning
    from t5x_like.planning import planner  # noqa: PLC0415
    from t5x_like.training import optimizers

    gin.clear_config()
    launch.parse_gin([f"models/{config.model}.gin"], [
        f"layers.TransformerConfig.num_decoder_layers = {layers}",
        f"layers.TransformerConfig.scan_layers = {not config.unrolled}"])
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    mesh = partitioning.make_mesh({"fsdp": config.devices}, jax.devices()[:config.devices])
    times = []
    for _ in range(config.repeats):
        jax.clear_caches()
        start = time.perf_counter()
        planner._compile(model, optimizers.adamw_llama2(1e-3, 1, 10), mesh,
                      partitioning.get_rules(config.rules), config.batch_size,
                      {"targets": config.length}, 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(_):
    config = _CONFIG.value
    jax.config.update("jax_num_cpu_devices", config.devices)
    counts = [int(n) for n in config.layers.split(",")]
    seconds = {n: compile_seconds(n, config) for n in counts}
    kind = "unrolled" if config.unrolled else "scanned"
    for n, s in seconds.items():
        print(f"{config.model}, {n} layers ({kind}), {config.devices} devices "
              f"{config.rules}: compile {s:.2f} s (median of {config.repeats})")
    print(f"ratio {max(counts)} / {min(counts)} layers: "
          f"{seconds[max(counts)] / seconds[min(counts)]:.2f}")


if __name__ == "__main__":
    app.run(main)
